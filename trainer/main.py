"""The trainer's commands: ``cppo train``, ``cppo stack up``, ``cppo export`` and ``cppo inspect`` (also
``python -m trainer``, which is ``cppo train`` for launchers: ``torchrun -m trainer``,
``deepspeed --module trainer``)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from shared.commands import Subcommands

if TYPE_CHECKING:  # trainer.config imports torch (through the objective): not for `cppo --help`
    from trainer.config import TrainConfig


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
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in a run_dir that holds a run, after moving that run aside (RUN_DIR.replaced-TIME)",
    )
    # The `deepspeed` launcher passes --local_rank; the LOCAL_RANK variable it also sets is what is read.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--help-config", action="store_true", help="list every config key with its type, default and meaning"
    )


def _print_fields() -> None:
    """Every key as a short entry, wrapped to the terminal (80 columns when piped) and never cut: a
    table cut keys and defaults short at 80 columns."""
    from trainer.config import describe_fields

    width = shutil.get_terminal_size((80, 24)).columns
    for key, type_name, default, description in describe_fields():
        print(textwrap.fill(f"{key}: {type_name} = {default}", width, subsequent_indent="      "))
        print(textwrap.fill(description, width, initial_indent="    ", subsequent_indent="    "))


def _config(args: argparse.Namespace) -> TrainConfig | None:
    """The run's config from the file and overrides; None once ``--help-config`` has listed the keys."""
    if args.help_config:
        _print_fields()
        return None
    from trainer.config import load_config

    config = load_config(args.config, args.overrides)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return config


def _name_the_accelerator() -> None:
    """Tell DeepSpeed what it runs on before it is imported: left to guess on a CPU-only machine, it
    says so in a warning on every command."""
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


def run_train(args: argparse.Namespace) -> None:
    _name_the_accelerator()
    if (config := _config(args)) is not None:
        from trainer.loop import train

        train(config, resume=args.resume, overwrite=args.overwrite)


def run_stack_up(args: argparse.Namespace) -> None:
    _name_the_accelerator()
    if (config := _config(args)) is not None:
        from trainer.stack import stack_up

        stack_up(config, resume=args.resume, overwrite=args.overwrite)


def run_export(args: argparse.Namespace) -> None:
    _name_the_accelerator()
    from trainer.checkpoint import export

    out = export(args.checkpoint, args.out, merge=args.merge)
    print(f"exported {args.checkpoint} to {out}")


def run_inspect(args: argparse.Namespace) -> None:
    _name_the_accelerator()
    from trainer.checkpoint import is_adapter, resolve, write_merged
    from trainer.config import load_config
    from trainer.inspect_page import write_inspection

    if args.run is None and args.model is None:
        raise ValueError("say what to inspect: --run RUN_DIR, or --model DIR")
    config_file = args.config
    if args.run is not None and config_file is None:
        config_file = args.run / "config.yaml"
        if not config_file.is_file():
            raise ValueError(f"{args.run} is not a run folder (no config.yaml)")
    overrides = [f"data.test_split={args.split}", *args.overrides]
    if args.data is not None:
        overrides.append(f"data.path={args.data}")
    config = load_config(config_file, overrides)
    model = Path(args.model or resolve(args.run, "latest") / "policy")
    out = args.out or (args.run / "inspect.html" if args.run is not None else Path("inspect.html"))
    with tempfile.TemporaryDirectory(prefix="cppo-inspect-") as scratch:
        if is_adapter(model):
            # A LoRA run's checkpoint holds its adapter; the servers and the passes take a whole model.
            model = write_merged(model, Path(scratch))
        written = write_inspection(config, str(model), args.prompts, out, args.rollout_url, args.reward_url)
    print(f"wrote {written}")


def add_commands(commands: Subcommands) -> None:
    train = commands.add_parser(
        "train",
        help="train a policy with GRPO, PAPO or CPPO against running rollout and reward servers",
        description="Train with the config file and overrides. Launch several processes with torchrun, "
        "deepspeed or accelerate launch (as `python -m trainer`); one process needs no launcher.",
    )
    add_train_arguments(train)
    train.set_defaults(handler=run_train)

    stack = commands.add_parser(
        "stack",
        help="run the whole system locally: servers as child processes, then training",
        description="Manage a local stack.",
    )
    stack_commands = stack.add_subparsers(dest="stack_command", metavar="ACTION", required=True)
    up = stack_commands.add_parser(
        "up",
        help="build missing demo inputs, start the servers, train, stop everything",
        description="Build the tiny model and synthetic data if the config's local paths are missing, start "
        "a rollout server and a reward server on free ports, train, and shut everything down.",
    )
    add_train_arguments(up)
    up.set_defaults(handler=run_stack_up)

    export = commands.add_parser(
        "export",
        help="write a checkpoint's policy as a Hugging Face folder the rollout server can serve",
        description="Copy a checkpoint's policy (weights, config, processor) into a Hugging Face folder; "
        "of a LoRA run, its adapter in PEFT's format (PeftModel.from_pretrained loads it onto the base "
        "model it names), or with --merge the base model with the adapter merged in.",
    )
    export.add_argument("checkpoint", type=Path, help="a checkpoint folder (run_dir/checkpoints/step-...)")
    export.add_argument("out", type=Path, help="output folder")
    export.add_argument(
        "--merge",
        action="store_true",
        help="of a LoRA run: write the whole merged model, which the rollout server serves (a full "
        "fine-tuning checkpoint is whole already)",
    )
    export.set_defaults(handler=run_export)

    inspect = commands.add_parser(
        "inspect",
        help="write an HTML page of the perception tokens CPPO selects in a model's responses",
        description="Sample a few test prompts (through a rollout server and a reward server started for "
        "the purpose, or the ones given), run the teacher-forced passes on I, I+ and I-, and write one "
        "self-contained HTML page: the three images, each response's tokens coloured by the entropy rise "
        "without the image's information, the selected tokens outlined, and every number per token.",
    )
    inspect.add_argument("--run", type=Path, help="a run folder: its latest checkpoint and its config.yaml")
    inspect.add_argument("--model", help="a model folder (default with --run: the latest checkpoint's)")
    inspect.add_argument("--config", type=Path, help="YAML training config (default with --run: the run's)")
    inspect.add_argument("--data", help="the dataset folder or hub name (default: the config's data.path)")
    inspect.add_argument("--split", default="test", help="the split to take prompts from (default: test)")
    inspect.add_argument(
        "--prompts", type=int, default=8, help="how many prompts, from the first (default: 8)"
    )
    inspect.add_argument("--rollout-url", help="a running rollout server serving the same model")
    inspect.add_argument("--reward-url", help="a running reward server")
    inspect.add_argument("--out", type=Path, help="the page (default: RUN_DIR/inspect.html or inspect.html)")
    inspect.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="override a config key, e.g. rollout.n=4"
    )
    inspect.set_defaults(handler=run_inspect)
