"""Datasets as published: each layout read from a fixture in its publisher's exact schema, the folder
layouts ``datasets`` writes, held-out evaluation, pixel bounds, and bad examples skipped and counted."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from published_data import (
    COLOURS,
    VERL_INSTRUCTION,
    colour_of,
    png,
    square,
    write_geometry3k,
    write_saved,
    write_verl,
    write_virl39k,
)

from shared.images import ImageError
from shared.schemas import ImagePart, TextPart
from shared.vlm import PixelBounds, load_processor
from trainer.config import PAPER_INSTRUCTION, load_config
from trainer.data import (
    DataError,
    evaluation_examples,
    evaluation_split,
    image_bounds,
    training_prompts,
    training_split,
)

BOUNDS = PixelBounds(factor=28, min_pixels=56 * 56, max_pixels=224 * 224)
"""The tiny model processor's."""


def config(path: Path | str, *overrides: str):
    return load_config(None, [f"data.path={path}", "data.shuffle=false", *overrides])


def texts(example) -> list[str]:
    return [part.text for part in example.messages[0].content if isinstance(part, TextPart)]


def kinds(example) -> list[str]:
    return ["image" if isinstance(part, ImagePart) else "text" for part in example.messages[0].content]


def test_the_virl39k_release_reads_as_published(tmp_path):
    folder = write_virl39k(tmp_path / "ViRL39K")
    run = config(folder, "eval.holdout=0.25", "data.instruction=' Think.'")
    assert training_split(run).layout.name == "virl39k"
    examples = training_prompts(run, BOUNDS).take(6)
    held = evaluation_examples(run, 2, BOUNDS)
    by_id = {example.id: example for example in examples + held}
    assert sorted(by_id) == [f"virl-{i}" for i in range(8)]  # 6 trained on, 2 held out: every row once
    for i in range(8):
        example = by_id[f"virl-{i}"]
        assert example.answer == colour_of(i)  # \boxed{red} → red
        assert example.data_source == ("mmk12" if i % 2 else "chartqa")
        assert example.metadata == {
            "PassRate_32BTrained": 0.5,
            "PassRate_7BBase": i / 8,
            "category": "(GradeSchool) Science" if i % 2 else "Tables/Diagrams/Charts",
            "source": example.data_source,
        }
    # A question without <image> gets the image in front; row 1 keeps its own slot.
    assert kinds(by_id["virl-0"]) == ["image", "text"]
    assert texts(by_id["virl-0"]) == ["What colour is the square? Think."]
    assert by_id["virl-0"].prompt == "<image>What colour is the square? Think."
    assert kinds(by_id["virl-1"]) == ["text", "image", "text"]
    assert texts(by_id["virl-1"]) == ["Look: ", " What colour is the square? Think."]
    # 20×14 is enlarged to 28 px on its short side (40×28), then sized within the bounds: 84×56.
    assert by_id["virl-2"].images[0].size == (84, 56)
    assert by_id["virl-0"].images[0].size == (56, 56)


def test_virl39k_has_no_test_split_and_says_what_to_do(tmp_path):
    folder = write_virl39k(tmp_path / "ViRL39K")
    with pytest.raises(
        DataError, match=r"no test split.*eval\.holdout=0\.01.*eval\.data=PATH.*eval\.every=0"
    ):
        evaluation_split(config(folder))
    # data.path may name the one file; it is the train split, its images relative to its folder.
    single = config(folder / "39Krelease.parquet", "eval.data=" + str(folder / "39Krelease.parquet"))
    assert len(training_split(single).rows) == 8
    assert [e.id for e in evaluation_examples(single, 3, BOUNDS)] == ["virl-0", "virl-1", "virl-2"]


def test_the_holdout_is_the_same_for_every_seed_and_never_trained_on(tmp_path):
    folder = write_virl39k(tmp_path / "ViRL39K", rows=40)
    held = {e.id for e in evaluation_examples(config(folder, "eval.holdout=0.1", "seed=1"), 4, BOUNDS)}
    assert held == {
        e.id for e in evaluation_examples(config(folder, "eval.holdout=0.1", "seed=7"), 4, BOUNDS)
    }
    trained = {e.id for e in training_prompts(config(folder, "eval.holdout=0.1"), BOUNDS).take(36)}
    assert len(trained) == 36 and not trained & held
    with pytest.raises(DataError, match=r"eval\.prompts is 5, but the eval\.holdout rows .* has 4 rows"):
        evaluation_examples(config(folder, "eval.holdout=0.1"), 5, BOUNDS)
    with pytest.raises(DataError, match=r"eval\.holdout=0\.99 holds out all 40 rows"):
        training_split(config(folder, "eval.holdout=0.99"))


def test_geometry3k_as_on_the_hub(tmp_path):
    folder = write_geometry3k(tmp_path / "geometry3k")
    run = config(folder)
    train, test = training_split(run), evaluation_split(run)
    assert (train.layout.name, len(train.rows), len(test.rows)) == ("easyr1", 8, 4)
    examples = training_prompts(run, BOUNDS).take(8)
    assert [e.answer for e in examples] == [colour_of(i) for i in range(8)]
    assert [e.id for e in examples] == [f"row-{i}" for i in range(8)]
    assert kinds(examples[0]) == ["image", "text"]
    assert texts(examples[0]) == ["What colour is the square?" + PAPER_INSTRUCTION]
    assert examples[3].images[0].getpixel((28, 28)) == COLOURS["yellow"]  # decoded from the bytes
    assert [e.answer for e in evaluation_examples(run, 4, BOUNDS)] == [colour_of(i) for i in range(8, 12)]


