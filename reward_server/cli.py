"""The reward server's part of ``cppo``: ``cppo reward-server`` and ``cppo openapi reward-server``."""

from __future__ import annotations

from typing import Any

from reward_server.config import RewardSettings
from shared.commands import Subcommands, settings_command


def _serve(settings: RewardSettings) -> None:
    # The server imports uvicorn and the reward functions: not for `cppo --help`.
    from reward_server.main import serve

    serve(settings)


def add_commands(commands: Subcommands) -> None:
    reward = commands.add_parser(
        "reward-server",
        help="serve reward functions: /v1/score and OpenRLHF's /get_reward",
        description="Score model responses over HTTP. Every flag can also be set as an environment "
        "variable: --workers is CPPO_REWARD_WORKERS.",
    )
    settings_command(reward, RewardSettings, _serve)


def openapi_schema() -> dict[str, Any]:
    # Building an app starts no worker: that happens at start-up.
    from reward_server.app import create_app

    return create_app(RewardSettings()).openapi()
