"""The data stage on real and broken inputs: HIT-UAV as shipped, leakage into the pre-training pool,
broken labeled data, and 16-bit thermal normalization."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sslrecipe.cli import main
from sslrecipe.data.synth import generate_synthetic

TINY = Path(__file__).with_name("tiny.yaml")


def run(*args):
    return CliRunner().invoke(main, ["run", str(TINY), *args])


def test_hit_uav_in_its_own_format_runs_few_shot(tmp_path, hit_uav):
    res = run(
        "--run-dir", str(tmp_path / "r"), "--until", "finetune",
        "--set", f"data={{train: {{annotations: {hit_uav}/annotations/train.json, images: {hit_uav}/train, format: hit-uav}}, "
        f"val: {{annotations: {hit_uav}/annotations/val.json, images: {hit_uav}/val}}, test: null, shots: 5}}",
        "--set", "evaluate.split=val", "--set", "backbone.in_chans=3", "--set", "finetune.steps=2",
    )
    assert res.exit_code == 0, res.output
    [data_dir] = (tmp_path / "r").glob("data-*")
    shots = json.loads((data_dir / "shots.json").read_text())
    assert len(shots["image_ids"]) == 5
    val = json.loads((data_dir / "val.json").read_text())
    names = {c["name"] for c in val["categories"]}
    assert "DontCare" not in names and {"Person", "Car"} <= names
    ignore = [a for a in val["annotations"] if a.get("iscrowd")]
    assert ignore, "DontCare regions must survive as ignore regions"
    assert (tmp_path / "r").glob("finetune-*/detector.safetensors")


def test_pool_holding_a_test_image_stops_with_leak(tmp_path):
    ann = generate_synthetic(tmp_path / "labeled", images=12, width=128, height=96, seed=3, objects_per_image=(2, 3))
    coco = json.loads(ann.read_text())
    pool = tmp_path / "pool"
    generate_synthetic(tmp_path / "other", images=6, width=128, height=96, seed=99)
    shutil.copytree(tmp_path / "other" / "images", pool)
    test_coco = {**coco, "images": coco["images"][8:], "annotations": [a for a in coco["annotations"] if a["image_id"] in {i["id"] for i in coco["images"][8:]}]}
    (tmp_path / "test.json").write_text(json.dumps(test_coco))
    planted = ann.parent / "images" / coco["images"][9]["file_name"]
    Image.open(planted).save(pool / "planted_copy.jpg", quality=60)
    data = (f"{{train: {{annotations: {ann}, images: {ann.parent / 'images'}}}, test: {{annotations: {tmp_path / 'test.json'}, "
            f"images: {ann.parent / 'images'}}}, unlabeled: {pool}}}")
    res = run("--run-dir", str(tmp_path / "r"), "--until", "data", "--set", f"data={data}",
              "--set", "weights={source: pretrain}", "--set", "pretrain.method=resim")
    assert res.exit_code == 2
    assert "leak" in res.output and "planted_copy.jpg" in res.output and "allow_leakage" in res.output


def test_broken_labeled_data_stops_with_the_list_or_is_skipped(tmp_path):
    ann = generate_synthetic(tmp_path / "d", images=10, width=128, height=96, seed=1, objects_per_image=(2, 3))
    coco = json.loads(ann.read_text())
    coco["annotations"][0]["bbox"] = [120, 90, 50, 50]  # outside the 128x96 image
    (ann.parent / "images" / coco["images"][3]["file_name"]).write_bytes(b"not a png")
    ann.write_text(json.dumps(coco))
    data = f"data={{train: {{annotations: {ann}, images: {ann.parent / 'images'}}}}}"
    res = run("--run-dir", str(tmp_path / "r"), "--until", "data", "--set", data)
    assert res.exit_code == 2
    assert coco["images"][3]["file_name"] in res.output and "skip_invalid" in res.output
    res = run("--run-dir", str(tmp_path / "r2"), "--until", "data", "--set", data, "--set", "data.skip_invalid=true")
    assert res.exit_code == 0, res.output
    [data_dir] = (tmp_path / "r2").glob("data-*")
    kept = sum(json.loads((data_dir / f"{s}.json").read_text())["images"].__len__() for s in ("train", "val", "test"))
    assert kept == 9


def test_16bit_thermal_is_normalized_by_dataset_statistics(tmp_path):
    ann = generate_synthetic(tmp_path / "d", images=10, width=128, height=96, seed=2, bit_depth=16)
    # squeeze the 16-bit range into a narrow band, like raw radiometric counts
    for png in (ann.parent / "images").glob("*.png"):
        arr = np.asarray(Image.open(png), dtype=np.float64)
        Image.fromarray((20000 + arr / 65535 * 3000).astype(np.uint16)).save(png)
    data = f"data={{train: {{annotations: {ann}, images: {ann.parent / 'images'}}}}}"
    res = run("--run-dir", str(tmp_path / "r"), "--until", "data", "--set", data)
    assert res.exit_code == 0, res.output
    [data_dir] = (tmp_path / "r").glob("data-*")
    norm = json.loads((data_dir / "data.json").read_text())["normalization"]
    assert norm is not None
    from sslrecipe.data.coco import DetectionDataset, load_coco

    ds = DetectionDataset(load_coco(data_dir / "train.json"), ann.parent / "images", 1, normalize=norm)
    image, _ = ds[0]
    assert image.max() > 0.9 and image.min() < 0.1  # stretched to the full range, not a sliver near 0.3
