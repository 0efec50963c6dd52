"""``cppo stack up``: the whole system on one machine, as child processes, then training.

Builds the tiny model and the synthetic dataset where the config points at local folders that do not
exist yet, starts a rollout server and a reward server on free ports, waits for ``/ready``, trains, and
stops them. An error, Ctrl-C, SIGTERM, SIGHUP or a dead child stops everything; checkpoints are atomic,
so none is left half-written.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import FrameType

from rich.console import Console

from shared.launch import Service, running_service
from trainer.config import TrainConfig
from trainer.loop import StopTraining, check_inputs, train
from trainer.rundir import check_run_dir, move_aside


def _local_and_missing(path: str, run_dir: Path) -> bool:
    candidate = Path(path)
    local = candidate.is_absolute() or path.startswith(".") or candidate.is_relative_to(run_dir)
    return local and not candidate.exists()


def prepare_inputs(config: TrainConfig, console: Console) -> None:
    """The tiny model and the synthetic data, where the config wants them and they are missing."""
    if _local_and_missing(config.model.path, config.run_dir):
        from shared.tiny_model import build_tiny_model

        console.print(f"building the tiny model in {config.model.path} (seed {config.seed})")
        build_tiny_model(config.model.path, seed=config.seed)
    if _local_and_missing(config.data.path, config.run_dir):
        from shared.synth_data import SynthSettings, write_dataset

        console.print(f"rendering the synthetic dataset in {config.data.path}")
        write_dataset(config.data.path, SynthSettings())


def _watch(services: dict[str, Service]) -> None:
    for name, service in services.items():
        code = service.process.poll()
        if code is not None:
            end = service.tail()
            raise StopTraining(f"the {name} exited with code {code}; the end of {service.log}:\n{end}")


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP interrupt like Ctrl-C, so that the servers are stopped on the way out: by
    default they end this process at once, and its children would live on, adopted by init."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {number: signal.signal(number, interrupt) for number in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def stack_up(config: TrainConfig, resume: str | None = None, overwrite: bool = False) -> Path:
    with _signals_interrupt():
        return _stack_up(config, resume, overwrite)


def _stack_up(config: TrainConfig, resume: str | None, overwrite: bool) -> Path:
    console = Console(stderr=True)
    # Before the servers start: they write their logs into the run folder.
    resume = check_run_dir(config.run_dir, resume, overwrite)
    if overwrite and (aside := move_aside(config.run_dir)) is not None:
        console.print(f"moved the earlier run in {config.run_dir} to {aside}")
    prepare_inputs(config, console)
    check_inputs(config)
    logs = config.run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rows = config.train.prompts_per_step * config.rollout.n
    rollout_args = [
        "--model",
        config.model.path,
        "--backend",
        "transformers",
        "--host",
        "127.0.0.1",
        "--weights-root",
        str(config.sync_dir().resolve().parent),
        "--max-batch-size",
        str(max(64, rows)),
    ]
    # The server sizes the images other clients send as the trainer sizes the dataset's.
    for flag, pixels in (("--min-pixels", config.data.min_pixels), ("--max-pixels", config.data.max_pixels)):
        if pixels is not None:
            rollout_args += [flag, str(pixels)]
    with ExitStack() as stack:
        console.print("starting the rollout server and the reward server")
        rollout = stack.enter_context(
            running_service("rollout-server", rollout_args, logs / "rollout-server.log")
        )
        reward = stack.enter_context(
            running_service("reward-server", ["--host", "127.0.0.1"], logs / "reward-server.log")
        )
        console.print(f"rollout server {rollout.url}, reward server {reward.url} (logs in {logs})")
        wired = config.model_copy(
            update={
                "rollout": config.rollout.model_copy(update={"urls": [rollout.url], "discover": None}),
                "reward": config.reward.model_copy(update={"url": reward.url}),
            }
        )
        services = {"rollout server": rollout, "reward server": reward}
        return train(wired, resume=resume, health_check=lambda: _watch(services))
