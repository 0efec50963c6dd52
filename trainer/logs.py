"""Where a run reports itself: ``metrics.jsonl`` (one object per step, with its wall-clock time),
TensorBoard (``train/``, ``eval/``, ``time/``, and the config as hyperparameters), wandb when configured,
progress (a bar on a terminal, a plain line now and then elsewhere), one line per evaluation, and at the
end a summary table and a PNG of the learning curves."""

from __future__ import annotations

import json
import math
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from trainer.config import TrainConfig

# In the summary, in this order.
KEY_METRICS = ("reward_mean", "accuracy_mean", "eval_accuracy_greedy", "cpl_loss", "entropy_mean")
# On the progress line, short: it must fit 80 columns with the step count, the rate and the ETA.
PROGRESS_METRICS = {"reward_mean": "reward", "accuracy_mean": "acc"}
EVAL_METRICS = {
    "eval_accuracy_greedy": "greedy",
    "eval_accuracy_greedy_removed": "I⁻",
    "eval_perception_gap": "gap",
    "eval_accuracy_sampled": "sampled",
}
PLAIN_EVERY_S = 30.0
"""Without a terminal, a progress line at least this often (and every twentieth of the run)."""
CURVES = (
    ("reward_mean", "accuracy_mean"),
    ("eval_accuracy_greedy", "eval_accuracy_greedy_removed", "eval_accuracy_sampled", "eval_perception_gap"),
    # Not pg_loss: with group-normalised advantages its mean is about 0 at every step.
    ("cpl_loss", "kl_loss"),
    ("entropy_mean", "perception_token_fraction", "clip_fraction"),
    ("grad_norm", "lr"),
)
SECOND_AXIS = {"lr"}
"""Drawn against a right-hand axis of their own: a learning rate is orders of magnitude below a norm."""
CHANCE = "eval_chance_accuracy"
"""Drawn as a dashed line on the panels that show accuracies."""


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
        if self.tensorboard is not None:
            self.tensorboard_hyperparameters(config)
        self.steps = config.train.steps
        self.first_step = first_step
        self.started = time.monotonic()
        self.plain = config.log.progress and not self.console.is_terminal
        self.plain_every = max(1, config.train.steps // 20)
        self.last_plain = (first_step, self.started)
        self.progress = None
        if config.log.progress and self.console.is_terminal:
            self.progress = Progress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(bar_width=16),
                TextColumn("{task.fields[line]}"),
                console=self.console,
            )
            self.task = self.progress.add_task(
                "train", total=config.train.steps, completed=first_step, line=""
            )
            self.progress.start()

    def tensorboard_hyperparameters(self, config: TrainConfig) -> None:
        """The resolved config in TensorBoard's HPARAMS tab, one dotted key per value."""
        from torch.utils.tensorboard.summary import hparams

        values = {
            key: value if isinstance(value, int | float | str | bool) else json.dumps(value)
            for key, value in _flatten(config.model_dump(mode="json")).items()
        }
        for summary in hparams(values, {"eval/accuracy_greedy": math.nan}):
            self.tensorboard.file_writer.add_summary(summary)

    def write(self, metrics: dict[str, float | int | None]) -> None:
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()
        }
        step = int(metrics["step"])
        clean = {"step": step, "time": datetime.now(UTC).isoformat(timespec="seconds"), **clean}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for name, value in clean.items():
                if name != "step" and isinstance(value, int | float):
                    self.tensorboard.add_scalar(tensorboard_name(name), value, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in clean.items() if isinstance(v, int | float)}, step=step)
        if any(name in clean for name in EVAL_METRICS):
            self.console.print(evaluation_line(clean))
        line = progress_line(clean, self.steps_per_second(step), self.steps - step)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, line=line)
        elif self.plain and self._plain_due(step):
            self.console.print(f"step {step}/{self.steps}  {line}", highlight=False)

    def steps_per_second(self, step: int) -> float:
        elapsed = time.monotonic() - self.started
        return (step - self.first_step) / elapsed if elapsed > 0 else math.nan

    def _plain_due(self, step: int) -> bool:
        last_step, last_time = self.last_plain
        now = time.monotonic()
        if step - last_step >= self.plain_every or now - last_time >= PLAIN_EVERY_S or step == self.steps:
            self.last_plain = (step, now)
            return True
        return False

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


def tensorboard_name(metric: str) -> str:
    """TensorBoard's name of a metric: grouped as ``eval/``, ``time/`` (seconds per phase) or ``train/``."""
    if metric.startswith("eval_"):
        return "eval/" + metric.removeprefix("eval_")
    if metric.startswith("seconds_"):
        return "time/" + metric.removeprefix("seconds_")
    return "train/" + metric


def progress_line(metrics: dict, steps_per_second: float, steps_left: int) -> str:
    """``0.82 step/s  eta 2:01  reward 0.812  acc 0.800``: what the bar or the plain line shows."""
    parts = []
    if math.isfinite(steps_per_second) and steps_per_second > 0:
        eta = round(steps_left / steps_per_second)
        parts.append(f"{steps_per_second:.2f} step/s")
        parts.append(f"eta {eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}")
    for name, short in PROGRESS_METRICS.items():
        if isinstance(metrics.get(name), int | float):
            parts.append(f"{short} {metrics[name]:.3f}")
    return "  ".join(parts)


def evaluation_line(metrics: dict) -> str:
    """``eval at step 100: greedy 1.000  I⁻ 0.200  gap 0.800  sampled 0.938``."""
    shown = "  ".join(
        f"{short} {metrics[name]:.3f}"
        for name, short in EVAL_METRICS.items()
        if isinstance(metrics.get(name), int | float)
    )
    return f"eval at step {metrics['step']}: {shown}"


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _drop_after(path: Path, step: int) -> None:
    """A resumed run rewrites the steps after its checkpoint, so each step is logged once."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics: list[dict], out: Path, title: str) -> Path:
    """The learning curves under ``title`` (the run, its algorithm and seed), one panel per group of
    related metrics, with chance level on the accuracy panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chance = next((m[CHANCE] for m in metrics if m.get(CHANCE) is not None), None)
    figure, axes = plt.subplots(len(CURVES), 1, figsize=(8, 2.6 * len(CURVES)), sharex=True)
    figure.suptitle(title)
    for axis, names in zip(axes, CURVES, strict=True):
        right = axis.twinx() if SECOND_AXIS & set(names) else None
        for colour, name in enumerate(names):
            points = [(m["step"], m[name]) for m in metrics if m.get(name) is not None]
            if points:
                steps, values = zip(*points, strict=True)
                drawn_on = right if name in SECOND_AXIS and right is not None else axis
                marker = "o" if name.startswith("eval_") else None
                drawn_on.plot(steps, values, marker=marker, label=name, color=f"C{colour}")
        if chance is not None and any("accuracy" in name for name in names):
            axis.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:.2f})")
        handles, labels = axis.get_legend_handles_labels()
        if right is not None:
            more_handles, more_labels = right.get_legend_handles_labels()
            handles, labels = handles + more_handles, labels + more_labels
        if handles:
            axis.legend(handles, labels, loc="best", fontsize="small")
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
