"""Sliced inference for small objects in large images: overlapping tiles plus a full-image pass, merged.

Each tile is a crop of the original image; the detector resizes it to its input size like any image, so a
tile smaller than ``img_size`` is magnified and its small objects cover more feature-map cells (the idea of
SAHI's sliced prediction). Tile detections are shifted back to image coordinates, joined with the
detections of the whole image (which keep the large objects that tiles cut), and merged by NMS — per class
by default, or across classes with ``class_agnostic``. Only boxes are merged: a Mask R-CNN's masks are
dropped in tiled inference.

:func:`tiled_training_crops` gives the matching training-side option: fixed crops of each training image
with the boxes that fall inside them (a box is kept when at least ``min_visible`` of it is in the crop).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision.ops import batched_nms

from sslrecipe.detect.predict import _image_id, to_coco_results
from sslrecipe.errors import SSLRecipeError


def _positions(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    pos = list(range(0, size - tile, stride))
    pos.append(size - tile)  # the last tile ends at the border
    return sorted(set(pos))


def tile_windows(width: int, height: int, tile_size: int, overlap: float = 0.2) -> list[tuple[int, int, int, int]]:
    """``(x0, y0, x1, y1)`` windows of at most ``tile_size`` px covering the image, neighbours overlapping by
    at least ``overlap`` (a fraction of the tile) so that an object cut by one tile is whole in the next."""
    if tile_size < 8:
        raise SSLRecipeError(f"evaluate.tiling.tile_size must be at least 8 px, got {tile_size}")
    if not 0 <= overlap < 1:
        raise SSLRecipeError(f"evaluate.tiling.overlap is a fraction of the tile in [0, 1), got {overlap}")
    stride = max(1, int(math.floor(tile_size * (1 - overlap))))
    xs = _positions(width, tile_size, stride)
    ys = _positions(height, tile_size, stride)
    return [(x, y, min(x + tile_size, width), min(y + tile_size, height)) for y in ys for x in xs]


def merge_detections(
    parts: list[Mapping[str, torch.Tensor]], iou_threshold: float = 0.5, class_agnostic: bool = False,
    max_detections: Optional[int] = None,
) -> dict[str, torch.Tensor]:
    """Concatenate detector outputs (image coordinates) and keep the NMS survivors, best score first."""
    boxes = torch.cat([p["boxes"].float() for p in parts]) if parts else torch.zeros(0, 4)
    scores = torch.cat([p["scores"].float() for p in parts]) if parts else torch.zeros(0)
    labels = torch.cat([p["labels"] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)
    groups = torch.zeros_like(labels) if class_agnostic else labels
    keep = batched_nms(boxes, scores, groups, iou_threshold)  # sorted by decreasing score
    if max_detections is not None:
        keep = keep[:max_detections]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def predict_image_tiled(
    model: nn.Module,
    image: torch.Tensor,
    tile_size: int,
    overlap: float = 0.2,
    full_image: bool = True,
    iou_threshold: float = 0.5,
    class_agnostic: bool = False,
    max_detections: Optional[int] = None,
    batch_size: int = 4,
) -> dict[str, torch.Tensor]:
    """Merged detections of one ``C x H x W`` image from its tiles (and the whole image). ``model`` in eval mode."""
    height, width = int(image.shape[-2]), int(image.shape[-1])
    windows = tile_windows(width, height, tile_size, overlap)
    if len(windows) == 1 and windows[0] == (0, 0, width, height):
        windows = []  # the image is one tile: the full-image pass covers it
    parts: list[dict[str, torch.Tensor]] = []
    crops = [image[:, y0:y1, x0:x1] for x0, y0, x1, y1 in windows]
    for start in range(0, len(crops), batch_size):
        outs = model(crops[start:start + batch_size])
        for (x0, y0, _x1, _y1), out in zip(windows[start:start + batch_size], outs):
            shift = torch.tensor([x0, y0, x0, y0], dtype=out["boxes"].dtype, device=out["boxes"].device)
            parts.append({"boxes": out["boxes"] + shift, "scores": out["scores"], "labels": out["labels"]})
    if full_image or not parts:
        out = model([image])[0]
        parts.append({"boxes": out["boxes"], "scores": out["scores"], "labels": out["labels"]})
    if max_detections is None:
        max_detections = getattr(getattr(model, "roi_heads", None), "detections_per_img", None)
    return merge_detections(parts, iou_threshold, class_agnostic, max_detections)


def predict_tiled(
    model: nn.Module,
    dataset: Dataset,
    device: Any,
    tile_size: int,
    overlap: float = 0.2,
    full_image: bool = True,
    iou_threshold: float = 0.5,
    class_agnostic: bool = False,
    score_threshold: float = 0.05,
    label_to_category: Optional[Mapping[int, int]] = None,
    batch_size: int = 4,
) -> list[dict[str, Any]]:
    """COCO results (boxes) for every image of ``dataset`` by sliced inference; see :func:`predict_image_tiled`.
    Same contract as :func:`sslrecipe.detect.predict.predict`."""
    device = torch.device(device)
    was_training = model.training
    model.to(device)
    model.eval()
    results: list[dict[str, Any]] = []
    try:
        with torch.inference_mode():
            for i in range(len(dataset)):
                image, target = dataset[i]
                merged = predict_image_tiled(model, image.to(device), tile_size, overlap, full_image, iou_threshold,
                                             class_agnostic, batch_size=batch_size)
                results.extend(to_coco_results(_image_id(target), merged, score_threshold, label_to_category))
    finally:
        model.train(was_training)
    return results


class TiledTrainingCrops(Dataset):
    """Training crops: every tile window of every image of a detection dataset, with the boxes inside it.

    ``dataset[key]`` takes the same ``index`` / ``(index, sample_seed)`` keys as the wrapped dataset (the
    sample seed is passed through, so augmentation stays reproducible). A box is clipped to the crop and
    kept when at least ``min_visible`` of its area lies inside; ``masks`` are cropped along when present.
    """

    def __init__(self, dataset: Dataset, image_sizes: list[tuple[int, int]], tile_size: int, overlap: float = 0.2,
                 min_visible: float = 0.5):
        if len(image_sizes) != len(dataset):
            raise ValueError("image_sizes needs one (width, height) per image of the dataset")
        self.dataset = dataset
        self.min_visible = float(min_visible)
        self.items = [(i, w) for i, (width, height) in enumerate(image_sizes)
                      for w in tile_windows(int(width), int(height), tile_size, overlap)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        index, seed = (key if isinstance(key, tuple) else (key, None))
        src, (x0, y0, x1, y1) = self.items[int(index)]
        image, target = self.dataset[(src, seed) if seed is not None else src]
        width, height = int(image.shape[-1]), int(image.shape[-2])
        if x1 > width or y1 > height:
            raise ValueError(f"tile {(x0, y0, x1, y1)} outside image {src} of {width}x{height}")
        boxes = target["boxes"]
        clipped = boxes.clone()
        clipped[:, 0::2] = clipped[:, 0::2].clamp(x0, x1)
        clipped[:, 1::2] = clipped[:, 1::2].clamp(y0, y1)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
        keep = (inside > 0) & (inside >= self.min_visible * area)
        shift = torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
        out = dict(target)
        out["boxes"] = (clipped[keep] - shift).reshape(-1, 4)
        out["labels"] = target["labels"][keep]
        out["area"] = inside[keep]
        if "iscrowd" in target:
            out["iscrowd"] = target["iscrowd"][keep]
        if "masks" in target:
            out["masks"] = target["masks"][keep][:, y0:y1, x0:x1]
        return image[:, y0:y1, x0:x1], out
