"""``cppo rollout-server``: check the settings, show them, and serve."""

from __future__ import annotations

import uvicorn

from rollout_server.app import create_app
from rollout_server.config import RolloutSettings
from shared.settings import exposure_problem, show_settings, warn_if_exposed


def serve(settings: RolloutSettings) -> None:
    problem = exposure_problem(settings.host, settings.api_key, settings.insecure_no_auth)
    if problem:
        raise ValueError(problem)
    show_settings(settings, "rollout server settings")
    warn_if_exposed(settings.host, settings.api_key)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=settings.drain_s,
    )
