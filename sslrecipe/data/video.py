"""Reading video frames: one reader for `sslrecipe predict` and for unlabeled pools that hold videos.

Videos (:data:`VIDEO_EXTENSIONS`) are decoded by PyAV (FFmpeg's decoders in a wheel; the optional extra ``video``),
imported only when a video is read, so a missing PyAV is one clear :class:`SSLRecipeError` naming the extra.

:func:`iter_video_frames` yields every ``stride``-th frame. With ``native=True`` a grey stream (``gray``,
``gray16le``, ...: a thermal camera's usual output) keeps its one channel and its bit depth (uint16 above 8 bits),
as :func:`sslrecipe.data.images.read_image` keeps a grey PNG's; colour streams are 8-bit RGB.
:func:`extract_frames` writes the sampled frames as PNG files (16-bit for 16-bit grey), which an unlabeled pool
then lists like any other image.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Optional, Union

import numpy as np

from sslrecipe.atomic import atomic_write_file
from sslrecipe.data.images import walk_files
from sslrecipe.errors import DataError, SSLRecipeError

PathLike = Union[str, "os.PathLike[str]"]

#: File extensions read as videos (compared case-insensitively).
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")


def is_video_file(path: PathLike) -> bool:
    """True when the file name has one of :data:`VIDEO_EXTENSIONS` and is not a hidden file."""
    name = Path(path).name
    return not name.startswith(".") and Path(name).suffix.lower() in VIDEO_EXTENSIONS


def list_videos(folder: PathLike) -> list[Path]:
    """All video files below ``folder`` (recursive, hidden files and folders skipped), sorted by relative path."""
    return walk_files(Path(folder).expanduser(), is_video_file)


def open_video(path: PathLike):
    """The PyAV container of ``path``; :class:`SSLRecipeError` without PyAV, :class:`DataError` when unreadable."""
    try:
        import av
    except ImportError:
        raise SSLRecipeError(f"{path}: reading videos needs PyAV, the optional extra `video`: "
                             "pip install 'sslrecipe[video]' (or pip install av)") from None
    try:
        return av.open(str(path))
    except Exception as e:  # noqa: BLE001 - any decoder failure is this file's problem
        raise DataError(f"cannot read video {path}: {e}") from e


def video_frame_count(path: PathLike, stride: int) -> Optional[int]:
    """Frames that will be read (every ``stride``-th), from the container's count; None when it does not say."""
    try:
        with open_video(path) as container:
            n = int(container.streams.video[0].frames or 0)
    except (DataError, IndexError):
        return None
    return (n + stride - 1) // stride if n > 0 else None


def _native_format(frame) -> str:
    """The ndarray layout that keeps a frame's information: grey stays grey (16-bit above 8 bits), else RGB."""
    name = frame.format.name
    if name.startswith(("gray", "ya")):
        return "gray16le" if max(c.bits for c in frame.format.components) > 8 else "gray"
    return "rgb24"


def iter_video_frames(path: PathLike, stride: int = 1, native: bool = False) -> Iterator[tuple[int, np.ndarray]]:
    """``(frame index, H x W x C array)`` of every ``stride``-th frame (0, stride, 2*stride, ...).

    The array is uint8 RGB (``C = 3``); with ``native`` a grey stream gives ``C = 1``, uint8 or uint16. A file that
    cannot be opened or decoded raises :class:`DataError` naming it (frames already yielded stay valid).
    """
    container = open_video(path)
    try:
        if not container.streams.video:
            raise DataError(f"{path} has no video stream")
        for i, frame in enumerate(container.decode(video=0)):
            if i % stride == 0:
                arr = frame.to_ndarray(format=_native_format(frame) if native else "rgb24")
                yield i, arr[:, :, None] if arr.ndim == 2 else arr
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt stream mid-file
        raise DataError(f"cannot decode video {path}: {e}") from e
    finally:
        container.close()


def _save_png(arr: np.ndarray, target: Path) -> None:
    from PIL import Image

    if arr.shape[2] == 1:
        # uint16 becomes a 16-bit grey PNG (Pillow's I;16), read back by read_image at full precision
        im = Image.fromarray(arr[:, :, 0]) if arr.dtype == np.uint16 else Image.fromarray(arr[:, :, 0], "L")
    else:
        im = Image.fromarray(arr, "RGB")
    # a killed extraction never leaves a truncated frame under the final name
    atomic_write_file(target, lambda tmp: im.save(tmp, format="PNG"), suffix=".png")


def extract_frames(path: PathLike, out_dir: PathLike, stride: int) -> tuple[list[Path], Optional[str]]:
    """Write every ``stride``-th frame of the video ``path`` to ``out_dir/frame_NNNNNN.png`` (NNNNNN: the frame
    index; grey streams stay 1-channel, 16-bit ones 16-bit). ``out_dir`` is emptied first.

    Returns the files written and, when the video could not be read to its end, why (the frames decoded before
    the failure are kept). Without PyAV, :class:`SSLRecipeError` naming the extra.
    """
    if stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    written: list[Path] = []
    try:
        for index, arr in iter_video_frames(path, stride, native=True):
            target = out / f"frame_{index:06d}.png"
            _save_png(arr, target)
            written.append(target)
    except DataError as e:
        return written, str(e)
    if not written:
        return written, f"{path} has no frames"
    return written, None
