"""COCO evaluation: hand-computed cases and equality with a direct pycocotools run.

The class-agnostic, IoU 0.05/0.3 and F1 metrics are checked against independent pycocotools runs on real
ground truth (HIT-UAV val, with its DontCare ignore regions) with noisy detections.
"""

import contextlib
import io
import json
import random

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sslrecipe.errors import DataError
from sslrecipe.evaluate.coco_eval import evaluate_detections

KEYS = ["bbox/mAP", "bbox/AP50", "bbox/AP75", "bbox/AP_small", "bbox/AP_medium", "bbox/AP_large", "bbox/AR100"]


def _gt(boxes_per_image, crowd=()):
    """boxes_per_image: {image_id: [(x, y, w, h, category)]}; areas deliberately left out."""
    anns = []
    for img, boxes in boxes_per_image.items():
        for x, y, w, h, c in boxes:
            anns.append({"id": len(anns) + 1, "image_id": img, "category_id": c, "bbox": [x, y, w, h]})
    for img, (x, y, w, h, c) in crowd:
        anns.append({"id": len(anns) + 1, "image_id": img, "category_id": c, "bbox": [x, y, w, h], "iscrowd": 1})
    return {
        "images": [{"id": i, "width": 640, "height": 512, "file_name": f"{i}.png"} for i in boxes_per_image],
        "categories": [{"id": 3, "name": "car"}, {"id": 9, "name": "person"}],
        "annotations": anns,
    }


def _det(img, x, y, w, h, c, s):
    return {"image_id": img, "category_id": c, "bbox": [x, y, w, h], "score": s}


SIZED = {
    1: [(10, 10, 12, 12, 3), (100, 100, 50, 50, 9)],  # small (144 px²), medium (2500)
    2: [(200, 200, 120, 110, 3), (5, 300, 8, 20, 9)],  # large (13200), small (160)
}


def test_perfect_detections_score_100_everywhere():
    dets = [_det(i, *b, 0.9) for i, boxes in SIZED.items() for b in boxes]
    m = evaluate_detections(_gt(SIZED), dets)
    assert list(m)[:7] == KEYS
    rates = {k: v for k, v in m.items() if not k.endswith("_threshold")}
    assert all(v == pytest.approx(100.0) for v in rates.values()), m
    assert m["F1_threshold"] == pytest.approx(0.9)


def test_box_at_iou_0_61_counts_at_ap50_not_ap75():
    # same 100x100 box shifted by 24 px: IoU = 76*100 / (124*100) = 0.613 -> matches at IoU 0.50, 0.55, 0.60
    gt = _gt({1: [(0, 0, 100, 100, 3)]})
    m = evaluate_detections(gt, [_det(1, 24, 0, 100, 100, 3, 0.8)])
    assert m["bbox/AP50"] == pytest.approx(100.0)
    assert m["bbox/AP75"] == pytest.approx(0.0)
    assert m["bbox/mAP"] == pytest.approx(30.0)  # 3 of the 10 IoU thresholds
    assert m["bbox/AR100"] == pytest.approx(30.0)
    assert m["bbox/AP_large"] == pytest.approx(30.0)


def test_empty_size_bucket_is_none_not_minus_one():
    gt = _gt({1: [(0, 0, 200, 200, 3)]})  # only a large object
    m = evaluate_detections(gt, [_det(1, 0, 0, 200, 200, 3, 0.5)])
    assert m["bbox/AP_small"] is None and m["bbox/AP_medium"] is None
    assert m["bbox/AP_large"] == pytest.approx(100.0)


def test_empty_detections_are_zero_not_a_crash():
    m = evaluate_detections(_gt(SIZED), [])
    assert all(m[k] == 0.0 for k in KEYS), m
    assert m["F1"] == 0.0 and m["recall"] == 0.0 and m["precision"] is None and m["F1_threshold"] is None
    only_large = evaluate_detections(_gt({1: [(0, 0, 200, 200, 3)]}), [])
    assert only_large["bbox/mAP"] == 0.0 and only_large["bbox/AP_small"] is None


def test_missing_area_is_box_area():
    # a 10x10 box without "area" is small; a wrong area would move it to another bucket
    gt = _gt({1: [(0, 0, 10, 10, 3)]})
    m = evaluate_detections(gt, [_det(1, 0, 0, 10, 10, 3, 0.5)])
    assert m["bbox/AP_small"] == pytest.approx(100.0) and m["bbox/AP_medium"] is None


