"""Prompts from datasets as they are published: EasyR1, ViRL39K, Geometry3K and verl layouts
(``trainer.layouts``), from local files or the hub.

A split comes from a local folder (``{split}.parquet`` or ``.jsonl``, a hub snapshot's
``data/{split}-*.parquet``, a ``save_to_disk`` folder, or a folder whose only data file is its train
split, as ViRL39K's ``39Krelease.parquet``), from one data file, or from a ``datasets`` hub name where the
machine can reach the hub. Image paths are relative to the dataset's folder. Prompts become OpenAI chat
messages with the images as ``data:`` URLs, sized within the model's pixel bounds, so that any rollout
replica reads them and sees what the trainer's passes see.

A bad example (an image that does not decode or is too large) is skipped, logged once and counted;
past ``data.max_skip_fraction`` of the split the run stops.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets import Dataset, DatasetDict, LargeList, List, load_dataset, load_from_disk
from PIL import Image
from transformers import ProcessorMixin

from shared.images import ImageError, decode_image_bytes, encode_image_data_url, read_image_file
from shared.schemas import ChatMessage, ImagePart, ImageURL, RequestedViews, RolloutPrompt, TextPart
from shared.vlm import PixelBounds, pixel_bounds
from trainer.config import DataConfig, TrainConfig
from trainer.layouts import Layout, LayoutError, Record, Scalar, detect_layout

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
DATA_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
"""The data files a folder is searched for, and the ``datasets`` builder of each."""
MIN_IMAGE_SIDE = 28
"""Shorter image sides are enlarged to this, as ViRL39K's official preprocessing does: Qwen-VL's processor
cannot cut a smaller side into patches."""
HOLDOUT_SEED = 0
"""``eval.holdout`` draws the same rows for every run seed, so that runs are evaluated alike."""


class DataError(ValueError):
    """The dataset cannot be read or does not have the expected layout."""


class MissingSplit(DataError):
    """The dataset has no such split."""


class BadExample(DataError):
    """One example cannot be used; the run skips it."""

    def __init__(self, example_id: str, reason: str) -> None:
        super().__init__(f"example {example_id}: {reason}")
        self.example_id, self.reason = example_id, reason


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
    prompt: str = ""
    """The prompt's text, images as ``<image>``: what score items carry."""
    data_source: str | None = None
    metadata: dict[str, Scalar] = field(default_factory=dict)
    row: int | None = None
    """Its row in the split, by which a prompt the rollout server refuses is skipped from then on."""

    def rollout_prompt(self, views: RequestedViews | None = None) -> RolloutPrompt:
        return RolloutPrompt(prompt_id=self.id, messages=list(self.messages), views=views)


# --- finding and loading a split -------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """One split of one dataset: its rows (images not decoded yet), its layout, and the folder its image
    paths are relative to."""

    rows: Dataset
    layout: Layout
    root: Path
    where: str
    """"the train split of PATH", for messages."""


def split_files(folder: Path, split: str) -> list[Path]:
    """The data files of ``split`` in ``folder``, in the layouts ``datasets`` writes; for the train split,
    also a folder's only data file whatever its name."""
    patterns = [f"{split}.*", f"{split}-*.*", f"data/{split}.*", f"data/{split}-*.*", f"{split}/*.*"]
    found = sorted(
        {path for pattern in patterns for path in folder.glob(pattern) if path.suffix in DATA_FORMATS}
    )
    if not found and split == "train":
        files = [path for pattern in ("*.*", "data/*.*") for path in folder.glob(pattern)]
        files = [path for path in files if path.suffix in DATA_FORMATS and path.is_file()]
        if len(files) == 1:
            found = files
    return found


def _read_files(files: list[Path], where: str) -> Dataset:
    kinds = {DATA_FORMATS[file.suffix] for file in files}
    if len(kinds) > 1:
        raise DataError(f"{where} mixes parquet and json files: {', '.join(map(str, files))}")
    try:
        return load_dataset(kinds.pop(), data_files=[str(file) for file in files], split="train")
    except Exception as error:  # datasets raises many kinds for a file it cannot parse
        raise DataError(f"cannot read {where}: {error}") from error


