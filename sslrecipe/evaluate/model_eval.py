"""Evaluate a fine-tuned detector on a labeled set: predict, score, optionally again with sliced inference.

This is what the pipeline's evaluate stage calls; ``sslrecipe eval`` scores a detections file with the same
:func:`sslrecipe.evaluate.coco_eval.evaluate_full`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from torch import nn
from torch.utils.data import Dataset

from sslrecipe.atomic import atomic_write
from sslrecipe.evaluate.coco_eval import evaluate_full

DETECTIONS_JSON = "detections.json"
TILED_DETECTIONS_JSON = "detections_tiled.json"
METRICS_JSON = "metrics.json"
CURVES_JSON = "curves.json"
TILED_PREFIX = "tiled/"


@dataclass
class ModelEvaluation:
    metrics: dict[str, Optional[float]]
    detections: list[dict[str, Any]]
    curves: dict[str, Any] = field(default_factory=dict)
    tiled_detections: Optional[list[dict[str, Any]]] = None


def evaluate_model(
    model: nn.Module,
    dataset: Dataset,
    gt: Mapping[str, Any],
    *,
    device: Any = "cpu",
    batch_size: int = 8,
    score_threshold: float = 0.05,
    label_to_category: Optional[Mapping[int, int]] = None,
    max_dets: int = 100,
    tiling: Optional[Mapping[str, Any]] = None,
) -> ModelEvaluation:
    """Predict on ``dataset`` and evaluate against ``gt`` (the same images' COCO dict).

    ``tiling`` (``evaluate.tiling`` of the recipe: ``enabled, tile_size, overlap, full_image, iou_threshold,
    class_agnostic``): when enabled, the images are also predicted tile by tile and every metric is added
    again under ``tiled/`` (per-class AP left out), so the report can show AP with and without it.
    """
    from sslrecipe.detect.predict import predict

    detections = predict(model, dataset, batch_size, device, score_threshold, label_to_category)
    result = evaluate_full(gt, detections, max_dets)
    out = ModelEvaluation(dict(result.metrics), detections, result.curves)
    if tiling and tiling.get("enabled"):
        from sslrecipe.detect.tiling import predict_tiled

        tiled = predict_tiled(
            model, dataset, device, tile_size=int(tiling.get("tile_size", 320)), overlap=float(tiling.get("overlap", 0.2)),
            full_image=bool(tiling.get("full_image", True)), iou_threshold=float(tiling.get("iou_threshold", 0.5)),
            class_agnostic=bool(tiling.get("class_agnostic", False)), score_threshold=score_threshold,
            label_to_category=label_to_category, batch_size=batch_size,
        )
        tres = evaluate_full(gt, tiled, max_dets, per_class=False)
        out.metrics.update({TILED_PREFIX + k: v for k, v in tres.metrics.items()})
        out.tiled_detections = tiled
        out.curves["tiled/bbox@0.5"] = tres.curves.get("bbox@0.5")
        out.curves["tiled/agnostic_small@0.3"] = tres.curves.get("agnostic_small@0.3")
    return out


def _atomic_json(path: Path, value: Any) -> None:
    atomic_write(path, "w", lambda f: json.dump(value, f, indent=None if isinstance(value, list) else 1))


def write_evaluation(out_dir: Path, evaluation: ModelEvaluation) -> dict[str, Path]:
    """``metrics.json``, ``detections.json``, ``curves.json`` (+ ``detections_tiled.json``) in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out_dir / METRICS_JSON, "detections": out_dir / DETECTIONS_JSON, "curves": out_dir / CURVES_JSON}
    _atomic_json(paths["detections"], evaluation.detections)
    _atomic_json(paths["curves"], evaluation.curves)
    if evaluation.tiled_detections is not None:
        paths["tiled_detections"] = out_dir / TILED_DETECTIONS_JSON
        _atomic_json(paths["tiled_detections"], evaluation.tiled_detections)
    _atomic_json(paths["metrics"], evaluation.metrics)  # last: its presence means the rest is written
    return paths