def test_crowd_regions_are_ignored():
    # a confident detection inside a crowd region is neither a true nor a false positive
    gt = _gt({1: [(0, 0, 50, 50, 3)]}, crowd=[(1, (200, 200, 100, 100, 3))])
    dets = [_det(1, 210, 210, 20, 20, 3, 0.99), _det(1, 0, 0, 50, 50, 3, 0.5)]
    assert evaluate_detections(gt, dets)["bbox/mAP"] == pytest.approx(100.0)
    # the same box as an ordinary object: an unmatched ground truth and a false positive ranked first
    gt_plain = _gt({1: [(0, 0, 50, 50, 3), (200, 200, 100, 100, 3)]})
    assert evaluate_detections(gt_plain, dets)["bbox/mAP"] < 50.0


def _direct_pycocotools(gt_path, dets_path, max_dets):
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        ev = COCOeval(coco_gt, coco_gt.loadRes(str(dets_path)), "bbox")
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def _noisy_case(seed=0):
    rng = random.Random(seed)
    boxes = {}
    for img in range(1, 7):
        boxes[img] = []
        for _ in range(rng.randint(1, 6)):
            w, h = rng.choice([(6, 9), (14, 12), (25, 30), (40, 35), (120, 100)])
            boxes[img].append((rng.uniform(0, 500), rng.uniform(0, 400), w, h, rng.choice([3, 9])))
    gt = _gt(boxes, crowd=[(2, (0, 0, 60, 60, 9))])
    for a in gt["annotations"]:  # pycocotools needs area and iscrowd in a file it loads itself
        a["area"] = a["bbox"][2] * a["bbox"][3]
        a.setdefault("iscrowd", 0)
    dets = []
    for img, bs in boxes.items():
        for x, y, w, h, c in bs:
            if rng.random() < 0.8:  # noisy hits, some with the wrong class
                dets.append(_det(img, x + rng.gauss(0, 3), y + rng.gauss(0, 3), w * rng.uniform(0.8, 1.2),
                                 h * rng.uniform(0.8, 1.2), c if rng.random() < 0.85 else 12 - c, rng.random()))
        for _ in range(rng.randint(0, 3)):  # false positives
            dets.append(_det(img, rng.uniform(0, 500), rng.uniform(0, 400), 20, 20, 3, rng.random() * 0.5))
    return gt, dets


def test_numbers_equal_a_direct_pycocotools_run(tmp_path):
    gt, dets = _noisy_case()
    gt_path, dets_path = tmp_path / "gt.json", tmp_path / "dets.json"
    gt_path.write_text(json.dumps(gt))
    dets_path.write_text(json.dumps(dets))

    stats = _direct_pycocotools(gt_path, dets_path, 100)
    ours = evaluate_detections(gt_path, dets_path)
    assert list(ours)[:7] == KEYS
    for key, idx in zip(KEYS, [0, 1, 2, 3, 4, 5, 8]):
        expected = None if stats[idx] < 0 else stats[idx] * 100
        assert ours[key] == pytest.approx(expected, abs=1e-9), key
    assert 0 < ours["bbox/mAP"] < 100 and ours["bbox/AP50"] > ours["bbox/AP75"]  # a non-trivial case
    assert evaluate_detections(gt, dets) == ours  # dict inputs give the same numbers as files
    assert ours["per_class/car/AP"] is not None and ours["per_class/person/AP50"] is not None


def test_max_dets_limits_detections_per_image_and_category(tmp_path):
    gt, dets = _noisy_case(seed=1)
    for i in range(8):  # a crowded image: many low-score extra detections of one class
        dets.append(_det(1, 300 + 5 * i, 100, 20, 20, 3, 0.01 * i))
    ours = evaluate_detections(gt, dets, max_dets=2)
    assert list(ours)[:7] == KEYS[:6] + ["bbox/AR2"]

    # pycocotools keeps the top maxDets detections per (image, category): truncating the results that way
    # and evaluating with COCO's default maxDets=100 must give the same numbers
    top: dict = {}
    for d in sorted(dets, key=lambda d: -d["score"]):
        top.setdefault((d["image_id"], d["category_id"]), []).append(d)
    truncated = [d for ds in top.values() for d in ds[:2]]
    gt_path, dets_path = tmp_path / "gt.json", tmp_path / "dets.json"
    gt_path.write_text(json.dumps(gt))
    dets_path.write_text(json.dumps(truncated))
    stats = _direct_pycocotools(gt_path, dets_path, 100)
    for key, idx in zip(KEYS[:6], range(6)):
        expected = None if stats[idx] < 0 else stats[idx] * 100
        assert ours[key] == pytest.approx(expected, abs=1e-9), key
    # AR2 is pycocotools' own AR line at maxDets=2
    assert ours["bbox/AR2"] == pytest.approx(_direct_pycocotools(gt_path, dets_path, 2)[8] * 100, abs=1e-9)
    assert ours["bbox/mAP"] != evaluate_detections(gt, dets)["bbox/mAP"]