def _load_rows(path: str, split: str) -> tuple[Dataset, Path]:
    """The split's rows and the folder image paths are relative to; :class:`MissingSplit` if absent."""
    where = f"the {split} split of {path}"
    local = Path(path)
    if local.is_file():
        if local.suffix not in DATA_FORMATS:
            raise DataError(f"data file {path} is not parquet, jsonl or json")
        if split != "train":
            raise MissingSplit(
                f"{path} is one file, which is the train split only; there is no {split} split"
            )
        return _read_files([local], where), local.parent
    if local.is_dir():
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            saved = load_from_disk(str(local))
            if isinstance(saved, DatasetDict):
                if split not in saved:
                    raise MissingSplit(f"{path} has no {split} split (it has {', '.join(saved)})")
                return saved[split], local
            if split != "train":
                raise MissingSplit(
                    f"{path} holds one dataset, the train split only; there is no {split} split"
                )
            return saved, local
        files = split_files(local, split)
        if not files:
            raise MissingSplit(
                f"{path} has no {split} split: no {split}.parquet, {split}.jsonl or data/{split}-*.parquet"
            )
        return _read_files(files, where), local
    if local.exists() or path.startswith((".", "/")):
        raise DataError(f"data path {path} is neither a folder nor a data file")
    try:
        return load_dataset(path, split=split), local
    except ValueError as error:
        if "split" in str(error).lower():
            raise MissingSplit(f"the hub dataset {path!r} has no {split} split: {error}") from error
        raise DataError(f"cannot load the hub dataset {path!r} (split {split!r}): {error}") from error
    except Exception as error:
        raise DataError(f"cannot load the hub dataset {path!r} (split {split!r}): {error}") from error


def _undecoded(feature: Any) -> Any:
    """The feature with its images left as ``{bytes, path}``: the reader decodes them, within limits, so
    that one corrupt image skips one example instead of stopping the run."""
    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    if isinstance(feature, List | LargeList):
        return type(feature)(_undecoded(feature.feature))
    if isinstance(feature, dict):
        return {name: _undecoded(inner) for name, inner in feature.items()}
    return feature


def load_split(path: str, split: str, data: DataConfig, views_by: str | None = None) -> Split:
    """One split of the dataset at ``path``, its layout detected and checked for the columns the run needs."""
    rows, root = _load_rows(path, split)
    where = f"the {split} split of {path}"
    for name, feature in rows.features.items():
        if (undecoded := _undecoded(feature)) != feature:
            rows = rows.cast_column(name, undecoded)
    try:
        layout = detect_layout(rows.column_names, data.columns, where)
    except LayoutError as error:
        raise DataError(str(error)) from error
    if views_by and views_by not in rows.column_names:
        raise DataError(f"rollout.views_by is {views_by!r}, but {where} has no such column")
    if data.tasks is not None:
        if "task" not in rows.column_names:
            raise DataError(f"data.tasks is set but {where} has no `task` column")
        rows = rows.filter(lambda task: task in data.tasks, input_columns="task")
    if len(rows) == 0:
        raise DataError(f"{where} has no rows" + (f" of tasks {data.tasks}" if data.tasks else ""))
    return Split(rows, layout, root, where)


def held_out(rows: int, fraction: float) -> np.ndarray:
    """The row indices ``eval.holdout`` keeps out of training: a seeded draw of ⌈fraction × rows⌉."""
    count = math.ceil(fraction * rows)
    return np.sort(np.random.default_rng(HOLDOUT_SEED).permutation(rows)[:count])


def training_split(config: TrainConfig) -> Split:
    """The split the run trains on: ``data.train_split`` less what ``eval.holdout`` keeps out."""
    split = load_split(config.data.path, config.data.train_split, config.data, config.rollout.views_by)
    if not config.eval.holdout:
        return split
    kept = np.setdiff1d(np.arange(len(split.rows)), held_out(len(split.rows), config.eval.holdout))
    if len(kept) == 0:
        raise DataError(
            f"eval.holdout={config.eval.holdout:g} holds out all {len(split.rows)} rows of {split.where}"
        )
    return replace(split, rows=split.rows.select(kept))


