"""Peak memory per rank of the policy and its reference: full fine-tuning against LoRA, ZeRO-2 against ZeRO-3.

Each variant runs in fresh processes on CPU, ``torchrun --nproc_per_node 2 bench/memory.py --worker VARIANT``:
both ranks build the trainer's ``Policy`` of ``configs/demo.yaml`` on the ~100 MB model (``cppo tiny-model
--profile 100mb``) with β = 0.01, so that a reference model is there too (with LoRA, ``model.lora: {}``, the
reference is the same model with its adapter off), then run ``--steps`` updates
(``trainer.loop.update``) on a fixed batch of rows made from the synthetic data with random responses. GRPO's
one pass is enough: the question is what the weights, gradients, optimizer state and reference cost, which
CPPO's extra passes do not change.

Each rank reports its peak resident memory (``getrusage``'s ``ru_maxrss``): after the imports (the libraries'
share, the same in every variant), after building the policy and the reference, and after the updates. Peak
RSS counts everything a process touched, so the differences between variants are what to read, not the
totals. The variants run one after the other, each in its own processes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import REPO, describe_machine
from results import add_out_argument, key_value_section, preamble, write_results

VARIANTS: dict[str, list[str]] = {
    "full, ZeRO-2": ["deepspeed.zero_stage=2"],
    "full, ZeRO-3": ["deepspeed.zero_stage=3"],
    "LoRA, ZeRO-2": ["deepspeed.zero_stage=2", "model.lora={}"],
    "LoRA, ZeRO-3": ["deepspeed.zero_stage=3", "model.lora={}"],
}
"""Each variant's overrides of the demo config."""
PROCESSES = 2
MMAP_THRESHOLD = "65536"
"""glibc's threshold for allocating with mmap, fixed: with its default, which rises after each large free,
freed blocks stay in the heap and count in the peak. ZeRO-3 gathers and frees every layer's parameters at
every pass, so the peak would count heap glibc keeps, not memory the process holds (measured here: 1398 MB
against 1256 under ZeRO-2, where the process held less under ZeRO-3). Both stages run with it."""
PHASES = ("imported", "built", "updated")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- one rank of one variant (under torchrun) -----------------------------------------------------------


def worker(variant: str, model: Path, data: Path, run_dir: Path, steps: int, out: Path) -> None:
    """Build the policy and reference, update ``steps`` times, and write this rank's peaks to
    ``out/rank-N.json``."""
    from shared.vlm import load_processor, suppressed_token_ids
    from trainer.config import load_config
    from trainer.data import training_prompts
    from trainer.distributed import init_distributed, rank
    from trainer.loop import micro_batches_per_mini_batch, share_of, update
    from trainer.policy import Policy

    peaks = {"imported": peak_mb()}
    init_distributed()
    overrides = [
        f"run_dir={run_dir}",
        f"model.path={model}",
        f"data.path={data}",
        "objective.algorithm=grpo",
        "objective.beta=0.01",
        *VARIANTS[variant],
    ]
    config = load_config(REPO / "configs/demo.yaml", overrides)
    processor = load_processor(model)
    policy = Policy(config, micro_batches_per_mini_batch(config), suppressed_token_ids(processor.tokenizer))
    peaks["built"] = peak_mb()
    examples = share_of(training_prompts(config).take(config.train.prompts_per_step))
    rows = fixed_rows(config, processor, examples)
    for _ in range(steps):
        update(policy, rows, rows[0], [], config, processor.tokenizer.pad_token_id)
    peaks["updated"] = peak_mb()
    (out / f"rank-{rank()}.json").write_text(json.dumps(peaks))


def fixed_rows(config, processor, examples: list) -> list:
    """``rollout.n`` rows per prompt, random responses of ``rollout.max_tokens`` tokens, advantage ±1."""
    import torch

    from trainer.experience import Row, prompt_inputs

    generator = torch.Generator().manual_seed(0)
    length = config.rollout.max_tokens
    rows = []
    for example in examples:
        inputs = prompt_inputs(processor, example, {"clean": example.images})
        for index in range(config.rollout.n):
            ids = torch.randint(0, len(processor.tokenizer), (length,), generator=generator).tolist()
            rows.append(
                Row(example.id, inputs, ids, [0.0] * length, float(index % 2), advantage=index % 2 * 2.0 - 1)
            )
    return rows


