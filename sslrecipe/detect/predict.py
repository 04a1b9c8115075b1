"""Run a torchvision detector over a dataset and return COCO-format results (boxes, and masks as RLE)."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list, list]:
    """Keep images (of different sizes) and targets as lists, as torchvision detectors expect."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def _image_id(target: Mapping[str, Any]) -> int:
    value = target["image_id"]
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1)[0].item()
    return int(value)


def to_coco_results(
    image_id: int,
    output: Mapping[str, torch.Tensor],
    score_threshold: float = 0.0,
    label_to_category: Optional[Mapping[int, int]] = None,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """One image's detector output (xyxy ``boxes``, ``scores``, ``labels``[, ``masks``]) as COCO results."""
    keep = output["scores"] >= score_threshold
    boxes = output["boxes"][keep].float().cpu()
    scores = output["scores"][keep].float().cpu().tolist()
    labels = output["labels"][keep].cpu().tolist()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    rles = None
    if "masks" in output:
        from sslrecipe.detect.masks import masks_to_rle

        rles = masks_to_rle(output["masks"][keep], mask_threshold)
    results = []
    for i, (box, score, label) in enumerate(zip(xywh, scores, labels)):
        category = int(label_to_category[int(label)]) if label_to_category is not None else int(label)
        r = {"image_id": int(image_id), "category_id": category, "bbox": [round(float(v), 3) for v in box],
             "score": float(score)}
        if rles is not None:
            r["segmentation"] = rles[i]
        results.append(r)
    return results


def predict(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: Any,
    score_threshold: float = 0.05,
    label_to_category: Optional[Mapping[int, int]] = None,
    num_workers: int = 0,
) -> list[dict[str, Any]]:
    """COCO results ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"[, "segmentation"]}]``.

    ``dataset`` yields ``(image FloatTensor[C,H,W] in [0,1], {"image_id": int, ...})``: the data's own scaling
    (``data.normalize``) and nothing more, because the detector's transform applies the mean/std its encoder
    expects (``detector.json``'s ``mean``/``std``: ``model.transform.image_mean`` / ``image_std``). Boxes are in the
    original image's pixels (the detector's transform maps them back); a Mask R-CNN's masks become
    compressed RLE at probability 0.5. ``label_to_category`` maps the model's contiguous labels (1..K) to the
    dataset's original category ids; None keeps the labels. Detections scoring below ``score_threshold`` are
    dropped. The model is left in the mode it came in.
    """
    device = torch.device(device)
    was_training = model.training
    model.to(device)
    model.eval()
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_detection
    )
    results: list[dict[str, Any]] = []
    try:
        with torch.inference_mode():
            for images, targets in loader:
                outputs = model([img.to(device, non_blocking=True) for img in images])
                for target, out in zip(targets, outputs):
                    results.extend(to_coco_results(_image_id(target), out, score_threshold, label_to_category))
    finally:
        model.train(was_training)
    return results