def evaluation_split(config: TrainConfig) -> Split:
    """The split the run evaluates on: ``eval.holdout``'s rows of the train split, or the test split of
    ``eval.data`` (its only split if it has no test split) or of ``data.path``."""
    data, views_by = config.data, config.rollout.views_by
    if config.eval.holdout:
        split = load_split(data.path, data.train_split, data, views_by)
        rows = split.rows.select(held_out(len(split.rows), config.eval.holdout))
        return replace(split, rows=rows, where=f"the eval.holdout rows of {split.where}")
    if config.eval.data:
        try:
            return load_split(config.eval.data, data.test_split, data, views_by)
        except MissingSplit:
            return load_split(config.eval.data, "train", data, views_by)
    try:
        return load_split(data.path, data.test_split, data, views_by)
    except MissingSplit as error:
        raise DataError(
            f"{error}. Evaluate on held-out training rows (eval.holdout=0.01), on another dataset "
            "(eval.data=PATH), or not at all (eval.every=0)"
        ) from error


# --- rows to examples ------------------------------------------------------------------------------


def open_image(value: Any, root: Path, bounds: PixelBounds | None) -> Image.Image:
    """A dataset image cell (a path relative to the dataset folder, ``{bytes, path}``, file bytes, verl's
    ``{image: ...}``, or a PIL image), decoded within the server's limits and sized as the model sees it."""
    if isinstance(value, Mapping) and "image" in value and not value.get("bytes"):
        value = value["image"]
    if isinstance(value, Image.Image):
        image = value.convert("RGB")
    elif isinstance(value, bytes | Mapping) and (
        raw := value if isinstance(value, bytes) else value.get("bytes")
    ):
        image = decode_image_bytes(raw)
    elif isinstance(value, str | Mapping) and (
        relative := value if isinstance(value, str) else value.get("path")
    ):
        image = read_image_file(root / relative)
    else:
        raise ImageError("bad_url", f"an image cell cannot be a {type(value).__name__}")
    if min(image.size) < MIN_IMAGE_SIDE:
        scale = MIN_IMAGE_SIDE / min(image.size)
        size = (
            max(MIN_IMAGE_SIDE, round(image.width * scale)),
            max(MIN_IMAGE_SIDE, round(image.height * scale)),
        )
        image = image.resize(size, Image.Resampling.BICUBIC)
    return bounds.fit(image) if bounds is not None else image


def _parts(text: str, images: list[Image.Image]) -> list[TextPart | ImagePart]:
    """A turn's content: its text with the next image at each ``<image>``."""
    parts: list[TextPart | ImagePart] = []
    for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i > 0:
            url = ImageURL(url=encode_image_data_url(images.pop(0)))
            parts.append(ImagePart(type="image_url", image_url=url))
        if piece:
            parts.append(TextPart(type="text", text=piece))
    return parts


@dataclass(frozen=True)
class ExampleReader:
    """Makes the examples of one split: its layout, the instruction, the pixel bounds, the group column."""

    split: Split
    instruction: str
    bounds: PixelBounds | None = None
    views_by: str | None = None

    def __call__(self, index: int) -> Example:
        """Example ``index`` of the split; :class:`BadExample` if it cannot be used."""
        row = self.split.rows[index]
        try:
            record = self.split.layout.read(row)
        except (LayoutError, KeyError, TypeError) as error:
            raise BadExample(
                f"row-{index}", f"does not fit the {self.split.layout.name} layout: {error}"
            ) from error
        identifier = record.id or f"row-{index}"
        turns = self._with_instruction(record)
        slots = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
        if slots not in (0, len(record.images)):
            raise BadExample(
                identifier, f"its prompt has {slots} <image> slots for {len(record.images)} images"
            )
        if slots == 0 and record.images:
            # No slot in the text: the images go first, as the Qwen-VL chat format (and ViRL39K) does.
            role, text = turns[-1]
            turns[-1] = (role, IMAGE_PLACEHOLDER * len(record.images) + text)
        try:
            images = [open_image(cell, self.split.root, self.bounds) for cell in record.images]
        except ImageError as error:
            raise BadExample(identifier, f"image: {error.message}") from error
        queue = list(images)
        messages = tuple(ChatMessage(role=role, content=_parts(text, queue)) for role, text in turns)
        group = str(row[self.views_by]) if self.views_by else None
        prompt = "\n".join(text for _, text in turns)
        return Example(
            identifier,
            messages,
            tuple(images),
            record.answer,
            group,
            prompt,
            record.data_source,
            record.metadata,
            index,
        )

    def _with_instruction(self, record: Record) -> list[tuple[str, str]]:
        turns = list(record.turns)
        if not record.instructed:
            role, text = turns[-1]
            turns[-1] = (role, text + self.instruction)
        return turns


