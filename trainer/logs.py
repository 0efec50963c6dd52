"""Where a run reports itself: ``metrics.jsonl`` (one object per step), TensorBoard, wandb when configured,
a progress bar, and at the end a summary table and a PNG of the learning curves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from trainer.config import TrainConfig

# Shown on the progress bar and in the summary, in this order.
KEY_METRICS = ("reward_mean", "accuracy_mean", "eval_accuracy_greedy", "cpl_loss", "entropy_mean")
CURVES = (
    ("reward_mean", "accuracy_mean"),
    ("eval_accuracy_greedy", "eval_accuracy_greedy_removed", "eval_accuracy_sampled", "eval_perception_gap"),
    ("pg_loss", "cpl_loss", "kl_loss"),
    ("entropy_mean", "perception_token_fraction", "clip_fraction"),
)


class RunLog:
    """Appends each step's metrics to every sink; only rank 0 makes one."""

    def __init__(
        self, config: TrainConfig, first_step: int, deepspeed: dict, console: Console | None = None
    ) -> None:
        self.run_dir = config.run_dir
        self.path = config.run_dir / "metrics.jsonl"
        self.console = console or Console(stderr=True)
        config.run_dir.mkdir(parents=True, exist_ok=True)
        # What this run resolved to, defaults, overrides and launcher included (secrets come out masked).
        (config.run_dir / "config.yaml").write_text(
            yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
        )
        (config.run_dir / "deepspeed.json").write_text(json.dumps(deepspeed, indent=2, default=str) + "\n")
        if first_step == 0 and self.path.exists():
            self.path.unlink()
        else:
            _drop_after(self.path, first_step)
        self.file = self.path.open("a")
        self.tensorboard = None
        if config.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(config.run_dir / "tensorboard"), purge_step=first_step + 1)
        self.wandb = None
        if config.log.wandb_project:
            import wandb

            self.wandb = wandb.init(
                project=config.log.wandb_project,
                dir=str(config.run_dir),
                config=config.model_dump(mode="json"),
            )
        self.progress = None
        if config.log.progress:
            self.progress = Progress(
                TextColumn("[bold]step {task.completed}/{task.total}"),
                BarColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[summary]}"),
                console=self.console,
            )
            self.task = self.progress.add_task(
                "train", total=config.train.steps, completed=first_step, summary=""
            )
            self.progress.start()

    def write(self, metrics: dict[str, float | int | None]) -> None:
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()
        }
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        step = int(metrics["step"])
        if self.tensorboard is not None:
            for name, value in clean.items():
                if name != "step" and isinstance(value, int | float):
                    self.tensorboard.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in clean.items() if isinstance(v, int | float)}, step=step)
        if self.progress is not None:
            shown = "  ".join(
                f"{k} {clean[k]:.3f}" for k in KEY_METRICS if isinstance(clean.get(k), int | float)
            )
            self.progress.update(self.task, completed=step, summary=shown)

    def figure(self, name: str, figure, step: int) -> None:
        """A matplotlib figure to TensorBoard and wandb (closed afterwards)."""
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Image(figure)}, step=step)
        if self.tensorboard is not None:
            self.tensorboard.add_figure(name, figure, step)
        import matplotlib.pyplot as plt

        plt.close(figure)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _drop_after(path: Path, step: int) -> None:
    """A resumed run rewrites the steps after its checkpoint, so each step is logged once."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics: list[dict], out: Path) -> Path:
    """The learning curves, one panel per group of related metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(CURVES), 1, figsize=(8, 2.6 * len(CURVES)), sharex=True)
    for axis, names in zip(axes, CURVES, strict=True):
        for name in names:
            points = [(m["step"], m[name]) for m in metrics if m.get(name) is not None]
            if points:
                steps, values = zip(*points, strict=True)
                axis.plot(steps, values, marker="o" if name.startswith("eval_") else None, label=name)
        axis.legend(loc="best", fontsize="small")
        axis.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def summary_table(metrics: list[dict]) -> Table:
    """First and last value of the key metrics, and the seconds spent per phase."""
    table = Table(title="training summary")
    table.add_column("metric")
    table.add_column("first", justify="right")
    table.add_column("last", justify="right")
    names = [
        *KEY_METRICS,
        "eval_accuracy_greedy_removed",
        "eval_accuracy_sampled",
        "eval_perception_gap",
        "perception_token_fraction",
        *sorted({k for m in metrics for k in m if k.startswith("perception_token_fraction/")}),
    ]
    for name in names:
        values = [m[name] for m in metrics if m.get(name) is not None]
        if values:
            table.add_row(name, f"{values[0]:.3f}", f"{values[-1]:.3f}")
    for phase in ("rollout", "reward", "train", "sync"):
        total = sum(m.get(f"seconds_{phase}") or 0.0 for m in metrics)
        table.add_row(f"total seconds in {phase}", "", f"{total:.1f}")
    return table
