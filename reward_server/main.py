"""``cppo reward-server``: check the settings, show them, and serve."""

from __future__ import annotations

import logging
import re

from reward_server.app import create_app
from reward_server.config import RewardSettings
from shared.server import serve as serve_app
from shared.settings import exposure_problem

_KEY_IN_QUERY = re.compile(r"(api_key=)[^&\s]*")


class RedactKeys(logging.Filter):
    """Hides ``?api_key=...`` (how OpenRLHF passes the key to /get_reward) in uvicorn's access log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _KEY_IN_QUERY.sub(r"\1********", arg) if isinstance(arg, str) else arg for arg in record.args
            )
        return True


def redact_keys_in_access_log() -> None:
    logging.getLogger("uvicorn.access").addFilter(RedactKeys())


def serve(settings: RewardSettings) -> None:
    """Refuse an insecure address, load the plugins (a bad one is a ``ValueError``), then serve."""
    problem = exposure_problem(settings.host, settings.api_key, settings.insecure_no_auth)
    if problem:
        raise ValueError(problem)
    app = create_app(settings)
    serve_app(app, settings, "reward server settings", redact_keys_in_access_log)
