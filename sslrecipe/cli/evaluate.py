"""`sslrecipe eval`: COCO evaluation of a detections file, the same implementation as the evaluate stage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from sslrecipe.atomic import atomic_write_text
from sslrecipe.errors import DataError


def _cell(key: str, value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if key.endswith("_threshold"):
        return f"{value:.3f}"
    return f"{value:.1f}"


def format_metrics(metrics: dict) -> str:
    """Plain-text table: the summary keys, then the per-class AP table."""
    main = [(k, v) for k, v in metrics.items() if not k.startswith("per_class/")]
    width = max((len(k) for k, _ in main), default=10)
    lines = [f"{k:<{width}}  {_cell(k, v):>6}" for k, v in main]
    per_class: dict[str, dict[str, object]] = {}
    for k, v in metrics.items():
        if k.startswith("per_class/"):
            name, metric = k[len("per_class/"):].rsplit("/", 1)
            per_class.setdefault(name, {})[metric] = v
    if per_class:
        cols = ["AP", "AP50", "AP_small"]
        nw = max(len("class"), *(len(n) for n in per_class))
        lines += ["", f"{'class':<{nw}}  " + "  ".join(f"{c:>8}" for c in cols)]
        for name, vals in per_class.items():
            lines.append(f"{name:<{nw}}  " + "  ".join(f"{_cell(c, vals.get(c)):>8}" for c in cols))
    return "\n".join(lines)


@click.command("eval")
@click.option("--gt", "gt_path", required=True, type=click.Path(dir_okay=True), help="Ground truth: COCO JSON (or HIT-UAV JSON, YOLO dataset YAML, VOC folder).")
@click.option("--dets", "dets_path", required=True, type=click.Path(dir_okay=False), help="Detections in COCO results format: [{image_id, category_id, bbox: [x, y, w, h], score}, ...].")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the metrics to this JSON file.")
@click.option("--max-dets", type=click.IntRange(min=1), default=100, show_default=True, help="COCO maxDets for AP/AR/F1 (raise it for scenes with more than 100 objects).")
@click.option("--gt-format", type=click.Choice(["auto", "coco", "hit-uav", "yolo", "voc"]), default="auto", show_default=True, help="Ground-truth format; non-COCO formats are converted as `sslrecipe data convert` does (HIT-UAV ids 0..3 become 1..4): detections must use the converted ids.")
@click.option("--no-per-class", is_flag=True, help="Leave out the per-class AP table.")
def eval_cmd(gt_path: str, dets_path: str, json_out: str | None, max_dets: int, gt_format: str, no_per_class: bool) -> None:
    """COCO box evaluation with the survey's small-object metrics, in percent.

    \b
    bbox/*       pycocotools' numbers (n/a for an empty size bucket, never -1)
    agnostic/*   all classes merged: mAP, AP50, AP_small, AP_small@0.3, AP@0.05
    F1           best F1 over score thresholds at IoU 0.5 (F1@0.05: at IoU 0.05),
                 with the threshold, precision and recall there
    per_class/*  AP, AP50, AP_small of each category
    """
    from sslrecipe.evaluate.coco_eval import evaluate_detections, load_ground_truth

    if not Path(gt_path).exists():
        raise DataError(f"--gt {gt_path}: not found")
    gt = load_ground_truth(gt_path, gt_format)
    metrics = evaluate_detections(gt, dets_path, max_dets=max_dets, per_class=not no_per_class)
    click.echo(format_metrics(metrics))
    if json_out:
        out = Path(json_out)
        atomic_write_text(out, json.dumps(metrics, indent=1) + "\n")
        click.echo(f"metrics written to {out}")
