"""COCO detection datasets: loading the JSON and a torch Dataset for fine-tuning and evaluation.

:class:`DetectionDataset` returns images at their original resolution (resizing belongs to the
detector's transform) and targets in the torchvision detection format. All augmentation
randomness comes from a per-sample ``numpy.random.Generator``: the key ``(index, sample_seed)``
seeds it directly and a plain ``index`` uses ``seed + index``, so a sample is the same whatever
worker process loads it and whatever the global RNG state is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from sslrecipe.data.images import to_channels
from sslrecipe.data.normalize import read_normalized
from sslrecipe.data.formats import read_json_file
from sslrecipe.errors import DataError

PathLike = Union[str, "os.PathLike[str]"]

_REQUIRED_KEYS = ("images", "annotations", "categories")


def load_coco(path: PathLike) -> dict:
    """Read a standard COCO detection JSON file.

    Raises :class:`DataError` naming the file when it is missing, not valid JSON (with line and
    column), not an object, or lacks one of the keys ``images``, ``annotations``, ``categories``.
    """
    p = Path(path).expanduser()
    coco = read_json_file(p, "COCO annotation file")
    if not isinstance(coco, dict):
        raise DataError(f"{p}: a COCO annotation file must hold a JSON object, found {type(coco).__name__}")
    missing = [k for k in _REQUIRED_KEYS if k not in coco]
    if missing:
        raise DataError(
            f"{p}: not a COCO detection file, missing key(s) {', '.join(repr(k) for k in missing)} — "
            "a COCO file needs 'images', 'annotations' and 'categories' (for YOLO/VOC data set the format)"
        )
    for key in _REQUIRED_KEYS:
        if not isinstance(coco[key], list):
            raise DataError(f"{p}: '{key}' must be a list, found {type(coco[key]).__name__}")
    for i, image in enumerate(coco["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise DataError(f"{p}: images[{i}] needs 'id' and 'file_name'")
    for i, ann in enumerate(coco["annotations"]):
        if not isinstance(ann, dict) or not {"image_id", "category_id", "bbox"} <= ann.keys():
            raise DataError(f"{p}: annotations[{i}] needs 'image_id', 'category_id' and 'bbox'")
    for i, cat in enumerate(coco["categories"]):
        if not isinstance(cat, dict) or "id" not in cat:
            raise DataError(f"{p}: categories[{i}] needs 'id' (and a 'name')")
    return coco


def is_ignored(ann: dict) -> bool:
    """True for crowd/ignore regions, which are never training targets."""
    return bool(ann.get("iscrowd", 0)) or bool(ann.get("ignore", 0))


def _sample_rng(key: Any, seed: int, length: int) -> tuple[int, np.random.Generator]:
    if isinstance(key, tuple):
        if len(key) != 2:
            raise TypeError(f"a dataset key is an index or (index, sample_seed), got {key!r}")
        index, sample_seed = int(key[0]), int(key[1])
    else:
        index = int(key)
        sample_seed = None
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a dataset of {length} images")
    if sample_seed is None:
        sample_seed = seed + index
    return index, np.random.default_rng(sample_seed)


class DetectionDataset(Dataset):
    """Images and boxes of a COCO dict, for torchvision detectors.

    ``dataset[key]`` -> ``(image, target)``: ``image`` is a float tensor ``C x H x W`` in [0, 1]
    at the original resolution (``C = in_chans``); ``target`` holds ``boxes`` (float ``N x 4``,
    xyxy pixels, clipped to the image), ``labels`` (int64 ``N``, contiguous ``1..K`` in sorted
    category-id order), ``image_id`` (int), ``iscrowd`` (int64 ``N``, all zero) and ``area``.
    Crowd/ignore annotations and boxes with no area inside the image are left out.

    ``label_to_category`` maps labels back to COCO category ids; ``category_names`` lists the
    names in label order (``category_names[label - 1]``).
    """

    def __init__(
        self,
        coco: dict,
        image_root: PathLike,
        in_chans: int,
        train: bool = False,
        hflip: bool = True,
        seed: int = 0,
        normalize: Optional[dict] = None,
    ) -> None:
        self.image_root = Path(image_root)
        self.normalize = normalize  # dataset statistics from sslrecipe.data.normalize (None: bit-depth scaling)
        self.in_chans = int(in_chans)
        self.train = bool(train)
        self.hflip = bool(hflip)
        self.seed = int(seed)
        categories = sorted(coco["categories"], key=lambda c: c["id"])
        self.label_to_category: dict[int, int] = {i + 1: int(c["id"]) for i, c in enumerate(categories)}
        self.category_to_label: dict[int, int] = {cid: label for label, cid in self.label_to_category.items()}
        self.category_names: list[str] = [str(c.get("name", c["id"])) for c in categories]
        self.images: list[dict] = list(coco["images"])
        by_image: dict[Any, list[dict]] = {image["id"]: [] for image in self.images}
        for ann in coco["annotations"]:
            if ann["image_id"] not in by_image:
                continue  # annotations of images outside this (sub)set
            if ann["category_id"] not in self.category_to_label:
                raise DataError(
                    f"annotation {ann.get('id', '?')} of image {ann['image_id']} has category_id "
                    f"{ann['category_id']}, which is not in 'categories' "
                    f"({sorted(self.category_to_label)}) — fix the annotation file"
                )
            if is_ignored(ann):
                continue
            by_image[ann["image_id"]].append(ann)
        self._annotations = [by_image[image["id"]] for image in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path:
        return self.image_root / self.images[index]["file_name"]

    def _target(self, index: int, width: int, height: int) -> dict:
        anns = self._annotations[index]
        if anns:
            xywh = np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
            boxes = np.stack(
                [xywh[:, 0], xywh[:, 1], xywh[:, 0] + xywh[:, 2], xywh[:, 1] + xywh[:, 3]], axis=1
            )
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            labels = np.asarray([self.category_to_label[a["category_id"]] for a in anns], dtype=np.int64)[keep]
            boxes = boxes[keep]
        else:
            boxes = np.zeros((0, 4), dtype=np.float64)
            labels = np.zeros((0,), dtype=np.int64)
        boxes_t = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        return {
            "boxes": boxes_t,
            "labels": torch.as_tensor(labels, dtype=torch.int64),
            "image_id": int(self.images[index]["id"]),
            "iscrowd": torch.zeros((boxes_t.shape[0],), dtype=torch.int64),
            "area": (boxes_t[:, 2] - boxes_t[:, 0]) * (boxes_t[:, 3] - boxes_t[:, 1]),
        }

    def __getitem__(self, key):
        index, rng = _sample_rng(key, self.seed, len(self))
        path = self.image_path(index)
        arr = to_channels(read_normalized(path, self.normalize), self.in_chans, source=path)
        height, width = arr.shape[:2]
        info = self.images[index]
        declared = (info.get("width"), info.get("height"))
        if None not in declared and (int(declared[0]), int(declared[1])) != (width, height):
            raise DataError(
                f"{path} is {width}x{height} pixels but the annotations say {declared[0]}x{declared[1]} "
                "(image id {}) — the boxes would be misplaced; fix 'width'/'height' in the annotation file "
                "or use the images the annotations were made on".format(info["id"])
            )
        target = self._target(index, width, height)
        if self.train and self.hflip and rng.random() < 0.5:
            arr = arr[:, ::-1].copy()  # a copy: numpy keeps the negative stride of a 1-pixel-wide flip, torch refuses it
            boxes = target["boxes"]
            target["boxes"] = torch.stack(
                [width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1
            ).reshape(-1, 4)
        image = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32))
        return image, target


def collate_detection(batch):
    """Collate ``(image, target)`` pairs into ``(list of images, list of targets)`` (sizes may differ)."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