def test_detections_on_unknown_images_are_a_clear_error():
    with pytest.raises(DataError, match="image ids not in the ground truth: \\[99\\]"):
        evaluate_detections(_gt(SIZED), [_det(99, 0, 0, 5, 5, 3, 0.5)])


def test_agnostic_metrics_merge_classes_and_f1_counts_hits():
    # two objects, detected in the right places but with swapped classes: class-aware AP 0, agnostic 100
    gt = _gt({1: [(0, 0, 20, 20, 3), (100, 100, 20, 20, 9)]})
    dets = [_det(1, 0, 0, 20, 20, 9, 0.9), _det(1, 100, 100, 20, 20, 3, 0.8)]
    m = evaluate_detections(gt, dets)
    assert m["bbox/mAP"] == 0.0 and m["F1"] == 0.0
    assert m["agnostic/mAP"] == pytest.approx(100.0) and m["agnostic/AP_small"] == pytest.approx(100.0)
    assert m["agnostic/AP_small@0.3"] == pytest.approx(100.0) and m["agnostic/AP@0.05"] == pytest.approx(100.0)

    # a loose box (IoU 0.1 with its object) counts at IoU 0.05 only; F1 threshold picks the best cut
    gt = _gt({1: [(0, 0, 20, 20, 3), (100, 100, 20, 20, 3)]})
    dets = [_det(1, 0, 0, 20, 20, 3, 0.9),            # hit
            _det(1, 300, 300, 20, 20, 3, 0.7),        # false positive
            _det(1, 110, 110, 30, 30, 3, 0.5)]        # IoU 100/(400+900-100) = 0.083
    m = evaluate_detections(gt, dets)
    # IoU 0.5: best is to keep only the 0.9 detection: P = 1, R = 0.5, F1 = 2/3
    assert m["F1"] == pytest.approx(200 / 3) and m["F1_threshold"] == pytest.approx(0.9)
    assert m["precision"] == pytest.approx(100.0) and m["recall"] == pytest.approx(50.0)
    # IoU 0.05: keeping all three: P = 2/3, R = 1, F1 = 0.8 (better than 2/3 at 0.9)
    assert m["F1@0.05"] == pytest.approx(80.0) and m["F1@0.05_threshold"] == pytest.approx(0.5)
    assert m["precision@0.05"] == pytest.approx(200 / 3) and m["recall@0.05"] == pytest.approx(100.0)
    # AP@0.05: precision 1 at recall 0.5, 2/3 at recall 1 -> 101-point interpolation
    expected = (51 * 1.0 + 50 * (2 / 3)) / 101 * 100
    assert m["bbox/AP@0.05"] == pytest.approx(expected)
    assert m["bbox/AP50"] == pytest.approx(51 / 101 * 100)


def test_f1_ignores_detections_in_crowd_regions():
    gt = _gt({1: [(0, 0, 50, 50, 3)]}, crowd=[(1, (200, 200, 100, 100, 3))])
    dets = [_det(1, 210, 210, 20, 20, 3, 0.99), _det(1, 0, 0, 50, 50, 3, 0.5)]
    m = evaluate_detections(gt, dets)
    assert m["F1"] == pytest.approx(100.0) and m["precision"] == pytest.approx(100.0)
    # an 'ignore: 1' annotation without iscrowd is an ignore region too
    gt2 = _gt({1: [(0, 0, 50, 50, 3), (200, 200, 100, 100, 3)]})
    gt2["annotations"][1]["ignore"] = 1
    assert evaluate_detections(gt2, dets)["F1"] == pytest.approx(100.0)


