"""Prompts from datasets in the EasyR1 / ViRL39K layout: ``problem`` with ``<image>``, ``answer``, ``images``.

A split comes from a local folder (``{split}.parquet`` or ``{split}.jsonl``, image paths relative to
the folder) or from a ``datasets`` hub name where the machine can reach the hub. Prompts become OpenAI
chat messages with the images as ``data:`` URLs, so any rollout replica can read them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, load_dataset
from PIL import Image

from shared.images import encode_image_data_url
from shared.schemas import ChatMessage, ImagePart, ImageURL, RequestedViews, RolloutPrompt, TextPart
from trainer.config import DataConfig

IMAGE_PLACEHOLDER = "<image>"
REQUIRED_COLUMNS = ("problem", "answer", "images")


class DataError(ValueError):
    """The dataset cannot be read or does not have the expected layout."""


@dataclass(frozen=True)
class Example:
    """One training or test prompt: its chat messages (images inline) and its ground truth."""

    id: str
    messages: tuple[ChatMessage, ...]
    images: tuple[Image.Image, ...]
    answer: str
    group: str | None = None
    """The value of the ``rollout.views_by`` column: it picks the example's views and names its per-group
    metrics."""

    def rollout_prompt(self, views: RequestedViews | None = None) -> RolloutPrompt:
        return RolloutPrompt(prompt_id=self.id, messages=list(self.messages), views=views)


def load_split(path: str, split: str, tasks: list[str] | None = None, views_by: str | None = None) -> Dataset:
    """The split as a ``datasets.Dataset``, checked for the columns the trainer needs."""
    folder = Path(path)
    if folder.is_dir():
        files = {suffix: folder / f"{split}.{suffix}" for suffix in ("parquet", "jsonl")}
        found = [(suffix, file) for suffix, file in files.items() if file.is_file()]
        if not found:
            raise DataError(f"{folder} has no {split}.parquet or {split}.jsonl")
        suffix, file = found[0]
        dataset = load_dataset(
            "parquet" if suffix == "parquet" else "json", data_files=str(file), split="train"
        )
    elif folder.exists() or path.startswith((".", "/")):
        raise DataError(f"data.path {path} is not a folder")
    else:
        try:
            dataset = load_dataset(path, split=split)
        except Exception as error:
            raise DataError(f"cannot load the hub dataset {path!r} (split {split!r}): {error}") from error
    needed = [*REQUIRED_COLUMNS, *([views_by] if views_by else [])]
    missing = [column for column in needed if column not in dataset.column_names]
    if missing:
        raise DataError(f"the {split} split of {path} lacks the column(s) {', '.join(missing)}")
    if tasks is not None:
        if "task" not in dataset.column_names:
            raise DataError(f"data.tasks is set but the {split} split of {path} has no `task` column")
        dataset = dataset.filter(lambda row: row["task"] in tasks)
    if len(dataset) == 0:
        raise DataError(f"the {split} split of {path} has no rows" + (f" of tasks {tasks}" if tasks else ""))
    return dataset


def _open_image(value: Any, root: Path) -> Image.Image:
    """A dataset image cell: a path relative to the dataset folder, ``{"bytes"|"path"}``, or a PIL image."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict) and value.get("bytes"):
        image = Image.open(io.BytesIO(value["bytes"]))
    elif isinstance(value, dict | str):
        relative = value["path"] if isinstance(value, dict) else value
        image = Image.open(root / relative)
    else:
        raise DataError(f"cannot read an image from a {type(value).__name__} cell")
    return image.convert("RGB")


def make_example(
    row: dict[str, Any], index: int, root: Path, instruction: str, views_by: str | None = None
) -> Example:
    """The row as a chat prompt: the problem's ``<image>`` slots in place, the instruction appended."""
    images = tuple(_open_image(value, root) for value in row["images"] or [])
    pieces = (str(row["problem"]) + instruction).split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 not in (0, len(images)):
        raise DataError(
            f"row {index}: the problem has {len(pieces) - 1} <image> slots for {len(images)} images"
        )
    if len(pieces) == 1:
        # No slot in the text: the images go first, as the Qwen-VL chat format does.
        pieces = [""] * len(images) + pieces
    parts: list[TextPart | ImagePart] = []
    for i, text in enumerate(pieces):
        if i > 0:
            parts.append(
                ImagePart(type="image_url", image_url=ImageURL(url=encode_image_data_url(images[i - 1])))
            )
        if text:
            parts.append(TextPart(type="text", text=text))
    identifier = str(row.get("id") or f"row-{index}")
    message = ChatMessage(role="user", content=parts)
    group = str(row[views_by]) if views_by else None
    return Example(identifier, (message,), images, str(row["answer"]), group)


class PromptStream:
    """Training prompts in a seeded order, epoch after epoch; its position is part of a checkpoint."""

    def __init__(
        self,
        dataset: Dataset,
        root: Path,
        instruction: str,
        seed: int,
        shuffle: bool,
        views_by: str | None = None,
    ) -> None:
        self.dataset = dataset
        self.root = root
        self.instruction = instruction
        self.seed = seed
        self.shuffle = shuffle
        self.views_by = views_by
        self.epoch = 0
        self.position = 0

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.dataset))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.dataset))

    def take(self, count: int) -> list[Example]:
        taken = []
        while len(taken) < count:
            order = self._order()
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
                continue
            index = int(order[self.position])
            self.position += 1
            example = make_example(self.dataset[index], index, self.root, self.instruction, self.views_by)
            # Ids must be unique within a request; the same row twice in one batch gets a suffix.
            if any(e.id == example.id for e in taken):
                example = replace(example, id=f"{example.id}~{len(taken)}")
            taken.append(example)
        return taken

    def groups(self) -> list[str]:
        """The distinct values of the ``views_by`` column, sorted: the same list on every rank."""
        return sorted({str(value) for value in self.dataset[self.views_by]}) if self.views_by else []

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def training_prompts(data: DataConfig, seed: int, views_by: str | None = None) -> PromptStream:
    """The train split as the loop reads it, from its start: the same prompts for the same seed."""
    split = load_split(data.path, data.train_split, data.tasks, views_by)
    return PromptStream(split, Path(data.path), data.instruction, seed, data.shuffle, views_by)


def evaluation_examples(
    data: DataConfig, count: int, views_by: str | None = None, asked_by: str = "eval.prompts"
) -> list[Example]:
    """The first ``count`` test prompts: the same ones at every evaluation. A split with fewer is refused,
    naming the setting that asked (``asked_by``), rather than quietly evaluated on fewer."""
    split = load_split(data.path, data.test_split, data.tasks, views_by)
    if count > len(split):
        tasks = f" of tasks {data.tasks}" if data.tasks else ""
        raise DataError(
            f"{asked_by} is {count}, but the {data.test_split} split of {data.path} has {len(split)} rows"
            f"{tasks}; ask for at most {len(split)}"
        )
    root = Path(data.path)
    return [make_example(split[i], i, root, data.instruction, views_by) for i in range(count)]
