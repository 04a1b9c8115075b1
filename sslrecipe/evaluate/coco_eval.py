"""COCO evaluation through pycocotools, in percent, plus the survey's class-agnostic and small-object metrics.

One implementation serves ``sslrecipe eval`` and the pipeline's evaluate stage: :func:`evaluate_detections`
(metrics only) and :func:`evaluate_full` (metrics + precision/recall curves for the report).

What the keys mean (all AP/AR/F1/precision/recall in percent; ``None`` where undefined, never -1):

- ``bbox/mAP, bbox/AP50, bbox/AP75, bbox/AP_small, bbox/AP_medium, bbox/AP_large, bbox/AR{max_dets}``:
  exactly pycocotools' ``COCOeval.stats`` [0-5, 8] x 100 (``maxDets = [1, 10, max_dets]``; for ``max_dets``
  other than 100 the mAP line uses ``max_dets`` like the other lines, where pycocotools' summarize would
  print -1). An empty size bucket is ``None``.
- ``bbox/AP@0.05``: class-aware AP at IoU 0.05, all sizes (the survey's VEDAI AP is at IoU 0.05).
- ``agnostic/...``: the same computations with every class merged into one (pycocotools with
  ``params.useCats = 0``; the survey's "No Class." columns): ``agnostic/mAP``, ``agnostic/AP50``,
  ``agnostic/AP_small`` (IoU 0.5:0.95), ``agnostic/AP_small@0.3`` (IoU 0.3, small objects; Table III's
  AP_S@0.3) and ``agnostic/AP@0.05`` (IoU 0.05, all sizes).
- ``F1``: the best F1 over score thresholds, pooling every class and image (micro average), with COCO's
  class-aware greedy matching at IoU 0.5 (``max_dets`` detections per image and class, crowd/ignore regions
  neither true nor false positives). ``F1_threshold`` is the lowest score kept at that point (a score in
  [0, 1], not a percentage); ``precision`` and ``recall`` are measured there. ``F1@0.05``,
  ``F1@0.05_threshold``, ``precision@0.05``, ``recall@0.05``: the same at IoU 0.05.
- ``per_class/<name>/AP``, ``per_class/<name>/AP50``, ``per_class/<name>/AP_small``: class-aware AP of each
  category (IoU 0.5:0.95 / 0.5 / 0.5:0.95 on small objects).
- with masks (``segm=True``, or detections carrying ``segmentation`` and ground truth with masks):
  ``segm/mAP, segm/AP50, segm/AP75, segm/AP_small, segm/AP_medium, segm/AP_large`` from pycocotools' ``segm``.

The ground truth is only completed where pycocotools would crash (missing ``area`` -> w*h, missing
``iscrowd`` -> 0, missing annotation ``id`` or ``categories``); an annotation with ``ignore: 1`` becomes a
crowd region (pycocotools itself would overwrite ``ignore`` with ``iscrowd``). Empty detections give 0.

Extra IoU thresholds (0.05 and 0.3) are evaluated in the same ``COCOeval`` run as COCO's ten: pycocotools
matches every threshold independently, so the 0.5:0.95 numbers are unchanged (the tests check that
against a plain pycocotools run).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from sslrecipe.errors import DataError

GT = Union[Mapping[str, Any], str, Path]
Dets = Union[Sequence[Mapping[str, Any]], str, Path]

EXTRA_IOUS = (0.05, 0.3)
# Key -> (AP or AR, IoU threshold or None = mean over 0.50:0.95, area range)
_SUMMARY = {
    "mAP": (True, None, "all"),
    "AP50": (True, 0.5, "all"),
    "AP75": (True, 0.75, "all"),
    "AP_small": (True, None, "small"),
    "AP_medium": (True, None, "medium"),
    "AP_large": (True, None, "large"),
}
_AGNOSTIC = {
    "agnostic/mAP": (None, "all"),
    "agnostic/AP50": (0.5, "all"),
    "agnostic/AP_small": (None, "small"),
    "agnostic/AP_small@0.3": (0.3, "small"),
    "agnostic/AP@0.05": (0.05, "all"),
}
BBOX_KEYS = tuple(f"bbox/{k}" for k in _SUMMARY)


def _read_json(path: Union[str, Path], what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{what} file {path} not found") from None
    except IsADirectoryError:
        raise DataError(f"{what} file {path} is a folder; give the JSON file") from None
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
        if a.get("ignore", 0) and not a["iscrowd"]:
            a["iscrowd"] = 1
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
        if not isinstance(d, Mapping):
            raise DataError(f"detection {i} is not an object {{image_id, category_id, bbox, score}}")
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in d]
        if missing:
            raise DataError(f"detection {i} lacks {', '.join(missing)}")
        if not isinstance(d["bbox"], (list, tuple)) or len(d["bbox"]) != 4:
            raise DataError(f"detection {i}: bbox must be [x, y, w, h], got {d['bbox']!r}")
        out.append(dict(d))
    return out


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


def _coco_gt(gt_data: dict):
    from pycocotools.coco import COCO

    with _quiet():
        coco_gt = COCO()
        coco_gt.dataset = gt_data
        coco_gt.createIndex()
    return coco_gt


def _coco_dt(coco_gt, gt_data: dict, dets: list[dict], iou_type: str):
    from pycocotools.coco import COCO

    with _quiet():
        if dets:
            if iou_type == "bbox":  # box results: pycocotools takes their area from the box
                results = [{k: v for k, v in d.items() if k != "segmentation"} for d in dets]
            else:  # mask results: area and box from the mask, as pycocotools' segm branch does
                results = [{k: v for k, v in d.items() if k not in ("bbox", "area")} for d in dets]
            return coco_gt.loadRes(results)
        # pycocotools' loadRes cannot take an empty list: an empty result set scores 0
        coco_dt = COCO()
        coco_dt.dataset = {
            "images": copy.deepcopy(gt_data["images"]),
            "categories": copy.deepcopy(gt_data["categories"]),
            "annotations": [],
        }
        coco_dt.createIndex()
    return coco_dt


def _check_image_ids(coco_gt, dets: list[dict]) -> None:
    known = set(coco_gt.getImgIds())
    unknown = sorted({d["image_id"] for d in dets} - known, key=str)
    if unknown:
        raise DataError(
            f"detections refer to image ids not in the ground truth: {unknown[:10]}"
            + (f" (+{len(unknown) - 10} more)" if len(unknown) > 10 else "")
        )


def _run_cocoeval(coco_gt, coco_dt, iou_type: str, max_dets: int, use_cats: bool):
    """A finished COCOeval (evaluate + accumulate) at COCO's ten IoU thresholds plus :data:`EXTRA_IOUS`."""
    from pycocotools.cocoeval import COCOeval

    with _quiet():
        ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        ev.params.maxDets = [1, 10, max_dets]
        ev.params.useCats = 1 if use_cats else 0
        standard = np.asarray(ev.params.iouThrs, dtype=np.float64)
        ev.params.iouThrs = np.concatenate([np.asarray(EXTRA_IOUS, dtype=np.float64), standard])
        ev.evaluate()
        ev.accumulate()
    ev._sslrecipe_standard = np.arange(len(EXTRA_IOUS), len(ev.params.iouThrs))
    return ev