def test_per_class_ap_equals_pycocotools_restricted_to_that_class(tmp_path):
    gt, dets = _noisy_case(seed=4)
    gt_path, dets_path = tmp_path / "gt.json", tmp_path / "dets.json"
    gt_path.write_text(json.dumps(gt))
    dets_path.write_text(json.dumps(dets))
    ours = evaluate_detections(gt_path, dets_path)
    for cid, name in ((3, "car"), (9, "person")):
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO(str(gt_path))
            ev = COCOeval(coco_gt, coco_gt.loadRes(str(dets_path)), "bbox")
            ev.params.catIds = [cid]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        assert ours[f"per_class/{name}/AP"] == pytest.approx(ev.stats[0] * 100, abs=1e-9)
        assert ours[f"per_class/{name}/AP50"] == pytest.approx(ev.stats[1] * 100, abs=1e-9)
        small = None if ev.stats[3] < 0 else ev.stats[3] * 100
        assert ours[f"per_class/{name}/AP_small"] == pytest.approx(small, abs=1e-9)


def test_mask_metrics_when_detections_carry_segmentation():
    from pycocotools import mask as mask_utils
    import numpy as np

    gt = _gt({1: [(10, 10, 40, 40, 3)]})
    gt["annotations"][0]["segmentation"] = [[10, 10, 50, 10, 50, 50, 10, 50]]  # the full box
    half = np.zeros((512, 640), dtype=np.uint8, order="F")
    half[10:50, 10:30] = 1  # left half of the object: mask IoU 0.5, box IoU 1 when the box is the object's
    rle = mask_utils.encode(half)
    rle["counts"] = rle["counts"].decode("ascii")
    dets = [{**_det(1, 10, 10, 40, 40, 3, 0.9), "segmentation": rle}]
    m = evaluate_detections(gt, dets)
    assert m["bbox/mAP"] == pytest.approx(100.0)
    assert m["segm/AP50"] == pytest.approx(100.0) and m["segm/AP75"] == pytest.approx(0.0)
    assert "segm/mAP" not in evaluate_detections(gt, [_det(1, 10, 10, 40, 40, 3, 0.9)])
    with pytest.raises(DataError, match="segmentation"):
        evaluate_detections(_gt({1: [(10, 10, 40, 40, 3)]}), dets, segm=True)


# ------------------------------------------------------------------- real ground truth: HIT-UAV val


def _hit_uav_case(hit_uav, n_images=80, seed=0):
    """HIT-UAV val restricted to its first images, with noisy detections: jittered hits (some with the
    wrong class), loose boxes that only count at low IoU, false positives, hits inside DontCare regions."""
    from sslrecipe.data.formats import read_hit_uav

    full = read_hit_uav(hit_uav / "annotations" / "val.json")
    keep = {im["id"] for im in sorted(full["images"], key=lambda im: im["id"])[:n_images]}
    gt = {"images": [im for im in full["images"] if im["id"] in keep], "categories": full["categories"],
          "annotations": [a for a in full["annotations"] if a["image_id"] in keep]}
    assert any(a.get("iscrowd") for a in gt["annotations"])  # real ignore regions are part of the case
    cats = [c["id"] for c in gt["categories"]]
    rng = random.Random(seed)
    dets = []
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        if a.get("iscrowd"):
            if rng.random() < 0.5:
                dets.append(_det(a["image_id"], x + 1, y + 1, w / 2, h / 2, a["category_id"], rng.random()))
            continue
        r = rng.random()
        if r < 0.65:
            c = a["category_id"] if rng.random() < 0.85 else rng.choice(cats)
            dets.append(_det(a["image_id"], x + rng.gauss(0, 1.5), y + rng.gauss(0, 1.5), w * rng.uniform(0.8, 1.25),
                             h * rng.uniform(0.8, 1.25), c, rng.uniform(0.2, 1.0)))
        elif r < 0.8:  # a loose box: IoU well below 0.5 but above 0.05
            dets.append(_det(a["image_id"], x + w * 0.6, y + h * 0.5, w * 1.5, h * 1.5, a["category_id"], rng.uniform(0.1, 0.9)))
    for im in gt["images"]:
        for _ in range(rng.randint(0, 4)):
            dets.append(_det(im["id"], rng.uniform(0, 600), rng.uniform(0, 480), rng.uniform(5, 40), rng.uniform(5, 40),
                             rng.choice(cats), rng.uniform(0.0, 0.8)))
    return gt, dets


