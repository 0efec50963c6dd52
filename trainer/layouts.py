r"""The dataset layouts the trainer reads as published, and how each reads a row.

=========  ===================================================================================
layout     columns
=========  ===================================================================================
easyr1     ``problem`` (``<image>`` where each image goes), ``answer``, ``images``: EasyR1's, ours,
           and Geometry3K's on the hub
virl39k    ``question``, ``answer`` written as ``\boxed{…}``, ``image`` (paths relative to the dataset
           folder), ``qid``, ``source``, ``category`` and pass rates: the ViRL39K release
verl       ``prompt`` (chat messages), ``images``, ``reward_model.ground_truth``, ``data_source``,
           ``extra_info``: verl's RL parquet
columns    any other: ``data.columns`` names the columns holding problem, answer and images
=========  ===================================================================================

A layout is detected from the column names, in the order above; ``docs/data.md`` has a row of each.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.latex import last_boxed
from shared.schemas import MAX_METADATA_CHARS, MAX_METADATA_ENTRIES, MAX_NAME_CHARS

Scalar = str | int | float | bool | None


class LayoutError(ValueError):
    """The dataset's columns fit no layout, or a row does not fit its layout."""


@dataclass(frozen=True)
class Record:
    """One row as its layout reads it, before any image is opened."""

    turns: tuple[tuple[str, str], ...]
    """(role, text) of each chat turn; each ``<image>`` in a text is where the next image goes."""
    images: tuple[Any, ...]
    """The row's image cells, in order: paths, ``{bytes, path}`` dicts or PIL images."""
    answer: str
    id: str | None = None
    data_source: str | None = None
    metadata: dict[str, Scalar] = field(default_factory=dict)
    instructed: bool = False
    """The prompt holds its own instruction (verl's do): ``data.instruction`` is not appended."""


def metadata(row: Mapping[str, Any], used: Iterable[str]) -> dict[str, Scalar]:
    """The row's other scalar columns, as score items carry them: text within the wire's limits, finite
    numbers, and at most as many entries as an item holds. Lists, images and long text are left out."""
    kept: dict[str, Scalar] = {}
    for name, value in row.items():
        if name in used or len(name) > MAX_NAME_CHARS or len(kept) == MAX_METADATA_ENTRIES:
            continue
        if isinstance(value, str) and len(value) > MAX_METADATA_CHARS:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        if isinstance(value, str | int | float | bool):
            kept[name] = value
    return kept


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


@dataclass(frozen=True)
class ProblemLayout:
    """One user turn from a problem column, an answer column and an image column."""

    name: str
    problem: str = "problem"
    answer: str = "answer"
    images: str = "images"
    id: str = "id"
    data_source: str = "data_source"
    boxed_answer: bool = False
    r"""The answer is written as ``\boxed{…}``; its content is the ground truth."""

    def required(self) -> tuple[str, ...]:
        return (self.problem, self.answer, self.images)

    def read(self, row: Mapping[str, Any]) -> Record:
        answer = str(row[self.answer])
        if self.boxed_answer and (boxed := last_boxed(answer)) is not None:
            answer = boxed.content.strip()
        cells = row[self.images]
        # A single image where a list is expected (a jsonl written by hand, a user's column).
        images = () if cells is None else tuple(cells) if isinstance(cells, list | tuple) else (cells,)
        used = (self.problem, self.answer, self.images, self.id)
        return Record(
            turns=(("user", str(row[self.problem])),),
            images=images,
            answer=answer,
            id=_text(row.get(self.id)),
            data_source=_text(row.get(self.data_source)),
            metadata=metadata(row, used),
        )


@dataclass(frozen=True)
class VerlLayout:
    """verl's RL parquet: the prompt as chat messages (text with ``<image>``), holding its instruction."""

    name: str = "verl"

    def required(self) -> tuple[str, ...]:
        return ("prompt", "reward_model")

    def read(self, row: Mapping[str, Any]) -> Record:
        messages = row["prompt"]
        if not isinstance(messages, list) or not all(
            isinstance(m, Mapping) and isinstance(m.get("content"), str) for m in messages
        ):
            raise LayoutError("its prompt is not a list of {role, content} messages with text content")
        truth = (row["reward_model"] or {}).get("ground_truth")
        if truth is None:
            raise LayoutError("its reward_model has no ground_truth")
        extra = row.get("extra_info") or {}
        extra = extra if isinstance(extra, Mapping) else {}
        facts = metadata(row, ("prompt", "reward_model", "images", "extra_info", "data_source"))
        return Record(
            turns=tuple((str(m.get("role") or "user"), m["content"]) for m in messages),
            images=tuple(row.get("images") or ()),
            answer=str(truth),
            id=_text(extra.get("index")),
            data_source=_text(row.get("data_source")),
            metadata=facts | metadata(extra, ()),
            instructed=True,
        )


Layout = ProblemLayout | VerlLayout

LAYOUTS: tuple[Layout, ...] = (
    VerlLayout(),
    ProblemLayout("easyr1"),
    ProblemLayout(
        "virl39k", problem="question", images="image", id="qid", data_source="source", boxed_answer=True
    ),
)


def detect_layout(columns: Iterable[str], mapping: Mapping[str, str] | None, where: str) -> Layout:
    """The layout of a split with these columns; ``mapping`` (``data.columns``) overrides detection."""
    columns = list(columns)
    if mapping:
        layout = ProblemLayout("columns", **mapping)
        missing = [column for column in layout.required() if column not in columns]
        if missing:
            raise LayoutError(
                f"data.columns names {', '.join(missing)}, which {where} lacks; "
                f"its columns: {', '.join(columns)}"
            )
        return layout
    for layout in LAYOUTS:
        if all(column in columns for column in layout.required()):
            return layout
    known = "; ".join(f"{layout.name} ({', '.join(layout.required())})" for layout in LAYOUTS)
    raise LayoutError(
        f"cannot tell the layout of {where} from its columns ({', '.join(columns)}). The known layouts: "
        f"{known}. Name yours with data.columns, e.g. data.columns='{{problem: question, answer: solution, "
        "images: image}'"
    )
