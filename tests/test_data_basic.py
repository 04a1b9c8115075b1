"""Image reading, COCO datasets, few-shot sampling, splits and unlabeled pools."""

from __future__ import annotations

import json
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslrecipe.data.coco import DetectionDataset, collate_detection, load_coco
from sslrecipe.data.images import IMAGE_EXTENSIONS, list_images, read_image, to_channels
from sslrecipe.data.sampling import sample_shots, split_coco
from sslrecipe.data.unlabeled import UnlabeledImages, scan_unlabeled
from sslrecipe.errors import DataError


# --------------------------------------------------------------------------- images


def _ramp(h=12, w=16) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) % 251).astype(np.uint8)


def test_read_8bit_gray_and_rgb(tmp_path):
    gray = _ramp()
    Image.fromarray(gray).save(tmp_path / "g.png")
    arr = read_image(tmp_path / "g.png")
    assert arr.shape == (12, 16, 1) and arr.dtype == np.float32
    np.testing.assert_allclose(arr[..., 0], gray / 255.0, atol=1e-6)

    rgb = np.stack([gray, 255 - gray, np.full_like(gray, 7)], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "c.bmp")
    arr = read_image(tmp_path / "c.bmp")
    assert arr.shape == (12, 16, 3)
    np.testing.assert_allclose(arr, rgb / 255.0, atol=1e-6)


def test_read_16bit_png_and_tiff(tmp_path):
    raw = (np.arange(12 * 16).reshape(12, 16) * 300).astype(np.uint16)
    for name in ("d.png", "d.tif", "d.TIFF"):
        Image.fromarray(raw).save(tmp_path / name)
        arr = read_image(tmp_path / name)
        assert arr.shape == (12, 16, 1)
        np.testing.assert_allclose(arr[..., 0], raw / 65535.0, atol=1e-6)
        assert arr.max() > 0.8  # scaled by 65535, not by 255 (which would exceed 1)


def test_read_float_tiff_is_kept(tmp_path):
    values = np.linspace(-1.5, 300.0, 12 * 16, dtype=np.float32).reshape(12, 16)
    Image.fromarray(values).save(tmp_path / "f.tif")
    arr = read_image(tmp_path / "f.tif")
    np.testing.assert_array_equal(arr[..., 0], values)


def _write_multiband_tiff(path: Path, arr: np.ndarray) -> None:
    """A minimal uncompressed little-endian TIFF with C uint16 bands (Pillow cannot write these)."""
    h, w, c = arr.shape
    bits = struct.pack("<" + "H" * c, *([16] * c))
    data = arr.astype("<u2").tobytes()
    data_at, ifd_at = 8 + len(bits), 8 + len(bits) + len(data)
    short = lambda tag, value: struct.pack("<HHIHH", tag, 3, 1, value, 0)  # noqa: E731
    entries = [
        short(256, w), short(257, h), struct.pack("<HHII", 258, 3, c, 8), short(259, 1), short(262, 1),
        struct.pack("<HHII", 273, 4, 1, data_at), short(277, c), short(278, h),
        struct.pack("<HHII", 279, 4, 1, len(data)), short(284, 1), short(338, 0),
    ]
    ifd = struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", 0)
    path.write_bytes(b"II*\x00" + struct.pack("<I", ifd_at) + bits + data + ifd)


def test_multiband_tiff_needs_tifffile(tmp_path, monkeypatch):
    bands = (np.arange(6 * 20 * 5).reshape(6, 20, 5) * 100).astype(np.uint16)
    path = tmp_path / "five.tif"
    _write_multiband_tiff(path, bands)
    monkeypatch.setitem(sys.modules, "tifffile", None)  # as on a machine without tifffile
    with pytest.raises(DataError, match="five.tif.*pip install tifffile"):
        read_image(path)
    # with tifffile present its array is used, scaled like any 16-bit image; planar layouts are moved
    fake = types.SimpleNamespace(imread=lambda p: np.moveaxis(bands, -1, 0))
    monkeypatch.setitem(sys.modules, "tifffile", fake)
    arr = read_image(path)
    assert arr.shape == (6, 20, 5)
    np.testing.assert_allclose(arr, bands / 65535.0, atol=1e-6)
    assert to_channels(arr[..., :1], 3).shape == (6, 20, 3)


