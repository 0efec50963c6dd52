"""Decoding and encoding the image URLs of OpenAI-style chat messages, with limits on what a client sends.

Accepted: ``data:image/{png,jpeg,webp};base64,...`` URLs, and ``file://`` URLs under a configured root.
Remote ``http(s)://`` URLs are refused: a server that fetched them could be steered at internal hosts.

Every refusal is an :class:`ImageError` with a short machine ``code``:

======================  ==========================================================================
``bad_url``             not a data: or file: URL (http(s) included), or a malformed or unresolvable one
``bad_base64``          the data: URL's payload is not valid base64
``unsupported_mime``    a data: URL declaring a type other than image/png, image/jpeg or image/webp
``mime_mismatch``       the decoded format differs from the MIME type the data: URL declares
``too_large``           more than ``max_bytes`` of file bytes
``too_many_pixels``     more than ``max_pixels`` pixels (or more than PIL's own bomb limit)
``corrupt``             not a PNG, JPEG or WebP file (other formats are never parsed), or a truncated one
``file_disabled``       a file: URL while no ``file_root`` is configured
``outside_root``        a file: URL whose resolved path lies outside ``file_root``
``not_found``           a file: URL naming no regular file, or one that cannot be read
======================  ==========================================================================
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from PIL import Image, UnidentifiedImageError

# Declared MIME type -> the PIL format it must decode as.
MIME_FORMATS: dict[str, str] = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
# PIL opens a JPEG with a multi-picture extension (most phone cameras write one) as "MPO".
_FORMAT_MIMES: dict[str, str] = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "WEBP": "image/webp",
}
# Modes that PNG stores losslessly; anything else is converted to RGB before encoding.
_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})
# Long URLs are cut in messages, so that an error never echoes megabytes back.
_URL_PREVIEW_CHARS = 60


@dataclass(frozen=True)
class ImageLimits:
    """What one image may cost to decode."""

    max_bytes: int = 20 * 1024 * 1024
    """Largest file, in bytes after base64 decoding."""
    max_pixels: int = 4096 * 4096
    """Largest ``width * height``, checked on the header before any pixel is decoded."""
    max_aspect_ratio: float = 200.0
    """Largest ratio of the long side to the short one: Qwen-VL processors refuse anything above 200."""
    file_root: Path | None = None
    """Folder that ``file://`` URLs may read from; ``None`` refuses every ``file://`` URL."""


DEFAULT_LIMITS = ImageLimits()


class ImageError(ValueError):
    """An image URL that was refused; ``code`` says why in one word, the message in a sentence."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def decode_image_url(url: str, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """The RGB image a ``data:`` or ``file://`` URL holds, fully loaded; :class:`ImageError` if refused."""
    scheme, colon, _ = url.partition(":")
    scheme = scheme.lower()
    if scheme == "data" and colon:
        raw, declared = _read_data_url(url, limits)
    elif scheme == "file" and colon:
        raw, declared = _read_file_url(url, limits), None
    elif scheme in ("http", "https") and colon:
        raise ImageError(
            "bad_url",
            "remote image URLs are not fetched by this server; send the image itself as a data: URL "
            "(base64), e.g. data:image/png;base64,iVBORw0KGgo...",
        )
    else:
        raise ImageError(
            "bad_url", f"unsupported image URL {_preview(url)}; send a data:image/...;base64 URL"
        )
    return _decode(raw, declared, limits)


def encode_image_data_url(image: Image.Image) -> str:
    """A lossless ``data:image/png;base64,...`` URL of ``image``; modes PNG cannot store become RGB."""
    if image.mode not in _PNG_MODES:
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _read_data_url(url: str, limits: ImageLimits) -> tuple[bytes, str]:
    """The file bytes and declared MIME type of a ``data:`` URL."""
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise ImageError("bad_url", "data: URL has no ',' between its header and its data")
    mime, *params = (part.strip().lower() for part in header.split(";"))
    if mime not in MIME_FORMATS:
        raise ImageError(
            "unsupported_mime",
            f"image MIME type {mime or '(none)'!r} is not supported; use one of {sorted(MIME_FORMATS)}",
        )
    if "base64" not in params:
        raise ImageError("bad_url", f"data: URL must be base64-encoded: data:{mime};base64,...")
    # Valid base64 decodes to exactly this many bytes, so a huge payload is refused before decoding it.
    decoded_length = len(payload) * 3 // 4 - payload[-2:].count("=")
    if decoded_length > limits.max_bytes:
        raise ImageError(
            "too_large", f"image is {decoded_length} bytes, more than the limit of {limits.max_bytes}"
        )
    try:
        raw = base64.b64decode(payload, validate=True)
    # binascii.Error is a ValueError; a plain ValueError is raised for non-ASCII text.
    except ValueError as error:
        raise ImageError("bad_base64", f"data: URL payload is not valid base64: {error}") from error
    return raw, mime


