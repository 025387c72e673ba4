"""Safe image decoding for training, and a parallel scan that finds bad image files before training starts.

`load_rgb` is what training code should use to decode an image: it always returns an 8-bit RGB `PIL.Image`
(EXIF orientation applied, alpha flattened onto a background, 16-bit grey scaled rather than clipped) or
raises `ImageDecodeError` naming the file. `scan_images` runs the same decoding over a whole data set with a
thread pool (Pillow releases the GIL while decoding) so that broken files are found up front instead of
mid-epoch.
"""

from __future__ import annotations

import io
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from PIL import ExifTags, Image, ImageOps

logger = logging.getLogger(__name__)

#: Images whose shorter side is below this many pixels are reported as bad by `scan_images` (a 1×1 or 4×4 file
#: is a broken download or a placeholder, not a photo; no benchmark image is anywhere near this small).
DEFAULT_MIN_SIZE = 16
#: Colour that transparent pixels are flattened onto.
DEFAULT_BACKGROUND = (255, 255, 255)

ImageSource = str | os.PathLike | bytes | Mapping[str, Any] | Image.Image
"""A path, raw file bytes, a `datasets.Image(decode=False)` value `{"path", "bytes"}`, or a PIL image."""

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_INT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class ImageDecodeError(OSError):
    """An image that cannot be decoded into an RGB picture. `path` names the file and `reason` says why."""

    def __init__(self, path: str, reason: str) -> None:
        # One argument only: OSError(a, b) would be read as (errno, strerror).
        super().__init__(f"cannot decode image {path!r}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class BadImage:
    """One image that failed the scan: where it is and what is wrong with it."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class BadImagesError(ValueError):
    """Raised when a data set holds images that cannot be used; `bad` lists all of them."""

    def __init__(self, message: str, bad: Sequence[BadImage]) -> None:
        super().__init__(message)
        self.bad = list(bad)


def describe_bad_images(bad: Sequence[BadImage], limit: int = 10) -> str:
    """A multi-line listing of the first `limit` bad images, and how many more there are."""
    lines = [f"  {item}" for item in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit:,} more")
    return "\n".join(lines)


def _source_name(source: ImageSource) -> str:
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "<in-memory image>"
    if isinstance(source, Mapping):
        return source.get("path") or "<image bytes>"
    if isinstance(source, bytes):
        return "<image bytes>"
    return os.fspath(source)


def _open(source: ImageSource, name: str) -> Image.Image:
    if isinstance(source, Image.Image):
        try:
            source.load()  # a lazily opened image may still be truncated
        except Exception as err:
            raise ImageDecodeError(name, f"{type(err).__name__}: {err}") from err
        return source
    data: bytes | None
    if isinstance(source, Mapping):
        data, path = source.get("bytes"), source.get("path")
    elif isinstance(source, bytes):
        data, path = source, None
    else:
        data, path = None, os.fspath(source)
    if data is None:
        if path is None:
            raise ImageDecodeError(name, "neither a path nor bytes were given")
        try:
            # Read the whole file first: no file handle outlives this call, and truncation shows as such.
            with open(path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise ImageDecodeError(name, f"{type(err).__name__}: {err.strerror or err}") from err
    if not data:
        raise ImageDecodeError(name, "file is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now, so that truncation and corrupt data surface here
    except Exception as err:  # decoders raise OSError, SyntaxError, struct.error, ... on bad data
        raise ImageDecodeError(name, f"{type(err).__name__}: {err}") from err
    return image


def _flatten_alpha(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    rgba = image.convert("RGBA")
    canvas = Image.new("RGB", rgba.size, background)
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    return canvas


def to_rgb(image: Image.Image, background: tuple[int, int, int] = DEFAULT_BACKGROUND) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit RGB.

    Transparency (RGBA, LA, palette or grey/RGB with a `transparency` key) is flattened onto `background`
    instead of exposing whatever colour hides under alpha 0. 16-bit grey (`I;16*`, and `I`, which older Pillow
    used for 16-bit PNGs) is scaled from 0–65535 to 0–255, where `Image.convert` would clip everything above
    255 to white. CMYK, YCbCr, LAB, 1-bit and 8-bit grey use Pillow's own conversion (CMYK without colour
    management).
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _INT_MODES:
        values = np.asarray(image).astype(np.int64).clip(0, 65535)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "La":  # premultiplied; Pillow converts it only to LA
        image = image.convert("LA")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        return _flatten_alpha(image, background)
    return image.convert("RGB")


def load_rgb(
    image: ImageSource,
    *,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
    exif_transpose: bool = True,
) -> Image.Image:
    """Decode `image` into an 8-bit RGB `PIL.Image`, or raise `ImageDecodeError` naming the file.

    Args:
        image: a path, the file's bytes, a `datasets.Image(decode=False)` value `{"path": ..., "bytes": ...}`,
            or an already opened PIL image.
        background: colour that transparent pixels are flattened onto (see `to_rgb`).
        exif_transpose: rotate/flip according to the EXIF orientation tag, as cameras expect.

    The whole file is decoded (not only its header): truncated and corrupt files fail here, naming the file.
    """
    name = _source_name(image)
    decoded = _open(image, name)
    if exif_transpose:
        try:
            if decoded.getexif().get(ExifTags.Base.Orientation, 1) != 1:
                decoded = ImageOps.exif_transpose(decoded)  # a rotated copy; never modifies a caller's image
        except Exception as err:  # noqa: BLE001 - a corrupt EXIF block should not make good pixels unusable
            logger.warning("ignoring unreadable EXIF orientation of %s: %s", name, err)
    try:
        return to_rgb(decoded, background)
    except Exception as err:
        raise ImageDecodeError(name, f"cannot convert mode {decoded.mode!r} to RGB: {err}") from err


def check_image(image: ImageSource, *, min_size: int | None = DEFAULT_MIN_SIZE) -> str | None:
    """Decode `image` as `load_rgb` does at training time; return why it is unusable, or None if it is fine.

    An image whose shorter side is below `min_size` pixels counts as unusable (None disables that check).
    """
    try:
        rgb = load_rgb(image)
    except ImageDecodeError as err:
        return err.reason
    width, height = rgb.size
    if min_size is not None and min(width, height) < min_size:
        return f"image is too small: {width}×{height} px (shorter side below min_size={min_size})"
    return None


T = TypeVar("T")
R = TypeVar("R")


def _bounded_map(fn: Callable[[T], R], items: Iterable[T], workers: int, window: int) -> Iterator[R]:
    """`map` over a thread pool, in order, with at most `window` items in flight (items may be big bytes)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def scan_images(
    images: Iterable[ImageSource],
    *,
    min_size: int | None = DEFAULT_MIN_SIZE,
    num_workers: int | None = None,
    progress: bool = True,
    total: int | None = None,
    desc: str = "verifying images",
) -> list[tuple[int, BadImage]]:
    """Decode every image and return `(position, BadImage)` for each one that is unusable, in input order.

    Each image goes through `check_image` (full decode, RGB conversion, size check) on a pool of `num_workers`
    threads (default: the number of CPUs). `progress` shows a tqdm bar. Nothing is raised for bad images: the
    caller decides whether to fail or to skip them (see `load_retrieval_dataset(on_bad_image=...)`).
    """
    from tqdm.auto import tqdm

    items = list(images) if total is None and not isinstance(images, Sequence) else images
    total = len(items) if total is None else total  # type: ignore[arg-type]
    workers = num_workers or os.cpu_count() or 1

    def check(item: ImageSource) -> tuple[str, str | None]:
        return _source_name(item), check_image(item, min_size=min_size)

    bad: list[tuple[int, BadImage]] = []
    results = _bounded_map(check, items, workers, window=8 * workers)
    for position, (name, reason) in enumerate(tqdm(results, total=total, desc=desc, disable=not progress)):
        if reason is not None:
            bad.append((position, BadImage(name, reason)))
    return bad
