"""The rollout server's part of ``cppo``: ``cppo rollout-server`` and ``cppo openapi rollout-server``."""

from __future__ import annotations

from typing import Any

from rollout_server.config import RolloutSettings
from shared.commands import Subcommands, settings_command


def _serve(settings: RolloutSettings) -> None:
    # The server imports torch and transformers: not for `cppo --help`.
    from rollout_server.main import serve

    serve(settings)


def add_commands(commands: Subcommands) -> None:
    rollout = commands.add_parser(
        "rollout-server",
        help="serve a VLM: rollouts with perturbed views, OpenAI chat completions, weight updates",
        description="Serve a vision-language model over HTTP. Every flag can also be set as an environment "
        "variable: --max-batch-size is CPPO_ROLLOUT_MAX_BATCH_SIZE.",
    )
    settings_command(rollout, RolloutSettings, _serve)


def openapi_schema() -> dict[str, Any]:
    # Building an app loads no model and starts no worker: that happens at start-up.
    from rollout_server.app import create_app

    return create_app(RolloutSettings(model="MODEL")).openapi()
