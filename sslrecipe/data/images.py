"""Reading images of any common layout into one float representation.

Every image the library touches goes through :func:`read_image`, which returns an ``H x W x C``
``float32`` array: 8-bit data divided by 255, 16-bit data by 65535, floating-point TIFFs kept as
they are. EXIF orientation is applied, so what the model sees matches what an image viewer shows.
:func:`to_channels` then adapts the channel count to the backbone's ``in_chans``.

TIFFs that Pillow cannot decode (more than four bands, unusual sample formats) are read with
``tifffile`` when it is installed; otherwise the error says to install it. 16-bit colour TIFFs
are read at full precision with ``tifffile`` when available, else at 8-bit precision by Pillow.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sslrecipe.errors import DataError

PathLike = Union[str, "os.PathLike[str]"]

#: File extensions recognised as images (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")

_UNREADABLE_HINT = "remove or replace the file (or re-export it from its source)"

#: The smallest usable image side in pixels. Anything smaller holds no scene a detector or an SSL view could
#: use (the leak guard's pixel check also compares at >= 8 px); the checks report it and pools skip it.
MIN_IMAGE_SIDE = 8


def too_small(width: int, height: int) -> Optional[str]:
    """Why an image of this size is unusable (smaller than :data:`MIN_IMAGE_SIDE` on a side), or None."""
    if min(width, height) >= MIN_IMAGE_SIDE:
        return None
    return f"the image is only {width}x{height} pixels (at least {MIN_IMAGE_SIDE} on each side are needed)"


def is_image_file(path: PathLike) -> bool:
    """True when the file name has one of :data:`IMAGE_EXTENSIONS` and is not a hidden file."""
    name = Path(path).name
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: PathLike) -> list[Path]:
    """All image files below ``folder`` (recursive), sorted by their path relative to ``folder``.

    Hidden files and folders (names starting with ``.``, e.g. macOS ``._x.jpg`` resource forks)
    are skipped. Raises :class:`DataError` when ``folder`` does not exist or is not a folder.
    """
    root = Path(folder).expanduser()
    if not root.exists():
        raise DataError(f"image folder not found: {root} — check the path (relative paths are resolved from {Path.cwd()})")
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a folder of images — give the folder that contains the images")
    return walk_files(root, is_image_file)


def walk_files(root: Path, keep: Callable[[str], bool]) -> list[Path]:
    """The files below ``root`` (recursive, hidden folders skipped) whose name ``keep`` accepts, sorted by their
    path relative to ``root``."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if keep(name):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


class _UseTifffile(Exception):
    """Internal signal: read this TIFF with tifffile for full precision."""


def _has_tifffile() -> bool:
    try:
        import tifffile  # noqa: F401
    except ImportError:
        return False
    return True


def _tiff_bits(im: Image.Image) -> int:
    bits = getattr(im, "tag_v2", {}).get(258, 8)
    return int(max(bits)) if isinstance(bits, tuple) else int(bits)


