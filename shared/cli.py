"""The ``cppo`` command line: one entry point, a subcommand per job.

Heavy imports (torch, transformers) happen inside the subcommands, so ``cppo --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError
from pydantic_settings import BaseSettings, CliSettingsSource

from reward_server.config import RewardSettings
from rollout_server.config import RolloutSettings

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


def _settings_command(
    parser: argparse.ArgumentParser, settings_class: type[BaseSettings], run: Callable[[BaseSettings], None]
) -> None:
    """A flag for every settings field (flags override ``CPPO_*`` variables, which override defaults)."""
    flags = CliSettingsSource(settings_class, root_parser=parser)
    parser.set_defaults(
        handler=lambda args: run(settings_class(_cli_settings_source=flags(parsed_args=args)))
    )


def _serve_rollouts(settings: BaseSettings) -> None:
    from rollout_server.main import serve

    serve(settings)


def _serve_rewards(settings: BaseSettings) -> None:
    from reward_server.main import serve

    serve(settings)


def _openapi(args: argparse.Namespace) -> None:
    # Building an app loads no model and starts no worker: that happens at start-up.
    if args.service == "rollout-server":
        from rollout_server.app import create_app as create_rollout_app

        app = create_rollout_app(RolloutSettings(model="MODEL"))
    else:
        from reward_server.app import create_app as create_reward_app

        app = create_reward_app(RewardSettings())
    print(json.dumps(app.openapi(), indent=2, sort_keys=True))


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cppo",
        description="Contrastive Perception Policy Optimization for vision-language models.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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
        choices=("transformers", "vllm"),
        default="transformers",
        help="transformers: smallest, for the CPU backend; vllm: head size 64, as vLLM kernels need "
        "(default: %(default)s)",
    )
    tiny.add_argument("--seed", type=_non_negative_int, default=0, help="weight init seed (default: 0)")
    tiny.set_defaults(handler=_tiny_model)

    synth = commands.add_parser(
        "synth-data",
        help="render a synthetic perception dataset (EasyR1/ViRL39K layout)",
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

    rollout = commands.add_parser(
        "rollout-server",
        help="serve a VLM: rollouts with perturbed views, OpenAI chat completions, weight updates",
        description="Serve a vision-language model over HTTP. Every flag can also be set as an environment "
        "variable: --max-batch-size is CPPO_ROLLOUT_MAX_BATCH_SIZE.",
    )
    _settings_command(rollout, RolloutSettings, _serve_rollouts)

    reward = commands.add_parser(
        "reward-server",
        help="serve reward functions: /v1/score and OpenRLHF's /get_reward",
        description="Score model responses over HTTP. Every flag can also be set as an environment "
        "variable: --workers is CPPO_REWARD_WORKERS.",
    )
    _settings_command(reward, RewardSettings, _serve_rewards)

    from trainer.main import add_train_arguments, run_export, run_stack_up, run_train

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
        description="Copy a checkpoint's policy (weights, config, processor) into a Hugging Face folder.",
    )
    export.add_argument("checkpoint", type=Path, help="a checkpoint folder (run_dir/checkpoints/step-...)")
    export.add_argument("out", type=Path, help="output folder")
    export.set_defaults(handler=run_export)

    openapi = commands.add_parser(
        "openapi",
        help="print a service's OpenAPI schema (the API reference in docs/api)",
        description="Print the OpenAPI schema of a service as JSON.",
    )
    openapi.add_argument("service", choices=("rollout-server", "reward-server"), help="the service")
    openapi.set_defaults(handler=_openapi)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        handler(args)
    except ValidationError as error:
        print(f"cppo {args.command}: error: {_describe(error)}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as error:
        print(f"cppo {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cppo {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
