"""`sslrecipe eval`: the command prints and writes exactly what the library's evaluation returns."""

import json

import pytest
from click.testing import CliRunner

from sslrecipe.cli import main
from sslrecipe.evaluate.coco_eval import evaluate_detections

GT = {
    "images": [{"id": 1, "file_name": "a.png", "width": 640, "height": 512},
               {"id": 2, "file_name": "b.png", "width": 640, "height": 512}],
    "categories": [{"id": 3, "name": "car"}, {"id": 9, "name": "person"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 15], "area": 300, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 9, "bbox": [100, 100, 60, 80], "area": 4800, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 9, "bbox": [300, 200, 8, 12], "area": 96, "iscrowd": 0},
    ],
}
DETS = [
    {"image_id": 1, "category_id": 3, "bbox": [11, 9, 20, 16], "score": 0.9},
    {"image_id": 1, "category_id": 3, "bbox": [100, 100, 60, 80], "score": 0.6},  # right place, wrong class
    {"image_id": 2, "category_id": 9, "bbox": [301, 201, 8, 12], "score": 0.4},
    {"image_id": 2, "category_id": 3, "bbox": [500, 400, 30, 30], "score": 0.3},  # false positive
]


@pytest.fixture
def files(tmp_path):
    gt, dets = tmp_path / "gt.json", tmp_path / "dets.json"
    gt.write_text(json.dumps(GT))
    dets.write_text(json.dumps(DETS))
    return gt, dets


def test_eval_prints_table_and_writes_the_library_numbers(files, tmp_path):
    gt, dets = files
    out = tmp_path / "sub" / "metrics.json"
    res = CliRunner().invoke(main, ["eval", "--gt", str(gt), "--dets", str(dets), "--json", str(out)])
    assert res.exit_code == 0, res.output
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(evaluate_detections(GT, DETS)))  # one implementation
    assert written["agnostic/AP50"] > written["bbox/AP50"]
    lines = res.output.splitlines()
    assert any(line.split() == ["bbox/AP_large", "n/a"] for line in lines)  # empty bucket, not -1
    assert any(line.split()[:2] == ["bbox/mAP", f"{written['bbox/mAP']:.1f}"] for line in lines)
    assert any(line.split()[:1] == ["car"] and len(line.split()) == 4 for line in lines)  # per-class table
    assert any(line.split()[:2] == ["F1_threshold", f"{written['F1_threshold']:.3f}"] for line in lines)


def test_eval_max_dets_and_no_per_class(files, tmp_path):
    gt, dets = files
    out = tmp_path / "m.json"
    res = CliRunner().invoke(main, ["eval", "--gt", str(gt), "--dets", str(dets), "--json", str(out),
                                    "--max-dets", "1", "--no-per-class"])
    assert res.exit_code == 0, res.output
    written = json.loads(out.read_text())
    assert "bbox/AR1" in written and "bbox/AR100" not in written
    assert not any(k.startswith("per_class/") for k in written)
    assert written == json.loads(json.dumps(evaluate_detections(GT, DETS, max_dets=1, per_class=False)))


def test_eval_errors_are_one_line_messages(files, tmp_path):
    gt, dets = files
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 77, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 0.5}]))
    res = CliRunner().invoke(main, ["eval", "--gt", str(gt), "--dets", str(bad)])
    assert res.exit_code == 2 and "image ids not in the ground truth: [77]" in res.output
    assert "Traceback" not in res.output
    res = CliRunner().invoke(main, ["eval", "--gt", str(tmp_path / "nope.json"), "--dets", str(dets)])
    assert res.exit_code == 2 and "not found" in res.output


def test_eval_reads_hit_uav_ground_truth(hit_uav, tmp_path):
    from sslrecipe.data.formats import read_hit_uav

    coco = read_hit_uav(hit_uav / "annotations" / "val.json")
    first = sorted(im["id"] for im in coco["images"])[:5]
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.5}
            for a in coco["annotations"] if a["image_id"] in first and not a.get("iscrowd")]
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    out = tmp_path / "m.json"
    res = CliRunner().invoke(main, ["eval", "--gt", str(hit_uav / "annotations" / "val.json"), "--dets", str(path),
                                    "--json", str(out)])
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text())
    assert m["precision"] == pytest.approx(100.0) and 0 < m["recall"] < 10  # 5 of 290 images detected