class PromptStream:
    """Training prompts in a seeded order, epoch after epoch; its position is part of a checkpoint.

    A bad example is skipped (logged once, counted in ``skipped``); once more than ``max_skip_fraction`` of
    the split was bad, :meth:`take` raises :class:`DataError`."""

    def __init__(
        self,
        read: Callable[[int], Example],
        size: int,
        seed: int,
        shuffle: bool,
        max_skip_fraction: float = 0.0,
        groups: list[str] | None = None,
    ) -> None:
        self.read = read
        self.size = size
        self.groups = groups or []
        """The distinct values of the ``views_by`` column, sorted: the same list on every rank."""
        self.seed = seed
        self.shuffle = shuffle
        self.max_skip_fraction = max_skip_fraction
        self.epoch = 0
        self.position = 0
        self.bad: set[int] = set()

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.size)

    def take(self, count: int) -> list[Example]:
        taken: list[Example] = []
        while len(taken) < count:
            order = self._order()
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
                continue
            index = int(order[self.position])
            self.position += 1
            if index in self.bad:
                continue
            try:
                example = self.read(index)
            except BadExample as error:
                self.skip(index, error)
                continue
            # Ids must be unique within a request; the same row twice in one batch gets a suffix.
            if any(e.id == example.id for e in taken):
                example = replace(example, id=f"{example.id}~{len(taken)}")
            taken.append(example)
        return taken

    def skip(self, index: int, error: BadExample) -> None:
        """Leave row ``index`` out from now on; stop the run once too many were bad."""
        self.bad.add(index)
        log.warning("skipped %s", error)
        # Every row bad would leave nothing to take, whatever the fraction allows.
        if len(self.bad) > self.max_skip_fraction * self.size or len(self.bad) == self.size:
            raise DataError(
                f"{len(self.bad)} of {self.size} examples were bad, more than data.max_skip_fraction "
                f"({self.max_skip_fraction:g}); the last: {error}"
            )

    @property
    def skipped(self) -> int:
        return len(self.bad)

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "bad": sorted(self.bad)}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.bad = {int(index) for index in state.get("bad", ())}


def image_bounds(processor: ProcessorMixin, data: DataConfig) -> PixelBounds:
    """The pixel bounds dataset images are sized to: the model processor's, narrowed by ``data.min_pixels``
    and ``data.max_pixels``."""
    try:
        return pixel_bounds(processor, data.min_pixels, data.max_pixels)
    except ValueError as error:
        raise DataError(f"data.min_pixels, data.max_pixels: {error}") from error


def training_prompts(config: TrainConfig, bounds: PixelBounds | None = None) -> PromptStream:
    """The training split as the loop reads it, from its start: the same prompts for the same seed."""
    split, views_by = training_split(config), config.rollout.views_by
    read = ExampleReader(split, config.data.instruction, bounds, views_by)
    groups = sorted({str(value) for value in split.rows[views_by]}) if views_by else []
    data = config.data
    return PromptStream(read, len(split.rows), config.seed, data.shuffle, data.max_skip_fraction, groups)


def evaluation_examples(
    config: TrainConfig, count: int, bounds: PixelBounds | None = None, asked_by: str = "eval.prompts"
) -> list[Example]:
    """The first ``count`` usable test prompts: the same ones at every evaluation. A split with fewer is
    refused, naming the setting that asked (``asked_by``), rather than quietly evaluated on fewer."""
    if count == 0:
        return []
    split = evaluation_split(config)
    read = ExampleReader(split, config.data.instruction, bounds, config.rollout.views_by)
    examples: list[Example] = []
    skipped: list[BadExample] = []
    for index in range(len(split.rows)):
        if len(examples) == count:
            break
        try:
            examples.append(read(index))
        except BadExample as error:
            log.warning("skipped %s", error)
            skipped.append(error)
    if len(examples) < count:
        tasks = f" of tasks {config.data.tasks}" if config.data.tasks else ""
        bad = f" ({len(skipped)} of them bad)" if skipped else ""
        raise DataError(
            f"{asked_by} is {count}, but {split.where} has {len(split.rows)} rows{tasks}{bad}; ask for at "
            f"most {len(examples)}"
        )
    return examples
