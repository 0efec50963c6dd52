"""Settings of the reward server, read from flags and ``CPPO_REWARD_*`` environment variables.

Every field is a flag (``--item-timeout-s``) and an environment variable (``CPPO_REWARD_ITEM_TIMEOUT_S``);
a flag wins over the environment, which wins over the default. This module imports nothing heavy, so
``cppo --help`` stays instant: the reward functions and math-verify load when the server starts.
"""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.schemas import MAX_REWARD_WEIGHT, MAX_SCORE_ITEMS

PAPER_REWARD = "math:0.9,format:0.1"
"""The CPPO paper's reward: 0.9·accuracy + 0.1·format."""

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_\-]{0,63}")


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_reward_spec(spec: str) -> dict[str, float]:
    """``"math:0.9,format:0.1"`` -> ``{"math": 0.9, "format": 0.1}``; a bare ``"math"`` weighs 1.

    Only the syntax is checked here; whether the names exist is checked against the registry (plugins
    included) when the server starts.
    """
    weights: dict[str, float] = {}
    for part in spec.split(","):
        name, colon, weight_text = part.strip().partition(":")
        name = name.strip()
        if not _NAME.fullmatch(name):
            raise ValueError(f"{name!r} in {spec!r} is not a reward function name")
        if name in weights:
            raise ValueError(f"{name!r} appears more than once in {spec!r}")
        try:
            weight = float(weight_text) if colon else 1.0
        except ValueError:
            raise ValueError(f"the weight of {name!r} in {spec!r} is not a number") from None
        if not abs(weight) <= MAX_REWARD_WEIGHT:
            raise ValueError(
                f"the weight of {name!r} in {spec!r} is not a number within ±{MAX_REWARD_WEIGHT:g}"
            )
        weights[name] = weight
    return weights


class RewardSettings(BaseSettings):
    """How the reward server runs."""

    model_config = SettingsConfigDict(
        env_prefix="CPPO_REWARD_",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,
        extra="forbid",
    )

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(5000, ge=1, le=65535, description="port to listen on")
    api_key: SecretStr | None = Field(
        None,
        description="bearer token required on every route but /health, /ready and /metrics "
        "(/get_reward also takes it as ?api_key=, for OpenRLHF)",
    )
    insecure_no_auth: bool = Field(
        False, description="serve on a non-loopback address without an API key (trusted networks only)"
    )
    workers: int = Field(
        _usable_cores(), ge=1, le=256, description="scoring worker processes; defaults to the usable cores"
    )
    plugin: list[str] = Field(
        [],
        description="module name or .py file whose @reward_function functions are added to the registry; "
        "repeat the flag for several",
    )
    fast_lane_s: float = Field(
        0.5,
        gt=0,
        le=3600,
        description="longest one item may hold a worker of the fast lane; past it, an item of the built-in "
        "reward functions times out, and any other is moved to the slow lane (at most half the workers) and "
        "scored again there",
    )
    item_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="longest one item may take to score in the slow lane; past it: status 'timeout'",
    )
    openrlhf_reward: str = Field(
        PAPER_REWARD,
        description="reward POST /get_reward applies, as name:weight pairs or one name",
    )
    max_request_bytes: int = Field(256 * 2**20, ge=1, description="largest JSON request body, in bytes")
    max_queued_items: int = Field(
        10 * MAX_SCORE_ITEMS,
        ge=1,
        description="most items waiting for a worker (default: ten of the largest requests); a request "
        "past it gets 503",
    )
    worker_memory_mb: int = Field(
        2048, ge=0, description="address-space limit of each worker, in MiB (0: none)"
    )
    drain_s: float = Field(
        30.0, ge=0, description="after SIGTERM, seconds running requests may take before they are cancelled"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log verbosity")

    @field_validator("openrlhf_reward")
    @classmethod
    def _spec_syntax(cls, spec: str) -> str:
        parse_reward_spec(spec)
        return spec

    @field_validator("plugin")
    @classmethod
    def _plugins_named(cls, plugins: list[str]) -> list[str]:
        for plugin in plugins:
            if not plugin.strip():
                raise ValueError("a plugin must name a module or a .py file")
        return plugins

    def openrlhf_weights(self) -> dict[str, float]:
        return parse_reward_spec(self.openrlhf_reward)
