"""Instance masks for Mask R-CNN: the data check, mask targets, and masks in COCO results (RLE).

Masks come only from the data: Mask R-CNN needs ``segmentation`` (polygons or RLE) on every training
annotation, and :func:`require_masks` says so clearly when it is missing — boxes are never turned into
rectangle "masks" behind the user's back.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from sslrecipe.data.coco import DetectionDataset, is_ignored
from sslrecipe.errors import DataError


def _has_mask(ann: Mapping[str, Any]) -> bool:
    seg = ann.get("segmentation")
    if isinstance(seg, dict):
        return "counts" in seg and "size" in seg
    return isinstance(seg, list) and any(isinstance(p, list) and len(p) >= 6 for p in seg)


def require_masks(coco: Mapping[str, Any], what: str = "training") -> None:
    """Raise :class:`DataError` unless every object annotation (not crowd/ignore) has a mask."""
    objects = [a for a in coco.get("annotations", []) if not is_ignored(a)]
    missing = [a for a in objects if not _has_mask(a)]
    if not objects:
        raise DataError(f"finetune.detector is mask_rcnn but the {what} set has no object annotations")
    if missing:
        ids = [a.get("id") for a in missing[:5]]
        raise DataError(
            f"finetune.detector is mask_rcnn, which needs instance masks, but {len(missing)} of {len(objects)} "
            f"{what} annotations have no 'segmentation' (polygons or RLE), e.g. ids {ids}. "
            "Use finetune.detector: faster_rcnn for box-only data, or add masks to the annotations."
        )


def ann_to_mask(ann: Mapping[str, Any], height: int, width: int) -> np.ndarray:
    """A ``height x width`` uint8 mask from COCO polygons, uncompressed or compressed RLE."""
    from pycocotools import mask as mask_utils

    seg = ann["segmentation"]
    if isinstance(seg, list):
        polys = [p for p in seg if isinstance(p, list) and len(p) >= 6]
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = dict(seg)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    m = mask_utils.decode(rle)
    if m.shape[:2] != (height, width):
        raise DataError(f"annotation {ann.get('id')}: mask of size {m.shape[:2]} on a {height}x{width} image")
    return m


class MaskDetectionDataset(DetectionDataset):
    """:class:`~sslrecipe.data.coco.DetectionDataset` whose targets also hold ``masks`` (uint8 ``N x H x W``),
    aligned with ``boxes`` (same annotations, same order, flipped with the image)."""

    def __init__(self, coco: dict, *args: Any, **kwargs: Any) -> None:
        require_masks(coco)
        super().__init__(coco, *args, **kwargs)

    def __getitem__(self, key):
        from sslrecipe.data.coco import _sample_rng

        image, target = super().__getitem__(key)
        index, rng = _sample_rng(key, self.seed, len(self))
        flipped = self.train and self.hflip and rng.random() < 0.5  # the parent's first draw, replayed
        height, width = int(image.shape[-2]), int(image.shape[-1])
        anns = self._annotations[index]
        masks = []
        for a in anns:
            x, y, w, h = (float(v) for v in a["bbox"])
            x0, x1 = min(max(x, 0.0), width), min(max(x + w, 0.0), width)
            y0, y1 = min(max(y, 0.0), height), min(max(y + h, 0.0), height)
            if x1 > x0 and y1 > y0:  # the boxes the parent kept
                masks.append(ann_to_mask(a, height, width))
        arr = np.stack(masks) if masks else np.zeros((0, height, width), dtype=np.uint8)
        if flipped:
            arr = arr[:, :, ::-1]
        if arr.shape[0] != target["boxes"].shape[0]:
            raise RuntimeError("mask targets out of step with box targets")  # DetectionDataset changed
        target["masks"] = torch.from_numpy(np.ascontiguousarray(arr))
        return image, target


def masks_to_rle(masks: torch.Tensor, threshold: float = 0.5) -> list[dict[str, Any]]:
    """Mask R-CNN's ``N x 1 x H x W`` probabilities -> COCO compressed RLE (``counts`` as text)."""
    from pycocotools import mask as mask_utils

    if masks.ndim == 4:
        masks = masks[:, 0]
    binary = (masks >= threshold).to(torch.uint8).cpu().numpy()
    out = []
    for m in binary:
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode("ascii")
        out.append({"size": [int(v) for v in rle["size"]], "counts": rle["counts"]})
    return out
