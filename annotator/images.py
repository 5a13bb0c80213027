"""Image access: cheap header reads for planning, and a safe decode to RGB at the target size.

Every failure is an `ImageError` whose message is short, stable and groupable (`kind (detail)`),
so a bad image becomes a row with an `error`, never a crashed run.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# The pixel limit is ours (recipe `input.max_image_pixels`), checked from the header before decoding.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False
_ORIENTATION_TAG = 0x0112
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


class ImageError(ValueError):
    """A row's image cannot be used; the message is what the output's `error` column says."""


@dataclass(frozen=True, slots=True)
class ImageRef:
    """Where a row's image is: encoded bytes, or a file path (already resolved)."""

    data: bytes | None = None
    path: str | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        with self._file() as f:
            return f.read()

    def _file(self):
        if self.path is None:
            raise ImageError("image: missing (neither bytes nor path)")
        try:
            return open(self.path, "rb")
        except FileNotFoundError:
            raise ImageError(f"image: file not found ({self.path})") from None
        except IsADirectoryError:
            raise ImageError(f"image: path is a folder ({self.path})") from None
        except OSError as exc:
            raise ImageError(f"image: unreadable file ({self.path}: {exc.strerror or exc})") from None

    def stream(self):
        """A binary file object positioned at the start of the encoded image."""
        return io.BytesIO(self.data) if self.data is not None else self._file()


def image_kind(message: str) -> str:
    """The groupable part of an error message: `decode: truncated image (x)` -> `decode: truncated image`."""
    return message.split(" (", 1)[0]


def _open(stream) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Image.open(stream)
    except UnidentifiedImageError:
        size = stream.seek(0, io.SEEK_END)
        kind = "0 bytes" if size == 0 else f"{size} bytes"
        raise ImageError(f"decode: not an image ({kind})") from None
    except Exception as exc:  # a codec may raise anything on hostile headers
        raise ImageError(f"decode: unreadable header ({type(exc).__name__})") from None


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:
        return 1


def header_size(ref: ImageRef, max_image_pixels: int) -> tuple[int, int]:
    """(width, height) as the model will see it (EXIF rotation applied), from the header alone."""
    with ref.stream() as stream, _open(stream) as image:
        width, height = image.size
        if width * height > max_image_pixels:
            raise ImageError(f"image: too large ({width * height} pixels > limit {max_image_pixels})")
        if _orientation(image) in _SWAPS_SIDES:
            width, height = height, width
        return width, height


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_resized(ref: ImageRef, size: tuple[int, int], max_image_pixels: int, draft: bool = True) -> np.ndarray:
    """Decode to RGB, apply EXIF orientation, take the first frame, resize (bicubic) to `size` = (h, w).

    With `draft`, JPEGs are decoded at the smallest DCT scale still at least the target size, which
    is several times faster for photos much larger than the model's input.
    Returns a uint8 array of shape (h, w, 3).
    """
    target_h, target_w = size
    with ref.stream() as stream, _open(stream) as image:
        return _decode(image, target_h, target_w, max_image_pixels, draft)


def _decode(image: Image.Image, target_h: int, target_w: int, max_image_pixels: int, draft: bool) -> np.ndarray:
    try:
        width, height = image.size
        if width * height > max_image_pixels:
            raise ImageError(f"image: too large ({width * height} pixels > limit {max_image_pixels})")
        orientation = _orientation(image)
        if draft and image.format == "JPEG":
            want = (target_h, target_w) if orientation in _SWAPS_SIDES else (target_w, target_h)
            image.draft(image.mode, want)
        image.seek(0)
        image.load()
        if orientation != 1:
            image = ImageOps.exif_transpose(image)
        image = _to_rgb(image)
        image = image.resize((target_w, target_h), Image.Resampling.BICUBIC)
        return np.array(image, dtype=np.uint8)  # a writable copy: torch wraps it without a warning
    except ImageError:
        raise
    except OSError as exc:
        text = str(exc)
        if "truncated" in text or "broken data stream" in text or "end of file" in text.lower():
            raise ImageError(f"decode: truncated image ({text})") from None
        raise ImageError(f"decode: corrupt image ({text})") from None
    except (SyntaxError, ValueError, EOFError, MemoryError, Image.DecompressionBombError) as exc:
        raise ImageError(f"decode: corrupt image ({type(exc).__name__}: {exc})") from None


def read_path(path: str, base_dir: str | None) -> str:
    """A path string from the dataset, resolved against the parquet file's folder when relative."""
    if base_dir and not os.path.isabs(path):
        return os.path.join(base_dir, path)
    return path
