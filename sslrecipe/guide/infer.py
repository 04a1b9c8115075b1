"""Constraints a dataset can tell: object size, shots and channels (`sslrecipe advise --data FILE`).

The data package's statistics (`sslrecipe.data.stats.dataset_stats`) are used when importable: they read
every format the data package knows (COCO, YOLO, VOC, HIT-UAV). Without them — and for what they do not
report (the median side of the small boxes only) — a COCO JSON file is read directly here: images, boxes, object sizes in COCO's area buckets
(small < 32^2, medium < 96^2, large otherwise, using the annotation's `area` as COCO evaluation does, else
the box's), image sizes, boxes per image, and the channel count of the first image found on disk.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from sslrecipe.errors import DataError

SMALL_AREA = 32**2
MEDIUM_AREA = 96**2
DOMINANT = 0.5  # a bucket holding at least this share of the boxes names the object size; else "mixed"


@dataclass
class DataFacts:
    path: str
    images: int
    boxes: int
    sizes: dict[str, int]  # small / medium / large box counts (COCO buckets)
    object_size: str  # small | medium | large | mixed
    channels: Optional[int] = None
    max_side: Optional[int] = None  # the largest image side in pixels
    median_small_side: Optional[float] = None  # sqrt(area) of the median small box
    max_boxes_per_image: int = 0
    source: str = "coco json"
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        total = max(self.boxes, 1)
        share = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in self.sizes.items())
        parts = [f"{self.images} images", f"{self.boxes} boxes ({share})"]
        if self.channels:
            parts.append(f"{self.channels} channel{'s' if self.channels > 1 else ''}")
        if self.max_side:
            parts.append(f"largest side {self.max_side} px")
        return f"{self.path}: " + ", ".join(parts)


def object_size_of(sizes: dict[str, int]) -> str:
    total = sum(sizes.get(k, 0) for k in ("small", "medium", "large"))
    if total == 0:
        return "mixed"
    for bucket in ("small", "medium", "large"):
        if sizes.get(bucket, 0) / total >= DOMINANT:
            return bucket
    return "mixed"


def _channels_of(image: Path) -> Optional[int]:
    try:
        from PIL import Image

        with Image.open(image) as im:
            bands = im.getbands()
            if im.mode == "P":
                return 3
            return len(bands)
    except Exception:  # noqa: BLE001 - an unreadable image only means "unknown"
        return None


def _first_image(path: Path, images: list[dict]) -> Optional[Path]:
    roots = [path.parent, path.parent / "images", path.parent.parent / "images", path.parent.parent]
    for img in images[:20]:
        name = img.get("file_name") or img.get("filename")
        if not name:
            continue
        for root in roots:
            candidate = root / name
            if candidate.is_file():
                return candidate
    return None


def coco_facts(path: str | Path) -> DataFacts:
    """Read the facts from a COCO JSON file (also HIT-UAV's variant: `annotation`, `filename`)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--data {path}: file not found")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"--data {path}: not a COCO JSON file ({e}); pass a COCO annotation file") from None
    if not isinstance(data, dict) or "images" not in data:
        raise DataError(f"--data {path}: not a COCO annotation file (no 'images' list)")
    images = data.get("images") or []
    anns = data.get("annotations", data.get("annotation")) or []
    if not images:
        raise DataError(f"--data {path}: the file lists no images")
    sizes = {"small": 0, "medium": 0, "large": 0}
    small_sides: list[float] = []
    per_image: dict[Any, int] = {}
    for a in anns:
        if a.get("ignore") or a.get("iscrowd"):
            continue
        area = a.get("area")
        if not area:
            box = a.get("bbox") or [0, 0, 0, 0]
            area = float(box[2]) * float(box[3]) if len(box) == 4 else 0.0
        area = float(area)
        if area <= 0:
            continue
        if area < SMALL_AREA:
            sizes["small"] += 1
            small_sides.append(area**0.5)
        elif area < MEDIUM_AREA:
            sizes["medium"] += 1
        else:
            sizes["large"] += 1
        per_image[a.get("image_id")] = per_image.get(a.get("image_id"), 0) + 1
    sides = [max(int(i.get("width") or 0), int(i.get("height") or 0)) for i in images]
    first = _first_image(p, images)
    facts = DataFacts(
        path=str(path),
        images=len(images),
        boxes=sum(sizes.values()),
        sizes=sizes,
        object_size=object_size_of(sizes),
        channels=_channels_of(first) if first else None,
        max_side=max(sides) or None,
        median_small_side=statistics.median(small_sides) if small_sides else None,
        max_boxes_per_image=max(per_image.values(), default=0),
    )
    if first is None:
        facts.notes.append("no image file found next to the annotations: channels unknown")
    return facts


def _from_stats(stats: Any, path: str) -> Optional[DataFacts]:
    """Adapt the data package's statistics (a mapping or an object) to DataFacts; None if its shape is unknown."""

    def get(obj: Any, key: str) -> Any:
        if isinstance(obj, dict):
            return obj.get(key)
        return getattr(obj, key, None)

    if hasattr(stats, "as_dict") and callable(stats.as_dict):
        stats = stats.as_dict()
    elif hasattr(stats, "to_dict") and callable(stats.to_dict):
        stats = stats.to_dict()
    images = get(stats, "images")
    if isinstance(images, (list, tuple)):
        images = len(images)
    sizes_raw = get(stats, "sizes")
    if not isinstance(images, int) or sizes_raw is None:
        return None
    sizes = {k: int(get(sizes_raw, k) or 0) for k in ("small", "medium", "large")}
    boxes = get(stats, "boxes")
    channels = get(stats, "effective_channels")
    if not isinstance(channels, int):
        channels = get(stats, "channels")
        if isinstance(channels, dict):  # {"3": images, "?": unreadable}: the most common known count
            known = {k: v for k, v in channels.items() if str(k).isdigit()}
            channels = max(known, key=lambda k: known[k]) if known else None
        try:
            channels = int(channels) if channels is not None else None
        except (TypeError, ValueError):
            channels = None
    max_side = None
    image_sizes = get(stats, "image_sizes")
    if isinstance(image_sizes, dict):
        sides = []
        for key in image_sizes:
            w, _, h = str(key).partition("x")
            if w.isdigit() and h.isdigit():
                sides.append(max(int(w), int(h)))
        max_side = max(sides) if sides else None
    per_image = get(stats, "boxes_per_image")
    max_boxes = get(per_image, "max") if per_image is not None else None
    median_side = None
    box_size = get(stats, "box_size")
    if box_size is not None:
        sqrt_area = get(box_size, "sqrt_area")
        median = get(sqrt_area, "median") if sqrt_area is not None else None
        if isinstance(median, (int, float)) and 0 < median < 32:
            median_side = float(median)  # all boxes' median; refined from the JSON where there is one
    return DataFacts(
        path=path,
        images=images,
        boxes=int(boxes) if isinstance(boxes, int) else sum(sizes.values()),
        sizes=sizes,
        object_size=object_size_of(sizes),
        channels=channels,
        max_side=max_side,
        median_small_side=median_side,
        max_boxes_per_image=int(max_boxes) if isinstance(max_boxes, (int, float)) else 0,
        source="sslrecipe.data.stats",
    )


def infer_from_data(path: str | Path) -> DataFacts:
    """Facts about a labeled dataset, for the advisor's constraints."""
    from sslrecipe.data.stats import dataset_stats  # numpy and Pillow: loaded only when --data is given

    path = str(path)
    facts = _from_stats(dataset_stats(path), path)
    is_json = Path(path).suffix.lower() == ".json"
    if facts is None:
        if not is_json:
            raise DataError(f"--data {path}: the dataset statistics gave no images/sizes for it")
        return coco_facts(path)
    if is_json:  # the median side of the small boxes only, which the statistics do not report
        try:
            own = coco_facts(path)
        except DataError:
            return facts
        facts.max_side = facts.max_side or own.max_side
        facts.median_small_side = own.median_small_side or facts.median_small_side
        facts.max_boxes_per_image = facts.max_boxes_per_image or own.max_boxes_per_image
        facts.channels = facts.channels or own.channels
    return facts
