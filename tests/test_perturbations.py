"""Perturbed views: sizes, determinism, specs that rebuild views, and what each kind keeps or removes."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable

import numpy as np
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from shared.perturbations import (
    DEFAULT_NEGATIVE_TRANSFORMS,
    DEFAULT_POSITIVE_TRANSFORMS,
    DEFAULT_TRANSFORMS_BY_KIND,
    MASKED_TRANSFORMS,
    NEGATIVE_TRANSFORMS,
    POSITIVE_TRANSFORMS,
    TRANSFORMS_BY_KIND,
    ViewSpec,
    apply_spec,
    perturb,
)
from shared.schemas import RequestedViews
from shared.synth_data import BACKGROUND, COLOURS, Example, ShapeSpec, draw_shape, generate, render

KIND_OF = {
    **dict.fromkeys(POSITIVE_TRANSFORMS, "positive"),
    **dict.fromkeys(NEGATIVE_TRANSFORMS, "negative"),
    **dict.fromkeys(MASKED_TRANSFORMS, "masked"),
}
ALL_TRANSFORMS = tuple(KIND_OF)
INFORMATION_REMOVING = ("grey_out", "pixelate", "heavy_blur", "cutout", "mirror_average")
SEEDS = range(20)
# Below this chroma (max - min channel) a pixel's hue is mostly rounding noise: treat it as grey.
MIN_CHROMA = 12


def scene(width: int = 112, height: int = 112, colour: str = "red", kind: str = "circle") -> Image.Image:
    """One shape of ``colour`` a little off-centre on the synthetic background, any size."""
    image = Image.new("RGB", (width, height), BACKGROUND)
    radius = max(3, min(width, height) // 6)
    centre = (width * 2 // 5, height * 3 // 5)
    draw_shape(ImageDraw.Draw(image), ShapeSpec(kind, colour, centre, radius))
    return image


def view(image: Image.Image, transform: str, seed: int) -> tuple[Image.Image, ViewSpec]:
    return perturb(image, KIND_OF[transform], seed, [transform])


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


def hue(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees of an (..., 3) array; grey pixels get 0."""
    rgb = rgb.astype(np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    top, chroma = rgb.max(-1), np.ptp(rgb, axis=-1)
    safe = np.where(chroma == 0, 1.0, chroma)
    sector = np.where(
        top == r, ((g - b) / safe) % 6, np.where(top == g, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    return np.where(chroma == 0, 0.0, sector * 60.0)


FAMILY_NAMES = list(COLOURS)
FAMILY_HUES = hue(np.array([COLOURS[name] for name in FAMILY_NAMES]))


def hue_distance(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    d = np.abs(np.asarray(a) - np.asarray(b)) % 360
    return np.minimum(d, 360 - d)


def chromatic(image: Image.Image) -> np.ndarray:
    """The pixels that are not near-grey: the shapes, whatever brightness or contrast did to them."""
    rgb = pixels(image).reshape(-1, 3)
    return rgb[np.ptp(rgb, axis=-1) >= MIN_CHROMA]


def family_counts(image: Image.Image) -> dict[str, int]:
    """How many chromatic pixels are nearest, by hue, to each of the six colour families."""
    nearest = hue_distance(hue(chromatic(image))[:, None], FAMILY_HUES[None, :]).argmin(axis=1)
    return {
        FAMILY_NAMES[i]: int((nearest == i).sum()) for i in range(len(FAMILY_NAMES)) if (nearest == i).any()
    }


def dominant_family(image: Image.Image) -> str:
    counts = family_counts(image)
    return max(counts, key=counts.__getitem__)


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(pixels(a) - pixels(b)).mean())


def content(image: Image.Image) -> np.ndarray:
    """Where the image is not the synthetic background."""
    return (pixels(image) != BACKGROUND).any(-1)


def antialiased(colour: str) -> Image.Image:
    """A 112 x 112 circle drawn at 4x and box-downsampled: its edge pixels blend shape and background."""
    big = Image.new("RGB", (448, 448), BACKGROUND)
    draw_shape(ImageDraw.Draw(big), ShapeSpec("circle", colour, (180, 240), 144))
    return big.resize((112, 112), Image.Resampling.BOX)


def synthetic(task: str, count: int = 12) -> list[Example]:
    """``count`` examples of ``task``, rendered as the synthetic dataset renders them."""
    return [example for example in generate("test", 4 * count, seed=0) if example.task == task]


# --- sizes, modes and the transform sets -----------------------------------------------------------


@pytest.mark.parametrize("transform", ALL_TRANSFORMS)
@pytest.mark.parametrize("size", [(112, 112), (120, 90), (90, 120), (29, 57)])
def test_every_transform_keeps_size_and_rgb(transform: str, size: tuple[int, int]) -> None:
    image = scene(*size)
    for seed in range(6):  # enough seeds that perspective is applied at least once
        out, spec = view(image, transform, seed)
        assert out.size == size
        assert out.mode == "RGB"
        assert spec.transform == transform and spec.kind == KIND_OF[transform] and spec.seed == seed


@pytest.mark.parametrize("transform", ALL_TRANSFORMS)
@pytest.mark.parametrize("size", [(1, 1), (1, 40), (40, 1), (2, 1), (2, 2)])
def test_every_transform_takes_an_image_one_or_two_pixels_across(
    transform: str, size: tuple[int, int]
) -> None:
    # A client may send any image the decoder accepts; a 1 x 1 PNG once made perspective raise (a 500).
    image = Image.new("RGB", size, "red")
    for seed in range(6):  # enough seeds that perspective is drawn as applied at least once
        out, spec = view(image, transform, seed)
        assert out.size == size and out.mode == "RGB"
        assert np.array_equal(np.asarray(apply_spec(image, spec)), np.asarray(out))
        if transform == "perspective" and min(size) == 1:
            assert spec.params == {"image_size": list(size), "applied": False, "endpoints": None}


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "1"])
def test_non_rgb_input_gives_rgb_view(mode: str) -> None:
    image = scene(100, 80).convert(mode)
    for kind in ("positive", "negative", "masked"):
        out, spec = perturb(image, kind, 3)
        assert out.mode == "RGB" and out.size == (100, 80)
        assert np.array_equal(np.asarray(apply_spec(image, spec)), np.asarray(out))


def test_the_default_sets_are_the_official_ones_and_accepted() -> None:
    assert DEFAULT_POSITIVE_TRANSFORMS == ("colour_jitter", "perspective", "rotation")
    assert DEFAULT_NEGATIVE_TRANSFORMS == ("noise_occlusion", "zoom_crop")
    assert set(POSITIVE_TRANSFORMS) == {*DEFAULT_POSITIVE_TRANSFORMS, "gaussian_blur"}
    assert set(NEGATIVE_TRANSFORMS) == {*DEFAULT_NEGATIVE_TRANSFORMS, *INFORMATION_REMOVING}
    assert DEFAULT_TRANSFORMS_BY_KIND["masked"] == TRANSFORMS_BY_KIND["masked"] == MASKED_TRANSFORMS


@pytest.mark.parametrize(
    ("kind", "names"),
    [
        ("positive", DEFAULT_POSITIVE_TRANSFORMS),
        ("negative", DEFAULT_NEGATIVE_TRANSFORMS),
        ("masked", MASKED_TRANSFORMS),
    ],
)
def test_default_draw_covers_exactly_the_kinds_official_set(kind: str, names: tuple[str, ...]) -> None:
    """No transforms named: never the light blur for I⁺, never one of the added I⁻ transforms."""
    image = scene(56, 56)
    drawn = {perturb(image, kind, seed)[1].transform for seed in range(60)}
    assert drawn == set(names)


@pytest.mark.parametrize("kind", ["positive", "negative"])
def test_every_accepted_transform_can_be_drawn_and_requested(kind: str) -> None:
    image = scene(56, 56)
    accepted = TRANSFORMS_BY_KIND[kind]
    drawn = {perturb(image, kind, seed, accepted)[1].transform for seed in range(80)}
    assert drawn == set(accepted)
    # A rollout request is checked against the same table.
    views = RequestedViews.model_validate({kind: {"transforms": list(accepted)}})
    assert getattr(views, kind).transforms == list(accepted)


def test_transform_subset_is_respected() -> None:
    image = scene(56, 56)
    drawn = {
        perturb(image, "positive", seed, ["rotation", "gaussian_blur"])[1].transform for seed in range(30)
    }
    assert drawn == {"rotation", "gaussian_blur"}


# --- determinism and specs -----------------------------------------------------------------------


@pytest.mark.parametrize("transform", ALL_TRANSFORMS)
def test_same_seed_same_bytes(transform: str) -> None:
    image = scene(120, 90, "green")
    for seed in (0, 7, 2**63 - 1):
        first, spec_a = view(image, transform, seed)
        second, spec_b = view(image, transform, seed)
        assert first.tobytes() == second.tobytes()
        assert spec_a == spec_b


@pytest.mark.parametrize(
    ("transform", "least_distinct"),
    [
        ("colour_jitter", 20),
        ("rotation", 20),
        ("noise_occlusion", 20),
        ("zoom_crop", 18),
        ("patch_blackening", 20),
        # Applied with probability 0.5: about half the seeds give the input back unchanged.
        ("perspective", 6),
        # One of 97 grey levels: two of 20 seeds may draw the same.
        ("grey_out", 16),
        ("pixelate", 20),
        ("heavy_blur", 20),
        # Covering a cell of plain background changes nothing: grids that cover the same cells of the
        # shape give the same view. (Their grids differ: see the test below.)
        ("cutout", 10),
    ],
)
def test_different_seeds_give_different_views(transform: str, least_distinct: int) -> None:
    image = scene(112, 112, "purple")
    distinct = {view(image, transform, seed)[0].tobytes() for seed in SEEDS}
    assert len(distinct) >= least_distinct


@pytest.mark.parametrize("transform", ["grey_out", "pixelate", "heavy_blur", "cutout"])
def test_different_seeds_draw_different_params(transform: str) -> None:
    params = [view(scene(112, 112), transform, seed)[1].params for seed in SEEDS]
    # grey_out draws one of 97 levels, so two of 20 seeds may share one.
    assert len({json.dumps(p, sort_keys=True) for p in params}) >= 16


@pytest.mark.parametrize("transform", ["gaussian_blur", "mirror_average"])
def test_transforms_with_nothing_to_draw_ignore_the_seed(transform: str) -> None:
    image = scene(112, 112, "orange")
    assert len({view(image, transform, seed)[0].tobytes() for seed in SEEDS}) == 1


@pytest.mark.parametrize("transform", ALL_TRANSFORMS)
def test_spec_rebuilds_view_bit_for_bit_also_after_json(transform: str) -> None:
    image = scene(120, 90, "blue", "triangle")
    for seed in range(8):
        out, spec = view(image, transform, seed)
        wire = ViewSpec.model_validate_json(spec.model_dump_json())
        assert wire == spec
        assert np.array_equal(np.asarray(apply_spec(image, spec)), np.asarray(out))
        assert np.array_equal(np.asarray(apply_spec(image, wire)), np.asarray(out))


@pytest.mark.parametrize("transform", ALL_TRANSFORMS)
def test_spec_params_are_plain_json(transform: str) -> None:
    _, spec = view(scene(64, 48), transform, 5)
    # Plain JSON types only: a tuple or a numpy scalar would not survive the round trip unchanged.
    assert json.loads(json.dumps(spec.params)) == spec.params
    with pytest.raises(pydantic.ValidationError):
        spec.seed = 1  # type: ignore[misc]


# --- information-preserving views keep the answer -------------------------------------------------


@pytest.mark.parametrize("transform", ["perspective", "rotation", "gaussian_blur"])
@pytest.mark.parametrize("colour", list(COLOURS))
def test_geometric_and_blur_views_keep_the_shapes_colour(transform: str, colour: str) -> None:
    image = scene(112, 112, colour, "square")
    shape_pixels = len(chromatic(image))
    for seed in SEEDS:
        out, _ = view(image, transform, seed)
        assert dominant_family(out) == colour
        # The shape is still there, at about its size (blur, warp and rotation move only its edges).
        assert 0.7 * shape_pixels <= len(chromatic(out)) <= 1.3 * shape_pixels


def test_colour_jitter_keeps_the_colour_family() -> None:
    """Brightness and saturation down to 0.2 can grey a shape out almost entirely, and contrast up to 1.8
    clips channels, which moves hue (orange towards red). So: most views show the colour, every view that
    shows colour keeps its hue within 30 degrees, and nearly all of those are still nearest to it."""
    shown = kept = 0
    for colour in COLOURS:
        image = scene(112, 112, colour, "circle")
        for seed in range(40):
            out, spec = view(image, "colour_jitter", seed)
            rgb = chromatic(out)
            if len(rgb) < 50:
                continue
            shown += 1
            weights = np.ptp(rgb, axis=-1)
            angles = np.radians(hue(rgb))
            mean_hue = np.degrees(
                np.arctan2((weights * np.sin(angles)).sum(), (weights * np.cos(angles)).sum())
            )
            assert hue_distance(mean_hue, hue(np.array(COLOURS[colour]))) < 30, (colour, spec.params)
            kept += dominant_family(out) == colour
    total = len(COLOURS) * 40
    assert shown >= 0.9 * total
    assert kept >= 0.9 * shown


def test_colour_jitter_factors_in_their_ranges() -> None:
    image = scene(32, 32)
    for seed in range(50):
        params = view(image, "colour_jitter", seed)[1].params
        assert 0.2 <= params["brightness"] <= 1.3
        assert 0.2 <= params["contrast"] <= 1.8
        assert 0.2 <= params["saturation"] <= 1.8


def test_colour_jitter_at_neutral_factors_is_identity() -> None:
    image = scene(80, 60, "yellow")
    spec = ViewSpec(
        kind="positive",
        transform="colour_jitter",
        params={"brightness": 1.0, "contrast": 1.0, "saturation": 1.0},
        seed=0,
    )
    assert apply_spec(image, spec).tobytes() == image.tobytes()


def test_perspective_is_applied_about_half_the_time_within_its_distortion() -> None:
    width, height = 120, 90
    image = scene(width, height)
    applied = 0
    for seed in range(200):
        out, spec = view(image, "perspective", seed)
        if not spec.params["applied"]:
            assert spec.params["endpoints"] is None
            assert out.tobytes() == image.tobytes()
            continue
        applied += 1
        corners = [[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]]
        for (x, y), (cx, cy) in zip(spec.params["endpoints"], corners, strict=True):
            assert abs(x - cx) <= 0.2 * (width // 2) and abs(y - cy) <= 0.2 * (height // 2)
            assert 0 <= x < width and 0 <= y < height
    assert 80 <= applied <= 120


@pytest.mark.parametrize("transform", ["perspective", "rotation"])
def test_uncovered_area_takes_the_background_colour(transform: str) -> None:
    image = scene(112, 112, "blue")
    for seed in SEEDS:
        out, spec = view(image, transform, seed)
        rgb = pixels(out)
        # Black corners would be new, dark content; the background colour is not.
        for corner in (rgb[0, 0], rgb[0, -1], rgb[-1, 0], rgb[-1, -1]):
            assert tuple(corner) == BACKGROUND, spec.params


def test_rotation_angle_in_range() -> None:
    angles = [view(scene(40, 40), "rotation", seed)[1].params["angle"] for seed in range(100)]
    assert all(-10 <= a <= 10 for a in angles)
    assert min(angles) < -8 and max(angles) > 8


def test_gaussian_blur_is_the_3x3_sigma_1_kernel() -> None:
    dot = np.zeros((9, 9, 3), dtype=np.uint8)
    dot[4, 4] = 255
    out, spec = view(Image.fromarray(dot), "gaussian_blur", 0)
    assert spec.params == {"kernel_size": 3, "sigma": 1.0}
    taps = np.exp(-np.array([1.0, 0.0, 1.0]) / 2)
    kernel = np.outer(taps, taps) / np.outer(taps, taps).sum()
    expected = np.zeros((9, 9), dtype=np.uint8)
    expected[3:6, 3:6] = np.rint(255 * kernel)
    for channel in range(3):
        assert np.array_equal(np.asarray(out)[..., channel], expected)


def test_gaussian_blur_keeps_a_flat_image_flat_up_to_its_edges() -> None:
    flat = Image.new("RGB", (30, 20), (10, 200, 90))
    assert view(flat, "gaussian_blur", 0)[0].tobytes() == flat.tobytes()


# --- information-removing views destroy part of it -------------------------------------------------


def test_noise_occlusion_boxes_and_changed_pixels() -> None:
    width, height = 120, 90
    image = scene(width, height, "blue")
    original = pixels(image)
    shape = (original != BACKGROUND).any(-1)
    for seed in SEEDS:
        out, spec = view(image, "noise_occlusion", seed)
        boxes = spec.params["boxes"]
        assert len(boxes) == 50
        covered = np.zeros((height, width), dtype=bool)
        for left, top, right, bottom in boxes:
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
            assert round(0.05 * width) <= right - left <= round(0.15 * width)
            assert round(0.05 * height) <= bottom - top <= round(0.15 * height)
            covered[top:bottom, left:right] = True
        changed = (pixels(out) != original).any(-1)
        assert not (changed & ~covered).any(), "pixels outside the boxes changed"
        assert changed.sum() >= 0.9 * covered.sum()  # noise equal to the input pixel is rare
        assert (changed & shape).sum() >= 0.10 * shape.sum()


def test_noise_occlusion_noise_is_uniform_over_0_255() -> None:
    out, spec = view(Image.new("RGB", (200, 200), BACKGROUND), "noise_occlusion", 1)
    left, top, right, bottom = spec.params["boxes"][-1]  # painted last, so never overwritten
    noise = np.asarray(out)[top:bottom, left:right]
    assert noise.min() <= 5 and noise.max() >= 250
    assert abs(noise.mean() - 127.5) < 12


def test_zoom_crop_keeps_36_to_49_percent_of_the_area() -> None:
    width, height = 120, 90
    for seed in range(50):
        box = view(scene(width, height), "zoom_crop", seed)[1].params["box"]
        left, top, right, bottom = box
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        fx, fy = (right - left) / width, (bottom - top) / height
        # One fraction for both sides; each side is rounded to whole pixels.
        for fraction, side in ((fx, width), (fy, height)):
            assert 0.6 - 0.5 / side <= fraction <= 0.7 + 0.5 / side
        assert abs(fx - fy) <= 0.5 / width + 0.5 / height
        assert 0.35 <= fx * fy <= 0.50


def test_zoom_crop_cuts_away_corner_shapes() -> None:
    """A crop of at most 70 % of each side cannot reach two opposite corners: of four small shapes, one
    in each corner, at least three are gone from every view."""
    corners = {"red": (8, 8), "green": (103, 8), "blue": (103, 103), "yellow": (8, 103)}
    image = render([ShapeSpec("circle", c, centre, 6) for c, centre in corners.items()], size=112)
    assert set(family_counts(image)) == set(corners)
    for seed in SEEDS:
        out, spec = view(image, "zoom_crop", seed)
        visible = {name for name, count in family_counts(out).items() if count >= 10}
        assert len(visible) <= 1, (spec.params, visible)


@pytest.mark.parametrize("transform", NEGATIVE_TRANSFORMS)
def test_negative_views_change_much_more_than_a_blur(transform: str) -> None:
    image = render(
        [
            ShapeSpec("circle", "red", (30, 30), 14),
            ShapeSpec("square", "blue", (80, 75), 16),
            ShapeSpec("triangle", "green", (35, 85), 14),
        ],
        size=112,
    )
    blurred = mean_abs_diff(view(image, "gaussian_blur", 0)[0], image)
    for seed in SEEDS:
        difference = mean_abs_diff(view(image, transform, seed)[0], image)
        assert difference >= 10
        assert difference >= 5 * blurred


# --- the added information-removing views: each removes one answer of the synthetic tasks ----------


@pytest.mark.parametrize("make", [lambda colour: scene(112, 112, colour, "triangle"), antialiased])
def test_grey_out_views_do_not_depend_on_the_colour(make: Callable[[str], Image.Image]) -> None:
    """Drawn shapes have hard edges. Box-downsampled ones have antialiased edges, whose faintest pixels
    hold 1/16 of the shape's colour: at least 13 levels off the background, so they go grey too."""
    for seed in range(5):
        views = {colour: view(make(colour), "grey_out", seed) for colour in COLOURS}
        first, spec = views["red"]
        for out, _ in views.values():
            assert out.tobytes() == first.tobytes(), spec.params
        rgb, shape = pixels(first), content(make("red"))
        assert (rgb[~shape] == BACKGROUND).all()
        assert (rgb[shape] == spec.params["level"]).all()


def test_grey_out_level_is_a_mid_grey_and_the_tolerance_is_fixed() -> None:
    params = [view(scene(40, 40), "grey_out", seed)[1].params for seed in range(100)]
    assert all(64 <= p["level"] <= 160 and p["tolerance"] == 10 for p in params)
    assert len({p["level"] for p in params}) >= 40


def test_grey_out_takes_the_background_from_the_border() -> None:
    image = Image.new("RGB", (60, 40), (20, 30, 40))
    ImageDraw.Draw(image).rectangle((10, 10, 30, 30), fill=(200, 30, 30))
    image.putpixel((45, 20), (28, 38, 48))  # within the tolerance of the background: kept
    out, spec = view(image, "grey_out", 2)
    rgb, level = pixels(out), spec.params["level"]
    assert (rgb[10:31, 10:31] == level).all()
    assert tuple(rgb[20, 45]) == (28, 38, 48) and tuple(rgb[0, 0]) == (20, 30, 40)


def equal_area_pair(centre: tuple[int, int]) -> tuple[Image.Image, Image.Image]:
    """A red circle and a red square of (almost) the same area about ``centre``: only the outline differs.

    With equal areas the views cannot tell the two apart by how much colour there is, only by its shape.
    """
    circle = render([ShapeSpec("circle", "red", centre, 36)], size=112)
    square = render([ShapeSpec("square", "red", centre, 32)], size=112)
    assert abs(int(content(circle).sum()) - int(content(square).sum())) <= 0.02 * content(square).sum()
    return circle, square


@pytest.mark.parametrize("transform", ["pixelate", "heavy_blur"])
@pytest.mark.parametrize("centre", [(38, 60), (74, 45), (56, 56)])
def test_pixelate_and_heavy_blur_remove_the_outline(transform: str, centre: tuple[int, int]) -> None:
    """The views of a circle and a square of equal area are much closer than the two images are.

    Pixelate's worst case is a grid that cuts the shapes where their outlines differ most: then about
    half the difference is left; on average less than a quarter.
    """
    circle, square = equal_area_pair(centre)
    apart = mean_abs_diff(circle, square)
    left = []
    for seed in SEEDS:
        circle_view, spec = view(circle, transform, seed)
        left.append(mean_abs_diff(circle_view, view(square, transform, seed)[0]) / apart)
        assert left[-1] <= 0.6, spec.params
    assert np.mean(left) <= 0.3


@pytest.mark.parametrize("transform", ["pixelate", "heavy_blur"])
def test_pixelate_and_heavy_blur_keep_the_colour(transform: str) -> None:
    """Over the shape, the view's mean colour is the shape's colour faded towards the grey background:
    on the line between the two (so the hue is the shape's), and at least a quarter of the way out."""
    background = np.array(BACKGROUND)
    for example in synthetic("colour"):
        shape = content(example.image)
        paint = np.array(COLOURS[example.answer]) - background
        for seed in SEEDS:
            out, spec = view(example.image, transform, seed)
            mean = pixels(out)[shape].mean(axis=0) - background
            strength = mean @ paint / (paint @ paint)
            assert strength >= 0.25, spec.params
            assert np.abs(mean - strength * paint).max() <= 2, spec.params
            assert dominant_family(out) == example.answer


@pytest.mark.parametrize("transform", ["pixelate", "heavy_blur"])
def test_pixelate_and_heavy_blur_keep_the_side(transform: str) -> None:
    """The centre of the colour that differs from the background stays on the shape's half."""
    for example in synthetic("position"):
        image = example.image
        columns = np.arange(image.width)
        for seed in range(5):
            weight = np.abs(pixels(view(image, transform, seed)[0]) - BACKGROUND).sum(axis=(0, 2))
            centre = (weight * columns).sum() / weight.sum()
            assert ("left" if centre < image.width / 2 else "right") == example.answer


def test_pixelate_paints_each_cell_of_a_shifted_grid_its_mean_colour() -> None:
    image = scene(120, 90, "green", "diamond")
    for seed in range(10):
        out, spec = view(image, "pixelate", seed)
        block, (x, y) = spec.params["block"], spec.params["offset"]
        assert block == 45 and 0 <= x < block and 0 <= y < block  # two cells along the shorter side
        rows, columns = [0, *range(y, 90, block), 90], [0, *range(x, 120, block), 120]
        for top, bottom in itertools.pairwise(rows):
            for left, right in itertools.pairwise(columns):
                cell = pixels(out)[top:bottom, left:right].reshape(-1, 3)
                mean = pixels(image)[top:bottom, left:right].reshape(-1, 3).mean(axis=0)
                assert (cell == np.rint(mean)).all()


def test_heavy_blur_sigma_is_a_sizeable_fraction_of_the_shorter_side() -> None:
    for seed in range(50):
        sigma = view(scene(120, 90), "heavy_blur", seed)[1].params["sigma"]
        assert 0.12 * 90 <= sigma <= 0.18 * 90


@pytest.mark.parametrize("task", ["count", "shape"])
def test_cutout_covers_most_of_the_content_with_background_only(task: str) -> None:
    removed = []
    for image in (example.image for example in synthetic(task)):
        original = pixels(image)
        shape = content(image)
        for seed in range(5):
            out, spec = view(image, "cutout", seed)
            grid = np.array(spec.params["grid"], dtype=bool)
            assert grid.shape == (4, 4) and grid.sum() == 12
            covered = grid.repeat(28, axis=0).repeat(28, axis=1)  # 4 cells of 28 px across 112 px
            rgb = pixels(out)
            # No new colours: each pixel is the input's, or the background where a cell is covered.
            assert (rgb[covered] == BACKGROUND).all()
            assert (rgb[~covered] == original[~covered]).all()
            removed.append((shape & covered).sum() / shape.sum())
    assert np.mean(removed) >= 0.6


def test_cutout_cells_split_any_size_evenly_and_fill_with_the_border_colour() -> None:
    image = Image.new("RGB", (30, 21), (0, 90, 0))
    ImageDraw.Draw(image).rectangle((2, 2, 27, 18), fill=(250, 250, 0))
    out, spec = view(image, "cutout", 4)
    grid = np.array(spec.params["grid"], dtype=bool)
    rows = np.arange(21) * 4 // 21
    columns = np.arange(30) * 4 // 30
    assert sorted(np.bincount(rows)) == [5, 5, 5, 6] and sorted(np.bincount(columns)) == [7, 7, 8, 8]
    covered = grid[rows[:, None], columns[None, :]]
    rgb = pixels(out)
    assert (rgb[covered] == (0, 90, 0)).all()
    assert (rgb[~covered] == pixels(image)[~covered]).all()


def test_mirror_average_removes_left_and_right() -> None:
    for image in (example.image for example in synthetic("position")):
        mirrored = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out = view(image, "mirror_average", 0)[0]
        assert out.tobytes() == view(mirrored, "mirror_average", 0)[0].tobytes()
        rgb = pixels(out)
        assert (rgb == rgb[:, ::-1]).all()
        # The shape's colour is still there, at half strength on each side.
        assert dominant_family(out) == dominant_family(image)


def test_mirror_average_is_the_rounded_mean() -> None:
    row = np.array([[[0, 10, 255], [7, 8, 9], [100, 101, 102], [1, 11, 254]]], dtype=np.uint8)
    out, spec = view(Image.fromarray(row), "mirror_average", 3)
    assert spec.params == {}
    expected = np.array([[[1, 11, 255], [54, 55, 56], [54, 55, 56], [1, 11, 255]]])
    assert (pixels(out) == expected).all()


# --- patch blackening (PAPO) -----------------------------------------------------------------------


def test_patch_blackening_blacks_out_about_60_percent_of_14px_patches() -> None:
    width, height = 14 * 40 + 5, 14 * 30 + 9  # partial patches on the right and bottom edges
    image = Image.new("RGB", (width, height), BACKGROUND)
    for seed in range(3):
        out, spec = view(image, "patch_blackening", seed)
        grid = np.array(spec.params["grid"], dtype=bool)
        assert spec.params["patch_size"] == 14
        assert grid.shape == (31, 41)
        assert 0.55 <= grid.mean() <= 0.65
        rgb = pixels(out)
        expected_black = grid.repeat(14, 0).repeat(14, 1)[:height, :width]
        assert (rgb[expected_black] == 0).all()
        assert (rgb[~expected_black] == BACKGROUND).all()


def test_patch_blackening_leaves_unmasked_patches_untouched() -> None:
    image = scene(100, 70, "orange", "diamond")
    out, spec = view(image, "patch_blackening", 11)
    kept = ~np.array(spec.params["grid"], dtype=bool).repeat(14, 0).repeat(14, 1)[:70, :100]
    assert np.array_equal(pixels(out)[kept], pixels(image)[kept])


# --- bad inputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "neutral", "seed": 0}, r"unknown perturbation kind 'neutral'.*positive.*negative.*masked"),
        (
            {"kind": "positive", "seed": 0, "transforms": ["sharpen"]},
            r"unknown transform 'sharpen'.*rotation",
        ),
        (
            {"kind": "positive", "seed": 0, "transforms": ["rotation", "zoom_crop"]},
            r"'zoom_crop' is a negative transform, not a positive one.*colour_jitter",
        ),
        (
            {"kind": "masked", "seed": 0, "transforms": ["gaussian_blur"]},
            r"'gaussian_blur'.*patch_blackening",
        ),
        (
            {"kind": "positive", "seed": 0, "transforms": ["grey_out"]},
            r"'grey_out' is a negative transform, not a positive one",
        ),
        ({"kind": "negative", "seed": 0, "transforms": []}, r"at least one negative transform"),
        ({"kind": "positive", "seed": 0, "transforms": "rotation"}, r"sequence of names.*'rotation'"),
        ({"kind": "positive", "seed": -1}, r"non-negative.*-1"),
        ({"kind": "positive", "seed": 2**63}, r"below 2\*\*63"),
        ({"kind": "positive", "seed": 1.0}, r"seed must be an int"),
        ({"kind": "positive", "seed": True}, r"seed must be an int"),
    ],
)
def test_bad_inputs_raise_value_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        perturb(scene(32, 32), **kwargs)


