"""Checking and showing a service's effective settings at start-up."""

from __future__ import annotations

from pydantic import SecretStr
from pydantic_settings import BaseSettings
from rich.console import Console
from rich.table import Table

from shared.net import is_loopback


def exposure_problem(host: str, api_key: SecretStr | None, insecure_no_auth: bool) -> str | None:
    """Why a server must not start, if it must not: without a key, anyone who can reach the address can
    use it (and replace a rollout server's weights), so an address beyond loopback needs a key or an
    explicit ``--insecure-no-auth``, which ``warn_if_exposed`` then warns about."""
    if api_key is not None or insecure_no_auth or is_loopback(host):
        return None
    return (
        f"refusing to serve on {host} without an API key; set --api-key, "
        "or (on a trusted network only) --insecure-no-auth"
    )


def warn_if_exposed(host: str, api_key: SecretStr | None) -> None:
    if api_key is None and not is_loopback(host):
        Console(stderr=True).print(
            f"[bold red]warning:[/] serving on {host} with no API key (--insecure-no-auth): anyone who can "
            "reach this address can use this server"
        )


def show_settings(settings: BaseSettings, title: str) -> None:
    """Every setting as it will be used, on stderr; secrets print masked (``SecretStr`` masks itself)."""
    table = Table(title=title, show_header=False)
    for name in type(settings).model_fields:
        table.add_row(name, str(getattr(settings, name)))
    Console(stderr=True).print(table)
