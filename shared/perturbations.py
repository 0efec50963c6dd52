"""Deterministic image perturbations: the views CPPO contrasts the policy's perception with.

CPPO compares the policy's output distribution on the original image ``I`` with its distribution on
two kinds of perturbed views:

* **information-preserving views** (``positive``, I⁺): colour jitter, a mild perspective warp, a small
  rotation or a light blur. The answer to the question is still readable from the view, so the policy's
  perception tokens should be as likely under I⁺ as under I.
* **information-removing views** (``negative``, I⁻): random noise patches over the image or a tight
  zoom-in crop. Part of the answer-bearing content is destroyed or cut away, so perception tokens that
  truly depend on the image should become less likely under I⁻.

A third kind, ``masked``, is PAPO's patch blackening: it is neither set, and is offered for baselines.

Each kind *accepts* the transforms in :data:`TRANSFORMS_BY_KIND` and draws from the official recipe's
set, :data:`DEFAULT_TRANSFORMS_BY_KIND`, when none are named. The official I⁻ views were made for
diagrams where small marks carry the answer; on an image where one large shape carries it they remove
nothing. The other accepted I⁻ transforms each remove one kind of answer from such an image, to be
chosen per example: ``grey_out`` its colour, ``pixelate`` and ``heavy_blur`` its outline, ``cutout``
most of its objects, ``mirror_average`` its side. The official recipe's light Gaussian blur is accepted
as I⁺ but, as there, not drawn by default.

Every view keeps the input's size and is RGB. A view is described by a :class:`ViewSpec` (the kind, the
transform, every drawn parameter and the seed); :func:`perturb` draws the spec with
``numpy.random.default_rng(seed)`` and applies it, and :func:`apply_spec` rebuilds the same bytes from
the spec alone, so a spec can travel between services instead of the image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

import numpy as np
import pydantic
from PIL import Image, ImageEnhance, ImageFilter

PerturbationKind = Literal["positive", "negative", "masked"]
DEFAULT_POSITIVE_TRANSFORMS: tuple[str, ...] = ("colour_jitter", "perspective", "rotation")
DEFAULT_NEGATIVE_TRANSFORMS: tuple[str, ...] = ("noise_occlusion", "zoom_crop")
POSITIVE_TRANSFORMS: tuple[str, ...] = (*DEFAULT_POSITIVE_TRANSFORMS, "gaussian_blur")
NEGATIVE_TRANSFORMS: tuple[str, ...] = (
    *DEFAULT_NEGATIVE_TRANSFORMS,
    "grey_out",
    "pixelate",
    "heavy_blur",
    "cutout",
    "mirror_average",
)
MASKED_TRANSFORMS: tuple[str, ...] = ("patch_blackening",)

KINDS: tuple[str, ...] = get_args(PerturbationKind)
TRANSFORMS_BY_KIND: dict[str, tuple[str, ...]] = {
    "positive": POSITIVE_TRANSFORMS,
    "negative": NEGATIVE_TRANSFORMS,
    "masked": MASKED_TRANSFORMS,
}
"""The transforms each kind accepts."""
DEFAULT_TRANSFORMS_BY_KIND: dict[str, tuple[str, ...]] = {
    "positive": DEFAULT_POSITIVE_TRANSFORMS,
    "negative": DEFAULT_NEGATIVE_TRANSFORMS,
    "masked": MASKED_TRANSFORMS,
}
"""The transforms each kind draws from when none are named: the official recipe's sets."""
SEED_LIMIT = 2**63
"""Seeds are in ``[0, SEED_LIMIT)``: any non-negative signed 64-bit integer."""

BRIGHTNESS_RANGE = (0.2, 1.3)
CONTRAST_RANGE = (0.2, 1.8)
SATURATION_RANGE = (0.2, 1.8)
PERSPECTIVE_DISTORTION = 0.2
PERSPECTIVE_PROBABILITY = 0.5
ROTATION_DEGREES = 10.0
BLUR_KERNEL_SIZE = 3
BLUR_SIGMA = 1.0
OCCLUSION_PATCHES = 50
OCCLUSION_SIDE_RANGE = (0.05, 0.15)
ZOOM_FRACTION_RANGE = (0.6, 0.7)
GREY_LEVEL_RANGE = (64, 160)
GREY_TOLERANCE = 10
PIXELATE_CELLS = 2
HEAVY_BLUR_FRACTION_RANGE = (0.12, 0.18)
CUTOUT_CELLS = 4
CUTOUT_FILLED = 12
MASK_PATCH_SIZE = 14
MASK_PROBABILITY = 0.6