def test_spec_for_another_size_is_refused() -> None:
    _, spec = view(scene(64, 64), "zoom_crop", 0)
    with pytest.raises(ValueError, match=r"drawn for a 64x64 image, got 64x48"):
        apply_spec(scene(64, 48), spec)


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "positive", "transform": "zoom_crop", "params": {}, "seed": 0},
        {"kind": "negative", "transform": "sharpen", "params": {}, "seed": 0},
        {"kind": "positive", "transform": "cutout", "params": {"grid": [[True]]}, "seed": 0},
        {"kind": "other", "transform": "rotation", "params": {}, "seed": 0},
        {"kind": "positive", "transform": "rotation", "params": {"angle": 1.0}, "seed": -3},
    ],
)
def test_invalid_spec_from_the_wire_is_refused(fields: dict) -> None:
    with pytest.raises(ValueError):
        ViewSpec.model_validate_json(json.dumps(fields))


# --- property --------------------------------------------------------------------------------------


@settings(max_examples=40)
@given(
    seed=st.integers(0, 2**63 - 1),
    width=st.integers(28, 200),
    height=st.integers(28, 200),
    kind=st.sampled_from(["positive", "negative", "masked"]),
    colour=st.sampled_from(list(COLOURS)),
    accepted=st.booleans(),
)
def test_any_seed_and_size_keeps_size_and_rebuilds(
    seed: int, width: int, height: int, kind: str, colour: str, accepted: bool
) -> None:
    image = scene(width, height, colour)
    out, spec = perturb(image, kind, seed, TRANSFORMS_BY_KIND[kind] if accepted else None)
    assert out.size == (width, height) and out.mode == "RGB"
    rebuilt = apply_spec(image, ViewSpec.model_validate_json(spec.model_dump_json()))
    assert np.array_equal(np.asarray(rebuilt), np.asarray(out))