def _iou_index(ev, iou_thr: Optional[float]) -> np.ndarray:
    if iou_thr is None:
        return ev._sslrecipe_standard
    idx = np.where(np.isclose(ev.params.iouThrs, iou_thr))[0][:1]
    if idx.size == 0:
        raise ValueError(f"IoU threshold {iou_thr} was not evaluated")
    return idx


def _summary(ev, ap: bool, iou_thr: Optional[float], area: str, max_det: int,
             cat_index: Optional[int] = None) -> Optional[float]:
    """One number of ``COCOeval.summarize`` in percent (None where pycocotools gives -1).

    Same computation as pycocotools' ``_summarize``, except that the mAP line uses ``max_det`` like every
    other line (pycocotools hard-codes 100 there, so its stats[0] is -1 whenever maxDets[2] != 100), and
    ``cat_index`` can restrict it to one category.
    """
    p = ev.params
    aind = [i for i, lbl in enumerate(p.areaRngLbl) if lbl == area]
    mind = [i for i, m in enumerate(p.maxDets) if m == max_det][-1:]
    s = ev.eval["precision"] if ap else ev.eval["recall"]
    s = s[_iou_index(ev, iou_thr)]
    if cat_index is not None:
        s = s[:, :, [cat_index]] if ap else s[:, [cat_index]]
    s = s[:, :, :, aind, mind] if ap else s[:, :, aind, mind]
    valid = s[s > -1]
    return None if valid.size == 0 else float(np.mean(valid)) * 100.0


def _pct(v: Optional[float]) -> Optional[float]:
    return None if v is None else float(v) * 100.0