# --- the variants, one after the other ----------------------------------------------------------------


def run_variant(variant: str, model: Path, data: Path, scratch: Path, steps: int) -> list[dict[str, float]]:
    """Both ranks' peaks for ``variant``, from fresh processes."""
    from shared.launch import free_port

    out = scratch / variant.replace(", ", "-").replace(" ", "")
    out.mkdir()
    command = [
        str(Path(sys.executable).parent / "torchrun"),
        f"--nproc_per_node={PROCESSES}",
        f"--master_port={free_port()}",
        str(Path(__file__)),
        "--worker",
        variant,
        "--model",
        str(model),
        "--data",
        str(data),
        "--run-dir",
        str(out / "run"),
        "--steps",
        str(steps),
        "--worker-out",
        str(out),
    ]
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD,
    }
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"memory bench: {variant} failed:\n{done.stderr[-4000:]}")
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(PROCESSES)]


def report(machine: dict[str, str], settings: dict[str, str], peaks: dict[str, list[dict]]) -> str:
    lines = preamble(
        "Peak memory per rank: full fine-tuning and LoRA, ZeRO-2 and ZeRO-3",
        "memory.py",
        "Peak resident memory (MB) of each of the 2 ranks; each variant in fresh processes.",
    )
    lines += key_value_section("Machine", machine)
    lines += key_value_section("Settings", settings)
    lines += [
        "## Peaks",
        "",
        "| variant | rank | after imports | after building policy + reference | after the updates |",
        "|---|---:|---:|---:|---:|",
    ]
    for variant, ranks in peaks.items():
        for number, peak in enumerate(ranks):
            lines.append(f"| {variant} | {number} | " + " | ".join(f"{peak[p]:.0f}" for p in PHASES) + " |")
    lines.append("")
    for kind in ("full", "LoRA"):
        two, three = peaks.get(f"{kind}, ZeRO-2"), peaks.get(f"{kind}, ZeRO-3")
        if two and three:
            worst = {stage: max(p["updated"] for p in ranks) for stage, ranks in ((2, two), (3, three))}
            verdict = "below" if worst[3] < worst[2] else "not below"
            lines.append(
                f"{kind}: the highest rank's peak is {worst[3]:.0f} MB under ZeRO-3 against "
                f"{worst[2]:.0f} MB under ZeRO-2 ({worst[3] - worst[2]:+.0f} MB): **{verdict}**."
            )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="updates per variant (default 2)")
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    for name in ("--model", "--data", "--run-dir", "--worker-out"):
        parser.add_argument(name, type=Path, help=argparse.SUPPRESS)
    add_out_argument(parser, "memory")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.model, args.data, args.run_dir, args.steps, args.worker_out)
        return
    from shared.synth_data import SynthSettings, write_dataset
    from shared.tiny_model import build_tiny_model

    started, load = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="cppo-memory-") as folder:
        scratch = Path(folder)
        model = build_tiny_model(scratch / "model-100mb", profile="100mb")
        data = write_dataset(scratch / "data", SynthSettings(train=200, test=8))
        megabytes = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
        peaks = {}
        for variant in VARIANTS:
            print(f"{variant} ...", file=sys.stderr)
            peaks[variant] = run_variant(variant, model, data, scratch, args.steps)
    settings = {
        "model": f"tiny Qwen2.5-VL, profile '100mb' ({megabytes:.0f} MB of fp32 weights)",
        "run": "configs/demo.yaml with objective.algorithm=grpo, objective.beta=0.01 (a reference model), "
        f"{PROCESSES} processes (torchrun, gloo), fp32 on CPU, {args.steps} updates on fixed rows",
        "allocator": f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} in every variant (see MMAP_THRESHOLD)",
        "whole run": f"{time.perf_counter() - started:.0f} s",
    }
    markdown = report(describe_machine({}, load), settings, peaks)
    write_results(args.out, markdown, {"settings": settings, "peaks": peaks})


if __name__ == "__main__":
    main()
