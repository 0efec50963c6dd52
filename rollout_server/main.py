"""``cppo rollout-server``: check the settings, show them, and serve."""

from __future__ import annotations

from rollout_server.app import create_app
from rollout_server.config import RolloutSettings
from shared.hub import reference_problem
from shared.server import serve as serve_app
from shared.settings import exposure_problem


def serve(settings: RolloutSettings) -> None:
    problem = exposure_problem(settings.host, settings.api_key, settings.insecure_no_auth)
    problem = problem or reference_problem(settings.model, "--model", "config.json")
    if problem:
        raise ValueError(problem)
    serve_app(create_app(settings), settings, "rollout server settings")
