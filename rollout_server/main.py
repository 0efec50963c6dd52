"""``cppo rollout-server``: check the settings, show them, and serve."""

from __future__ import annotations

import uvicorn

from rollout_server.app import create_app
from rollout_server.config import RolloutSettings
from shared.settings import show_settings


def serve(settings: RolloutSettings) -> None:
    problem = settings.weights_update_problem()
    if problem:
        raise ValueError(problem)
    show_settings(settings, "rollout server settings")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)