Params = dict[str, Any]
Size = tuple[int, int]


class ViewSpec(pydantic.BaseModel):
    """How one view was made; enough to rebuild it bit for bit from the same input image.

    Transforms whose parameters are in pixels also record ``image_size`` ([width, height]), so that the
    spec is not applied to an image of another size by mistake.
    """

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    kind: PerturbationKind
    transform: str
    params: dict[str, Any]
    seed: Annotated[int, pydantic.Field(strict=True, ge=0, lt=SEED_LIMIT)]

    @pydantic.model_validator(mode="after")
    def _transform_belongs_to_kind(self) -> ViewSpec:
        _check_transform(self.kind, self.transform)
        return self


# --- validation ----------------------------------------------------------------------------------


def _check_kind(kind: str) -> None:
    if kind not in TRANSFORMS_BY_KIND:
        raise ValueError(f"unknown perturbation kind {kind!r}; expected one of {list(KINDS)}")


def _check_transform(kind: str, transform: str) -> None:
    allowed = TRANSFORMS_BY_KIND[kind]
    if transform in allowed:
        return
    owner = next((k for k, names in TRANSFORMS_BY_KIND.items() if transform in names), None)
    if owner is None:
        known = [name for names in TRANSFORMS_BY_KIND.values() for name in names]
        raise ValueError(f"unknown transform {transform!r}; known transforms: {known}")
    raise ValueError(
        f"transform {transform!r} is a {owner} transform, not a {kind} one; "
        f"the {kind} transforms are {list(allowed)}"
    )


def _check_seed(seed: int) -> int:
    # bool is an int subclass, and a True seed is almost certainly a bug at the call site.
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be a non-negative int below 2**63, got {seed}")
    return int(seed)


# --- helpers -------------------------------------------------------------------------------------