def test_read_applies_exif_orientation(tmp_path):
    # stored 40 wide x 20 high, left half red; orientation 6 = rotate 90 deg clockwise to display
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "r.jpg", exif=exif, quality=95)
    arr = read_image(tmp_path / "r.jpg")
    assert arr.shape == (40, 20, 3)
    assert arr[:15, :, 0].mean() > 0.8 and arr[:15, :, 2].mean() < 0.2  # red now on top
    assert arr[25:, :, 2].mean() > 0.8


def test_unreadable_files_name_the_file(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    Image.fromarray(np.full((64, 64, 3), 9, np.uint8)).save(tmp_path / "ok.jpg")
    jpg = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image at all")
    for name in ("trunc.png", "trunc.jpg", "empty.png", "junk.jpg", "missing.png"):
        with pytest.raises(DataError) as info:
            read_image(tmp_path / name)
        assert name in str(info.value)
    assert "truncated" in str(pytest.raises(DataError, read_image, tmp_path / "trunc.png").value)


def test_to_channels():
    gray = np.random.default_rng(0).random((5, 6, 1), dtype=np.float32)
    three = to_channels(gray, 3)
    assert three.shape == (5, 6, 3) and np.array_equal(three[..., 1], gray[..., 0])
    rgb = np.random.default_rng(1).random((5, 6, 3), dtype=np.float32)
    np.testing.assert_allclose(to_channels(rgb, 1)[..., 0], rgb.mean(axis=2), atol=1e-6)
    rgba = np.concatenate([rgb, np.ones((5, 6, 1), np.float32)], axis=2)
    assert np.array_equal(to_channels(rgba, 3), rgb)
    assert to_channels(rgb, 3) is rgb
    assert to_channels(gray[..., 0], 1).shape == (5, 6, 1)
    with pytest.raises(DataError, match="in_chans") as info:
        to_channels(np.zeros((5, 6, 5), np.float32), 3, source="x.tif")
    assert "x.tif" in str(info.value)


def test_list_images(tmp_path):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for rel in ("z.PNG", "a.jpg", "b/deep/c.tiff", "b/x.bmp", "notes.txt", ".hidden/h.png", "._a.jpg"):
        (tmp_path / rel).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["a.jpg", "b/deep/c.tiff", "b/x.bmp", "z.PNG"]
    assert ".jpeg" in IMAGE_EXTENSIONS
    with pytest.raises(DataError, match="not found"):
        list_images(tmp_path / "nope")


# --------------------------------------------------------------------------- COCO dataset


@pytest.fixture
def tiny_coco(tmp_path):
    """Two 8-bit grey images (a horizontal ramp, so flips are visible) with categories 5 and 3."""
    w, h = 20, 10
    ramp = np.tile(np.arange(w, dtype=np.uint8) * 10, (h, 1))
    Image.fromarray(ramp).save(tmp_path / "one.png")
    Image.fromarray(ramp[::-1].copy()).save(tmp_path / "two.png")
    coco = {
        "images": [
            {"id": 7, "file_name": "one.png", "width": w, "height": h},
            {"id": 9, "file_name": "two.png", "width": w, "height": h},
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 5, "bbox": [2, 1, 4, 3], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [10, 2, 8, 6], "iscrowd": 0},
            {"id": 3, "image_id": 7, "category_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": 1},
            {"id": 4, "image_id": 7, "category_id": 5, "bbox": [15, 5, 9, 9]},  # leaves the image: clipped
        ],
        "categories": [{"id": 5, "name": "car"}, {"id": 3, "name": "person"}],
    }
    return coco, tmp_path, ramp


def _flip_seed(flip: bool) -> int:
    return next(s for s in range(100) if (np.random.default_rng(s).random() < 0.5) == flip)


def test_detection_dataset_targets(tiny_coco):
    coco, root, ramp = tiny_coco
    ds = DetectionDataset(coco, root, in_chans=1)
    assert len(ds) == 2
    assert ds.label_to_category == {1: 3, 2: 5}
    assert ds.category_names == ["person", "car"]
    image, target = ds[0]
    assert image.shape == (1, 10, 20) and image.dtype == torch.float32
    np.testing.assert_allclose(image[0].numpy(), ramp / 255.0, atol=1e-6)
    assert target["image_id"] == 7
    # crowd annotation excluded; the last box is clipped to the image
    assert target["boxes"].tolist() == [[2, 1, 6, 4], [10, 2, 18, 8], [15, 5, 20, 10]]
    assert target["labels"].tolist() == [2, 1, 2]
    assert target["labels"].dtype == torch.int64 and target["iscrowd"].tolist() == [0, 0, 0]
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    rgb, _ = DetectionDataset(coco, root, in_chans=3)[0]
    assert rgb.shape == (3, 10, 20) and torch.equal(rgb[0], rgb[2])


