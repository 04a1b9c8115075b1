"""Dataset checks: broken image files and annotation problems, each named with its file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sslrecipe.cli import main
from sslrecipe.data.check import Problem, check_coco, check_dataset, drop_invalid, inspect_image

HIT_UAV = Path(__file__).parents[1].parent / "shared/data/hit-uav"

BROKEN = {  # file -> expected kind
    "empty.jpg": "empty",
    "truncated.jpg": "truncated",
    "truncated.png": "truncated",
    "truncated.tif": "truncated",
    "garbage.jpg": "unreadable",
    "text.png": "unreadable",
    "bad_crc.png": "unreadable",
    "sub/zeroed_idat.png": "unreadable",
}


def _make_folder(folder: Path) -> list[str]:
    """Good images of several layouts plus the broken files of BROKEN; returns the good names."""
    rng = np.random.default_rng(1)
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (64, 80), dtype=np.uint8)).save(folder / "good.jpg", quality=90)
    Image.fromarray(rng.integers(0, 65535, (64, 80), dtype=np.uint16)).save(folder / "good16.png")
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(folder / "good_rgb.tif")
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / "sub" / "good.bmp")
    (folder / "notes.txt").write_text("not an image, not checked")
    jpg, png, tif = [(folder / n).read_bytes() for n in ("good.jpg", "good16.png", "good_rgb.tif")]
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(jpg[: len(jpg) * 6 // 10])
    (folder / "truncated.png").write_bytes(png[: len(png) * 6 // 10])
    (folder / "truncated.tif").write_bytes(tif[: len(tif) // 2])
    (folder / "garbage.jpg").write_bytes(rng.integers(0, 255, 2000, dtype=np.uint8).tobytes())
    (folder / "text.png").write_text("hello")
    crc = bytearray(png)
    crc[60] ^= 0xFF  # inside the first data chunk: its checksum no longer matches
    (folder / "bad_crc.png").write_bytes(bytes(crc))
    zeroed = bytearray(png)
    zeroed[len(zeroed) // 2: len(zeroed) // 2 + 64] = bytes(64)
    (folder / "sub" / "zeroed_idat.png").write_bytes(bytes(zeroed))
    return ["good.jpg", "good16.png", "good_rgb.tif", "sub/good.bmp"]


def test_check_folder_names_every_broken_file(tmp_path: Path) -> None:
    good = _make_folder(tmp_path / "pool")
    problems = check_dataset(tmp_path / "pool")
    found = {Path(p.file).relative_to(tmp_path / "pool").as_posix(): p.kind for p in problems}
    assert found == BROKEN
    for name in good:
        problem, size = inspect_image(tmp_path / "pool" / name)
        assert problem is None and size is not None

    runner = CliRunner()
    r = runner.invoke(main, ["data", "check", str(tmp_path / "pool")])
    assert r.exit_code == 1
    for name in BROKEN:
        assert str(tmp_path / "pool" / name) in r.output
    assert "Traceback" not in r.output
    r = runner.invoke(main, ["data", "check", str(tmp_path / "pool"), "--json"])
    assert r.exit_code == 1
    data = json.loads(r.output)
    assert data["count"] == len(BROKEN) and {Path(p["file"]).name for p in data["problems"]} == {Path(n).name for n in BROKEN}

    clean = tmp_path / "clean"
    clean.mkdir()
    for name in good:
        (clean / Path(name).name).write_bytes((tmp_path / "pool" / name).read_bytes())
    r = runner.invoke(main, ["data", "check", str(clean)])
    assert r.exit_code == 0, r.output
    assert "no problems" in r.output


def test_check_coco_annotation_problems(tmp_path: Path) -> None:
    img = tmp_path / "images"
    img.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(np.zeros((50, 100), dtype=np.uint8)).save(img / name)
    # EXIF orientation 6 (rotated 90 degrees): seen as 50 wide, 100 high
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((50, 100), dtype=np.uint8)).save(img / "rot.jpg", exif=exif.tobytes())
    (img / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 100, "height": 50},
            {"id": 2, "file_name": "b.png", "width": 100, "height": 50},
            {"id": 2, "file_name": "c.png", "width": 100, "height": 50},
            {"id": 4, "file_name": "missing.png", "width": 100, "height": 50},
            {"id": 5, "file_name": "rot.jpg", "width": 100, "height": 50},
            {"id": 6, "file_name": "broken.png", "width": 100, "height": 50},
        ],
        "categories": [{"id": 1, "name": "car"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 5, 5]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [95, 10, 10, 5]},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [10, 10, 0, 5]},
            {"id": 4, "image_id": 1, "category_id": 9, "bbox": [1, 1, 2, 2]},
            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [2, 2, 2, 2]},
            {"id": 6, "image_id": 77, "category_id": 1, "bbox": [1, 1, 2, 2]},
            {"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 1, "x", 2]},
            {"id": 8, "image_id": 1, "category_id": 1, "bbox": [99.6, 49.6, 0.8, 0.8]},  # within 0.5 px: fine
        ],
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(coco))
    problems = check_dataset(ann, image_root=img)
    got = sorted((Path(p.file).name, p.kind) for p in problems)
    assert got == sorted([
        ("b.png", "duplicate_image_id"),
        ("a.png", "bbox_outside"),
        ("a.png", "zero_area"),
        ("a.png", "unknown_category"),
        ("a.png", "duplicate_annotation_id"),
        ("ann.json", "unknown_image"),
        ("ann.json", "bad_bbox"),  # malformed entries name the annotation file
        ("missing.png", "missing"),
        ("rot.jpg", "size_mismatch"),
        ("broken.png", "unreadable"),
    ]), got
    assert all(isinstance(p, Problem) and p.message for p in problems)
    # the same through the dict API, annotations only
    no_images = check_dataset(coco, image_root=img, images=False)
    assert {p.kind for p in no_images} == {"duplicate_image_id", "bbox_outside", "zero_area", "unknown_category",
                                           "duplicate_annotation_id", "unknown_image", "bad_bbox"}

    # data.skip_invalid: drop what is broken, clip boxes past the border, and the rest checks clean
    clean, found = drop_invalid(coco, img)
    assert len(found) == 10
    assert [i["file_name"] for i in clean["images"]] == ["a.png", "b.png"]
    assert sorted(a["id"] for a in clean["annotations"]) == [1, 2, 4, 8]
    assert next(a for a in clean["annotations"] if a["id"] == 2)["bbox"] == [95.0, 10.0, 5.0, 5.0]
    assert check_coco(clean, img) == []


def test_check_unparseable_and_yolo_label_problems(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{\"images\": [")
    problems = check_dataset(tmp_path / "bad.json")
    assert [p.kind for p in problems] == ["annotation_format"] and "invalid JSON" in problems[0].message

    root = tmp_path / "yolo"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.zeros((40, 40), dtype=np.uint8)).save(root / "images" / f"{name}.png")
    (root / "labels" / "a.txt").write_text("0 0.5 0.5 0.1 0.1\n3 0.5 0.5 0.1 0.1\n0 0.5 0.5\n0 0.99 0.5 0.2 0.2\n")
    (root / "labels" / "b.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (root / "data.yaml").write_text("train: images\nnames: [car, person]\n")
    problems = check_dataset(root / "data.yaml")
    got = sorted((Path(p.file).name, p.kind) for p in problems)
    assert got == [("a.png", "bbox_outside"), ("a.txt", "label_format"), ("a.txt", "unknown_category")]
    r = CliRunner().invoke(main, ["data", "check", str(root)])
    assert r.exit_code == 1 and "a.txt" in r.output and "unknown_category" in r.output


def test_check_hit_uav_subset_is_clean_and_finds_planted_damage(tmp_path: Path) -> None:
    if not HIT_UAV.is_dir():
        pytest.skip(f"HIT-UAV data not found at {HIT_UAV} (the tests expect ../shared/data/hit-uav)")
    raw = json.loads((HIT_UAV / "annotations" / "val.json").read_text())
    images = raw["images"][:20]
    ids = {i["id"] for i in images}
    sub = dict(raw, images=images, annotation=[a for a in raw["annotation"] if a["image_id"] in ids])
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val").mkdir()
    for i in images:
        shutil.copyfile(HIT_UAV / "val" / i["filename"], tmp_path / "val" / i["filename"])
    (tmp_path / "annotations" / "val.json").write_text(json.dumps(sub))
    assert check_dataset(tmp_path / "annotations" / "val.json") == []  # images found in ../val

    victim = tmp_path / "val" / images[3]["filename"]
    victim.write_bytes(victim.read_bytes()[:5000])
    (tmp_path / "val" / images[7]["filename"]).unlink()
    problems = check_dataset(tmp_path / "annotations" / "val.json")
    assert sorted((Path(p.file).name, p.kind) for p in problems) == sorted(
        [(images[3]["filename"], "truncated"), (images[7]["filename"], "missing")]
    )
