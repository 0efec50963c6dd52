"""``cppo reward-server``: check the settings, show them, and serve."""

from __future__ import annotations

import logging
import re

import uvicorn

from reward_server.app import create_app
from reward_server.config import RewardSettings
from shared.settings import exposure_problem, show_settings, warn_if_exposed

_KEY_IN_QUERY = re.compile(r"(api_key=)[^&\s]*")


class RedactKeys(logging.Filter):
    """Hides ``?api_key=...`` (how OpenRLHF passes the key to /get_reward) in uvicorn's access log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _KEY_IN_QUERY.sub(r"\1********", arg) if isinstance(arg, str) else arg for arg in record.args
            )
        return True


def serve(settings: RewardSettings) -> None:
    """Refuse an insecure address, load the plugins (a bad one is a ``ValueError``), then serve."""
    problem = exposure_problem(settings.host, settings.api_key, settings.insecure_no_auth)
    if problem:
        raise ValueError(problem)
    app = create_app(settings)
    show_settings(settings, "reward server settings")
    warn_if_exposed(settings.host, settings.api_key)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=settings.drain_s,
    )
    logging.getLogger("uvicorn.access").addFilter(RedactKeys())  # after Config, which sets up logging
    uvicorn.Server(config).run()