def test_detection_dataset_flip(tiny_coco):
    coco, root, _ = tiny_coco
    plain_image, plain = DetectionDataset(coco, root, in_chans=1)[0]
    ds = DetectionDataset(coco, root, in_chans=1, train=True, seed=0)
    image, target = ds[(0, _flip_seed(True))]
    assert torch.equal(image, plain_image.flip(-1))
    b = plain["boxes"]
    expected = torch.stack([20 - b[:, 2], b[:, 1], 20 - b[:, 0], b[:, 3]], dim=1)
    assert torch.equal(target["boxes"], expected)
    assert torch.equal(target["labels"], plain["labels"])
    # the flipped box covers the flipped pixels: the ramp value at the box's left edge matches
    x1 = int(target["boxes"][0, 0])
    assert image[0, 1, x1] == plain_image[0, 1, 20 - 1 - x1]
    image, target = ds[(0, _flip_seed(False))]
    assert torch.equal(image, plain_image) and torch.equal(target["boxes"], plain["boxes"])
    # no flip when hflip is off, whatever the seed
    no_flip = DetectionDataset(coco, root, in_chans=1, train=True, hflip=False)
    assert torch.equal(no_flip[(0, _flip_seed(True))][0], plain_image)


def test_detection_dataset_deterministic_by_sample_seed(tiny_coco):
    coco, root, _ = tiny_coco
    ds = DetectionDataset(coco, root, in_chans=1, train=True, seed=4)
    flips = set()
    for s in range(12):
        torch.manual_seed(s)  # the global RNGs must not matter
        np.random.seed(s)
        a_img, a_t = ds[(0, s)]
        torch.manual_seed(1000 + s)
        b_img, b_t = ds[(0, s)]
        assert torch.equal(a_img, b_img) and torch.equal(a_t["boxes"], b_t["boxes"])
        flips.add(bool(a_t["boxes"][0, 0] != 2))
    assert flips == {True, False}
    # a plain index uses seed + index
    assert torch.equal(ds[1][0], ds[(1, 4 + 1)][0])
    assert torch.equal(ds[0][1]["boxes"], ds[(0, 4)][1]["boxes"])


def test_collate_and_errors(tiny_coco):
    coco, root, _ = tiny_coco
    ds = DetectionDataset(coco, root, in_chans=1)
    images, targets = collate_detection([ds[0], ds[1]])
    assert len(images) == 2 and [t["image_id"] for t in targets] == [7, 9]
    wrong = json.loads(json.dumps(coco))
    wrong["images"][1]["width"] = 99
    with pytest.raises(DataError, match="two.png"):
        DetectionDataset(wrong, root, in_chans=1)[1]
    wrong["annotations"][0]["category_id"] = 42
    with pytest.raises(DataError, match="42"):
        DetectionDataset(wrong, root, in_chans=1)
    gone = json.loads(json.dumps(coco))
    gone["images"][0]["file_name"] = "missing.png"
    with pytest.raises(DataError, match="missing.png"):
        DetectionDataset(gone, root, in_chans=1)[0]


def test_load_coco(tiny_coco, tmp_path):
    coco, _, _ = tiny_coco
    good = tmp_path / "good.json"
    good.write_text(json.dumps(coco))
    assert load_coco(good) == coco
    with pytest.raises(DataError, match="nope.json"):
        load_coco(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [\n  1,,\n]}')
    with pytest.raises(DataError, match=r"bad\.json:2:\d+: invalid JSON"):
        load_coco(bad)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DataError, match="partial.json.*'categories'"):
        load_coco(partial)


# --------------------------------------------------------------------------- sampling and splits


def _many_images_coco(n=50) -> dict:
    rng = np.random.default_rng(0)
    anns = []
    for i in range(n):
        for _ in range(int(rng.integers(0, 4))):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(rng.choice([1, 2])), "bbox": [0, 0, 5, 5]})
    # category 3 appears in two images only; category 4 only as a crowd region
    for image_id in (17, 41):
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 3, "bbox": [1, 1, 3, 3]})
    anns.append({"id": len(anns) + 1, "image_id": 5, "category_id": 4, "bbox": [1, 1, 3, 3], "iscrowd": 1})
    return {
        "info": {"description": "test"},
        "images": [{"id": i + 1, "file_name": f"{i}.png", "width": 10, "height": 10} for i in range(n)],
        "annotations": anns,
        "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3, 4)],
    }