def test_verl_parquet_keeps_its_own_prompt(tmp_path):
    folder = write_verl(tmp_path / "geo3k")
    run = config(folder)
    assert training_split(run).layout.name == "verl"
    example = training_prompts(run, BOUNDS).take(1)[0]
    assert texts(example) == ["What colour is the square?" + VERL_INSTRUCTION]  # no paper instruction
    assert example.messages[0].role == "user" and kinds(example) == ["image", "text"]
    assert (example.id, example.answer, example.data_source) == ("0", "red", "hiyouga/geometry3k")
    assert example.metadata == {
        "ability": "math",
        "split": "train",
        "index": 0,
        "answer": "red",
        "question": "<image>What colour is the square?",
    }
    assert [e.answer for e in evaluation_examples(run, 4, BOUNDS)] == [colour_of(i) for i in range(8, 12)]


def test_save_to_disk_folders_and_jsonl_files(tmp_path):
    saved = write_saved(tmp_path / "saved")
    assert [e.answer for e in training_prompts(config(saved), BOUNDS).take(3)] == ["red", "green", "blue"]
    assert len(evaluation_examples(config(saved), 4, BOUNDS)) == 4
    jsonl = tmp_path / "jsonl"
    (jsonl / "images").mkdir(parents=True)
    square("yellow").save(jsonl / "images/a.png")
    row = {
        "id": "a",
        "problem": "Colour?<image>",
        "answer": "yellow",
        "images": ["images/a.png"],
        "task": "c",
    }
    (jsonl / "train.jsonl").write_text(json.dumps(row) + "\n")
    (example,) = training_prompts(config(jsonl, "data.instruction=''"), BOUNDS).take(1)
    assert (example.id, example.answer, kinds(example), example.metadata) == (
        "a",
        "yellow",
        ["text", "image"],
        {"task": "c"},
    )


def test_columns_that_fit_no_layout_are_named_and_mapped(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    square("green").save(folder / "g.png")
    row = {"query": "<image>Which colour?", "solution": "green", "picture": "g.png", "origin": "mine"}
    (folder / "train.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"columns \(query, solution, picture, origin\).*data\.columns"):
        training_split(config(folder))
    mapped = config(
        folder, "data.columns={problem: query, answer: solution, images: picture, data_source: origin}"
    )
    (example,) = training_prompts(mapped, BOUNDS).take(1)
    assert (example.answer, example.data_source, kinds(example)) == ("green", "mine", ["image", "text"])
    with pytest.raises(DataError, match=r"data\.columns names nothing_here"):
        training_split(
            config(folder, "data.columns={problem: nothing_here, answer: solution, images: picture}")
        )


def test_images_are_sized_within_the_pixel_bounds(tmp_path, tiny):
    processor = load_processor(tiny)
    assert image_bounds(processor, config(tmp_path).data) == BOUNDS
    narrow = image_bounds(processor, config(tmp_path, "data.max_pixels=3136").data)
    assert narrow.fit(square("red", (112, 112))).size == (56, 56)
    assert narrow.fit(square("red", (56, 56))).size == (56, 56)
    with pytest.raises(DataError, match=r"must lie within the model processor's 3136\.\.50176"):
        image_bounds(processor, config(tmp_path, "data.max_pixels=100000").data)
    with pytest.raises(ValueError, match=r"data\.min_pixels cannot exceed data\.max_pixels"):
        config(tmp_path, "data.min_pixels=5000", "data.max_pixels=4000")


def write_with_bad_rows(folder: Path, rows: int, bad: set[int]) -> Path:
    (folder / "images").mkdir(parents=True)
    lines = []
    for i in range(rows):
        name = f"images/{i}.png"
        (folder / name).write_bytes(png(square(colour_of(i)))[:50] if i in bad else png(square(colour_of(i))))
        lines.append(
            json.dumps({"id": f"r{i}", "problem": "Colour?", "answer": colour_of(i), "images": [name]})
        )
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_bad_examples_are_skipped_once_and_counted(tmp_path, caplog):
    folder = write_with_bad_rows(tmp_path / "data", rows=20, bad={3})
    stream = training_prompts(config(folder, "data.max_skip_fraction=0.1"), BOUNDS)
    with caplog.at_level(logging.WARNING):
        taken = stream.take(38)  # nearly two epochs
    assert "r3" not in {e.id for e in taken} and stream.skipped == 1
    warnings = [record.getMessage() for record in caplog.records if "skipped" in record.getMessage()]
    assert len(warnings) == 1 and "example r3: image:" in warnings[0] and "truncated" in warnings[0]
    # The skipped rows are part of a checkpoint's data position.
    resumed = training_prompts(config(folder, "data.max_skip_fraction=0.1"), BOUNDS)
    resumed.restore(stream.state())
    assert resumed.skipped == 1


def test_too_many_bad_examples_stop_the_run(tmp_path):
    folder = write_with_bad_rows(tmp_path / "data", rows=20, bad={1, 2, 5})
    stream = training_prompts(config(folder, "data.max_skip_fraction=0.1"), BOUNDS)
    with pytest.raises(
        DataError, match=r"3 of 20 examples were bad, more than data\.max_skip_fraction \(0\.1\)"
    ):
        stream.take(20)


def test_image_cells_in_every_published_form(tmp_path):
    """A path relative to the dataset folder, ``{bytes, path}`` and ``{path}`` (the Image feature
    undecoded), raw file bytes and verl's ``{image: ...}``: the same pixels each time."""
    from trainer.data import open_image

    square("green").save(tmp_path / "g.png")
    data = png(square("green"))
    cells = ["g.png", {"bytes": data, "path": None}, {"bytes": None, "path": "g.png"}, data, {"image": data}]
    for cell in cells:
        assert open_image(cell, tmp_path, None).getpixel((28, 28)) == COLOURS["green"], cell
    with pytest.raises(ImageError, match="cannot be a int"):
        open_image(3, tmp_path, None)
