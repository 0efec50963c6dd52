"""The ``cppo`` command line: one entry point, a subcommand per job.

Each service adds its own subcommands (a ``cppo.commands`` entry point: ``add_commands(subcommands)``) and
its API schema (a ``cppo.openapi`` entry point), both declared in pyproject.toml, so ``shared`` imports no
service. Heavy imports (torch, transformers) happen inside the subcommands, so ``cppo --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path

from pydantic import ValidationError

from shared.commands import AddCommands, Subcommands

Handler = Callable[[argparse.Namespace], None]


def _tiny_model(args: argparse.Namespace) -> None:
    from shared.tiny_model import build_tiny_model

    start = time.perf_counter()
    out = build_tiny_model(args.dir, profile=args.profile, seed=args.seed)
    print(f"tiny Qwen2.5-VL ({args.profile} profile) written to {out} in {time.perf_counter() - start:.2f} s")


def _synth_data(args: argparse.Namespace) -> None:
    from shared.synth_data import SynthSettings, write_dataset

    settings = SynthSettings(train=args.train, test=args.test, seed=args.seed, image_size=args.image_size)
    out = write_dataset(args.dir, settings)
    print(f"synthetic dataset written to {out}: {args.train} train and {args.test} test examples")


def _openapi(args: argparse.Namespace) -> None:
    schema = entry_points(group="cppo.openapi")[args.service].load()()
    print(json.dumps(schema, indent=2, sort_keys=True))


def _describe(error: ValidationError) -> str:
    """Pydantic's errors as flags: ``--max-batch-size: Input should be greater than or equal to 1``."""
    problems = []
    for problem in error.errors():
        name = "--" + "-".join(str(part) for part in problem["loc"]).replace("_", "-")
        problems.append(f"{name}: {problem['msg']}")
    return "; ".join(problems)


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _add_shared_commands(commands: Subcommands) -> None:
    tiny = commands.add_parser(
        "tiny-model",
        help="build a tiny random Qwen2.5-VL (model, tokenizer, processor) offline",
        description="Build a tiny Qwen2.5-VL-architecture model with random weights, a locally trained "
        "tokenizer and an image processor, saved with save_pretrained so that the usual "
        "from_pretrained calls load it.",
    )
    tiny.add_argument("dir", type=Path, help="output folder (created if missing)")
    tiny.add_argument(
        "--profile",
        choices=("transformers", "vllm", "100mb"),
        default="transformers",
        help="transformers: smallest, for the CPU backend; vllm: head size 64, as vLLM kernels need; "
        "100mb: the vllm shape grown to ~100 MB of weights, for measuring weight sync (default: %(default)s)",
    )
    tiny.add_argument("--seed", type=_non_negative_int, default=0, help="weight init seed (default: 0)")
    tiny.set_defaults(handler=_tiny_model)

    synth = commands.add_parser(
        "synth-data",
        help="render a synthetic perception dataset (EasyR1 layout)",
        description="Render images of shapes with questions that need the image (colour, shape, count, "
        "position) and write train.parquet and test.parquet (columns problem, answer, images) plus the "
        "PNG files.",
    )
    synth.add_argument("dir", type=Path, help="output folder (created if missing)")
    synth.add_argument("--train", type=_non_negative_int, default=2000, help="train examples (default: 2000)")
    synth.add_argument("--test", type=_non_negative_int, default=200, help="test examples (default: 200)")
    synth.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default: 0)")
    synth.add_argument(
        "--image-size", type=int, default=112, help="image side in pixels, 56..1024 (default: 112)"
    )
    synth.set_defaults(handler=_synth_data)


def _add_openapi_command(commands: Subcommands) -> None:
    openapi = commands.add_parser(
        "openapi",
        help="print a service's OpenAPI schema (the API reference in docs/api)",
        description="Print the OpenAPI schema of a service as JSON.",
    )
    services = [entry.name for entry in entry_points(group="cppo.openapi")]
    openapi.add_argument("service", choices=services, help="the service")
    openapi.set_defaults(handler=_openapi)


def build_parser(commands: Sequence[AddCommands] | None = None) -> argparse.ArgumentParser:
    """The parser with the subcommands ``commands`` add; by default every one: shared's, then each installed
    ``cppo.commands`` entry point's, then ``openapi``."""
    if commands is None:
        installed = [entry.load() for entry in entry_points(group="cppo.commands")]
        commands = [_add_shared_commands, *installed, _add_openapi_command]
    parser = argparse.ArgumentParser(
        prog="cppo",
        description="Contrastive Perception Policy Optimization for vision-language models.",
    )
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in commands:
        add(subcommands)
    return parser


def main(argv: Sequence[str] | None = None, commands: Sequence[AddCommands] | None = None) -> int:
    """Run one ``cppo`` command line (``commands`` as in ``build_parser``); the exit code."""
    args = build_parser(commands).parse_args(argv)
    handler: Handler = args.handler
    try:
        handler(args)
    except ValidationError as error:
        print(f"cppo {args.command}: error: {_describe(error)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `cppo ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # as the Python docs advise
        return 0
    except (ValueError, OSError) as error:
        print(f"cppo {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cppo {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