def _pycocotools_eval(gt, dets, iou_thrs=None, agnostic=False, max_dets=100):
    """A plain pycocotools run; class-agnostic by rewriting every category id to one (not via useCats)."""
    gt = json.loads(json.dumps(gt))
    dets = json.loads(json.dumps(dets))
    if agnostic:
        for a in gt["annotations"]:
            a["category_id"] = 1
        for d in dets:
            d["category_id"] = 1
        gt["categories"] = [{"id": 1, "name": "object"}]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
        ev.params.maxDets = [1, 10, max_dets]
        if iou_thrs is not None:
            ev.params.iouThrs = iou_thrs
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _counts_at(gt, dets, threshold, iou):
    """TP, FP, GT at a score threshold from pycocotools' own matching of the detections kept there."""
    import numpy as np

    kept = [d for d in dets if d["score"] >= threshold]
    ev = _pycocotools_eval(gt, kept, iou_thrs=np.array([iou]))
    tp = fp = n_gt = 0
    for e in ev.evalImgs:
        if e is None or e["aRng"] != [0, 1e10]:
            continue
        n_gt += int((np.asarray(e["gtIgnore"]) == 0).sum())
        ign = np.asarray(e["dtIgnore"][0]).astype(bool)
        hit = np.asarray(e["dtMatches"][0]) > 0
        tp += int((hit & ~ign).sum())
        fp += int((~hit & ~ign).sum())
    return tp, fp, n_gt


def test_hit_uav_metrics_equal_independent_pycocotools_runs(hit_uav):
    import numpy as np

    gt, dets = _hit_uav_case(hit_uav)
    ours = evaluate_detections(gt, dets)

    std = _pycocotools_eval(gt, dets).stats
    for key, idx in zip(KEYS, [0, 1, 2, 3, 4, 5, 8]):
        assert ours[key] == pytest.approx(None if std[idx] < 0 else std[idx] * 100, abs=1e-9), key
    assert 5 < ours["bbox/mAP"] < 80

    agn = _pycocotools_eval(gt, dets, agnostic=True).stats
    assert ours["agnostic/mAP"] == pytest.approx(agn[0] * 100, abs=1e-9)
    assert ours["agnostic/AP50"] == pytest.approx(agn[1] * 100, abs=1e-9)
    assert ours["agnostic/AP_small"] == pytest.approx(agn[3] * 100, abs=1e-9)
    assert ours["agnostic/mAP"] > ours["bbox/mAP"]  # wrong-class hits count once classes are merged

    low = _pycocotools_eval(gt, dets, iou_thrs=np.array([0.05, 0.3]), agnostic=True)
    p = low.eval["precision"]  # T x R x K x A x M
    small = low.params.areaRngLbl.index("small")
    assert ours["agnostic/AP_small@0.3"] == pytest.approx(p[1, :, :, small, 2][p[1, :, :, small, 2] > -1].mean() * 100, abs=1e-9)
    assert ours["agnostic/AP@0.05"] == pytest.approx(p[0, :, :, 0, 2][p[0, :, :, 0, 2] > -1].mean() * 100, abs=1e-9)
    aware = _pycocotools_eval(gt, dets, iou_thrs=np.array([0.05]))
    assert ours["bbox/AP@0.05"] == pytest.approx(aware.stats[0] * 100, abs=1e-9)  # the mean over its one threshold
    assert ours["agnostic/AP@0.05"] > ours["agnostic/AP50"]  # the loose boxes count at IoU 0.05

    for iou, suffix in ((0.5, ""), (0.05, "@0.05")):
        t = ours[f"F1{suffix}_threshold"]
        tp, fp, n_gt = _counts_at(gt, dets, t, iou)
        prec, rec = tp / (tp + fp), tp / n_gt
        assert ours[f"precision{suffix}"] == pytest.approx(prec * 100, abs=1e-9)
        assert ours[f"recall{suffix}"] == pytest.approx(rec * 100, abs=1e-9)
        assert ours[f"F1{suffix}"] == pytest.approx(200 * prec * rec / (prec + rec), abs=1e-9)
        # no other score threshold does better
        scores = sorted({d["score"] for d in dets})
        for q in (0.1, 0.3, 0.5, 0.7, 0.9):
            other = scores[int(q * (len(scores) - 1))]
            tp, fp, _ = _counts_at(gt, dets, other, iou)
            f1 = 2 * tp / (2 * tp + fp + (n_gt - tp))
            assert f1 * 100 <= ours[f"F1{suffix}"] + 1e-9, (iou, other)
    assert ours["F1@0.05"] > ours["F1"]
