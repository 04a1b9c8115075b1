"""Unlabeled image pools for self-supervised pre-training.

:func:`scan_unlabeled` lists a folder and opens every image header cheaply, so the pipeline can
warn about broken files and skip them before training starts. :class:`UnlabeledImages` reads
the good ones as float tensors; augmentation randomness comes from a per-sample
``numpy.random.Generator`` exactly as in :class:`sslrecipe.data.coco.DetectionDataset`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from sslrecipe.data.images import IMAGE_EXTENSIONS, list_images, to_channels, too_small
from sslrecipe.data.normalize import read_normalized
from sslrecipe.errors import DataError

PathLike = Union[str, "os.PathLike[str]"]

#: How many following images are tried in place of an unreadable one when ``on_error`` is set.
MAX_SUBSTITUTES = 16


def scan_unlabeled(folder: PathLike, allow_empty: bool = False) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Images under ``folder`` that open, and ``(path, reason)`` for those that do not.

    Each file is checked with Pillow's ``verify`` (header and, for PNG, chunk checksums) without
    decoding the pixels, so a scan of thousands of images takes seconds; images smaller than
    :data:`~sslrecipe.data.images.MIN_IMAGE_SIDE` on a side (e.g. 1x1) are listed as problems too. A file that passes may
    still fail to decode later (e.g. a truncated JPEG); :class:`UnlabeledImages` handles that via
    ``on_error``. Raises :class:`DataError` when the folder is missing or, unless ``allow_empty`` (a folder of
    videos), holds no image files.
    """
    paths = list_images(folder)
    if not paths and not allow_empty:
        raise DataError(
            f"no images found in {folder} (searched recursively for {', '.join(IMAGE_EXTENSIONS)}) — "
            "check the path in data.unlabeled"
        )
    good: list[Path] = []
    problems: list[tuple[Path, str]] = []
    for path in paths:
        try:
            if path.stat().st_size == 0:
                problems.append((path, "empty file (0 bytes)"))
                continue
            with Image.open(path) as im:
                small = too_small(*im.size)  # from the header; verify() leaves the image unusable
                im.verify()
            if small is not None:
                problems.append((path, small))
                continue
            good.append(path)
        except Exception as e:  # noqa: BLE001 - every failure is reported, none is fatal
            reason = str(e) or type(e).__name__
            problems.append((path, f"cannot open: {reason}"))
    return good, problems


class UnlabeledImages(Dataset):
    """A list of image files as float tensors ``C x H x W`` (``C = in_chans``), original size.

    ``dataset[key]`` with ``key`` an index or ``(index, sample_seed)``: the image is read, adapted
    with :func:`to_channels` and, when ``transform`` is given, passed as ``transform(tensor, rng)``
    where ``rng = numpy.random.default_rng(sample_seed)`` (``seed + index`` for a plain index);
    the transform's result is returned.

    When an image cannot be read: without ``on_error`` the :class:`DataError` (naming the file)
    propagates; with ``on_error``, ``on_error(path, error)`` is called and the next image in the
    list is used instead (up to :data:`MAX_SUBSTITUTES` tries).
    """

    def __init__(
        self,
        paths: Sequence[PathLike],
        in_chans: int,
        transform: Optional[Callable[[torch.Tensor, np.random.Generator], Any]] = None,
        on_error: Optional[Callable[[Path, Exception], None]] = None,
        seed: int = 0,
        normalize: Optional[dict] = None,
    ) -> None:
        self.normalize = normalize  # dataset statistics from sslrecipe.data.normalize (None: bit-depth scaling)
        self.paths = [Path(p) for p in paths]
        self.in_chans = int(in_chans)
        self.transform = transform
        self.on_error = on_error
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> torch.Tensor:
        """The image at ``index`` as a float tensor, without transform."""
        path = self.paths[index]
        arr = to_channels(read_normalized(path, self.normalize), self.in_chans, source=path)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32))

    def __getitem__(self, key):
        if isinstance(key, tuple):
            if len(key) != 2:
                raise TypeError(f"a dataset key is an index or (index, sample_seed), got {key!r}")
            index, sample_seed = int(key[0]), int(key[1])
        else:
            index, sample_seed = int(key), None
        n = len(self.paths)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        if sample_seed is None:
            sample_seed = self.seed + index
        tensor = None
        tries = min(n, MAX_SUBSTITUTES + 1) if self.on_error is not None else 1
        for offset in range(tries):
            current = (index + offset) % n
            try:
                tensor = self.load(current)
                break
            except DataError as e:
                if self.on_error is None:
                    raise
                self.on_error(self.paths[current], e)
        if tensor is None:
            raise DataError(
                f"{tries} consecutive images from {self.paths[index]} on could not be read — "
                "remove or replace the broken files in the folder"
            )
        if self.transform is None:
            return tensor
        return self.transform(tensor, np.random.default_rng(sample_seed))
