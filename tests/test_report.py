"""The run report: markdown metrics table, loss-curve PNG and detections PNG."""

import numpy as np
import pytest
from PIL import Image

from sslrecipe.engine.events import EventLog, read_events
from sslrecipe.report.report import load_display_image, progress_by_stage, write_report


def _events(path):
    log = EventLog(path)
    log.emit("run_start", world_size=1)
    # an earlier attempt of finetune with other settings (hash a): must not be drawn
    log.emit("stage_start", "finetune", hash="a", dir="finetune-a")
    for step in range(1, 4):
        log.emit("progress", "finetune", step=step, total=30, loss=50.0, lr=1.0)
    log.emit("stage_cached", "pretrain", hash="p", dir="pretrain-p")
    log.emit("stage_start", "finetune", hash="b", dir="finetune-b")
    for step in range(1, 21):
        loss = 3.0 / step
        log.emit("progress", "finetune", step=step, total=30, epoch=0, loss=loss,
                 losses={"loss_classifier": loss * 0.6, "loss_box_reg": loss * 0.4}, lr=1e-3 * min(1, step / 5))
    # killed after step 20, resumed from the checkpoint at step 15: steps 16.. are written again
    log.emit("stage_start", "finetune", hash="b", dir="finetune-b")
    log.emit("resume", "finetune", step=15, checkpoint="ckpt.pt")
    for step in range(16, 31):
        log.emit("progress", "finetune", step=step, total=30, loss=2.0 / step, lr=1e-3)
    log.emit("stage_end", "finetune", dir="finetune-b", seconds=3.0)