def _border_colour(image: Image.Image) -> tuple[int, int, int]:
    """The most common colour on the image's outermost pixels (ties: the smallest RGB triple).

    Areas a warp uncovers are filled with it, so they read as background rather than as new content.
    """
    pixels = np.asarray(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    colours, counts = np.unique(border, axis=0, return_counts=True)
    return tuple(int(c) for c in colours[int(np.argmax(counts))])


def _perspective_coefficients(endpoints: list[list[int]], startpoints: list[list[int]]) -> list[float]:
    """The 8 coefficients PIL's PERSPECTIVE transform needs, mapping output points back to input points.

    PIL maps each output pixel (x, y) to the input pixel ((a x + b y + c) / (g x + h y + 1),
    (d x + e y + f) / (g x + h y + 1)); four point pairs give the 8 linear equations in a..h.
    """
    matrix = np.zeros((8, 8), dtype=np.float64)
    rhs = np.zeros(8, dtype=np.float64)
    for i, ((x, y), (u, v)) in enumerate(zip(endpoints, startpoints, strict=True)):
        matrix[2 * i] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        matrix[2 * i + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
        rhs[2 * i], rhs[2 * i + 1] = u, v
    return [float(c) for c in np.linalg.solve(matrix, rhs)]


def _corners(size: Size) -> list[list[int]]:
    width, height = size
    return [[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]]


# --- information-preserving transforms (I⁺) -------------------------------------------------------


def colour_jitter(image: Image.Image, brightness: float, contrast: float, saturation: float) -> Image.Image:
    """Scale brightness, then contrast, then saturation by the given factors (PIL ImageEnhance).

    Drawn uniformly: brightness in [0.2, 1.3], contrast in [0.2, 1.8], saturation in [0.2, 1.8].
    """
    image = ImageEnhance.Brightness(image).enhance(brightness)
    image = ImageEnhance.Contrast(image).enhance(contrast)
    return ImageEnhance.Color(image).enhance(saturation)


def _draw_colour_jitter(rng: np.random.Generator, size: Size) -> Params:
    return {
        "brightness": float(rng.uniform(*BRIGHTNESS_RANGE)),
        "contrast": float(rng.uniform(*CONTRAST_RANGE)),
        "saturation": float(rng.uniform(*SATURATION_RANGE)),
    }


def perspective(image: Image.Image, applied: bool, endpoints: list[list[int]] | None) -> Image.Image:
    """Warp the image so its corners (top-left, top-right, bottom-right, bottom-left) land on ``endpoints``.

    Drawn as torchvision's RandomPerspective with distortion scale 0.2: each corner moves inwards by up
    to 0.2 of half the side along each axis; the warp is applied with probability 0.5 (otherwise the view
    is the input and ``endpoints`` is None). Bilinear; uncovered area takes the border colour.
    """
    if not applied or endpoints is None:
        return image.copy()
    coefficients = _perspective_coefficients(endpoints, _corners(image.size))
    return image.transform(
        image.size,
        Image.Transform.PERSPECTIVE,
        coefficients,
        resample=Image.Resampling.BILINEAR,
        fillcolor=_border_colour(image),
    )


def _draw_perspective(rng: np.random.Generator, size: Size) -> Params:
    applied = bool(rng.random() < PERSPECTIVE_PROBABILITY)
    # An image one pixel wide or high has no quadrilateral to warp: its corners are collinear, and the
    # coefficients' equations singular. Drawn after the coin, so that other sizes draw as before.
    if not applied or min(size) < 2:
        return {"image_size": list(size), "applied": False, "endpoints": None}
    width, height = size
    reach_x = int(PERSPECTIVE_DISTORTION * (width // 2)) + 1
    reach_y = int(PERSPECTIVE_DISTORTION * (height // 2)) + 1
    inward = [[int(rng.integers(0, reach_x)), int(rng.integers(0, reach_y))] for _ in range(4)]
    # Each corner moves towards the centre: +x on the left, -x on the right, +y on top, -y at the bottom.
    signs = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
    endpoints = [
        [cx + sx * dx, cy + sy * dy]
        for (cx, cy), (sx, sy), (dx, dy) in zip(_corners(size), signs, inward, strict=True)
    ]
    return {"image_size": list(size), "applied": True, "endpoints": endpoints}


def rotation(image: Image.Image, angle: float) -> Image.Image:
    """Rotate by ``angle`` degrees (anticlockwise) about the centre, same size, bilinear, border fill.

    Drawn uniformly in [-10, 10] degrees.
    """
    return image.rotate(
        angle, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=_border_colour(image)
    )


def _draw_rotation(rng: np.random.Generator, size: Size) -> Params:
    return {"angle": float(rng.uniform(-ROTATION_DEGREES, ROTATION_DEGREES))}


def gaussian_blur(image: Image.Image, kernel_size: int, sigma: float) -> Image.Image:
    """Convolve with a ``kernel_size`` x ``kernel_size`` Gaussian of standard deviation ``sigma``.

    Always kernel size 3 and sigma 1.0 (nothing is drawn). The kernel is separable and applied in
    float64 with edge padding; PIL's GaussianBlur takes a radius instead, and its Kernel filter leaves
    the outermost pixels unblurred.
    """
    half = kernel_size // 2
    taps = np.exp(-(np.arange(-half, half + 1, dtype=np.float64) ** 2) / (2 * sigma**2))
    taps /= taps.sum()
    pixels = np.pad(np.asarray(image, dtype=np.float64), ((half, half), (half, half), (0, 0)), mode="edge")
    height, width = image.height, image.width
    rows = sum(w * pixels[i : i + height] for i, w in enumerate(taps))
    blurred = sum(w * rows[:, i : i + width] for i, w in enumerate(taps))
    return Image.fromarray(np.clip(np.rint(blurred), 0, 255).astype(np.uint8), mode="RGB")


def _draw_gaussian_blur(rng: np.random.Generator, size: Size) -> Params:
    return {"kernel_size": BLUR_KERNEL_SIZE, "sigma": BLUR_SIGMA}


# --- information-removing transforms (I⁻) ---------------------------------------------------------


def noise_occlusion(image: Image.Image, boxes: list[list[int]], noise_seed: int) -> Image.Image:
    """Paint each box (left, top, right, bottom; right/bottom exclusive) with uniform RGB noise in 0..255.

    Drawn: 50 boxes, each side independently 5-15 % of the image's width (height), placed uniformly
    fully inside the image. The noise comes from ``default_rng(noise_seed)``, box by box in order.
    """
    pixels = np.array(image)
    noise_rng = np.random.default_rng(noise_seed)
    for left, top, right, bottom in boxes:
        pixels[top:bottom, left:right] = noise_rng.integers(
            0, 256, size=(bottom - top, right - left, 3), dtype=np.uint8
        )
    return Image.fromarray(pixels, mode="RGB")


def _draw_noise_occlusion(rng: np.random.Generator, size: Size) -> Params:
    width, height = size
    boxes = []
    for _ in range(OCCLUSION_PATCHES):
        box_width = max(1, round(float(rng.uniform(*OCCLUSION_SIDE_RANGE)) * width))
        box_height = max(1, round(float(rng.uniform(*OCCLUSION_SIDE_RANGE)) * height))
        left = int(rng.integers(0, width - box_width + 1))
        top = int(rng.integers(0, height - box_height + 1))
        boxes.append([left, top, left + box_width, top + box_height])
    return {"image_size": list(size), "boxes": boxes, "noise_seed": int(rng.integers(0, SEED_LIMIT))}


def zoom_crop(image: Image.Image, box: list[int]) -> Image.Image:
    """Keep ``box`` (left, top, right, bottom) and resize it back to the image's size, bilinear.

    Drawn: one fraction uniform in [0.6, 0.7] for both sides, so the crop keeps the image's aspect ratio
    and the shapes are magnified, not distorted; the box is placed uniformly inside the image. About
    36-49 % of the image's area survives.
    """
    return image.resize(image.size, Image.Resampling.BILINEAR, box=tuple(box))


def _draw_zoom_crop(rng: np.random.Generator, size: Size) -> Params:
    width, height = size
    fraction = float(rng.uniform(*ZOOM_FRACTION_RANGE))
    crop_width, crop_height = max(1, round(fraction * width)), max(1, round(fraction * height))
    left = int(rng.integers(0, width - crop_width + 1))
    top = int(rng.integers(0, height - crop_height + 1))
    return {"image_size": list(size), "box": [left, top, left + crop_width, top + crop_height]}


def grey_out(image: Image.Image, level: int, tolerance: int) -> Image.Image:
    """Set every pixel that is not background to the one grey ``level``: removes the content's colour.

    Background is the border colour (:func:`_border_colour`); a pixel is background when each channel is
    within ``tolerance`` of it. Plain greyscale would keep each colour's luminance, and a policy can learn
    to read the colour from that; one level for all content leaves only the outlines. The tolerance is
    small, so an antialiased edge pixel with a few percent of a shape's colour already goes grey. Drawn:
    ``level`` uniform in 64..160, a mid grey that stays visible on a white or a black background;
    ``tolerance`` always 10.
    """
    pixels = np.array(image)
    background = np.array(_border_colour(image), dtype=np.int16)
    content = (np.abs(pixels.astype(np.int16) - background) > tolerance).any(axis=-1)
    pixels[content] = level
    return Image.fromarray(pixels, mode="RGB")


def _draw_grey_out(rng: np.random.Generator, size: Size) -> Params:
    low, high = GREY_LEVEL_RANGE
    return {"level": int(rng.integers(low, high + 1)), "tolerance": GREY_TOLERANCE}


def _cell_starts(length: int, block: int, offset: int) -> np.ndarray:
    """Where each cell of a ``block``-pixel grid shifted by ``offset`` starts along a side of ``length``.

    The pixels before ``offset`` form a partial first cell; the last cell may be partial too.
    """
    return np.unique(np.r_[0, np.arange(offset, length, block)])


def pixelate(image: Image.Image, block: int, offset: list[int]) -> Image.Image:
    """Replace each ``block`` x ``block`` cell by its mean colour: removes outlines and small marks.

    The grid is shifted right and down by ``offset`` ([x, y]) pixels; the edge cells may be partial. A
    shape becomes a few flat cells of its colour blended with the background (blending with a grey
    background keeps the hue), still on its side, but its outline is gone. Drawn: 2 cells along the
    shorter side (``block`` = half that side, rounded up), as large as the synthetic shapes (2/3 of the
    side), since with smaller cells the pattern of cells still draws the outline; and an offset uniform
    in [0, block) on each axis, so that where the cell edges cut a shape does not follow from where the
    shape is.
    """
    pixels = np.asarray(image, dtype=np.float64)
    rows = _cell_starts(image.height, block, offset[1])
    columns = _cell_starts(image.width, block, offset[0])
    heights = np.diff(np.r_[rows, image.height])
    widths = np.diff(np.r_[columns, image.width])
    sums = np.add.reduceat(np.add.reduceat(pixels, rows, axis=0), columns, axis=1)
    means = np.rint(sums / (heights[:, None, None] * widths[None, :, None])).astype(np.uint8)
    return Image.fromarray(means.repeat(heights, axis=0).repeat(widths, axis=1), mode="RGB")


def _draw_pixelate(rng: np.random.Generator, size: Size) -> Params:
    block = -(-min(size) // PIXELATE_CELLS)
    offset = [int(rng.integers(0, block)), int(rng.integers(0, block))]
    return {"image_size": list(size), "block": block, "offset": offset}


def heavy_blur(image: Image.Image, sigma: float) -> Image.Image:
    """Gaussian blur of standard deviation ``sigma`` pixels (PIL's GaussianBlur): removes outlines.

    A shape turns into a round blob of its colour on its side of the image; corners and edges, which tell
    a square from a circle, are gone. Drawn: ``sigma`` uniform in 12-18 % of the shorter side. PIL
    approximates the Gaussian by repeated box blurs, whose cost does not grow with ``sigma``; the exact
    separable kernel of :func:`gaussian_blur` would need hundreds of taps on a large image.
    """
    return image.filter(ImageFilter.GaussianBlur(sigma))


def _draw_heavy_blur(rng: np.random.Generator, size: Size) -> Params:
    return {"image_size": list(size), "sigma": float(rng.uniform(*HEAVY_BLUR_FRACTION_RANGE)) * min(size)}


def cutout(image: Image.Image, grid: list[list[bool]]) -> Image.Image:
    """Fill every cell whose ``grid[row][column]`` is true with the background: removes most objects.

    The grid's rows and columns split the image's height and width as evenly as whole pixels allow, and
    the fill is the border colour (:func:`_border_colour`), so a covered object is simply gone: noise
    patches would read as extra objects, and black ones as dark objects. Drawn: a 4 x 4 grid with 12
    cells filled, chosen uniformly, so 3/4 of the image is covered. Four cells per side match the grid
    the synthetic counting images place their shapes on, so a shape is mostly kept or removed whole and
    the number of shapes left says little about the number there were.
    """
    filled = np.asarray(grid, dtype=bool)
    rows, columns = filled.shape
    row_of = np.arange(image.height) * rows // image.height
    column_of = np.arange(image.width) * columns // image.width
    pixels = np.array(image)
    pixels[filled[row_of[:, None], column_of[None, :]]] = _border_colour(image)
    return Image.fromarray(pixels, mode="RGB")


def _draw_cutout(rng: np.random.Generator, size: Size) -> Params:
    grid = np.zeros(CUTOUT_CELLS * CUTOUT_CELLS, dtype=bool)
    grid[rng.choice(grid.size, size=CUTOUT_FILLED, replace=False)] = True
    return {"grid": grid.reshape(CUTOUT_CELLS, CUTOUT_CELLS).tolist()}


def mirror_average(image: Image.Image) -> Image.Image:
    """The mean of the image and its left-right mirror image, rounded half up: removes left and right.

    The view is symmetric, and an image and its mirror image give the same view, so nothing in it says
    which side a shape was on; the shape shows on both sides at half strength, its colour blended with
    what is opposite. Nothing is drawn.
    """
    pixels = np.asarray(image, dtype=np.uint16)
    return Image.fromarray(((pixels + pixels[:, ::-1] + 1) // 2).astype(np.uint8), mode="RGB")


def _draw_mirror_average(rng: np.random.Generator, size: Size) -> Params:
    return {}


# --- masked (PAPO) -------------------------------------------------------------------------------


def patch_blackening(image: Image.Image, patch_size: int, grid: list[list[bool]]) -> Image.Image:
    """Set to black every ``patch_size`` patch whose ``grid[row][column]`` is true.

    The grid starts at the top-left corner; patches on the right and bottom edges may be partial. Drawn:
    patch size 14, each patch blackened independently with probability 0.6.
    """
    mask = np.asarray(grid, dtype=bool).repeat(patch_size, axis=0).repeat(patch_size, axis=1)
    pixels = np.array(image)
    pixels[mask[: image.height, : image.width]] = 0
    return Image.fromarray(pixels, mode="RGB")


def _draw_patch_blackening(rng: np.random.Generator, size: Size) -> Params:
    width, height = size
    rows, columns = -(-height // MASK_PATCH_SIZE), -(-width // MASK_PATCH_SIZE)
    grid = rng.random((rows, columns)) < MASK_PROBABILITY
    return {"image_size": list(size), "patch_size": MASK_PATCH_SIZE, "grid": grid.tolist()}


# --- entry points --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Transform:
    draw: Callable[[np.random.Generator, Size], Params]
    apply: Callable[..., Image.Image]


_TRANSFORMS: dict[str, _Transform] = {
    "colour_jitter": _Transform(_draw_colour_jitter, colour_jitter),
    "perspective": _Transform(_draw_perspective, perspective),
    "rotation": _Transform(_draw_rotation, rotation),
    "gaussian_blur": _Transform(_draw_gaussian_blur, gaussian_blur),
    "noise_occlusion": _Transform(_draw_noise_occlusion, noise_occlusion),
    "zoom_crop": _Transform(_draw_zoom_crop, zoom_crop),
    "grey_out": _Transform(_draw_grey_out, grey_out),
    "pixelate": _Transform(_draw_pixelate, pixelate),
    "heavy_blur": _Transform(_draw_heavy_blur, heavy_blur),
    "cutout": _Transform(_draw_cutout, cutout),
    "mirror_average": _Transform(_draw_mirror_average, mirror_average),
    "patch_blackening": _Transform(_draw_patch_blackening, patch_blackening),
}


def draw_spec(
    size: Size, kind: PerturbationKind, seed: int, transforms: Sequence[str] | None = None
) -> ViewSpec:
    """Draw one transform of ``kind`` (among ``transforms``, default the kind's official set) and its
    parameters for an image of ``size`` (width, height), with ``numpy.random.default_rng(seed)``."""
    _check_kind(kind)
    seed = _check_seed(seed)
    # A bare name would otherwise be read as a sequence of one-letter transform names.
    if isinstance(transforms, str):
        raise ValueError(f"transforms must be a sequence of names, not the string {transforms!r}")
    candidates = DEFAULT_TRANSFORMS_BY_KIND[kind] if transforms is None else tuple(transforms)
    if not candidates:
        raise ValueError(f"transforms must name at least one {kind} transform, got none")
    for name in candidates:
        _check_transform(kind, name)
    rng = np.random.default_rng(seed)
    name = candidates[int(rng.integers(len(candidates)))]
    params = _TRANSFORMS[name].draw(rng, (int(size[0]), int(size[1])))
    return ViewSpec(kind=kind, transform=name, params=params, seed=seed)


def apply_spec(image: Image.Image, spec: ViewSpec) -> Image.Image:
    """Rebuild the view ``spec`` describes from ``image``: the same image in gives the same bytes out."""
    image = image.convert("RGB")
    params = dict(spec.params)
    drawn_for = params.pop("image_size", None)
    if drawn_for is not None and list(image.size) != list(drawn_for):
        raise ValueError(
            f"the {spec.transform} spec was drawn for a {drawn_for[0]}x{drawn_for[1]} image, "
            f"got {image.width}x{image.height}"
        )
    try:
        return _TRANSFORMS[spec.transform].apply(image, **params)
    except TypeError as error:
        # A spec from the wire may carry the wrong parameter names; say which, not where it broke.
        raise ValueError(
            f"the {spec.transform} spec has the wrong params {sorted(params)}: {error}"
        ) from error


def perturb(
    image: Image.Image, kind: PerturbationKind, seed: int, transforms: Sequence[str] | None = None
) -> tuple[Image.Image, ViewSpec]:
    """Draw one transform from ``transforms`` (default: the kind's official set) with a generator seeded
    by ``seed``, draw its parameters, apply. Returns the view and the spec."""
    spec = draw_spec(image.size, kind, seed, transforms)
    return apply_spec(image, spec), spec
