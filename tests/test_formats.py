"""Annotation formats: HIT-UAV, COCO, YOLO, Pascal VOC readers/writers, detection and conversion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from sslrecipe.cli import main
from sslrecipe.data.formats import (
    convert,
    detect_format,
    ignore_regions,
    load_labeled,
    read_hit_uav,
    read_voc,
    read_yolo,
    write_coco,
    write_yolo,
)
from sslrecipe.errors import DataError

HIT_UAV = Path(__file__).parents[1].parent / "shared/data/hit-uav"


@pytest.fixture
def hit() -> Path:
    if not HIT_UAV.is_dir():
        pytest.skip(f"HIT-UAV data not found at {HIT_UAV} (the tests expect ../shared/data/hit-uav)")
    return HIT_UAV


def _hit_subset(hit: Path, tmp: Path, n: int = 20, split: str = "train") -> Path:
    """A HIT-UAV-format JSON with the first n images that have a DontCare box or other boxes."""
    raw = json.loads((hit / "annotations" / f"{split}.json").read_text())
    dontcare_images = {a["image_id"] for a in raw["annotation"] if a["category_id"] == 4}
    ordered = [i for i in raw["images"] if i["id"] in dontcare_images][:5]
    ordered += [i for i in raw["images"] if i["id"] not in dontcare_images][: n - len(ordered)]
    ids = {i["id"] for i in ordered}
    sub = dict(raw, images=ordered, annotation=[a for a in raw["annotation"] if a["image_id"] in ids])
    out = tmp / "annotations" / f"{split}.json"
    out.parent.mkdir(parents=True)
    out.write_text(json.dumps(sub))
    return out


def _boxes_by_file(coco: dict) -> dict[str, list[tuple]]:
    names = {i["id"]: i["file_name"] for i in coco["images"]}
    cat = {c["id"]: c["name"] for c in coco["categories"]}
    out: dict[str, list[tuple]] = {n: [] for n in names.values()}
    for a in coco["annotations"]:
        if a.get("iscrowd", 0) or a.get("ignore", 0):
            continue
        out[names[a["image_id"]]].append((cat[a["category_id"]],) + tuple(float(v) for v in a["bbox"]))
    return {k: sorted(v) for k, v in out.items()}


def _assert_same_boxes(a: dict, b: dict, tol: float) -> None:
    ba, bb = _boxes_by_file(a), _boxes_by_file(b)
    assert set(Path(k).name for k in ba) == set(Path(k).name for k in bb)
    bb = {Path(k).name: v for k, v in bb.items()}
    for name, boxes in ba.items():
        other = bb[Path(name).name]
        assert len(boxes) == len(other), name
        remaining = list(other)
        for x in boxes:  # each box has its own counterpart (same class, every coordinate within tol)
            match = [y for y in remaining if y[0] == x[0] and np.allclose(x[1:], y[1:], rtol=0, atol=tol)]
            assert match, (name, x, remaining)
            remaining.remove(match[0])


# --------------------------------------------------------------------------- HIT-UAV


def test_hit_uav_to_coco_keeps_every_box_and_dontcare_as_ignore(hit: Path) -> None:
    raw = json.loads((hit / "annotations" / "train.json").read_text())
    coco, root = load_labeled(hit / "annotations" / "train.json")
    assert detect_format(hit / "annotations" / "train.json") == "hit-uav"
    assert root == hit / "train"  # annotations/train.json -> train/

    names = {c["id"]: c["name"] for c in raw["categories"]}
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "Person"), (2, "Car"), (3, "Bicycle"), (4, "OtherVehicle")]
    assert all("file_name" in i for i in coco["images"]) and len(coco["images"]) == len(raw["images"])
    assert {i["id"] for i in coco["images"]} == {i["id"] + 1 for i in raw["images"]}

    by_id = {a["id"]: a for a in coco["annotations"] if not a.get("iscrowd")}
    kept = [a for a in raw["annotation"] if names[a["category_id"]] != "DontCare"]
    assert len(by_id) == len(kept)
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    for a in kept:
        b = by_id[a["id"] + 1]
        assert b["bbox"] == a["bbox"]  # exactly
        assert b["image_id"] == a["image_id"] + 1
        assert cats[b["category_id"]] == names[a["category_id"]]

    dontcare = [a for a in raw["annotation"] if names[a["category_id"]] == "DontCare"]
    assert len(dontcare) == 36
    regions = ignore_regions(coco)
    assert sorted((i, tuple(b)) for i, b in regions) == sorted((a["image_id"] + 1, tuple(map(float, a["bbox"]))) for a in dontcare)
    crowd = [a for a in coco["annotations"] if a.get("iscrowd")]
    assert len(crowd) == len(dontcare) * 4  # one copy per class: ignored whatever class a detection has
    assert all(a["ignore"] == 1 and a["category_id"] in cats for a in crowd)


def test_hit_uav_convert_cli_to_coco_and_yolo(hit: Path, tmp_path: Path) -> None:
    src = _hit_subset(hit, tmp_path / "src")
    runner = CliRunner()
    out_json = tmp_path / "out" / "train.json"
    r = runner.invoke(main, ["data", "convert", str(src), str(out_json), "--from", "hit-uav", "--to", "coco",
                             "--images", str(hit / "train")])
    assert r.exit_code == 0, r.output
    assert "ignore region" in r.output
    written = json.loads(out_json.read_text())
    assert "annotation" not in written and written["annotations"]
    # the written COCO file finds its images again through info.image_root
    coco, root = load_labeled(out_json)
    assert detect_format(out_json) == "coco"
    assert root.resolve() == (hit / "train").resolve()
    original = read_hit_uav(src)
    _assert_same_boxes(original, coco, tol=0)
    assert len(ignore_regions(coco)) == len(ignore_regions(original)) > 0

    r = runner.invoke(main, ["data", "convert", str(src), str(tmp_path / "yolo"), "--to", "yolo",
                             "--images", str(hit / "train"), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["images"] == 20 and summary["ignore_left_out"] == 4 * summary["ignore_regions"]
    back, _ = load_labeled(tmp_path / "yolo")
    _assert_same_boxes(original, back, tol=0.5)


# --------------------------------------------------------------------------- COCO <-> YOLO


def _coco_fixture(tmp: Path) -> tuple[dict, Path]:
    img_dir = tmp / "imgs"
    (img_dir / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70), dtype=np.uint8)).save(img_dir / "a.png")
    Image.fromarray(rng.integers(0, 255, (61, 83, 3), dtype=np.uint8)).save(img_dir / "sub" / "b.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(img_dir / "c.png")
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 70, "height": 50},
            {"id": 2, "file_name": "sub/b.jpg", "width": 83, "height": 61},
            {"id": 3, "file_name": "c.png", "width": 40, "height": 40},
        ],
        "categories": [{"id": 3, "name": "car"}, {"id": 7, "name": "person"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [0.0, 0.0, 12.25, 7.5], "area": 91.875, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [63.3, 44.1, 6.7, 5.9], "area": 39.53, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 7, "bbox": [10.4, 20.6, 3.3, 2.2], "area": 7.26, "iscrowd": 0},
            {"id": 4, "image_id": 2, "category_id": 3, "bbox": [40, 30, 43, 31], "area": 1333, "iscrowd": 0},
            {"id": 5, "image_id": 2, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 1},
        ],
    }
    return coco, img_dir


def test_coco_yolo_coco_round_trip_within_half_pixel(tmp_path: Path) -> None:
    coco, img_dir = _coco_fixture(tmp_path)
    ann = write_coco(coco, tmp_path / "ann" / "instances.json", image_root=img_dir)
    summary = convert(ann, tmp_path / "yolo", to="yolo")
    assert summary["boxes"] == 4 and summary["ignore_left_out"] == 1
    data = yaml.safe_load((tmp_path / "yolo" / "data.yaml").read_text())
    assert data["names"] == {0: "car", 1: "person"} and data["train"] == "images/train"
    assert (tmp_path / "yolo" / "images" / "train" / "sub" / "b.jpg").is_file()
    assert (tmp_path / "yolo" / "labels" / "train" / "c.txt").read_text() == ""  # an image without boxes

    back, root = read_yolo(tmp_path / "yolo" / "data.yaml")
    assert [c["name"] for c in back["categories"]] == ["car", "person"]
    _assert_same_boxes(coco, back, tol=0.5)
    # and on to COCO again through the CLI
    r = CliRunner().invoke(main, ["data", "convert", str(tmp_path / "yolo"), str(tmp_path / "again.json"), "--from", "yolo"])
    assert r.exit_code == 0, r.output
    again, again_root = load_labeled(tmp_path / "again.json")
    _assert_same_boxes(coco, again, tol=0.5)
    assert all((again_root / i["file_name"]).is_file() for i in again["images"])


def test_yolo_coco_yolo_round_trip_keeps_labels(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    lines = {"x1": ["0 0.5 0.5 0.2 0.1", "1 0.123456 0.654321 0.05 0.075"], "x2": ["1 0.9 0.1 0.2 0.2"], "x3": []}
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
    for name, ls in lines.items():
        Image.fromarray(np.zeros((120, 160), dtype=np.uint8)).save(root / "images" / "train" / f"{name}.png")
        if ls:
            (root / "labels" / "train" / f"{name}.txt").write_text("\n".join(ls) + "\n")
    Image.fromarray(np.zeros((100, 100), dtype=np.uint8)).save(root / "images" / "val" / "v.png")
    (root / "labels" / "val" / "v.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (root / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "val": "images/val", "names": ["car", "person"]}))

    coco, img_root = load_labeled(root)  # auto: the folder holds a dataset YAML
    assert len(coco["images"]) == 3 and len(coco["annotations"]) == 3
    val, _ = load_labeled(root / "data.yaml", split="val")
    assert len(val["images"]) == 1 and val["annotations"][0]["bbox"] == [25.0, 25.0, 50.0, 50.0]
    out = write_yolo(coco, img_root, tmp_path / "out")
    assert out["boxes"] == 3
    for name, ls in lines.items():
        written = (tmp_path / "out" / "labels" / "train" / f"{name}.txt").read_text().split("\n")
        written = [w for w in written if w]
        assert len(written) == len(ls)
        for a, b in zip(ls, written):
            va, vb = np.array(a.split(), dtype=float), np.array(b.split(), dtype=float)
            assert va[0] == vb[0]
            assert np.allclose(va[1:] * [160, 120, 160, 120], vb[1:] * [160, 120, 160, 120], atol=0.5)


def test_yolo_reader_details(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    Image.fromarray(np.zeros((100, 200), dtype=np.uint8)).save(root / "images" / "p.png")
    Image.fromarray(np.zeros((100, 200), dtype=np.uint8)).save(root / "images" / "q.png")
    # a polygon line gives its bounding box; DontCare in names becomes an ignore region
    (root / "labels" / "p.txt").write_text("0 0.1 0.1 0.3 0.1 0.3 0.5 0.1 0.5\n2 0.5 0.5 0.1 0.1\n")
    (root / "labels" / "q.txt").write_text("1 0.5 0.5 0.2 0.2\n")
    (root / "classes.txt").write_text("car\nperson\nDontCare\n")
    assert detect_format(root) == "yolo"
    coco, _ = read_yolo(root)
    assert [c["name"] for c in coco["categories"]] == ["car", "person"]
    boxes = _boxes_by_file(coco)
    assert np.allclose(boxes["p.png"][0][1:], [20, 10, 40, 40])
    assert len(ignore_regions(coco)) == 1
    # a class index past the names is an error (strict) or a problem (check mode)
    (root / "labels" / "q.txt").write_text("5 0.5 0.5 0.2 0.2\nnot numbers\n")
    with pytest.raises(DataError, match="malformed"):
        read_yolo(root)
    problems: list = []
    read_yolo(root, problems=problems)
    assert {p.kind for p in problems} == {"unknown_category", "label_format"}
    assert all(p.file.endswith("q.txt") for p in problems)


# --------------------------------------------------------------------------- Pascal VOC


def _voc_xml(filename: str, w: int, h: int, objects: list[tuple]) -> str:
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for n, x0, y0, x1, y1, d in objects
    )
    return f"<annotation><filename>{filename}</filename><size><width>{w}</width><height>{h}</height><depth>1</depth></size>{objs}</annotation>"


def test_voc_reader(tmp_path: Path) -> None:
    root = tmp_path / "VOC"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for name in ("000001", "000002"):
        Image.fromarray(np.zeros((80, 100, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
    (root / "Annotations" / "000001.xml").write_text(
        _voc_xml("000001.jpg", 100, 80, [("person", 11, 21, 30, 40, 0), ("car", 1, 1, 100, 80, 1), ("DontCare", 50, 50, 59, 59, 0)])
    )
    (root / "Annotations" / "000002.xml").write_text(_voc_xml("000002.jpg", 100, 80, [("car", 5, 6, 7, 8, 0)]))
    (root / "ImageSets" / "Main" / "val.txt").write_text("000002\n")
    assert detect_format(root) == "voc"
    coco, img_root = load_labeled(root)
    assert img_root == root / "JPEGImages"
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "car"), (2, "person")]
    anns = sorted(coco["annotations"], key=lambda a: a["id"])
    person = next(a for a in anns if a["category_id"] == 2)
    assert person["bbox"] == [10.0, 20.0, 20.0, 20.0]  # 1-based inclusive corners
    difficult = next(a for a in anns if a.get("difficult"))
    assert difficult["iscrowd"] == 1 and difficult["bbox"] == [0.0, 0.0, 100.0, 80.0]
    assert len(ignore_regions(coco)) == 2  # the difficult car and the DontCare region
    val, _ = read_voc(root, split="val")
    assert [i["file_name"] for i in val["images"]] == ["000002.jpg"]
    cont, _ = read_voc(root / "Annotations" / "000002.xml", images=root / "JPEGImages", one_based=False)
    assert cont["annotations"][0]["bbox"] == [5.0, 6.0, 2.0, 2.0]


# --------------------------------------------------------------------------- detection and errors


def test_detect_format_and_errors(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [], "categories": []}))
    (tmp_path / "h.json").write_text(json.dumps({"images": [{"id": 0, "filename": "a.jpg"}], "annotation": [], "categories": []}))
    (tmp_path / "x.json").write_text(json.dumps({"hello": 1}))
    (tmp_path / "bad.json").write_text("{not json")
    assert detect_format(tmp_path / "c.json") == "coco"
    assert detect_format(tmp_path / "h.json") == "hit-uav"
    for name in ("x.json", "bad.json"):
        with pytest.raises(DataError):
            detect_format(tmp_path / name)
    with pytest.raises(DataError, match="invalid JSON"):
        load_labeled(tmp_path / "bad.json", format="coco")
    with pytest.raises(DataError, match="not found"):
        load_labeled(tmp_path / "nope.json")
    with pytest.raises(DataError, match="cannot find the images"):
        load_labeled(tmp_path / "c.json")
    coco, root = load_labeled(tmp_path / "c.json", images=tmp_path)  # --images overrides the search
    assert root == tmp_path and coco["images"][0]["file_name"] == "a.jpg"
    r = CliRunner().invoke(main, ["data", "convert", str(tmp_path / "x.json"), str(tmp_path / "o.json")])
    assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output


def test_dontcare_regions_ignore_detections_of_every_class_in_cocoeval(tmp_path: Path) -> None:
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    raw = {
        "images": [{"id": 0, "filename": "f.jpg", "width": 200, "height": 200}],
        "categories": [{"id": 0, "name": "Person"}, {"id": 1, "name": "Car"}, {"id": 4, "name": "DontCare"}],
        "annotation": [
            {"id": 0, "image_id": 0, "category_id": 0, "bbox": [10, 10, 10, 20], "area": 200},
            {"id": 1, "image_id": 0, "category_id": 1, "bbox": [50, 50, 30, 20], "area": 600},
            {"id": 2, "image_id": 0, "category_id": 4, "bbox": [120, 120, 60, 60], "area": 3600},
        ],
    }
    (tmp_path / "h.json").write_text(json.dumps(raw))
    gt = read_hit_uav(tmp_path / "h.json")
    dets = [  # the true objects, and higher-scoring detections of both classes inside the DontCare region
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 10, 20], "score": 0.5},
        {"image_id": 1, "category_id": 2, "bbox": [50, 50, 30, 20], "score": 0.5},
        {"image_id": 1, "category_id": 1, "bbox": [130, 130, 10, 20], "score": 0.9},
        {"image_id": 1, "category_id": 2, "bbox": [140, 150, 20, 12], "score": 0.9},
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[1] == pytest.approx(1.0)  # AP50: the detections in the region are not false positives
