r"""Small datasets in exactly the schemas their publishers use, with images drawn here (nothing is
downloaded): the ViRL39K release, Geometry3K as on the hub, verl's RL parquet, and ``save_to_disk``.

Every one asks the colour of a square, so the tiny model's servers can train on any of them; the
answer is the colour's name (ViRL39K's written as ``\boxed{…}``).
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
from datasets import Dataset, DatasetDict, Features, List, Value
from datasets import Image as ImageFeature
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 210, 20)}


def square(colour: str, size: tuple[int, int] = (56, 56)) -> Image.Image:
    image = Image.new("RGB", size, (255, 255, 255))
    width, height = size
    image.paste(COLOURS[colour], (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return image


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def colour_of(index: int) -> str:
    return list(COLOURS)[index % len(COLOURS)]


def write_virl39k(folder: Path, rows: int = 8) -> Path:
    """``39Krelease.parquet`` and ``images/``: the release's columns, image paths relative to the folder.
    Row 1's question has its ``<image>`` in the middle, the others none; row 2's image is 20×14 px (the
    release has such, which the official preprocessing enlarges to 28 px)."""
    (folder / "images").mkdir(parents=True)
    records = []
    for i in range(rows):
        colour = colour_of(i)
        name = f"images/Processed-{i:04d}.{'jpg' if i % 2 else 'png'}"
        square(colour, (20, 14) if i == 2 else (56, 56)).save(folder / name, quality=95)
        question = "What colour is the square?" if i != 1 else "Look: <image> What colour is the square?"
        records.append(
            {
                "qid": f"virl-{i}",
                "question": question,
                "answer": f"\\boxed{{{colour}}}",
                "PassRate_32BTrained": 0.5,
                "PassRate_7BBase": i / rows,
                "category": "(GradeSchool) Science" if i % 2 else "Tables/Diagrams/Charts",
                "source": "mmk12" if i % 2 else "chartqa",
                "image": [name],
            }
        )
    pd.DataFrame(records).to_parquet(folder / "39Krelease.parquet")
    return folder


def _image_rows(rows: int, offset: int = 0) -> list[dict]:
    return [
        {"images": [{"bytes": png(square(colour_of(i))), "path": None}], "colour": colour_of(i), "index": i}
        for i in range(offset, offset + rows)
    ]


def write_geometry3k(folder: Path, train: int = 8, test: int = 4) -> Path:
    """A hub snapshot of ``hiyouga/geometry3k``: ``data/{split}-00000-of-00001.parquet`` whose ``images``
    column is a list of the ``Image`` feature (``{bytes, path}`` in parquet) and ``problem`` holds
    ``<image>``."""
    features = Features(
        {"images": List(ImageFeature()), "problem": Value("string"), "answer": Value("string")}
    )
    (folder / "data").mkdir(parents=True)
    for split, rows, offset in (("train", train, 0), ("test", test, train)):
        table = {
            "images": [row["images"] for row in _image_rows(rows, offset)],
            "problem": ["<image>What colour is the square?"] * rows,
            "answer": [colour_of(i) for i in range(offset, offset + rows)],
        }
        Dataset.from_dict(table, features=features).to_parquet(
            folder / f"data/{split}-00000-of-00001.parquet"
        )
    return folder


VERL_INSTRUCTION = " Answer with the colour's name."


def verl_split(rows: int, offset: int, split: str) -> Dataset:
    """Rows as verl's ``examples/data_preprocess/geo3k.py`` writes them."""
    features = Features(
        {
            "data_source": Value("string"),
            "prompt": List({"role": Value("string"), "content": Value("string")}),
            "images": List(ImageFeature()),
            "ability": Value("string"),
            "reward_model": {"style": Value("string"), "ground_truth": Value("string")},
            "extra_info": {
                "split": Value("string"),
                "index": Value("int64"),
                "answer": Value("string"),
                "question": Value("string"),
            },
        }
    )
    table: dict[str, list] = {name: [] for name in features}
    for row in _image_rows(rows, offset):
        question = "<image>What colour is the square?"
        table["data_source"].append("hiyouga/geometry3k")
        table["prompt"].append([{"role": "user", "content": question + VERL_INSTRUCTION}])
        table["images"].append(row["images"])
        table["ability"].append("math")
        table["reward_model"].append({"style": "rule", "ground_truth": row["colour"]})
        table["extra_info"].append(
            {"split": split, "index": row["index"], "answer": row["colour"], "question": question}
        )
    return Dataset.from_dict(table, features=features)


def write_verl(folder: Path, train: int = 8, test: int = 4) -> Path:
    """``train.parquet`` and ``test.parquet`` in verl's RL layout."""
    folder.mkdir(parents=True)
    verl_split(train, 0, "train").to_parquet(folder / "train.parquet")
    verl_split(test, train, "test").to_parquet(folder / "test.parquet")
    return folder


def write_saved(folder: Path, train: int = 8, test: int = 4) -> Path:
    """A ``DatasetDict.save_to_disk`` folder in the EasyR1 layout (problem, answer, images)."""
    features = Features(
        {"images": List(ImageFeature()), "problem": Value("string"), "answer": Value("string")}
    )
    splits = {}
    for split, rows, offset in (("train", train, 0), ("test", test, train)):
        table = {
            "images": [row["images"] for row in _image_rows(rows, offset)],
            "problem": ["<image>What colour is the square?"] * rows,
            "answer": [colour_of(i) for i in range(offset, offset + rows)],
        }
        splits[split] = Dataset.from_dict(table, features=features)
    DatasetDict(splits).save_to_disk(str(folder))
    return folder
