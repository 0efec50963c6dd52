"""What a package needs to add its subcommands to ``cppo`` (``shared.cli`` finds them by entry point)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

from pydantic_settings import BaseSettings, CliSettingsSource

# What ``add_subparsers`` returns; argparse gives it no public name.
Subcommands = argparse._SubParsersAction
AddCommands = Callable[[Subcommands], None]
Settings = TypeVar("Settings", bound=BaseSettings)


def settings_command(
    parser: argparse.ArgumentParser, settings_class: type[Settings], run: Callable[[Settings], None]
) -> None:
    """A flag for every settings field (flags override ``CPPO_*`` variables, which override defaults); the
    command calls ``run`` with the settings."""
    flags = CliSettingsSource(settings_class, root_parser=parser)
    parser.set_defaults(
        handler=lambda args: run(settings_class(_cli_settings_source=flags(parsed_args=args)))
    )
