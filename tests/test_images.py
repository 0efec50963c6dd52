"""Image URLs: what decodes, what round-trips, and that every refusal has its own code and message."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image, ImageFile

from shared import images
from shared.images import DEFAULT_LIMITS, ImageError, ImageLimits, decode_image_url, encode_image_data_url


def noise(width: int = 24, height: int = 16, seed: int = 0) -> np.ndarray:
    """Random RGB pixels: incompressible, so every byte of a file carries image data."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def gradient(side: int = 32) -> np.ndarray:
    """A smooth RGB image, which lossy JPEG keeps close."""
    y, x = np.mgrid[0:side, 0:side]
    return np.stack([x * 8, y * 8, (x + y) * 4], axis=-1).astype(np.uint8)


def file_bytes(pixels: np.ndarray | Image.Image, fmt: str, **options: object) -> bytes:
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


def refusal(url: str, limits: ImageLimits = DEFAULT_LIMITS) -> ImageError:
    with pytest.raises(ImageError) as caught:
        decode_image_url(url, limits)
    return caught.value


@cache
def bomb_png(side: int) -> bytes:
    """A valid 1-bit grayscale PNG of side x side black pixels: tiny on disk, huge once decoded.

    ``side`` is a multiple of 1000.
    """

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    # Each row is a filter byte and side/8 bytes of pixels; compressed in blocks to stay small in memory.
    rows_per_block = 1000
    block = bytes((1 + (side + 7) // 8) * rows_per_block)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(block) for _ in range(side // rows_per_block)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any image's pixels get decoded (and so allocated)."""

    def refuse(self: ImageFile.ImageFile) -> None:
        raise AssertionError(f"pixels of a {self.size} image were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# --- what decodes ----------------------------------------------------------------------------------


def test_png_decodes_pixel_exact() -> None:
    pixels = noise()
    image = decode_image_url(data_url(file_bytes(pixels, "PNG")))
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), pixels)


def test_jpeg_decodes_close_to_the_original() -> None:
    pixels = gradient()
    image = decode_image_url(data_url(file_bytes(pixels, "JPEG", quality=95), "image/jpeg"))
    assert image.mode == "RGB"
    error = np.abs(np.asarray(image).astype(int) - pixels)
    assert error.mean() < 2 and error.max() < 16


def test_webp_decodes() -> None:
    pixels = noise()
    lossless = decode_image_url(data_url(file_bytes(pixels, "WEBP", lossless=True), "image/webp"))
    np.testing.assert_array_equal(np.asarray(lossless), pixels)
    lossy = decode_image_url(data_url(file_bytes(gradient(), "WEBP", quality=90), "image/webp"))
    assert lossy.mode == "RGB" and lossy.size == (32, 32)


def test_multi_picture_jpeg_is_a_jpeg() -> None:
    """Phone cameras write JPEGs with an MPO extension, which PIL names as another format."""
    first = Image.fromarray(gradient())
    raw = file_bytes(first, "MPO", save_all=True, append_images=[first.rotate(90)])
    image = decode_image_url(data_url(raw, "image/jpeg"))
    assert image.size == (32, 32)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "1", "I;16"])
def test_every_png_mode_decodes_to_rgb(mode: str) -> None:
    image = decode_image_url(data_url(file_bytes(Image.new(mode, (5, 4)), "PNG")))
    assert image.mode == "RGB" and image.size == (5, 4)


def test_mime_type_and_scheme_are_case_insensitive() -> None:
    url = data_url(file_bytes(noise(), "PNG")).replace("data:image/png;base64", "DATA:Image/PNG;Base64")
    assert decode_image_url(url).size == (24, 16)


def test_decoded_image_is_loaded_and_independent_of_the_file() -> None:
    image = decode_image_url(data_url(file_bytes(noise(), "PNG")))
    # A lazily loaded image would fail here, once its file object is closed.
    assert image.getpixel((0, 0)) == tuple(noise()[0, 0])


@settings(max_examples=30)
@given(arrays(np.uint8, st.tuples(st.integers(1, 16), st.integers(1, 16), st.just(3))))
def test_encode_decode_round_trip_is_pixel_exact(pixels: np.ndarray) -> None:
    url = encode_image_data_url(Image.fromarray(pixels, "RGB"))
    assert url.startswith("data:image/png;base64,")
    np.testing.assert_array_equal(np.asarray(decode_image_url(url)), pixels)


def test_encode_converts_modes_png_cannot_store() -> None:
    url = encode_image_data_url(Image.new("CMYK", (3, 3), (0, 255, 0, 0)))
    assert decode_image_url(url).getpixel((1, 1)) == (255, 0, 255)


