"""COCO evaluation: hand-computed cases and equality with a direct pycocotools run."""

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
    assert list(m) == KEYS
    assert all(v == pytest.approx(100.0) for v in m.values()), m


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
    assert all(v == 0.0 for v in m.values()), m
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
    assert list(ours) == KEYS
    for key, idx in zip(KEYS, [0, 1, 2, 3, 4, 5, 8]):
        expected = None if stats[idx] < 0 else stats[idx] * 100
        assert ours[key] == pytest.approx(expected, abs=1e-9), key
    assert 0 < ours["bbox/mAP"] < 100 and ours["bbox/AP50"] > ours["bbox/AP75"]  # a non-trivial case
    assert evaluate_detections(gt, dets) == ours  # dict inputs give the same numbers as files


def test_max_dets_limits_detections_per_image_and_category(tmp_path):
    gt, dets = _noisy_case(seed=1)
    for i in range(8):  # a crowded image: many low-score extra detections of one class
        dets.append(_det(1, 300 + 5 * i, 100, 20, 20, 3, 0.01 * i))
    ours = evaluate_detections(gt, dets, max_dets=2)
    assert list(ours) == KEYS[:6] + ["bbox/AR2"]

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