def _has_tiff_header(path: Path) -> bool:
    """True when the file starts with a (Big)TIFF signature, whatever its extension."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _unreadable(path: Path, reason: str) -> DataError:
    return DataError(f"cannot read image {path}: {reason} — {_UNREADABLE_HINT}")


def _pil_to_array(im: Image.Image, path: Path) -> np.ndarray:
    """Convert a loaded PIL image to H x W x C float32 following the module's scaling rules."""
    mode = im.mode
    if mode == "1":
        arr = np.asarray(im, dtype=np.float32)
    elif mode in ("L", "LA", "RGB", "RGBA"):
        arr = np.asarray(im, dtype=np.uint8).astype(np.float32) / 255.0
    elif mode == "P":
        target = "RGBA" if "transparency" in im.info else "RGB"
        arr = np.asarray(im.convert(target), dtype=np.uint8).astype(np.float32) / 255.0
    elif mode == "PA":
        arr = np.asarray(im.convert("RGBA"), dtype=np.uint8).astype(np.float32) / 255.0
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La"):
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8).astype(np.float32) / 255.0
    elif mode.startswith("I;16"):
        arr = np.asarray(im).astype(np.float32) / 65535.0
    elif mode == "I":
        raw = np.asarray(im)
        if raw.size and raw.min() >= 0 and raw.max() <= 65535:
            # 16-bit data that Pillow widened to 32-bit integers (some PNG/TIFF writers)
            arr = raw.astype(np.float32) / 65535.0
        else:
            arr = np.clip(raw.astype(np.float64) / 2147483647.0, 0.0, 1.0).astype(np.float32)
    elif mode == "F":
        arr = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    else:
        raise _unreadable(path, f"unsupported pixel mode {mode!r}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr, dtype=np.float32)


def _read_with_tifffile(path: Path, pil_error: Optional[Exception]) -> np.ndarray:
    try:
        import tifffile  # optional: only needed for TIFF layouts Pillow cannot decode
    except ImportError:
        why = f" (Pillow: {pil_error})" if pil_error else ""
        raise DataError(
            f"cannot read TIFF {path}{why}: this TIFF layout (e.g. more than 4 bands) "
            "needs the optional package tifffile — run `pip install tifffile`, or convert the file"
        ) from pil_error
    try:
        raw = np.asarray(tifffile.imread(str(path)))
    except Exception as e:  # noqa: BLE001 - any decoder failure is a user-facing data problem
        raise _unreadable(path, f"{type(e).__name__}: {e}") from e
    raw = np.squeeze(raw)
    if raw.ndim == 3 and raw.shape[0] <= 16 and raw.shape[-1] > 16:
        raw = np.moveaxis(raw, 0, -1)  # planar (C, H, W) -> (H, W, C)
    if raw.ndim == 2:
        raw = raw[:, :, None]
    if raw.ndim != 3:
        raise _unreadable(path, f"expected a 2-D image with optional bands, got array shape {raw.shape}")
    if raw.dtype == np.uint8:
        arr = raw.astype(np.float32) / 255.0
    elif raw.dtype == np.uint16:
        arr = raw.astype(np.float32) / 65535.0
    elif np.issubdtype(raw.dtype, np.floating):
        arr = np.nan_to_num(raw.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    elif raw.dtype == np.bool_:
        arr = raw.astype(np.float32)
    elif np.issubdtype(raw.dtype, np.integer):
        info = np.iinfo(raw.dtype)
        arr = np.clip(raw.astype(np.float64) / float(info.max), 0.0, 1.0).astype(np.float32)
    else:
        raise _unreadable(path, f"unsupported sample type {raw.dtype}")
    return np.ascontiguousarray(arr)


def read_image(path: PathLike) -> np.ndarray:
    """Read one image as an ``H x W x C`` float32 array.

    8-bit data is scaled by 1/255 and 16-bit by 1/65535 to [0, 1]; floating-point TIFFs keep their
    values. C is 1 (grey), 2 (grey + alpha), 3 (RGB), 4 (RGBA) or the band count of a multi-band
    TIFF. EXIF orientation is applied. Raises :class:`DataError` naming the file when it is
    missing, empty, truncated or otherwise unreadable.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"image not found: {p} — check the image folder and the file names in the annotations")
    if p.stat().st_size == 0:
        raise _unreadable(p, "the file is empty (0 bytes)")
    pil_error: Optional[Exception] = None
    try:
        with Image.open(p) as im:
            im.load()
            if im.format == "TIFF" and im.mode in ("RGB", "RGBA") and _tiff_bits(im) > 8 and _has_tifffile():
                raise _UseTifffile  # Pillow would reduce this 16-bit colour TIFF to 8 bits
            oriented = ImageOps.exif_transpose(im) if im.getexif().get(0x0112, 1) != 1 else im
            arr = _pil_to_array(oriented, p)
    except DataError:
        raise
    except _UseTifffile as e:
        pil_error = e
    except UnidentifiedImageError as e:
        if _has_tiff_header(p):
            pil_error = e
        else:
            raise _unreadable(p, "not a recognised image format (is the extension right?)") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        message = str(e)
        truncated = any(word in message.lower() for word in ("truncated", "broken data stream", "broken png"))
        if _has_tiff_header(p) and not truncated:
            pil_error = e
        else:
            raise _unreadable(p, "the file is truncated or corrupt" if truncated else message) from e
    if pil_error is not None:
        arr = _read_with_tifffile(p, pil_error)
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise _unreadable(p, "the image has zero width or height")
    return arr


def to_channels(arr: np.ndarray, in_chans: int, *, source: Optional[PathLike] = None) -> np.ndarray:
    """Adapt an ``H x W x C`` (or ``H x W``) image to ``in_chans`` channels.

    1 -> N replicates the band; 3 -> 1 takes the mean; an alpha band (C = 2 or 4) is dropped first.
    Other combinations (e.g. a 5-band TIFF for a 3-channel backbone) raise :class:`DataError`;
    ``source`` names the file in that message.
    """
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"expected an H x W x C array, got shape {arr.shape}")
    c = arr.shape[2]
    if c == in_chans:
        return arr
    if c in (2, 4):  # grey+alpha / RGBA: the alpha band carries no scene content
        return to_channels(arr[:, :, : c - 1], in_chans, source=source)
    if c == 1:
        return np.ascontiguousarray(np.repeat(arr, in_chans, axis=2))
    if c == 3 and in_chans == 1:
        return arr.mean(axis=2, keepdims=True, dtype=np.float32)
    where = f"{source} has" if source is not None else "the image has"
    raise DataError(
        f"{where} {c} channels but the backbone expects {in_chans} (backbone.in_chans) — set "
        f"backbone.in_chans: {c}, or convert the images to 1 or 3 channels"
    )
