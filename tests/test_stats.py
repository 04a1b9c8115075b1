"""Dataset statistics (sizes, density, channels, bit depth) and per-dataset normalization."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import sslrecipe.data.normalize as normalize
from sslrecipe.cli import main
from sslrecipe.data.images import read_image
from sslrecipe.data.normalize import apply_normalization, dataset_normalization, fixed_normalization
from sslrecipe.data.stats import dataset_stats

HIT_UAV = Path(__file__).parents[1].parent / "shared/data/hit-uav"


def _dataset(tmp: Path) -> Path:
    img = tmp / "images"
    img.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (100, 100), dtype=np.uint8)).save(img / "gray8.png")
    Image.fromarray(rng.integers(0, 255, (100, 200, 3), dtype=np.uint8)).save(img / "rgb.png")
    Image.fromarray(rng.integers(0, 65535, (300, 300), dtype=np.uint16)).save(img / "thermal16.png")
    anns = []

    def box(image_id, cat, x, y, w, h, **extra):
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": [x, y, w, h], "area": w * h,
                     "iscrowd": 0, **extra})

    box(1, 1, 0, 0, 7, 7)      # area 49: < 8^2
    box(1, 1, 10, 10, 10, 10)  # 100: < 16^2
    box(1, 2, 30, 30, 20, 20)  # 400: small
    box(1, 2, 40, 40, 50, 50)  # 2500: medium
    box(1, 2, 0, 0, 30, 30, iscrowd=1)  # an ignore region, not an object
    for k in range(101):       # a scene denser than COCO's maxDets
        box(3, 1, (k % 50) * 5, (k // 50) * 5, 4, 4)
    box(3, 2, 100, 100, 100, 100)  # 10000: large
    coco = {
        "images": [{"id": 1, "file_name": "gray8.png", "width": 100, "height": 100},
                   {"id": 2, "file_name": "rgb.png", "width": 200, "height": 100},
                   {"id": 3, "file_name": "thermal16.png", "width": 300, "height": 300}],
        "categories": [{"id": 1, "name": "car"}, {"id": 2, "name": "person"}],
        "annotations": anns,
    }
    path = tmp / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


def test_stats_sizes_density_channels(tmp_path: Path) -> None:
    s = dataset_stats(_dataset(tmp_path))
    assert s["images"] == 3 and s["images_without_boxes"] == 1 and s["images_with_boxes"] == 2
    assert s["boxes"] == 4 + 102 and s["ignore_regions"] == 1
    assert s["per_class"] == {"car": 103, "person": 3}
    assert [(c["name"], c["images"]) for c in s["categories"]] == [("car", 2), ("person", 2)]
    assert s["sizes"] == {"small": 101 + 3, "medium": 1, "large": 1}
    assert s["tiny"] == {"lt8": 101 + 1, "lt16": 101 + 2}
    assert s["boxes_per_image"]["max"] == 102 and s["dense_images"] == 1 and s["dense"] is True
    assert s["channels"] == {"1": 2, "3": 1}
    assert s["bit_depth"] == {"16": 1, "8": 2}
    assert s["image_sizes"] == {"100x100": 1, "200x100": 1, "300x300": 1}
    assert s["box_size"]["sqrt_area"]["max"] == 100.0

    r = CliRunner().invoke(main, ["data", "stats", str(tmp_path / "annotations.json"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["sizes"] == s["sizes"]
    r = CliRunner().invoke(main, ["data", "stats", str(tmp_path / "annotations.json")])
    assert r.exit_code == 0 and "maxDets 100" in r.output and "small 104" in r.output


def test_stats_plain_folder_detects_grey_stored_as_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(3):
        g = rng.integers(0, 255, (32, 48), dtype=np.uint8)
        Image.fromarray(np.stack([g, g, g], axis=2)).save(tmp_path / f"f{i}.jpg", quality=95)
    s = dataset_stats(tmp_path)
    assert s["images"] == 3 and s["channels"] == {"3": 3} and s["effective_channels"] == 1
    Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(tmp_path / "colour.png")
    assert dataset_stats(tmp_path)["effective_channels"] == 3


def test_stats_hit_uav_subset_matches_the_json(tmp_path: Path) -> None:
    if not HIT_UAV.is_dir():
        pytest.skip(f"HIT-UAV data not found at {HIT_UAV} (the tests expect ../shared/data/hit-uav)")
    raw = json.loads((HIT_UAV / "annotations" / "train.json").read_text())
    images = raw["images"][:20]
    ids = {i["id"] for i in images}
    anns = [a for a in raw["annotation"] if a["image_id"] in ids]
    sub = tmp_path / "sub.json"
    sub.write_text(json.dumps(dict(raw, images=images, annotation=anns)))
    s = dataset_stats(sub, image_root=HIT_UAV / "train")
    objects = [a for a in anns if a["category_id"] != 4]
    assert s["boxes"] == len(objects) and s["ignore_regions"] == len(anns) - len(objects)
    assert s["sizes"]["small"] == sum(a["bbox"][2] * a["bbox"][3] < 32**2 for a in objects)
    assert s["channels"] == {"1": 20} and s["bit_depth"] == {"8": 20} and s["image_sizes"] == {"640x512": 20}
    assert "DontCare" not in s["per_class"]


# --------------------------------------------------------------------------- normalization


def _thermal(tmp: Path, n: int = 4) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        a = rng.normal(2000 + 100 * i, 300, (64, 80)).clip(0, 65535).astype(np.uint16)
        a[0, :3] = 60000  # hot pixels the robust percentiles ignore
        p = tmp / f"t{i}.png"
        Image.fromarray(a).save(p)
        paths.append(p)
    return paths


def test_dataset_normalization_is_robust_and_cached(tmp_path: Path, monkeypatch) -> None:
    paths = _thermal(tmp_path)
    stats = dataset_normalization(paths, cache_dir=tmp_path / "cache")
    assert stats["channels"] == 1 and stats["bit_depth"] == {"16": 4} and stats["images"] == 4
    assert 900 < stats["low_raw"][0] < 1400 and 2600 < stats["high_raw"][0] < 3200  # not the 60000 outliers
    assert abs(stats["mean"][0] * 65535 - 2150) < 60
    cached = list((tmp_path / "cache").glob("normalization-*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["fingerprint"] == stats["fingerprint"]

    def fail(*a, **k):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(normalize, "compute_normalization", fail)
    assert dataset_normalization(list(reversed(paths)), cache_dir=tmp_path / "cache") == stats
    monkeypatch.undo()
    extra = tmp_path / "more"
    extra.mkdir()
    more = paths + _thermal(extra, 1)  # a changed file list is measured again
    assert dataset_normalization(more, cache_dir=tmp_path / "cache")["fingerprint"] != stats["fingerprint"]


def test_apply_normalization_keeps_16_bit_precision(tmp_path: Path) -> None:
    paths = _thermal(tmp_path)
    stats = dataset_normalization(paths)
    raw = np.asarray(Image.open(paths[0]))
    from_raw = apply_normalization(raw, stats)
    from_float = apply_normalization(read_image(paths[0]), stats)
    assert from_raw.dtype == np.float32 and from_raw.shape == raw.shape
    assert np.allclose(from_raw, from_float[:, :, 0], atol=1e-5)
    inside = (from_raw > 0) & (from_raw < 1)
    assert inside.mean() > 0.95  # only the tails are clipped
    assert len(np.unique(from_raw)) > 256  # not squeezed into 8-bit levels
    # plain division by 65535 would leave almost no contrast
    def spread(a):
        lo, hi = np.percentile(a, [5, 95])
        return hi - lo

    assert spread(from_raw) > 10 * spread(raw / 65535.0)
    z = apply_normalization(raw, stats, method="meanstd")
    assert abs(float(z.mean())) < 0.5 and 0.5 < float(z.std()) < 2.0
    fixed = fixed_normalization(1000, 3000, scale=65535)
    assert np.isclose(apply_normalization(np.array([[2000]], dtype=np.uint16), fixed)[0, 0], 0.5, atol=1e-4)
    rgb = apply_normalization(np.repeat(raw[:, :, None], 3, axis=2), stats)  # one-channel stats apply to all
    assert np.allclose(rgb[:, :, 2], from_raw, atol=1e-6)
