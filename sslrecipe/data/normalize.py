"""Per-dataset intensity normalization, for 16-bit thermal imagery in particular.

Raw 16-bit thermal frames use a narrow band of the 0..65535 range (a scene spans perhaps a few
thousand counts), so dividing by 65535 leaves almost no contrast, and clipping to 8 bits throws
information away. Instead the dataset's own range is measured once: :func:`dataset_normalization`
reads (a deterministic sample of) the images with :func:`sslrecipe.data.images.read_image`, takes
robust percentiles (default 0.5 / 99.5) and mean/std per channel, and caches them in
``<cache_dir>/normalization-<fingerprint>.json``; the fingerprint covers the file list (paths,
sizes, modification times) and the settings, so a changed pool is measured again.
:func:`apply_normalization` maps an image into that range in float32 (no 8-bit quantisation).

Statistics are in :func:`read_image` units (8-bit / 255, 16-bit / 65535); ``low_raw`` /
``high_raw`` repeat them in the files' counts for reading. Values given in a recipe can be
turned into the same dict with :func:`fixed_normalization`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from sslrecipe.atomic import atomic_write_text
from sslrecipe.data.images import read_image
from sslrecipe.errors import DataError

PathLike = Union[str, "os.PathLike[str]"]

STATS_VERSION = 1
#: Pixels sampled per image per channel for the percentiles.
PIXELS_PER_IMAGE = 20_000


def fingerprint(paths: Sequence[PathLike], **settings: Any) -> str:
    """A hex digest of the file list (resolved path, size, mtime) and ``settings``."""
    h = hashlib.sha256()
    for p in sorted(str(Path(x).resolve()) for x in paths):
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def _sample_indices(n: int, k: Optional[int]) -> np.ndarray:
    if k is None or k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


def _bit_depth(path: Path) -> Optional[int]:
    try:
        from PIL import Image

        with Image.open(path) as im:
            mode = im.mode
            if mode.startswith("I;16") or (mode == "I" and im.format == "PNG"):
                return 16
            if mode in ("I", "F"):
                return 32
            return 8
    except Exception:  # noqa: BLE001
        return None


def compute_normalization(
    paths: Sequence[PathLike],
    percentiles: tuple[float, float] = (0.5, 99.5),
    max_images: Optional[int] = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure the statistics (no cache); see :func:`dataset_normalization`."""
    lo_p, hi_p = float(percentiles[0]), float(percentiles[1])
    if not 0 <= lo_p < hi_p <= 100:
        raise DataError(f"normalization percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    all_paths = sorted(Path(p) for p in paths)
    if not all_paths:
        raise DataError("no images to compute normalization statistics from")
    rng = np.random.default_rng(seed)
    samples: list[np.ndarray] = []
    total = total_sq = None
    count = 0
    channels: Optional[int] = None
    bit_depths: dict[str, int] = {}
    used = skipped = 0
    for i in _sample_indices(len(all_paths), max_images):
        p = all_paths[int(i)]
        try:
            arr = read_image(p)
        except DataError:
            skipped += 1
            continue
        c = arr.shape[2]
        if channels is None:
            channels = c
        elif c != channels:
            if c == 1 or channels == 1:  # a grey image in a colour set (or the reverse): compare as grey
                arr = arr.mean(axis=2, keepdims=True)
                if channels != 1:
                    arr = np.repeat(arr, channels, axis=2)
            else:
                raise DataError(f"{p} has {c} channels but earlier images have {channels} — normalize sets with one channel count")
        flat = arr.reshape(-1, channels).astype(np.float64)
        s = flat.sum(axis=0)
        sq = (flat * flat).sum(axis=0)
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += flat.shape[0]
        take = flat if flat.shape[0] <= PIXELS_PER_IMAGE else flat[rng.choice(flat.shape[0], PIXELS_PER_IMAGE, replace=False)]
        samples.append(take.astype(np.float32))
        bd = _bit_depth(p)
        bit_depths[str(bd)] = bit_depths.get(str(bd), 0) + 1
        used += 1
    if not used:
        raise DataError(f"none of the {len(all_paths)} images could be read to compute normalization statistics")
    pix = np.concatenate(samples, axis=0)
    low = np.percentile(pix, lo_p, axis=0)
    high = np.percentile(pix, hi_p, axis=0)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    common_bits = max(bit_depths.items(), key=lambda kv: kv[1])[0]
    scale = {"8": 255.0, "16": 65535.0}.get(common_bits, 1.0)
    return {
        "version": STATS_VERSION,
        "method": "percentile",
        "percentiles": [lo_p, hi_p],
        "images": used,
        "images_total": len(all_paths),
        "skipped": skipped,
        "channels": int(channels or 1),
        "bit_depth": {k: v for k, v in sorted(bit_depths.items())},
        "scale": scale,
        "low": [float(v) for v in low],
        "high": [float(v) for v in high],
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "low_raw": [round(float(v) * scale, 3) for v in low],
        "high_raw": [round(float(v) * scale, 3) for v in high],
    }


def dataset_normalization(
    paths: Sequence[PathLike],
    cache_dir: Optional[PathLike] = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
    max_images: Optional[int] = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-channel intensity statistics of a set of images, computed once and cached.

    Returns ``{method, percentiles, low, high, mean, std, channels, scale, low_raw, high_raw,
    images, images_total, skipped, bit_depth, fingerprint}``; ``low``/``high`` are the given
    percentiles and ``mean``/``std`` the moments, per channel in :func:`read_image` units. At most
    ``max_images`` images (evenly spread over the sorted list; ``None`` = all) are read, and
    :data:`PIXELS_PER_IMAGE` pixels of each enter the percentiles. With ``cache_dir`` the result
    is stored as ``normalization-<fingerprint[:16]>.json`` there and reused while the file list
    and settings are unchanged. Unreadable images are skipped (counted in ``skipped``).
    """
    settings = {"percentiles": [float(percentiles[0]), float(percentiles[1])], "max_images": max_images,
                "seed": seed, "version": STATS_VERSION, "pixels": PIXELS_PER_IMAGE}
    fp = fingerprint(paths, **settings)
    cache_file = Path(cache_dir) / f"normalization-{fp[:16]}.json" if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text(encoding="utf-8"))
            if cached.get("fingerprint") == fp:
                return cached
        except (OSError, json.JSONDecodeError):
            pass  # a damaged cache is recomputed
    stats = compute_normalization(paths, percentiles, max_images, seed)
    stats["fingerprint"] = fp
    if cache_file is not None:
        try:
            atomic_write_text(cache_file, json.dumps(stats, indent=1))
        except OSError as e:
            raise DataError(f"cannot write the normalization cache {cache_file}: {e}") from e
    return stats


def fixed_normalization(
    low: Union[float, Sequence[float]],
    high: Union[float, Sequence[float]],
    scale: float = 65535.0,
    mean: Union[float, Sequence[float], None] = None,
    std: Union[float, Sequence[float], None] = None,
) -> dict[str, Any]:
    """Statistics given directly (e.g. in a recipe) in the files' own counts (``scale``: 255 for
    8-bit, 65535 for 16-bit data, 1 for values already in read_image units)."""

    def seq(v):
        return [float(x) for x in (v if isinstance(v, (list, tuple)) else [v])]

    lo, hi = seq(low), seq(high)
    if len(lo) != len(hi) or any(h <= l for l, h in zip(lo, hi)):
        raise DataError(f"normalization needs low < high per channel, got low={low} high={high}")
    out: dict[str, Any] = {
        "version": STATS_VERSION, "method": "percentile", "channels": len(lo), "scale": float(scale),
        "low": [v / scale for v in lo], "high": [v / scale for v in hi], "low_raw": lo, "high_raw": hi,
    }
    if mean is not None and std is not None:
        out["mean"] = [v / scale for v in seq(mean)]
        out["std"] = [v / scale for v in seq(std)]
    return out


def _per_channel(values: Sequence[float], c: int, what: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float32)
    if v.size == c:
        return v
    if v.size == 1:
        return np.repeat(v, c)
    if c == 1:
        return v.mean(keepdims=True)
    raise DataError(f"normalization statistics have {v.size} channel value(s) for '{what}' but the image has {c} channels")


def apply_normalization(arr: np.ndarray, stats: dict, method: Optional[str] = None, clip: bool = True) -> np.ndarray:
    """Normalize an ``H x W x C`` (or ``H x W``) image with dataset statistics, as float32.

    ``arr`` is in :func:`read_image` units (float), or raw integers (uint8/uint16, divided by the
    type's maximum first). ``method`` ``percentile`` (default: ``stats['method']``) maps
    ``low..high`` to ``0..1`` (clipped to [0, 1] when ``clip``: only the 1% tails); ``meanstd``
    gives ``(x - mean) / std``. Single-valued statistics apply to every channel; an image with one
    channel uses the channel mean of multi-channel statistics.
    """
    x = np.asarray(arr)
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / float(np.iinfo(x.dtype).max)
    else:
        x = x.astype(np.float32, copy=False)
    squeeze = x.ndim == 2
    if squeeze:
        x = x[:, :, None]
    c = x.shape[2]
    method = method or stats.get("method", "percentile")
    if method == "percentile":
        lo = _per_channel(stats["low"], c, "low")
        hi = _per_channel(stats["high"], c, "high")
        out = (x - lo) / np.maximum(hi - lo, 1e-12)
        if clip:
            out = np.clip(out, 0.0, 1.0)
    elif method == "meanstd":
        if "mean" not in stats or "std" not in stats:
            raise DataError("meanstd normalization needs 'mean' and 'std' in the statistics")
        mean = _per_channel(stats["mean"], c, "mean")
        std = _per_channel(stats["std"], c, "std")
        out = (x - mean) / np.maximum(std, 1e-12)
    else:
        raise DataError(f"unknown normalization method {method!r} — use percentile or meanstd")
    out = out.astype(np.float32, copy=False)
    return out[:, :, 0] if squeeze else out


def read_normalized(path: PathLike, stats: Optional[dict] = None) -> np.ndarray:
    """`read_image`, then the dataset's intensity normalization when `stats` is given: the one reader the
    datasets (coco.py, unlabeled.py) use."""
    arr = read_image(path)
    return arr if stats is None else apply_normalization(arr, stats)
