"""``cppo rollout-server``: check the settings, show them, and serve."""

from __future__ import annotations

import uvicorn
from rich.console import Console
from rich.table import Table

from rollout_server.app import create_app
from rollout_server.config import RolloutSettings


def show_settings(settings: RolloutSettings) -> None:
    table = Table(title="rollout server settings", show_header=False)
    for name, value in settings.model_dump().items():
        table.add_row(name, "********" if name == "api_key" and value is not None else str(value))
    Console(stderr=True).print(table)


def serve(settings: RolloutSettings) -> None:
    problem = settings.weights_update_problem()
    if problem:
        raise ValueError(problem)
    show_settings(settings)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)
