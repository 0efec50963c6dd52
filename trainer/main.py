"""The trainer's commands: ``cppo train``, ``cppo stack up`` and ``cppo export`` (also ``python -m trainer``,
which is ``cppo train`` for launchers: ``torchrun -m trainer``, ``deepspeed --module trainer``)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rich.console import Console
from rich.table import Table


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML training config (configs/demo.yaml, ...)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="override a config key, e.g. train.lr=1e-5"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CHECKPOINT",
        help="continue from a checkpoint folder, or the run's latest without a value",
    )
    # The `deepspeed` launcher passes --local_rank; the LOCAL_RANK variable it also sets is what is read.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--help-config", action="store_true", help="list every config key with its type, default and meaning"
    )


def _print_fields() -> None:
    from trainer.config import describe_fields

    table = Table(title="training config keys")
    for column in ("key", "type", "default", "description"):
        table.add_column(column)
    for row in describe_fields():
        table.add_row(*row)
    Console().print(table)


def run_train(args: argparse.Namespace) -> None:
    if args.help_config:
        _print_fields()
        return
    from trainer.config import load_config

    config = load_config(args.config, args.overrides)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from trainer.loop import train

    train(config, resume=args.resume)


def run_stack_up(args: argparse.Namespace) -> None:
    if args.help_config:
        _print_fields()
        return
    from trainer.config import load_config

    config = load_config(args.config, args.overrides)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from trainer.stack import stack_up

    stack_up(config, resume=args.resume)


def run_export(args: argparse.Namespace) -> None:
    from trainer.checkpoint import export

    out = export(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} to {out}")