def _read_file_url(url: str, limits: ImageLimits) -> bytes:
    """The bytes of a ``file://`` URL's file, which must resolve inside ``limits.file_root``."""
    if limits.file_root is None:
        raise ImageError("file_disabled", "file:// image URLs are disabled on this server; send a data: URL")
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        raise ImageError("bad_url", f"file URL must be file:///absolute/path, got {_preview(url)}")
    root = limits.file_root.resolve()
    try:
        # Resolving follows symlinks and '..', so the check is on where the file really is.
        path = Path(unquote(parts.path)).resolve()
    except (OSError, RuntimeError, ValueError) as error:
        # A NUL byte (ValueError), or a symlink loop (RuntimeError before Python 3.13, OSError after).
        raise ImageError("bad_url", f"file URL {_preview(url)} cannot be resolved: {error}") from error
    if not path.is_relative_to(root):
        raise ImageError("outside_root", f"file {path} is outside the image root {root}")
    # Existence is looked at only inside the root, so that no one can probe the rest of the disk.
    try:
        if not path.is_file():
            raise ImageError("not_found", f"image file {path} does not exist or is not a regular file")
        raw = _read_bounded(path, limits)
    except OSError as error:
        raise ImageError("not_found", f"image file {path} cannot be read: {error.strerror}") from error
    return raw


def read_image_file(path: Path, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """The RGB image in a file the caller trusts (a dataset's), with the same limits as a URL's;
    :class:`ImageError` if refused."""
    try:
        raw = _read_bounded(path, limits)
    except OSError as error:
        raise ImageError("not_found", f"image file {path} cannot be read: {error.strerror}") from error
    return _decode(raw, None, limits)


def decode_image_bytes(raw: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """The RGB image of PNG, JPEG or WebP file bytes (a dataset's cell), with a URL's limits."""
    if len(raw) > limits.max_bytes:
        raise ImageError("too_large", f"image is {len(raw)} bytes, more than the limit of {limits.max_bytes}")
    return _decode(raw, None, limits)


def _read_bounded(path: Path, limits: ImageLimits) -> bytes:
    """A file's bytes, refused past ``limits.max_bytes``."""
    with path.open("rb") as file:
        # The size of the file opened, not of whatever the path names by now.
        size = os.fstat(file.fileno()).st_size
        if size > limits.max_bytes:
            raise ImageError(
                "too_large", f"image file {path} is {size} bytes, more than the limit of {limits.max_bytes}"
            )
        # Bounded, since the file may grow while it is read.
        raw = file.read(limits.max_bytes + 1)
    if len(raw) > limits.max_bytes:
        raise ImageError("too_large", f"image file {path} grew past the limit of {limits.max_bytes} bytes")
    return raw


def _decode(raw: bytes, declared: str | None, limits: ImageLimits) -> Image.Image:
    """Decode PNG, JPEG or WebP bytes to RGB, refusing a bomb on its header's size before decoding."""
    formats = sorted(set(MIME_FORMATS.values()))
    try:
        # Only the three plugins are tried: PIL's rarer decoders are an attack surface we have no use for.
        image = Image.open(io.BytesIO(raw), formats=formats)
    except Image.DecompressionBombError as error:
        raise ImageError("too_many_pixels", f"image is a decompression bomb: {error}") from error
    except UnidentifiedImageError as error:
        # PIL's message names only the buffer object, so it is left out.
        raise ImageError(
            "corrupt", "image data is not a PNG, JPEG or WebP file, or its header is corrupt"
        ) from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageError("corrupt", f"image header is corrupt: {error}") from error
    with image:
        # Opening tried only these plugins, so the format is one of the mapped ones.
        actual = _FORMAT_MIMES[image.format]
        if declared is not None and actual != declared:
            raise ImageError(
                "mime_mismatch", f"data: URL declares {declared} but the data is {image.format} ({actual})"
            )
        width, height = image.size
        # PIL only warns between its limit and twice it; treating its limit as ours keeps the
        # warning filters (process-global, not thread-safe) out of this.
        max_pixels = min(limits.max_pixels, Image.MAX_IMAGE_PIXELS or limits.max_pixels)
        if width * height > max_pixels:
            raise ImageError(
                "too_many_pixels",
                f"image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}",
            )
        if max(width, height) > limits.max_aspect_ratio * min(width, height):
            raise ImageError(
                "aspect_ratio",
                f"image is {width}x{height}, its long side more than {limits.max_aspect_ratio:g} times its "
                "short one; the vision processor cannot resize it",
            )
        try:
            return image.convert("RGB")
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise ImageError(
                "corrupt", f"{image.format} image data is corrupt or truncated: {error}"
            ) from error


def _preview(url: str) -> str:
    """``url`` cut to a length fit for an error message."""
    if len(url) <= _URL_PREVIEW_CHARS:
        return repr(url)
    return repr(url[:_URL_PREVIEW_CHARS] + "...")
