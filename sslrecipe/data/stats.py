"""Dataset statistics: what the advisor reads to infer object size, shots and input channels.

:func:`dataset_stats` returns a JSON-serialisable dict:

``images``, ``images_with_boxes``, ``images_without_boxes``
``boxes``                    boxes that are objects (crowd / ignore regions excluded)
``ignore_regions``           distinct ignore regions (DontCare, VOC difficult, COCO crowd)
``categories``               ``[{id, name, boxes, images}]`` (``images``: images that hold the class)
``per_class``                ``{name: boxes}``
``sizes``                    COCO buckets by area: ``small`` < 32², ``medium`` < 96², ``large``
``size_fractions``           the same as fractions of ``boxes``
``tiny``                     ``{lt8, lt16}``: boxes with area < 8² and < 16² (cumulative)
``box_size``                 ``sqrt(area)`` in pixels: ``min, p10, median, p90, max, mean``, and
                             ``median_relative``: median ``sqrt(area / image area)``
``boxes_per_image``          ``mean, median, p95, max`` over all images
``max_dets``                 COCO's maxDets (100); ``dense_images``: images with more boxes
                             than that; ``dense``: whether there is any
``image_sizes``              ``{"WxH": images}``
``channels``, ``bit_depth``  ``{value: images}`` read from the file headers (``"?"`` = unreadable)
``effective_channels``       1 when a sample of multi-channel images holds identical channels
                             (greyscale stored as RGB), else the most common channel count

Areas are the annotations' ``area`` (as COCO evaluation buckets AP_S/M/L), ``w*h`` when absent.
A plain folder of images gives the image keys only.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from PIL import Image

from sslrecipe.errors import DataError

PathLike = Union[str, "os.PathLike[str]"]

#: COCO evaluation's maxDets: scenes with more objects lose recall at this cap.
COCO_MAX_DETS = 100
SMALL_AREA = 32**2
MEDIUM_AREA = 96**2
#: Images decoded to test whether multi-channel files are greyscale stored as RGB.
CHANNEL_SAMPLE = 16

# Pillow mode -> (channels, bits per sample)
_MODES = {
    "1": (1, 1), "L": (1, 8), "P": (3, 8), "LA": (2, 8), "PA": (4, 8), "RGB": (3, 8), "RGBA": (4, 8),
    "RGBX": (4, 8), "CMYK": (4, 8), "YCbCr": (3, 8), "LAB": (3, 8), "HSV": (3, 8),
    "I;16": (1, 16), "I;16B": (1, 16), "I;16L": (1, 16), "I;16N": (1, 16), "I": (1, 32), "F": (1, 32),
}


def _header(path: Path) -> tuple[Optional[int], Optional[int], Optional[tuple[int, int]], Optional[str]]:
    """(channels, bit depth, size, mode) from the file header, without decoding pixels."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            size = im.size
            bands = len(im.getbands())
            channels, bits = _MODES.get(mode, (bands, None))
            if mode == "I" and im.format == "PNG":  # 16-bit PNGs that Pillow widens to 32-bit ints
                bits = 16
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                size = (size[1], size[0])
            return channels, bits, (int(size[0]), int(size[1])), mode
    except Exception:  # noqa: BLE001
        pass
    try:  # many-band / 16-bit RGB TIFFs: the project's reader (needs tifffile)
        from sslrecipe.data.images import read_image

        arr = read_image(path)
        return int(arr.shape[2]), None, (int(arr.shape[1]), int(arr.shape[0])), None
    except Exception:  # noqa: BLE001
        return None, None, None, None


def _identical_channels(path: Path) -> Optional[bool]:
    try:
        with Image.open(path) as im:
            im.draft("RGB", (256, 256))
            arr = np.asarray(im.convert("RGB") if im.mode in ("P", "CMYK", "YCbCr") else im)
    except Exception:  # noqa: BLE001
        return None
    if arr.ndim != 3 or arr.shape[2] < 3:
        return None
    a = arr[:, :, :3].astype(np.int32)
    # JPEG chroma rounding can leave +-1 differences in a grey image saved as RGB
    return bool(np.abs(a[:, :, 0] - a[:, :, 1]).max() <= 2 and np.abs(a[:, :, 0] - a[:, :, 2]).max() <= 2)


def image_stats(paths: list[Path]) -> dict[str, Any]:
    """Channels, bit depth and sizes of image files (headers only, plus a small decoded sample)."""
    channels: Counter = Counter()
    bits: Counter = Counter()
    sizes: Counter = Counter()
    multi: list[Path] = []
    unreadable = 0
    for p in paths:
        c, b, size, _mode = _header(p)
        if c is None:
            unreadable += 1
            channels["?"] += 1
            bits["?"] += 1
            continue
        channels[str(c)] += 1
        bits[str(b) if b is not None else "?"] += 1
        sizes[f"{size[0]}x{size[1]}"] += 1
        if c >= 3 and len(multi) < CHANNEL_SAMPLE:
            multi.append(p)
    common = [int(k) for k, _ in channels.most_common() if k != "?"]
    effective = common[0] if common else None
    if effective is not None and effective >= 3 and multi:
        verdicts = [v for v in (_identical_channels(p) for p in multi) if v is not None]
        if verdicts and all(verdicts):
            effective = 1
    return {
        "image_sizes": dict(sizes.most_common()),
        "channels": dict(sorted(channels.items())),
        "bit_depth": dict(sorted(bits.items())),
        "effective_channels": effective,
        "unreadable_images": unreadable,
    }


