"""Image access: cheap header reads for planning, and a safe decode to RGB at the target size.

Every failure is an `ImageError` whose message is short, stable and groupable (`kind (detail)`),
so a bad image becomes a row with an `error`, never a crashed run.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# The pixel limit is ours (recipe `input.max_image_pixels`), checked from the header before decoding.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False
_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that shows the image upright; 5 to 8 swap width and height.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_SIDES = {5, 6, 7, 8}
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
_TRUNCATION_HINTS = ("truncated", "end of file", "broken data stream")


class ImageError(ValueError):
    """A row's image cannot be used; the message is what the output's `error` column says."""


@dataclass(frozen=True, slots=True)
class ImageRef:
    """Where a row's image is: encoded bytes (or a view of them in the window's Arrow buffers), or a file path."""

    data: bytes | memoryview | None = None
    path: str | None = None

    def stream(self) -> BinaryIO:
        """A binary file object positioned at the start of the encoded image.

        A path is looked at with `stat` first: folders and special files (FIFOs, devices, sockets) are refused
        without being opened, since opening or reading one can block forever or have effects (a tape rewinds).
        It is then opened non-blocking and checked again, so a file swapped in meanwhile cannot block either.
        """
        if self.data is not None:
            return io.BytesIO(self.data)
        if self.path is None:
            raise ImageError("image: missing (neither bytes nor path)")
        try:
            _check_regular(os.stat(self.path).st_mode, self.path)
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
        except ImageError:
            raise
        except FileNotFoundError:
            raise ImageError(f"image: file not found ({_shown(self.path)})") from None
        except IsADirectoryError:
            raise ImageError(f"image: path is a folder ({_shown(self.path)})") from None
        except (OSError, ValueError) as exc:  # ValueError: a path holding a NUL character
            reason = getattr(exc, "strerror", None) or exc
            raise ImageError(f"image: unreadable file ({_shown(self.path)}: {reason})") from None
        try:
            _check_regular(os.fstat(fd).st_mode, self.path)
        except ImageError:
            os.close(fd)
            raise
        return os.fdopen(fd, "rb")


def _shown(path: str, limit: int = 120) -> str:
    """A path short enough for an `error` value: its end, which names the file."""
    return path if len(path) <= limit else "..." + path[-(limit - 3) :]


def _check_regular(mode: int, path: str) -> None:
    if stat.S_ISDIR(mode):
        raise ImageError(f"image: path is a folder ({_shown(path)})")
    if not stat.S_ISREG(mode):
        kind = "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"
        raise ImageError(f"image: not a regular file ({kind}: {_shown(path)})")


def image_kind(message: str) -> str:
    """The groupable part of an error message: `decode: truncated image (x)` -> `decode: truncated image`."""
    return message.split(" (", 1)[0]


def _codec_error(exc: BaseException) -> ImageError:
    """A decoder's exception as a row error: truncated data is the common case and gets its own kind."""
    text = " ".join(str(exc).split())[:150]  # one short line: it lands in the output's `error` column
    if isinstance(exc, OSError | EOFError) and any(hint in text.lower() for hint in _TRUNCATION_HINTS):
        return ImageError(f"decode: truncated image ({text})")
    return ImageError(f"decode: corrupt image ({type(exc).__name__}: {text})")


@contextmanager
def _opened(ref: ImageRef) -> Iterator[Image.Image]:
    """The image, opened lazily (header only), with codec warnings silenced and codec errors as `ImageError`."""
    with ref.stream() as stream, warnings.catch_warnings():
        # Warnings about corrupt EXIF or palettes would flood the console; errors are what matters.
        warnings.simplefilter("ignore")
        try:
            image = Image.open(stream)
        except UnidentifiedImageError:
            size = stream.seek(0, io.SEEK_END)
            raise ImageError(f"decode: not an image ({size} bytes)") from None
        except Exception as exc:  # a codec may raise anything on hostile headers
            raise _codec_error(exc) from None
        with image:
            yield image


def _check_pixels(image: Image.Image, max_image_pixels: int) -> None:
    width, height = image.size
    if width * height > max_image_pixels:
        raise ImageError(f"image: too large ({width}x{height} = {width * height} pixels > limit {max_image_pixels})")


def _orientation(image: Image.Image) -> int:
    """The EXIF (or XMP) orientation found in the header; 1 when there is none or it is unreadable."""
    if image.format == "TIFF":  # Pillow's TIFF plugin applies the orientation itself, to size and pixels
        return 1
    try:
        # Image.getexif, not PngImageFile.getexif: that one decodes every pixel to look for a late eXIf chunk.
        return int(Image.Image.getexif(image).get(_ORIENTATION_TAG, 1))
    except Exception:
        return 1


def header_size(ref: ImageRef, max_image_pixels: int) -> tuple[int, int]:
    """(width, height) as the model will see it (EXIF rotation applied), from the header alone."""
    with _opened(ref) as image:
        _check_pixels(image, max_image_pixels)
        width, height = image.size
        return (height, width) if _orientation(image) in _SWAPS_SIDES else (width, height)


def _has_transparency(image: Image.Image) -> bool:
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode.endswith("A")


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grayscale to 8 bits, keeping the full range visible."""
    array = np.asarray(image, dtype=np.float64)
    # 16-bit modes span 0..65535; "I" and "F" carry no range: values above 255 are taken as 16-bit.
    top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
    return Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white."""
    if image.mode in _HIGH_DEPTH_MODES:
        image = _to_8bit_gray(image)
    if _has_transparency(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_resized(ref: ImageRef, size: tuple[int, int], max_image_pixels: int, draft: bool = True) -> np.ndarray:
    """Decode to RGB, apply EXIF orientation, take the first frame, resize (bicubic) to `size` = (h, w).

    Images over `max_image_pixels` are refused from the header, before any pixel is decoded.
    With `draft`, JPEGs are decoded at the smallest DCT scale still at least the target size, which
    is several times faster for photos much larger than the model's input.
    Returns a uint8 array of shape (h, w, 3).
    """
    target_h, target_w = size
    with _opened(ref) as image:
        _check_pixels(image, max_image_pixels)
        orientation = _orientation(image)
        try:
            if draft and image.format == "JPEG":
                stored = (target_h, target_w) if orientation in _SWAPS_SIDES else (target_w, target_h)
                image.draft(image.mode, stored)
            image.seek(0)
            image.load()
            if orientation in _UPRIGHT:
                image = image.transpose(_UPRIGHT[orientation])
            image = _to_rgb(image)
            image = image.resize((target_w, target_h), Image.Resampling.BICUBIC)
            return np.array(image, dtype=np.uint8)  # a writable copy: torch wraps it without a warning
        except (ImageError, MemoryError):
            raise
        except Exception as exc:  # codecs raise OSError, SyntaxError, struct.error, ... on bad data
            raise _codec_error(exc) from None


def read_path(path: str, base_dir: str | None) -> str:
    """A path string from the dataset, resolved against the parquet file's folder when relative."""
    if base_dir and not os.path.isabs(path):
        return os.path.join(base_dir, path)
    return path
