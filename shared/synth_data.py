"""Synthetic perception data: rendered shapes whose questions cannot be answered without looking.

Each example is one image (a light background with one or more filled shapes) and one question about
it: the colour of the shape, its kind, how many shapes there are, or where the shape is. Answers are
one word or one digit.

The files follow the layout of real VLM-RL datasets (EasyR1, ViRL39K): a parquet file per split with
the columns ``problem`` (text with an ``<image>`` placeholder), ``answer`` and ``images`` (a list of
image paths relative to the dataset folder), so the trainer reads synthetic and real data one way.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset
from PIL import Image, ImageDraw
from rich.progress import track

IMAGE_PLACEHOLDER = "<image>"
BACKGROUND = (245, 245, 245)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 180),
    "orange": (245, 120, 10),
}
SHAPES = ("circle", "square", "triangle", "diamond")
POSITIONS = ("left", "right")
NUMBER_WORDS = ("1", "2", "3", "4")
TASKS = ("colour", "shape", "count", "position")

QUESTIONS = {
    "colour": "What colour is the shape? Answer with one word.",
    "shape": "What kind of shape is in the image? Answer with one word: circle, square, triangle or diamond.",
    "count": "How many shapes are in the image? Answer with a number.",
    "position": "Is the shape on the left or on the right of the image? Answer with one word.",
}


@dataclass(frozen=True)
class Example:
    """One rendered example; ``image`` is kept out of the parquet rows and saved as a file."""

    id: str
    task: str
    problem: str
    answer: str
    image: Image.Image


@dataclass(frozen=True)
class ShapeSpec:
    kind: str
    colour: str
    centre: tuple[int, int]
    radius: int


def draw_shape(draw: ImageDraw.ImageDraw, shape: ShapeSpec) -> None:
    x, y = shape.centre
    r = shape.radius
    fill = COLOURS[shape.colour]
    if shape.kind == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    elif shape.kind == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    elif shape.kind == "diamond":
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}")


def render(shapes: list[ShapeSpec], size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        draw_shape(draw, shape)
    return image


def _non_overlapping_centres(
    rng: np.random.Generator, count: int, size: int, radius: int
) -> list[tuple[int, int]]:
    """Centres on a coarse grid, so that counted shapes never touch."""
    cells = size // (2 * radius + 4)
    chosen = rng.choice(cells * cells, size=count, replace=False)
    step = size / cells
    return [(int((c % cells + 0.5) * step), int((c // cells + 0.5) * step)) for c in chosen]


def make_example(rng: np.random.Generator, index: int, split: str, size: int) -> Example:
    task = TASKS[index % len(TASKS)]
    colour = str(rng.choice(list(COLOURS)))
    kind = str(rng.choice(SHAPES))
    # Large shapes: the colour covers a good part of the image, a strong signal for a tiny vision tower.
    radius = max(4, size // 3)
    if task == "count":
        count = int(rng.integers(1, len(NUMBER_WORDS) + 1))
        small = max(3, size // 10)
        centres = _non_overlapping_centres(rng, count, size, small)
        shapes = [ShapeSpec(kind, colour, c, small) for c in centres]
        answer = str(count)
    else:
        side = str(rng.choice(POSITIONS))
        lo, hi = (
            (radius + 1, size // 2 - radius // 2)
            if side == "left"
            else (size // 2 + radius // 2, size - radius - 1)
        )
        centre = (int(rng.integers(lo, hi + 1)), int(rng.integers(radius + 1, size - radius)))
        shapes = [ShapeSpec(kind, colour, centre, radius)]
        answer = {"colour": colour, "shape": kind, "position": side}[task]
    return Example(
        id=f"{split}-{index:06d}",
        task=task,
        problem=f"{IMAGE_PLACEHOLDER}{QUESTIONS[task]}",
        answer=answer,
        image=render(shapes, size),
    )


def generate(split: str, count: int, seed: int, size: int = 112) -> Iterator[Example]:
    """Examples of one split, the same for the same (split, count, seed, size).

    Each split draws from its own stream, so train and test never repeat each other.
    """
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    for index in range(count):
        yield make_example(rng, index, split, size)


def write_split(out_dir: Path, split: str, count: int, seed: int, size: int) -> Path:
    image_dir = out_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for example in track(generate(split, count, seed, size), total=count, description=f"rendering {split}"):
        relative = f"images/{split}/{example.id}.png"
        example.image.save(out_dir / relative)
        rows.append(
            {
                "id": example.id,
                "task": example.task,
                "problem": example.problem,
                "answer": example.answer,
                "images": [relative],
            }
        )
    path = out_dir / f"{split}.parquet"
    Dataset.from_list(rows).to_parquet(str(path))
    return path


@dataclass(frozen=True)
class SynthSettings:
    train: int = 2000
    test: int = 200
    seed: int = 0
    image_size: int = 112


def write_dataset(out_dir: str | Path, settings: SynthSettings) -> Path:
    """Render both splits to ``out_dir`` and record how they were made in ``dataset_info.json``."""
    if settings.train < 0 or settings.test < 0:
        raise ValueError("--train and --test must be >= 0")
    if not 56 <= settings.image_size <= 1024:
        raise ValueError(f"--image-size must be between 56 and 1024, got {settings.image_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", settings.train), ("test", settings.test)):
        write_split(out, split, count, settings.seed, settings.image_size)
    info = {"generator": "cppo synth-data", **asdict(settings), "tasks": list(TASKS)}
    (out / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def corpus() -> Iterator[str]:
    """Text the tiny tokenizer is trained on: the task's questions and answers, and the answer format."""
    words = [*COLOURS, *SHAPES, *POSITIONS, *NUMBER_WORDS]
    for _ in range(20):
        yield "You are a helpful assistant."
        yield from QUESTIONS.values()
        for word in words:
            yield f"<think>The image shows {word}.</think> The answer is \\boxed{{{word}}}"
            yield f"<answer>{word}</answer> {word} {word.capitalize()}"
        yield (
            "You FIRST think about the reasoning process as an internal monologue and then provide the "
            "final answer. The reasoning process MUST BE enclosed within <think> </think> tags. "
            "The final answer MUST BE put in \\boxed{}."
        )
        yield "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] { } , . ; : ! ? ' \" \\frac \\sqrt ^ _"
