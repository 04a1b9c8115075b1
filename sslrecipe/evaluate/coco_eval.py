"""COCO box evaluation through pycocotools, in percent, with empty size buckets as None.

The numbers are exactly pycocotools' ``COCOeval.stats`` (times 100; for ``max_dets`` other than 100 the
mAP uses ``max_dets`` as the other lines do, where pycocotools' summarize would print -1): the ground truth is only completed
where pycocotools would crash (missing ``area`` -> w*h, missing ``iscrowd`` -> 0, missing annotation
``id`` or ``categories``), crowd annotations stay ignore regions, and empty detections give 0 (not -1).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from sslrecipe.errors import DataError

GT = Union[Mapping[str, Any], str, Path]
Dets = Union[Sequence[Mapping[str, Any]], str, Path]

# Key -> (AP or AR, IoU threshold or None = mean over 0.50:0.95, area range): COCOeval.stats[0..5] and
# stats[8]. The AR key is named after max_dets.
_SUMMARY = {
    "bbox/mAP": (True, None, "all"),
    "bbox/AP50": (True, 0.5, "all"),
    "bbox/AP75": (True, 0.75, "all"),
    "bbox/AP_small": (True, None, "small"),
    "bbox/AP_medium": (True, None, "medium"),
    "bbox/AP_large": (True, None, "large"),
}


def _read_json(path: Union[str, Path], what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{what} file {path} not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{what} file {path} is not valid JSON: {e}") from None


def prepare_gt(gt: GT) -> dict[str, Any]:
    """A deep copy of the COCO ground truth, completed so that pycocotools accepts it."""
    data = _read_json(gt, "ground-truth") if isinstance(gt, (str, Path)) else copy.deepcopy(dict(gt))
    if not isinstance(data, dict) or "images" not in data:
        raise DataError("ground truth must be a COCO dict with 'images' (and 'annotations', 'categories')")
    anns = data.setdefault("annotations", [])
    used_ids = {a["id"] for a in anns if "id" in a}
    next_id = max(used_ids, default=0) + 1
    for a in anns:
        if "bbox" not in a or len(a["bbox"]) != 4:
            raise DataError(f"ground-truth annotation {a.get('id')} has no [x, y, w, h] bbox")
        if "id" not in a:
            a["id"] = next_id
            next_id += 1
        if "area" not in a:
            a["area"] = float(a["bbox"][2]) * float(a["bbox"][3])
        a.setdefault("iscrowd", 0)
    if "categories" not in data:
        data["categories"] = [{"id": c, "name": str(c)} for c in sorted({a["category_id"] for a in anns})]
    return data


def load_detections(detections: Dets) -> list[dict[str, Any]]:
    if isinstance(detections, (str, Path)):
        detections = _read_json(detections, "detections")
    if not isinstance(detections, (list, tuple)):
        raise DataError("detections must be a list of COCO results {image_id, category_id, bbox, score}")
    out = []
    for i, d in enumerate(detections):
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in d]
        if missing:
            raise DataError(f"detection {i} lacks {', '.join(missing)}")
        out.append(dict(d))
    return out


def _coco_objects(gt: GT, detections: Dets):
    from pycocotools.coco import COCO

    gt_data = prepare_gt(gt)
    dets = load_detections(detections)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_data
        coco_gt.createIndex()
        known = set(coco_gt.getImgIds())
        unknown = sorted({d["image_id"] for d in dets} - known)
        if unknown:
            raise DataError(
                f"detections refer to image ids not in the ground truth: {unknown[:10]}"
                + (f" (+{len(unknown) - 10} more)" if len(unknown) > 10 else "")
            )
        if dets:
            coco_dt = coco_gt.loadRes(dets)
        else:  # pycocotools' loadRes cannot take an empty list: an empty result set scores 0
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": copy.deepcopy(gt_data["images"]),
                "categories": copy.deepcopy(gt_data["categories"]),
                "annotations": [],
            }
            coco_dt.createIndex()
    return coco_gt, coco_dt


def _summary(ev, ap: bool, iou_thr: Optional[float], area: str, max_det: int) -> Optional[float]:
    """One number of ``COCOeval.summarize`` in percent (None where pycocotools gives -1).

    Same computation as pycocotools' ``_summarize``, except that the mAP line uses ``max_det`` like every
    other line (pycocotools hard-codes 100 there, so its stats[0] is -1 whenever maxDets[2] != 100).
    """
    import numpy as np

    p = ev.params
    aind = [i for i, lbl in enumerate(p.areaRngLbl) if lbl == area]
    mind = [i for i, m in enumerate(p.maxDets) if m == max_det][-1:]
    s = ev.eval["precision"] if ap else ev.eval["recall"]
    if iou_thr is not None:
        s = s[np.where(np.isclose(p.iouThrs, iou_thr))[0]]
    s = s[:, :, :, aind, mind] if ap else s[:, :, aind, mind]
    valid = s[s > -1]
    return None if valid.size == 0 else float(np.mean(valid)) * 100.0


def evaluate_detections(gt: GT, detections: Dets, max_dets: int = 100) -> dict[str, Optional[float]]:
    """``bbox/mAP, bbox/AP50, bbox/AP75, bbox/AP_small, bbox/AP_medium, bbox/AP_large, bbox/AR{max_dets}``.

    Values are pycocotools' stats in percent; a size bucket with no ground truth is None. ``max_dets`` is
    the last of COCO's maxDets ``[1, 10, max_dets]`` and applies to the AP numbers and the AR key.
    ``gt`` / ``detections`` are dicts/lists or paths of COCO JSON files.
    """
    from pycocotools.cocoeval import COCOeval

    if max_dets < 1:
        raise ValueError(f"max_dets must be >= 1, got {max_dets}")
    coco_gt, coco_dt = _coco_objects(gt, detections)
    max_dets = int(max_dets)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
    out = {k: _summary(ev, ap, iou, area, max_dets) for k, (ap, iou, area) in _SUMMARY.items()}
    out[f"bbox/AR{max_dets}"] = _summary(ev, False, None, "all", max_dets)
    return out