def _check_subset(sub: dict, full: dict) -> set:
    ids = {im["id"] for im in sub["images"]}
    assert sub["categories"] == full["categories"] and sub["info"] == full["info"]
    assert sub["annotations"] == [a for a in full["annotations"] if a["image_id"] in ids]
    return ids


def test_sample_shots():
    coco = _many_images_coco()
    for shots in (3, 5, 20):
        sub = sample_shots(coco, shots, seed=1)
        ids = _check_subset(sub, coco)
        assert len(ids) == shots
        present = {a["category_id"] for a in sub["annotations"] if not a.get("iscrowd")}
        assert {1, 2, 3} <= present  # the rare class is kept
    assert sample_shots(coco, 5, seed=1) == sample_shots(coco, 5, seed=1)
    picks = {tuple(im["id"] for im in sample_shots(coco, 5, seed=s)["images"]) for s in range(6)}
    assert len(picks) > 1
    assert len(sample_shots(coco, 50, seed=0)["images"]) == 50
    assert len(sample_shots(coco, 500, seed=0)["images"]) == 50
    one = sample_shots(coco, 1, seed=0)
    assert len(one["images"]) == 1 and {a["category_id"] for a in one["annotations"]} & {3}
    with pytest.raises(DataError):
        sample_shots(coco, 0, seed=0)


def test_split_coco():
    coco = _many_images_coco(50)
    train, val, test = split_coco(coco, (0.6, 0.2, 0.2), seed=3)
    ids = [_check_subset(part, coco) for part in (train, val, test)]
    assert [len(i) for i in ids] == [30, 10, 10]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert ids[0] | ids[1] | ids[2] == {im["id"] for im in coco["images"]}
    assert sum(len(p["annotations"]) for p in (train, val, test)) == len(coco["annotations"])
    assert split_coco(coco, (0.6, 0.2, 0.2), seed=3) == (train, val, test)
    assert split_coco(coco, (0.6, 0.2, 0.2), seed=4)[0]["images"] != train["images"]
    sizes = [len(p["images"]) for p in split_coco(_many_images_coco(7), (0.6, 0.2, 0.2))]
    assert sum(sizes) == 7 and min(sizes) >= 1
    assert [len(p["images"]) for p in split_coco(_many_images_coco(3), (0.8, 0.1, 0.1))] == [1, 1, 1]
    assert [len(p["images"]) for p in split_coco(_many_images_coco(10), (0.8, 0.2, 0.0))] == [8, 2, 0]
    with pytest.raises(DataError):
        split_coco(coco, (0.5, 0.2, 0.2))


# --------------------------------------------------------------------------- unlabeled pools


def test_scan_and_unlabeled_dataset(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.fromarray(_ramp()).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((8, 9, 3), np.uint8)).save(tmp_path / "sub" / "b.jpg")
    Image.fromarray((_ramp().astype(np.uint16) * 200)).save(tmp_path / "sub" / "c.tif")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "readme.txt").write_text("ignored")
    good, problems = scan_unlabeled(tmp_path)
    assert [p.name for p in good] == ["a.png", "b.jpg", "c.tif"]
    assert sorted(p.name for p, _ in problems) == ["broken.png", "empty.jpg"]
    assert all(reason for _, reason in problems)
    with pytest.raises(DataError, match="no images"):
        scan_unlabeled(_empty_dir(tmp_path))

    calls = []

    def transform(tensor, rng):
        calls.append(tensor.shape)
        return tensor * 0 + float(rng.random())

    ds = UnlabeledImages(good, in_chans=3, transform=transform)
    assert len(ds) == 3
    assert torch.equal(ds[(1, 5)], ds[(1, 5)]) and ds[(1, 5)][0, 0, 0] == np.random.default_rng(5).random()
    assert ds[2][0, 0, 0] == np.random.default_rng(2).random()  # seed 0 + index
    assert calls[0] == (3, 8, 9)
    plain = UnlabeledImages(good, in_chans=1)
    assert plain[0].shape == (1, 12, 16) and plain[2].max() <= 1.0 and plain[1].dtype == torch.float32

    broken = [tmp_path / "broken.png", good[0]]
    with pytest.raises(DataError, match="broken.png"):
        UnlabeledImages(broken, in_chans=1)[0]
    seen = []
    tolerant = UnlabeledImages(broken, in_chans=1, on_error=lambda path, err: seen.append(path.name))
    assert torch.equal(tolerant[0], plain[0]) and seen == ["broken.png"]


def _empty_dir(root: Path) -> Path:
    empty = root / "nothing"
    empty.mkdir()
    return empty