def test_image_of_exactly_the_byte_limit_is_accepted() -> None:
    raw = file_bytes(noise(), "PNG")
    # Trailing bytes after IEND are ignored by decoders; they vary the base64 padding.
    for padded in (raw, raw + b"\0", raw + b"\0\0"):
        url = data_url(padded)
        assert decode_image_url(url, ImageLimits(max_bytes=len(padded))).size == (24, 16)
        assert refusal(url, ImageLimits(max_bytes=len(padded) - 1)).code == "too_large"


# --- what is refused -------------------------------------------------------------------------------


def test_garbage_is_corrupt() -> None:
    error = refusal(data_url(b"this is not an image, only text pretending" * 4))
    assert error.code == "corrupt"
    assert "not a PNG, JPEG or WebP" in str(error)


def test_truncated_png_is_corrupt() -> None:
    raw = file_bytes(noise(64, 64), "PNG")
    error = refusal(data_url(raw[: len(raw) // 2]))
    assert error.code == "corrupt"
    assert "truncated" in str(error)


@pytest.mark.parametrize("mime", ["image/gif", "text/plain", "image/svg+xml", ""])
def test_unsupported_mime_type(mime: str) -> None:
    error = refusal(data_url(file_bytes(noise(), "GIF"), mime))
    assert error.code == "unsupported_mime"
    assert repr(mime or "(none)") in str(error) and "image/png" in str(error)


def test_declared_type_must_match_the_data() -> None:
    error = refusal(data_url(file_bytes(noise(), "PNG"), "image/jpeg"))
    assert error.code == "mime_mismatch"
    assert "image/jpeg" in str(error) and "PNG" in str(error)


def test_too_many_bytes_is_refused_before_base64_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("a payload over the limit was decoded")

    monkeypatch.setattr(images.base64, "b64decode", refuse)
    error = refusal("data:image/png;base64," + "A" * 4_000_000, ImageLimits(max_bytes=1000))
    assert error.code == "too_large"
    assert "3000000 bytes" in str(error) and "1000" in str(error)


def test_too_many_pixels_by_limit(no_pixel_decoding: None) -> None:
    error = refusal(data_url(file_bytes(noise(11, 10), "PNG")), ImageLimits(max_pixels=100))
    assert error.code == "too_many_pixels"
    assert "11x10" in str(error) and "100" in str(error)


@pytest.mark.parametrize("size", [(4000, 1), (1, 201)])
def test_a_sliver_the_processor_cannot_resize_is_refused_on_its_header(
    size: tuple[int, int], no_pixel_decoding: None
) -> None:
    error = refusal(data_url(file_bytes(Image.new("RGB", size), "PNG")))
    assert error.code == "aspect_ratio" and f"{size[0]}x{size[1]}" in str(error)


def test_an_aspect_ratio_of_200_decodes() -> None:
    assert decode_image_url(data_url(file_bytes(Image.new("RGB", (200, 1)), "PNG"))).size == (200, 1)


def test_bomb_under_pils_limit_is_refused_on_its_header(no_pixel_decoding: None) -> None:
    raw = bomb_png(5000)
    assert len(raw) < 100_000
    error = refusal(data_url(raw))
    assert error.code == "too_many_pixels"
    assert "5000x5000" in str(error)


def test_bomb_over_pils_limit_is_refused(no_pixel_decoding: None) -> None:
    """20000x20000 is past twice PIL's limit: PIL itself raises, even where our limit is higher."""
    raw = bomb_png(20000)
    assert len(raw) < 200_000
    for limits in (DEFAULT_LIMITS, ImageLimits(max_pixels=10**9)):
        assert refusal(data_url(raw), limits).code == "too_many_pixels"


def test_pils_warning_limit_binds_when_ours_is_higher(no_pixel_decoding: None) -> None:
    with pytest.warns(Image.DecompressionBombWarning):
        error = refusal(data_url(bomb_png(10000)), ImageLimits(max_pixels=10**9))
    assert error.code == "too_many_pixels"
    assert str(Image.MAX_IMAGE_PIXELS) in str(error)


@pytest.mark.parametrize("payload", ["!!!!", "iVBORw0KGgo", "aGVsbG8=\n", "ïmage"])
def test_bad_base64(payload: str) -> None:
    error = refusal("data:image/png;base64," + payload)
    assert error.code == "bad_base64"
    assert "base64" in str(error)


def test_data_url_must_be_base64() -> None:
    error = refusal("data:image/png,%89PNG")
    assert error.code == "bad_url"
    assert "base64" in str(error)


def test_data_url_needs_a_comma() -> None:
    error = refusal("data:image/png;base64")
    assert error.code == "bad_url"
    assert "','" in str(error)


@pytest.mark.parametrize("url", ["http://example.com/cat.png", "HTTPS://example.com/cat.png"])
def test_remote_urls_are_not_fetched(url: str) -> None:
    error = refusal(url)
    assert error.code == "bad_url"
    assert "remote image URLs are not fetched" in str(error) and "data: URL" in str(error)


@pytest.mark.parametrize("url", ["ftp://example.com/cat.png", "cat.png", "", "/etc/passwd"])
def test_other_urls_are_refused(url: str) -> None:
    error = refusal(url)
    assert error.code == "bad_url"
    assert repr(url) in str(error)


def test_long_urls_are_cut_in_messages() -> None:
    error = refusal("gopher://" + "x" * 10_000)
    assert error.code == "bad_url" and len(str(error)) < 200


# --- file:// URLs ----------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An image root with one PNG inside, and one PNG beside it (outside the root)."""
    folder = tmp_path / "root"
    folder.mkdir()
    (folder / "inside.png").write_bytes(file_bytes(noise(), "PNG"))
    (tmp_path / "outside.png").write_bytes(file_bytes(noise(), "PNG"))
    return folder


def test_file_inside_root_decodes(root: Path) -> None:
    image = decode_image_url((root / "inside.png").as_uri(), ImageLimits(file_root=root))
    np.testing.assert_array_equal(np.asarray(image), noise())


def test_file_url_is_percent_decoded(root: Path) -> None:
    (root / "a cat.png").write_bytes(file_bytes(noise(), "PNG"))
    url = (root / "a cat.png").as_uri()
    assert "%20" in url
    assert decode_image_url(url, ImageLimits(file_root=root)).size == (24, 16)


def test_file_urls_disabled_without_root(root: Path) -> None:
    error = refusal((root / "inside.png").as_uri())
    assert error.code == "file_disabled"
    assert "disabled" in str(error)


def test_file_outside_root(root: Path) -> None:
    error = refusal((root.parent / "outside.png").as_uri(), ImageLimits(file_root=root))
    assert error.code == "outside_root"
    assert str(root.resolve()) in str(error)


def test_dot_dot_traversal_is_outside_root(root: Path) -> None:
    error = refusal(f"file://{root}/../outside.png", ImageLimits(file_root=root))
    assert error.code == "outside_root"
    assert str(root.resolve()) in str(error)


def test_symlink_out_of_root_is_outside_root(root: Path) -> None:
    (root / "link.png").symlink_to(root.parent / "outside.png")
    error = refusal((root / "link.png").as_uri(), ImageLimits(file_root=root))
    assert error.code == "outside_root"


def test_symlink_within_root_is_followed(root: Path) -> None:
    (root / "link.png").symlink_to(root / "inside.png")
    assert decode_image_url((root / "link.png").as_uri(), ImageLimits(file_root=root)).size == (24, 16)


def test_missing_file(root: Path) -> None:
    error = refusal((root / "missing.png").as_uri(), ImageLimits(file_root=root))
    assert error.code == "not_found"
    assert "missing.png" in str(error)


def test_missing_file_outside_root_does_not_reveal_existence(root: Path) -> None:
    error = refusal((root.parent / "missing.png").as_uri(), ImageLimits(file_root=root))
    assert error.code == "outside_root"


def test_directory_is_not_found(root: Path) -> None:
    (root / "folder").mkdir()
    assert refusal((root / "folder").as_uri(), ImageLimits(file_root=root)).code == "not_found"


def test_a_name_too_long_for_the_file_system_is_not_found(root: Path) -> None:
    # Looking a 300-byte name up fails with ENAMETOOLONG, which Path.is_file does not swallow.
    error = refusal(f"file://{root}/{'a' * 300}.png", ImageLimits(file_root=root))
    assert error.code == "not_found" and "File name too long" in str(error)


def test_file_over_byte_limit(root: Path) -> None:
    error = refusal((root / "inside.png").as_uri(), ImageLimits(max_bytes=100, file_root=root))
    assert error.code == "too_large"
    assert "inside.png" in str(error)


def test_file_must_be_png_jpeg_or_webp(root: Path) -> None:
    (root / "cat.gif").write_bytes(file_bytes(noise(), "GIF"))
    error = refusal((root / "cat.gif").as_uri(), ImageLimits(file_root=root))
    assert error.code == "corrupt"
    assert "not a PNG, JPEG or WebP" in str(error)


def test_unresolvable_file_urls_are_bad(root: Path) -> None:
    (root / "loop1").symlink_to(root / "loop2")
    (root / "loop2").symlink_to(root / "loop1")
    for url in ((root / "loop1").as_uri(), f"file://{root}/nul%00.png"):
        error = refusal(url, ImageLimits(file_root=root))
        assert error.code == "bad_url" and "cannot be resolved" in str(error)


def test_file_url_with_a_host_is_refused(root: Path) -> None:
    error = refusal("file://server/share/cat.png", ImageLimits(file_root=root))
    assert error.code == "bad_url"