def best_f1(ev, iou_thr: float, max_det: int) -> dict[str, Optional[float]]:
    """Best F1 over score thresholds from a finished class-aware COCOeval's per-image matches.

    Pools the matches of every (image, category) at area 'all' (COCO's greedy, score-ordered matching,
    ``max_det`` detections per image and category): a detection is a true positive when matched to a
    non-ignored ground truth, ignored when matched to a crowd region, else a false positive. Returns
    ``{"F1", "threshold", "precision", "recall"}`` (F1/precision/recall as fractions; threshold = the
    lowest score kept). Ties in score are cut together (a threshold keeps every detection with that score).
    """
    p = ev.params
    t = int(_iou_index(ev, iou_thr)[0])
    a_all = p.areaRngLbl.index("all")
    n_img, n_area = len(p.imgIds), len(p.areaRng)
    scores, tps, n_gt = [], [], 0
    cat_count = len(p.catIds) if p.useCats else 1
    for k in range(cat_count):
        for i in range(n_img):
            e = ev.evalImgs[k * n_area * n_img + a_all * n_img + i]
            if e is None:
                continue
            n_gt += int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
            s = np.asarray(e["dtScores"][:max_det], dtype=np.float64)
            if s.size == 0:
                continue
            matched = np.asarray(e["dtMatches"][t, :max_det]) > 0
            ignored = np.asarray(e["dtIgnore"][t, :max_det]).astype(bool)
            keep = ~ignored
            scores.append(s[keep])
            tps.append(matched[keep])
    out = {"F1": None, "threshold": None, "precision": None, "recall": None}
    if n_gt == 0:
        return out
    if not scores or sum(len(s) for s in scores) == 0:
        return {"F1": 0.0, "threshold": None, "precision": None, "recall": 0.0}
    s = np.concatenate(scores)
    tp = np.concatenate(tps)
    order = np.argsort(-s, kind="mergesort")
    s, tp = s[order], tp[order]
    ctp = np.cumsum(tp)
    kept = np.arange(1, len(s) + 1)
    last_of_tie = np.r_[s[1:] != s[:-1], True]  # a threshold keeps all detections of equal score
    ctp, kept, s_cut = ctp[last_of_tie], kept[last_of_tie], s[last_of_tie]
    precision = ctp / kept
    recall = ctp / n_gt
    denom = precision + recall
    f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)
    best = int(np.argmax(f1))  # first maximum = the highest threshold reaching it
    return {"F1": float(f1[best]), "threshold": float(s_cut[best]), "precision": float(precision[best]),
            "recall": float(recall[best])}


@dataclass
class EvalResult:
    """Metrics (flat keys, see the module docstring) and the report's precision/recall curves."""

    metrics: dict[str, Optional[float]]
    curves: dict[str, Any] = field(default_factory=dict)


def _unique_names(categories: Sequence[Mapping[str, Any]]) -> dict[Any, str]:
    names: dict[Any, str] = {}
    seen: dict[str, int] = {}
    for c in sorted(categories, key=lambda c: c["id"]):
        name = str(c.get("name", c["id"]))
        seen[name] = seen.get(name, 0) + 1
    for c in sorted(categories, key=lambda c: c["id"]):
        name = str(c.get("name", c["id"]))
        names[c["id"]] = name if seen[name] == 1 else f"{name}#{c['id']}"
    return names


def _pr_curve(ev, iou_thr: float, area: str, max_det: int, cat_index: Optional[int] = None) -> Optional[list[float]]:
    """Precision at COCO's 101 recall points (mean over categories with ground truth), None if undefined."""
    p = ev.params
    a = p.areaRngLbl.index(area)
    m = [i for i, v in enumerate(p.maxDets) if v == max_det][-1]
    t = int(_iou_index(ev, iou_thr)[0])
    prec = ev.eval["precision"][t, :, :, a, m]  # R x K
    if cat_index is not None:
        prec = prec[:, [cat_index]]
    cols = [k for k in range(prec.shape[1]) if (prec[:, k] > -1).any()]
    if not cols:
        return None
    return [round(float(v), 6) for v in prec[:, cols].mean(axis=1)]


