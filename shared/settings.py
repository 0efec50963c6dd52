"""Showing a service's effective settings at start-up."""

from __future__ import annotations

from pydantic_settings import BaseSettings
from rich.console import Console
from rich.table import Table


def show_settings(settings: BaseSettings, title: str) -> None:
    """Every setting as it will be used, on stderr; secrets print masked (``SecretStr`` masks itself)."""
    table = Table(title=title, show_header=False)
    for name in type(settings).model_fields:
        table.add_row(name, str(getattr(settings, name)))
    Console(stderr=True).print(table)