def _images(root):
    rng = np.random.default_rng(0)
    rgb = (rng.random((90, 120, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(root / "a.png")
    thermal = (20000 + rng.random((100, 80)) * 3000).astype(np.uint16)  # 16-bit, narrow range
    thermal[40:50, 30:45] = 26000  # a warm object
    Image.fromarray(thermal).save(root / "b.png")
    Image.fromarray((rng.random((64, 64)) * 255).astype(np.uint8)).save(root / "c.png")  # 8-bit gray


GT = {
    "images": [
        {"id": 1, "file_name": "a.png", "width": 120, "height": 90},
        {"id": 2, "file_name": "b.png", "width": 80, "height": 100},
        {"id": 3, "file_name": "c.png", "width": 64, "height": 64},
    ],
    "categories": [{"id": 3, "name": "car"}, {"id": 9, "name": "person"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 15], "area": 300, "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 9, "bbox": [30, 40, 15, 10], "area": 150, "iscrowd": 0},
    ],
}
DETS = [
    {"image_id": 1, "category_id": 3, "bbox": [11, 9, 20, 16], "score": 0.91},
    {"image_id": 1, "category_id": 9, "bbox": [60, 50, 10, 10], "score": 0.2},  # below the drawing threshold
    {"image_id": 2, "category_id": 9, "bbox": [29, 41, 16, 9], "score": 0.77},
]
METRICS = {
    "bbox/mAP": 53.2147, "bbox/AP50": 88.0, "bbox/AP75": 41.25, "bbox/AP_small": 12.5,
    "bbox/AP_medium": None, "bbox/AP_large": None, "bbox/AR100": 61.0,
}


def test_progress_keeps_latest_attempt_and_last_value_per_step(tmp_path):
    _events(tmp_path / "events.jsonl")
    stages = progress_by_stage(read_events(tmp_path / "events.jsonl"))
    assert list(stages) == ["finetune"]
    steps = [e["step"] for e in stages["finetune"]]
    assert steps == list(range(1, 31))
    losses = {e["step"]: e["loss"] for e in stages["finetune"]}
    assert losses[10] == pytest.approx(0.3) and losses[16] == pytest.approx(2.0 / 16)  # resumed value wins
    assert all(v < 50 for v in losses.values())  # the stale attempt is gone


def test_write_report(tmp_path):
    run = tmp_path / "run"
    images = tmp_path / "images"
    images.mkdir()
    _images(images)
    _events(tmp_path / "events.jsonl")
    path = write_report(run, METRICS, tmp_path / "events.jsonl", GT, DETS, images, n_images=3,
                        score_threshold=0.5, title="quickstart: resnet18 from scratch")
    assert path == run / "report.md"
    md = path.read_text()
    assert md.startswith("# quickstart: resnet18 from scratch")
    assert "| mAP | AP50 | AP75 | AP_S | AP_M | AP_L | AR100 |" in md
    assert "| 53.2 | 88.0 | 41.2 | 12.5 | n/a[^na] | n/a[^na] | 61.0 |" in md
    assert "[^na]: n/a: undefined — no ground-truth object in that size bucket" in md
    assert "(loss_curve.png)" in md and "(detections.png)" in md
    assert "(pr_curves.png)" in md and "(ap_by_size.png)" in md

    for name, min_side in (("loss_curve.png", 300), ("detections.png", 500), ("pr_curves.png", 300),
                           ("ap_by_size.png", 300)):
        f = run / name
        assert f.stat().st_size > 10_000, name
        with Image.open(f) as im:
            im.verify()
        with Image.open(f) as im:
            assert im.format == "PNG" and min(im.size) >= min_side, (name, im.size)
            pixels = np.asarray(im.convert("RGB"))
        assert pixels.std() > 10, name  # not a blank canvas
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temp files left

    # the detection colours are really drawn: green GT and red-orange predictions appear in the PNG
    with Image.open(run / "detections.png") as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    green = (rgb[..., 1] > 180) & (rgb[..., 0] < 80) & (rgb[..., 2] < 150)
    red = (rgb[..., 0] > 200) & (rgb[..., 1] < 110) & (rgb[..., 2] < 60)
    assert green.sum() > 50 and red.sum() > 50


def test_small_objects_are_enlarged_in_an_inset(tmp_path):
    from sslrecipe.report.report import plot_detections

    arr = (np.random.default_rng(1).random((320, 400)) * 80).astype(np.uint8)
    arr[200:206, 300:307] = 250  # a 7x6 px object
    Image.fromarray(arr).save(tmp_path / "big.png")
    gt = {"images": [{"id": 1, "file_name": "big.png", "width": 400, "height": 320}],
          "categories": [{"id": 1, "name": "person"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [300, 200, 7, 6], "area": 42, "iscrowd": 0}]}
    dets = [{"image_id": 1, "category_id": 1, "bbox": [299, 200, 8, 6], "score": 0.9}]

    def colours(inset):
        out = tmp_path / f"d{inset}.png"
        plot_detections(gt, dets, tmp_path, out, n_images=1, inset=inset)
        with Image.open(out) as im:
            rgb = np.asarray(im.convert("RGB")).astype(int)
        yellow = (rgb[..., 0] > 220) & (rgb[..., 1] > 200) & (rgb[..., 2] < 90)
        green = (rgb[..., 1] > 180) & (rgb[..., 0] < 80) & (rgb[..., 2] < 150)
        return int(yellow.sum()), int(green.sum())

    y_with, g_with = colours(True)
    y_without, g_without = colours(False)
    assert y_without == 0 and y_with > 200  # the inset frame
    assert g_with > g_without + 50  # the enlarged ground-truth box inside the inset


def test_report_shows_survey_metrics_per_class_and_tiling(tmp_path):
    from sslrecipe.evaluate.coco_eval import evaluate_full

    images = tmp_path / "images"
    images.mkdir()
    _images(images)
    result = evaluate_full(GT, DETS)
    metrics = dict(result.metrics)
    tiled = evaluate_full(GT, DETS[:1], per_class=False).metrics
    metrics.update({"tiled/" + k: v for k, v in tiled.items()})
    path = write_report(tmp_path / "run", metrics, tmp_path / "none.jsonl", GT, DETS, images, n_images=0,
                        curves=result.curves)
    md = path.read_text()
    assert "| AP (no cls) | AP50 (no cls) | AP_S (no cls) | AP_S@0.3 (no cls) | AP@0.05 (no cls) | AP@0.05 | F1 | F1@0.05 |" in md
    f1_row = f"| IoU 0.5 | {metrics['F1']:.1f} | {metrics['F1_threshold']:.3f} | {metrics['precision']:.1f} | {metrics['recall']:.1f} |"
    assert f1_row in md
    assert "| car | 80.0 | 100.0 | 80.0 |" in md and "| person | 70.0 | 100.0 | 70.0 |" in md  # per-class table
    assert "| whole image | " in md and "| tiles + whole image | " in md
    assert "`tiled/" not in md and "`per_class/" not in md  # shown in their tables, not in the catch-all list
    for name in ("pr_curves.png", "ap_by_size.png"):
        with Image.open(tmp_path / "run" / name) as im:
            assert np.asarray(im.convert("RGB")).std() > 10


def test_report_without_progress_or_images(tmp_path):
    path = write_report(tmp_path, {"bbox/mAP": 0.0, "bbox/AR300": 1.5}, tmp_path / "missing.jsonl",
                        {"images": [], "annotations": []}, [], tmp_path, n_images=0)
    md = path.read_text()
    assert "| 0.0 |" in md and "AR300" in md and "detections.png" not in md
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000


def test_16bit_images_are_stretched_for_display(tmp_path):
    arr = np.full((20, 20), 30000, dtype=np.uint16)
    arr[5:10, 5:10] = 31000
    Image.fromarray(arr).save(tmp_path / "t.png")
    shown = load_display_image(tmp_path / "t.png")
    assert shown.shape == (20, 20) and shown.min() == 0.0 and shown.max() == 1.0
