"""Sliced inference: tile windows, shifting tile detections back, NMS merge with the full-image pass."""

import pytest
import torch

from sslrecipe.detect.tiling import (TiledTrainingCrops, merge_detections, predict_image_tiled, predict_tiled,
                                     tile_windows)
from sslrecipe.errors import SSLRecipeError


def test_windows_cover_the_image_with_overlap():
    wins = tile_windows(640, 512, 256, overlap=0.25)
    xs = sorted({w[0] for w in wins})
    ys = sorted({w[1] for w in wins})
    assert xs == [0, 192, 384] and ys == [0, 192, 256]
    assert all(x1 - x0 == 256 and y1 - y0 == 256 for x0, y0, x1, y1 in wins)
    covered = torch.zeros(512, 640, dtype=torch.bool)
    for x0, y0, x1, y1 in wins:
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    assert tile_windows(100, 80, 256) == [(0, 0, 100, 80)]  # a small image is one (smaller) tile
    with pytest.raises(SSLRecipeError, match="overlap"):
        tile_windows(100, 100, 50, overlap=1.0)


def test_merge_keeps_the_best_of_overlapping_boxes_per_class():
    a = {"boxes": torch.tensor([[10.0, 10, 20, 20], [50, 50, 60, 60]]), "scores": torch.tensor([0.9, 0.4]),
         "labels": torch.tensor([1, 1])}
    b = {"boxes": torch.tensor([[11.0, 10, 21, 20], [10, 10, 20, 20]]), "scores": torch.tensor([0.7, 0.8]),
         "labels": torch.tensor([1, 2])}
    merged = merge_detections([a, b], iou_threshold=0.5)
    assert merged["scores"].tolist() == pytest.approx([0.9, 0.8, 0.4])  # the 0.7 duplicate of class 1 is gone
    assert merged["labels"].tolist() == [1, 2, 1]
    agnostic = merge_detections([a, b], iou_threshold=0.5, class_agnostic=True)
    assert agnostic["scores"].tolist() == pytest.approx([0.9, 0.4])
    assert merge_detections([a, b], max_detections=1)["scores"].tolist() == pytest.approx([0.9])


class BlobDetector(torch.nn.Module):
    """A stand-in detector: one box around every bright pixel blob it sees, scored higher the larger the
    blob appears relative to the input (like a real detector, small objects are found better when enlarged)."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.roi_heads = type("H", (), {"detections_per_img": 50})()

    def forward(self, images):
        outs = []
        for img in images:
            self.calls.append(tuple(img.shape[-2:]))
            ys, xs = torch.nonzero(img[0] > 0.5, as_tuple=True)
            if len(xs) == 0:
                outs.append({"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)})
                continue
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            frac = float((box[0, 2] - box[0, 0]) / img.shape[-1])
            outs.append({"boxes": box, "scores": torch.tensor([min(1.0, frac * 10)]), "labels": torch.tensor([1])})
        return outs


def test_tiled_prediction_maps_tile_boxes_back_and_merges_with_the_full_pass():
    image = torch.zeros(1, 200, 300)
    image[:, 150:158, 250:260] = 1.0  # a small object near the bottom-right corner
    model = BlobDetector().eval()
    merged = predict_image_tiled(model, image, tile_size=128, overlap=0.25)
    # every tile containing the object found it at the same place; NMS keeps one box, from a tile (higher score)
    assert merged["boxes"].tolist() == [[250.0, 150.0, 260.0, 158.0]]
    assert float(merged["scores"][0]) == pytest.approx(10 / 128 * 10)
    n_tiles = len(tile_windows(300, 200, 128, 0.25))
    assert model.calls[-1] == (200, 300) and len(model.calls) == n_tiles + 1  # tiles, then the whole image
    model.calls.clear()
    predict_image_tiled(model, image, tile_size=128, overlap=0.25, full_image=False)
    assert (200, 300) not in model.calls


class _Images(torch.utils.data.Dataset):
    def __init__(self):
        self.items = []
        for i, (y, x) in enumerate([(20, 30), (100, 200)]):
            img = torch.zeros(1, 160, 240)
            img[:, y:y + 6, x:x + 6] = 1.0
            self.items.append((img, {"image_id": 7 + i, "boxes": torch.tensor([[x, y, x + 6, y + 6]], dtype=torch.float32),
                                     "labels": torch.tensor([1])}))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        i = key[0] if isinstance(key, tuple) else key
        return self.items[i]


def test_predict_tiled_gives_coco_results_with_categories():
    res = predict_tiled(BlobDetector(), _Images(), "cpu", tile_size=100, overlap=0.2, label_to_category={1: 42},
                        score_threshold=0.0)
    assert sorted((r["image_id"], tuple(r["bbox"]), r["category_id"]) for r in res) == [
        (7, (30.0, 20.0, 6.0, 6.0), 42), (8, (200.0, 100.0, 6.0, 6.0), 42)]


def test_tiled_training_crops_keep_and_shift_the_boxes_inside():
    ds = _Images()
    crops = TiledTrainingCrops(ds, [(240, 160)] * 2, tile_size=100, overlap=0.2, min_visible=0.5)
    assert len(crops) == 2 * len(tile_windows(240, 160, 100, 0.2))
    seen = 0
    for k in range(len(crops)):
        img, t = crops[(k, 123)]
        assert img.shape[-2:] == (100, 100)
        for box in t["boxes"]:
            x0, y0, x1, y1 = (int(v) for v in box)
            assert img[0, y0:y1, x0:x1].min() == 1.0  # the shifted box still frames the object
            seen += 1
    assert seen >= 2