def evaluate_full(
    gt: GT, detections: Dets, max_dets: int = 100, *, per_class: bool = True, segm: Optional[bool] = None
) -> EvalResult:
    """All metrics and curves; ``gt`` / ``detections`` are dicts/lists or paths of COCO JSON files.

    ``max_dets`` is the last of COCO's maxDets ``[1, 10, max_dets]``: it applies to every AP, the AR key
    (``bbox/AR{max_dets}``) and the F1 matching. ``segm`` None = evaluate masks when every detection has a
    ``segmentation`` and the ground truth has masks.
    """
    if int(max_dets) < 1:
        raise ValueError(f"max_dets must be >= 1, got {max_dets}")
    max_dets = int(max_dets)
    gt_data = prepare_gt(gt)
    dets = load_detections(detections)
    coco_gt = _coco_gt(gt_data)
    _check_image_ids(coco_gt, dets)
    coco_dt = _coco_dt(coco_gt, gt_data, dets, "bbox")

    cls = _run_cocoeval(coco_gt, coco_dt, "bbox", max_dets, use_cats=True)
    agn = _run_cocoeval(coco_gt, coco_dt, "bbox", max_dets, use_cats=False)

    out: dict[str, Optional[float]] = {f"bbox/{k}": _summary(cls, ap, iou, area, max_dets) for k, (ap, iou, area) in _SUMMARY.items()}
    out[f"bbox/AR{max_dets}"] = _summary(cls, False, None, "all", max_dets)
    out["bbox/AP@0.05"] = _summary(cls, True, 0.05, "all", max_dets)
    for key, (iou, area) in _AGNOSTIC.items():
        out[key] = _summary(agn, True, iou, area, max_dets)
    for iou, suffix in ((0.5, ""), (0.05, "@0.05")):
        f = best_f1(cls, iou, max_dets)
        out[f"F1{suffix}"] = _pct(f["F1"])
        out[f"F1{suffix}_threshold"] = f["threshold"]
        out[f"precision{suffix}"] = _pct(f["precision"])
        out[f"recall{suffix}"] = _pct(f["recall"])

    names = _unique_names(gt_data["categories"])
    cat_ids = list(cls.params.catIds)
    if per_class:
        for k, cid in enumerate(cat_ids):
            name = names.get(cid, str(cid))
            out[f"per_class/{name}/AP"] = _summary(cls, True, None, "all", max_dets, k)
            out[f"per_class/{name}/AP50"] = _summary(cls, True, 0.5, "all", max_dets, k)
            out[f"per_class/{name}/AP_small"] = _summary(cls, True, None, "small", max_dets, k)

    if segm is None:
        segm = bool(dets) and all("segmentation" in d for d in dets) and any(
            "segmentation" in a for a in gt_data["annotations"])
    if segm:
        missing = [a.get("id") for a in gt_data["annotations"] if "segmentation" not in a]
        if missing:
            raise DataError(f"mask evaluation needs 'segmentation' on every ground-truth annotation; "
                            f"{len(missing)} lack it (first ids {missing[:5]})")
        seg = _run_cocoeval(coco_gt, _coco_dt(coco_gt, gt_data, dets, "segm"), "segm", max_dets, use_cats=True)
        for k, (ap, iou, area) in _SUMMARY.items():
            out[f"segm/{k}"] = _summary(seg, ap, iou, area, max_dets)

    curves: dict[str, Any] = {
        "recall": [round(float(r), 6) for r in cls.params.recThrs],
        "bbox@0.5": _pr_curve(cls, 0.5, "all", max_dets),
        "bbox@0.05": _pr_curve(cls, 0.05, "all", max_dets),
        "agnostic@0.5": _pr_curve(agn, 0.5, "all", max_dets),
        "agnostic_small@0.3": _pr_curve(agn, 0.3, "small", max_dets),
        "per_class@0.5": {names.get(cid, str(cid)): _pr_curve(cls, 0.5, "all", max_dets, k) for k, cid in enumerate(cat_ids)},
    }
    return EvalResult(out, curves)


def evaluate_detections(
    gt: GT, detections: Dets, max_dets: int = 100, *, per_class: bool = True, segm: Optional[bool] = None
) -> dict[str, Optional[float]]:
    """The metrics of :func:`evaluate_full` (keys in the module docstring), in percent, None = undefined."""
    return evaluate_full(gt, detections, max_dets, per_class=per_class, segm=segm).metrics


def load_ground_truth(path: Union[str, Path], format: str = "auto") -> dict[str, Any]:
    """Ground truth for ``sslrecipe eval``: a COCO file, or any format :func:`sslrecipe.data.formats.load_labeled`
    reads (HIT-UAV JSON, YOLO, VOC), converted to COCO without needing the images."""
    p = Path(path)
    if format == "coco" or (format == "auto" and p.is_file() and p.suffix.lower() == ".json"):
        data = _read_json(p, "ground-truth")
        if isinstance(data, dict) and "annotations" in data and "images" in data:
            return data
        if format == "coco":
            raise DataError(f"{p} is not a COCO file (it needs 'images' and 'annotations')")
    from sslrecipe.data import formats

    fmt = formats.detect_format(p) if format == "auto" else format
    if fmt == "hit-uav":
        return formats.read_hit_uav(p)
    if fmt == "coco":
        return formats.read_coco(p)
    coco, _root = formats.load_labeled(p, format=fmt)
    return coco
