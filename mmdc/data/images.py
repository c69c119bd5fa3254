"""Loading, hashing and (de)serialising images with errors that say what is wrong.

A real instruction set has a few broken files among hundreds of thousands; a
worker that dies on one of them with "OSError: image file is truncated" and no
path costs an hour to track down. Every failure here is an ``ImageError``
carrying the path (or a description of the source) and one of a few reasons.

Engines speak OpenAI-style chat messages with images as data URLs, so the
same helpers turn an image file into a data URL on the client side and back
into a PIL image inside the engine.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import warnings
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

# 8192 x 8192: far above any LLaVA / COCO image, far below what exhausts a worker's memory.
DEFAULT_MAX_PIXELS = 8192 * 8192

ImageSource = str | os.PathLike | Image.Image


class ImageError(ValueError):
    """An image that cannot be used; ``source`` names the file (or data URL), ``reason`` says why."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason

    def __reduce__(self):  # rebuilt from its fields when it crosses Ray (the default would call __init__(message))
        return type(self), (self.source, self.reason)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode to RGB; transparent pixels become white rather than black (what a viewer shows)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def _decode(stream: io.BufferedIOBase | io.BytesIO, source: str, max_pixels: int) -> Image.Image:
    """Open, size-check from the header, then fully decode ``stream``; every failure is an ImageError."""
    with warnings.catch_warnings():
        # We enforce our own limit below; PIL's bomb warning would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(stream)  # lazy: reads the header only
        except Image.DecompressionBombError as err:
            raise ImageError(source, f"too large ({err})") from err
        except UnidentifiedImageError as err:
            raise ImageError(source, "corrupt: not a recognised image format") from err
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageError(source, f"corrupt: {err}") from err
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageError(source, f"corrupt: header says {width}x{height}")
        if width * height > max_pixels:
            raise ImageError(source, f"too large: {width}x{height} = {width * height} pixels > max_pixels {max_pixels}")
        try:
            image.load()
        except OSError as err:
            reason = "truncated" if "truncated" in str(err).lower() else "corrupt"
            raise ImageError(source, f"{reason}: {err}") from err
        except (SyntaxError, ValueError, EOFError) as err:
            raise ImageError(source, f"corrupt: {err}") from err
    return _to_rgb(image)


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load an image file as RGB, failing with an ImageError for missing, empty, unreadable, corrupt, truncated or
    too large files.

    The pixel count is checked from the header before any pixel is decoded, so
    a 20000x20000 file fails in microseconds instead of allocating 1.2 GB.
    """
    source = str(path)
    file = Path(path)
    try:
        if not file.exists():
            raise ImageError(source, "missing: no such file")
        if not file.is_file():
            raise ImageError(source, "missing: not a regular file")
        if file.stat().st_size == 0:
            raise ImageError(source, "zero-byte file")
        with open(file, "rb") as stream:
            return _decode(stream, source, max_pixels)
    except (OSError, ValueError) as err:  # permission denied, a name too long, a NUL in the path, an I/O error
        if isinstance(err, ImageError):
            raise
        raise ImageError(source, f"unreadable: {err}") from err


def resolve_image(image: str, image_root: str | None) -> str:
    """The path of a pool row's ``image``: absolute as given, else under ``image_root`` (when there is one)."""
    return image if os.path.isabs(image) or not image_root else os.path.join(image_root, image)


def confine(image: str, image_root: str | None) -> str:
    """``resolve_image``, refused with an ImageError when the file it names lies outside ``image_root``.

    Both sides are resolved first (``..``, and symlinks: a link inside the folder that points out of it is
    outside), so a record cannot make the run read, or send to an engine, a file it was not given. An absolute
    path is allowed when it lies inside the folder. Without a folder (``image_root`` None) nothing is confined.
    """
    path = resolve_image(image, image_root)
    if not image_root:
        return path
    try:
        root = os.path.realpath(image_root)
        real = os.path.realpath(path)
    except (OSError, ValueError) as err:  # a NUL byte in the name, a path too long
        raise ImageError(repr(image), f"not a usable path: {err}") from err
    if os.path.commonpath([root, real]) != root:
        folder = os.path.abspath(image_root)
        symlink = os.path.commonpath([folder, os.path.abspath(path)]) == folder  # inside until links were followed
        how = "a symlink in it points to" if symlink else "resolves to"
        raise ImageError(image, f"outside the image folder {image_root}: {how} {real}")
    return path


def image_problem(image: str, image_root: str | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """Why the record's ``image`` cannot be used (outside its folder, missing, corrupt, ...), or None when it can."""
    try:
        load_image(confine(image, image_root), max_pixels=max_pixels)
    except ImageError as err:
        return str(err)
    return None


def image_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of the file's bytes (identifies an image for answer caching independent of its path)."""
    file = Path(path)
    if not file.is_file():
        raise ImageError(str(path), "missing: no such file")
    digest = hashlib.sha256()
    with open(file, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def to_data_url(image: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """Encode a path or PIL image as ``data:image/png;base64,...`` (validated, RGB, lossless)."""
    if isinstance(image, Image.Image):
        pil = _to_rgb(image)
    elif isinstance(image, (str, os.PathLike)):
        pil = load_image(image, max_pixels=max_pixels)
    else:
        raise TypeError(f"to_data_url expects a path or a PIL image, got {type(image).__name__}")
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _describe(url: str) -> str:
    """A short name for a possibly huge data URL, for error messages."""
    return url if len(url) <= 64 else url[:48] + f"...({len(url)} chars)"


def from_data_url(url: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image reference from a chat message: a base64 data URL, a ``file://`` URL or a plain path.

    Anything else (http URLs, non-image data URLs, bad base64) is an ImageError
    that says which; engines never fetch from the network.
    """
    if not isinstance(url, str) or not url:
        raise ImageError(repr(url), "not an image reference: expected a data URL, file:// URL or path")
    if url.startswith("data:"):
        source = _describe(url)
        header, sep, payload = url.partition(",")
        if not sep:
            raise ImageError(source, "malformed data URL: no ',' before the payload")
        media_type = header[len("data:") :].split(";")[0].strip().lower()
        if not media_type.startswith("image/"):
            raise ImageError(source, f"data URL media type {media_type or '(none)'!r} is not an image")
        if ";base64" not in header.lower():
            raise ImageError(source, "data URL is not base64-encoded")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ImageError(source, f"invalid base64 payload: {err}") from err
        if not raw:
            raise ImageError(source, "zero-byte payload")
        return _decode(io.BytesIO(raw), source, max_pixels)
    if url.startswith("file://"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ImageError(url, f"file URL on remote host {parsed.netloc!r} is not supported")
        return load_image(unquote(parsed.path), max_pixels=max_pixels)
    scheme = urlparse(url).scheme
    if scheme and len(scheme) > 1:  # one letter is a Windows drive, e.g. C:\
        raise ImageError(_describe(url), f"unsupported URL scheme {scheme!r}: use a data URL, file:// URL or a path")
    return load_image(url, max_pixels=max_pixels)