def _summary(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"min": 0.0, "p10": 0.0, "median": 0.0, "p90": 0.0, "max": 0.0, "mean": 0.0}
    p10, med, p90 = np.percentile(values, [10, 50, 90])
    return {"min": round(float(values.min()), 3), "p10": round(float(p10), 3), "median": round(float(med), 3),
            "p90": round(float(p90), 3), "max": round(float(values.max()), 3), "mean": round(float(values.mean()), 3)}


def coco_stats(coco: dict, image_root: Optional[PathLike] = None, read_images: bool = True) -> dict[str, Any]:
    """Statistics of a COCO dict (``read_images``: also channels/bit depth from the files)."""
    images = coco.get("images", [])
    cats = sorted(coco.get("categories", []), key=lambda c: c["id"])
    names = {c["id"]: str(c.get("name", c["id"])) for c in cats}
    img_size = {img["id"]: (img.get("width"), img.get("height")) for img in images}
    per_image: Counter = Counter()
    per_class: Counter = Counter()
    class_images: dict[Any, set] = {}
    areas, rel = [], []
    ignored = set()
    for ann in coco.get("annotations", []):
        bbox = ann.get("bbox") or [0, 0, 0, 0]
        if ann.get("iscrowd", 0) or ann.get("ignore", 0):
            ignored.add((ann.get("image_id"), tuple(float(v) for v in bbox)))
            continue
        if ann.get("image_id") not in img_size:
            continue
        per_image[ann["image_id"]] += 1
        per_class[ann.get("category_id")] += 1
        class_images.setdefault(ann.get("category_id"), set()).add(ann["image_id"])
        area = ann.get("area")
        if not isinstance(area, (int, float)) or area <= 0:
            area = float(bbox[2]) * float(bbox[3])
        areas.append(float(area))
        W, H = img_size[ann["image_id"]]
        if W and H:
            rel.append(np.sqrt(max(float(area), 0.0) / (float(W) * float(H))))
    a = np.asarray(areas, dtype=np.float64)
    n = int(a.size)
    sizes = {"small": int((a < SMALL_AREA).sum()), "medium": int(((a >= SMALL_AREA) & (a < MEDIUM_AREA)).sum()),
             "large": int((a >= MEDIUM_AREA).sum())}
    counts = np.asarray([per_image.get(img["id"], 0) for img in images], dtype=np.float64)
    dense = int((counts > COCO_MAX_DETS).sum())
    out: dict[str, Any] = {
        "images": len(images),
        "images_with_boxes": int((counts > 0).sum()),
        "images_without_boxes": int((counts == 0).sum()),
        "boxes": n,
        "ignore_regions": len(ignored),
        "categories": [
            {"id": c["id"], "name": names[c["id"]], "boxes": int(per_class.get(c["id"], 0)),
             "images": len(class_images.get(c["id"], ()))}
            for c in cats
        ],
        "per_class": {names[c["id"]]: int(per_class.get(c["id"], 0)) for c in cats},
        "sizes": sizes,
        "size_fractions": {k: (round(v / n, 4) if n else 0.0) for k, v in sizes.items()},
        "tiny": {"lt8": int((a < 8**2).sum()), "lt16": int((a < 16**2).sum())},
        "box_size": {"sqrt_area": _summary(np.sqrt(np.clip(a, 0, None))),
                     "median_relative": round(float(np.median(rel)), 5) if rel else 0.0},
        "boxes_per_image": {
            "mean": round(float(counts.mean()), 3) if counts.size else 0.0,
            "median": float(np.median(counts)) if counts.size else 0.0,
            "p95": float(np.percentile(counts, 95)) if counts.size else 0.0,
            "max": int(counts.max()) if counts.size else 0,
        },
        "max_dets": COCO_MAX_DETS,
        "dense_images": dense,
        "dense": dense > 0,
    }
    declared = Counter(f"{w}x{h}" for w, h in img_size.values() if w and h)
    if read_images and image_root is not None:
        root = Path(image_root)
        out.update(image_stats([root / img["file_name"] for img in images]))
    else:
        out["image_sizes"] = dict(declared.most_common())
    return out


def dataset_stats(
    path_or_coco: Union[PathLike, dict],
    image_root: Optional[PathLike] = None,
    format: str = "auto",
    split: Optional[str] = None,
    read_images: bool = True,
) -> dict[str, Any]:
    """Statistics of a labeled set (any format :func:`~sslrecipe.data.formats.load_labeled` reads,
    or a COCO dict with its ``image_root``) or of a plain folder of images (image keys only)."""
    from sslrecipe.data.formats import detect_format, load_labeled

    if isinstance(path_or_coco, dict):
        return coco_stats(path_or_coco, image_root, read_images=read_images)
    p = Path(path_or_coco).expanduser()
    if p.is_dir() and (format or "auto") == "auto":
        try:
            detect_format(p)
        except DataError:
            from sslrecipe.data.images import list_images

            paths = list_images(p)
            if not paths:
                raise DataError(f"{p}: no images or annotations found") from None
            return {"images": len(paths), **image_stats(paths)}
    coco, root = load_labeled(p, images=image_root, format=format, split=split)
    return coco_stats(coco, root, read_images=read_images)
