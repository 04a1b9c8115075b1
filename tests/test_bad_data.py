"""Bad data and bad weights files, as a user meets them on the command line: each case ends in one message that
names the file or key and what to do, the documented exit status, no traceback, and nothing lost on disk.

Data cases run `sslrecipe run tests/tiny.yaml --until data` on a few 64x64 images; weights cases run
`sslrecipe weights convert` on hand-made hostile safetensors files and `sslrecipe weights fetch` against a
local HTTP server (as in test_weights_fetch.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from sslrecipe.cli import main
from sslrecipe.data.synth import generate_synthetic

TINY = Path(__file__).with_name("tiny.yaml")
PRETRAIN = ("--set", "weights.source=pretrain", "--set", "pretrain.method=spark")


def cli(*args: str):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    return res


def run_data(run_dir: Path, data: str, *extra: str):
    return cli("run", TINY, "--run-dir", run_dir, "--until", "data", "--set", f"data={data}", *extra)


def data_dir(run_dir: Path) -> Path:
    [d] = run_dir.glob("data-*")
    return d


def split_files(run_dir: Path, split: str) -> list[str]:
    return [im["file_name"] for im in json.loads((data_dir(run_dir) / f"{split}.json").read_text())["images"]]


def events(run_dir: Path, name: str) -> list:
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [e["value"] for e in map(json.loads, lines) if e.get("event") == "metric" and e.get("name") == name]


def subset(ann: Path, keep, out: Path) -> Path:
    """A COCO file with the images of ``ann`` whose index is in ``keep``; ``out`` goes beside ``ann`` (its images/)."""
    coco = json.loads(ann.read_text())
    images = [im for i, im in enumerate(coco["images"]) if i in keep]
    ids = {im["id"] for im in images}
    out.write_text(json.dumps({**coco, "images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}))
    return out


def add_image(ann: Path, size: tuple[int, int], name: str) -> None:
    """Add a grey image of ``size`` (w, h) with one box to a COCO set."""
    coco = json.loads(ann.read_text())
    Image.new("L", size, 90).save(ann.parent / "images" / name)
    iid = max(im["id"] for im in coco["images"]) + 1
    coco["images"].append({"id": iid, "file_name": name, "width": size[0], "height": size[1]})
    coco["annotations"].append({"id": 10_000 + iid, "image_id": iid, "category_id": coco["categories"][0]["id"],
                                "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0})
    ann.write_text(json.dumps(coco))


@pytest.fixture
def lab(tmp_path) -> Path:
    """Six labeled 64x64 images: annotations.json beside images/."""
    return generate_synthetic(tmp_path / "lab", images=6, width=64, height=64, seed=5, objects_per_image=(1, 2))


def rows(*cases):
    """Parametrize rows named by their first value."""
    return [pytest.param(*c, id=c[0]) for c in cases]


def src(ann: Path) -> str:
    return f"{{annotations: {ann}, images: {ann.parent / 'images'}}}"


# --------------------------------------------------------------------------- which set each split comes from


@pytest.mark.parametrize("given, evaluated", [("test", "test"), ("val", "test"), ("val", "val")])
def test_a_split_given_beside_synthetic_wins(tmp_path, lab, given, evaluated):
    res = run_data(tmp_path / "r", f"{{synthetic: {{images: 16, width: 64, height: 64}}, {given}: {src(lab)}}}",
                   "--set", f"evaluate.split={evaluated}")
    assert res.exit_code == 0, res.output
    run = tmp_path / "r"
    assert split_files(run, given) == [f"synth_{i:06d}.png" for i in range(6)]
    manifest = json.loads((data_dir(run) / "data.json").read_text())["splits"]
    assert manifest[given]["image_root"] == str((lab.parent / "images").resolve())
    other = "val" if given == "test" else "test"
    # the 16 synthetic images fill train and the other split, 0.6:0.2 scaled to 0.75:0.25
    assert (manifest["train"]["images"], manifest[other]["images"]) == (12, 4)
    assert f"{given}: 6 images from data.{given} ({lab})" in res.output
    assert "train: 12 images from data.synthetic (75% of it)" in res.output
    [sources] = events(run, "data/sources")
    assert sources[given] == {"from": f"data.{given}", "file": str(lab), "images": 6}
    assert sources["train"]["from"] == "data.synthetic"


def test_synthetic_beside_a_given_train_set_is_said_to_be_unused(tmp_path, lab):
    res = run_data(tmp_path / "r", f"{{train: {src(lab)}, synthetic: {{images: 8, width: 64, height: 64}}}}")
    assert res.exit_code == 0, res.output
    assert "warning: data.synthetic is not used: data.train is given" in res.output
    assert not (data_dir(tmp_path / "r") / "synthetic").exists()  # nothing generated
    assert f"train: 4 images from data.train ({lab}, 60% of it)" in res.output


def test_the_leak_guard_compares_the_pool_with_the_given_test_set(tmp_path):
    # the given test set holds copies of the run's own synthetic images: the training share is pre-trained on
    copies = generate_synthetic(tmp_path / "copies", images=16, width=64, height=64, seed=0, objects_per_image=(2, 4))
    syn = "{images: 16, width: 64, height: 64, objects_per_image: [2, 4]}"
    res = run_data(tmp_path / "r", f"{{synthetic: {syn}, test: {src(copies)}}}", *PRETRAIN)
    assert res.exit_code == 2, res.output
    assert "leak: 12 training image(s)" in res.output and str(copies.parent / "images") in res.output
    assert "allow_leakage" in res.output
    assert not list(data_dir(tmp_path / "r").glob("data.json")) and not (data_dir(tmp_path / "r") / "done.json").exists()


def test_the_given_test_set_enters_the_data_and_pool_hashes(tmp_path, lab):
    from sslrecipe.engine.pipeline import stable_hash
    from sslrecipe.engine.stages import build_pipeline
    from sslrecipe.recipe import load_recipe

    test = subset(lab, range(6), lab.parent / "test.json")
    data = f"{{synthetic: {{images: 16, width: 64, height: 64}}, test: {src(test)}}}"
    assert run_data(tmp_path / "r", data).exit_code == 0
    subset(lab, range(4), test)  # the user edits the test set: the data stage runs again, beside the old one
    assert run_data(tmp_path / "r", data).exit_code == 0
    assert len(list((tmp_path / "r").glob("data-*/done.json"))) == 2

    stage = build_pipeline().by_name["pretrain"]
    alone = load_recipe(TINY, ["data.synthetic.images=16", "weights.source=pretrain", "pretrain.method=spark"])
    given = load_recipe(TINY, [f"data.test={src(test)}", "data.synthetic.images=16", "weights.source=pretrain",
                               "pretrain.method=spark"])
    # a given test set changes what the synthetic training share (the default pool) is
    assert stable_hash(stage.config(alone)) != stable_hash(stage.config(given))


# --------------------------------------------------------------------------- the default pool's leak guard


def test_default_pool_holding_test_images_stops_unless_allowed(tmp_path, lab):
    # train and test share two images: with data.unlabeled null they would be pre-trained on
    test = subset(lab, {0, 1}, lab.parent / "test.json")
    data = f"{{train: {src(lab)}, test: {src(test)}, unlabeled: null}}"
    res = run_data(tmp_path / "r", data, *PRETRAIN)
    assert res.exit_code == 2, res.output
    assert "leak: 2 training image(s) (the pre-training pool, as data.unlabeled is null)" in res.output
    assert "synth_000000.png" in res.output and "allow_leakage" in res.output
    assert not (data_dir(tmp_path / "r") / "done.json").exists()

    res = run_data(tmp_path / "r2", data, *PRETRAIN, "--set", "data.allow_leakage=true")
    assert res.exit_code == 0, res.output
    assert "warning: leak: 2 training image(s)" in res.output and "continuing" in res.output
    assert len((data_dir(tmp_path / "r2") / "unlabeled.txt").read_text().splitlines()) == 6


def test_default_pool_without_copies_passes(tmp_path, lab):
    test = generate_synthetic(tmp_path / "test", images=3, width=64, height=64, seed=77, objects_per_image=(1, 2))
    res = run_data(tmp_path / "r", f"{{train: {src(lab)}, test: {src(test)}}}", *PRETRAIN)
    assert res.exit_code == 0, res.output
    assert len((data_dir(tmp_path / "r") / "unlabeled.txt").read_text().splitlines()) == 6


# --------------------------------------------------------------------------- empty sets and degenerate images


def _empty(lab: Path, tmp_path: Path) -> Path:
    return subset(lab, (), lab.parent / "empty.json")


def _tiny_train(lab: Path, tmp_path: Path) -> Path:
    """A training set whose every image is 1x1."""
    folder = tmp_path / "ones"
    (folder / "images").mkdir(parents=True)
    coco = json.loads(lab.read_text())
    for im in coco["images"]:
        Image.new("L", (1, 1), 50).save(folder / "images" / im["file_name"])
        im["width"] = im["height"] = 1
    coco["annotations"] = []
    (folder / "annotations.json").write_text(json.dumps(coco))
    return folder / "annotations.json"


@pytest.mark.parametrize("case, data, extra, message", rows(
    ("empty train", "{{train: {empty}, test: {lab}}}", (), ["data.train: {empty_file} lists no images", "remove data.train"]),
    ("empty test", "{{train: {lab}, test: {empty}}}", (), ["data.test: {empty_file} lists no images"]),
    ("empty val beside synthetic", "{{synthetic: {{images: 8, width: 64, height: 64}}, val: {empty}}}", (),
     ["data.val: {empty_file} lists no images"]),
    ("split leaves no training image", "{{synthetic: {{images: 1, width: 64, height: 64}}, split: [0.1, 0.45, 0.45]}}",
     PRETRAIN, ["the training set, 10% of data.synthetic, has no images", "pre-training pool", "data.split"]),
    ("skip_invalid drops every training image", "{{train: {ones}, test: {lab}, skip_invalid: true}}", PRETRAIN,
     ["the training set, data.train ({ones_file}), has no images after data.skip_invalid dropped",
      "The pre-training pool, the training images (data.unlabeled is null), is empty too"]),
))
def test_empty_sets_are_named(tmp_path, lab, case, data, extra, message):
    empty, ones = _empty(lab, tmp_path), _tiny_train(lab, tmp_path)
    fill = {"lab": src(lab), "empty": src(empty), "ones": src(ones), "empty_file": empty, "ones_file": ones}
    res = run_data(tmp_path / "r", data.format(**fill), *extra, "--set", "evaluate.split=test")
    assert res.exit_code == 2, res.output
    for m in message:
        assert m.format(**fill) in res.output, res.output
    assert not list((tmp_path / "r").glob("data-*/done.json"))


@pytest.mark.parametrize("size", [(1, 1), (1, 40), (300, 2)])
def test_degenerate_labeled_image_is_reported_by_the_checks(tmp_path, lab, size):
    add_image(lab, size, "thin.png")
    test = generate_synthetic(tmp_path / "test", images=2, width=64, height=64, seed=9)
    data = f"{{train: {src(lab)}, test: {src(test)}}}"
    res = run_data(tmp_path / "r", data)
    assert res.exit_code == 2, res.output
    assert f"thin.png: too_small: the image is only {size[0]}x{size[1]} pixels" in res.output
    assert "skip_invalid" in res.output

    res = run_data(tmp_path / "r2", data, "--set", "data.skip_invalid=true")
    assert res.exit_code == 0, res.output
    assert "thin.png" not in split_files(tmp_path / "r2", "train") and len(split_files(tmp_path / "r2", "train")) == 6
    assert (lab.parent / "images" / "thin.png").exists()  # the user's file is left alone

    res = cli("data", "check", lab, "--images", lab.parent / "images")
    assert res.exit_code == 1 and "too_small" in res.output


def test_degenerate_pool_image_is_skipped_with_a_warning(tmp_path, lab):
    pool = tmp_path / "pool"
    shutil.copytree(generate_synthetic(tmp_path / "p", images=3, width=64, height=64, seed=11).parent / "images", pool)
    Image.new("L", (1, 1), 200).save(pool / "dot.png")
    Image.new("L", (500, 3), 200).save(pool / "line.png")
    res = run_data(tmp_path / "r", f"{{train: {src(lab)}, unlabeled: {pool}}}", *PRETRAIN)
    assert res.exit_code == 0, res.output
    assert f"unlabeled image skipped: {pool / 'dot.png'}: the image is only 1x1 pixels" in res.output
    assert "line.png: the image is only 500x3 pixels" in res.output
    kept = (data_dir(tmp_path / "r") / "unlabeled.txt").read_text().splitlines()
    assert len(kept) == 3 and not any(p.endswith(("dot.png", "line.png")) for p in kept)


def test_one_pixel_wide_image_flips_without_error(tmp_path, lab):
    """Outside the data stage (e.g. `sslrecipe eval`) a dataset may still meet one: the flip must not fail."""
    from sslrecipe.data.coco import DetectionDataset, load_coco

    add_image(lab, (1, 5), "one.png")
    ds = DetectionDataset(load_coco(lab), lab.parent / "images", 1, train=True)
    for seed in range(8):  # both sides of the coin
        image, target = ds[(len(ds) - 1, seed)]
        assert image.shape == (1, 5, 1) and target["boxes"].shape == (1, 4)


# --------------------------------------------------------------------------- weights convert: hostile files


def _safetensors(header, length=None, body=b"\0" * 16) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


def _truncated() -> bytes:
    from safetensors.torch import save

    data = save({"conv1.weight": torch.zeros(8, 3, 3, 3)})
    return data[:-40]


W = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


@pytest.mark.parametrize("case, data, message", rows(
    ("empty file", b"", "it is 0 bytes long"),
    ("shorter than the length field", b"\x05\x00", "it is 2 bytes long"),
    ("truncated", _truncated(), "outside the file's"),
    ("header length past the end", _safetensors({"w": W}, length=10_000), "header length field says 10000 bytes but only"),
    ("huge header length", _safetensors({"w": W}, length=2**63), "more than safetensors allows"),
    ("header not JSON", _safetensors(b"{nope"), "its header is not valid JSON"),
    ("header a JSON list", _safetensors(b"[1, 2, 3]"), "its header is a JSON list, not an object"),
    ("entry not an object", _safetensors({"w": "x"}), "tensor 'w' has no data_offsets"),
    ("offsets past the end", _safetensors({"w": {**W, "data_offsets": [0, 4096]}}), "data_offsets [0, 4096], outside"),
    ("offsets reversed", _safetensors({"w": {**W, "data_offsets": [16, 0]}}), "data_offsets [16, 0], outside"),
    ("shape overflows", _safetensors({"w": {**W, "shape": [2**40, 2**40]}}), "overflow"),
))
def test_convert_refuses_a_hostile_safetensors_file(tmp_path, monkeypatch, case, data, message):
    def no_unpickling(*a, **k):
        raise AssertionError("torch.load must not read a safetensors file")

    monkeypatch.setattr(torch, "load", no_unpickling)
    path = tmp_path / "encoder.safetensors"
    path.write_bytes(data)
    res = cli("weights", "convert", path, tmp_path / "out", "--backbone", "resnet18")
    assert res.exit_code == 2, res.output
    assert f"error: cannot read {path} as a safetensors file: " in res.output and message in res.output
    assert "download or copy it again" in res.output
    assert not (tmp_path / "out").exists() and path.read_bytes() == data


def test_convert_names_an_unknown_backbone_before_reading(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7)}, str(path))
    res = cli("weights", "convert", path, tmp_path / "out", "--backbone", "resnet18x")
    assert res.exit_code == 2 and "unknown timm backbone 'resnet18x'. Did you mean" in res.output
    assert not (tmp_path / "out").exists()


def test_convert_names_a_damaged_torch_file_without_calling_it_unsafe(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8)))
    res = cli("weights", "convert", path, tmp_path / "out", "--backbone", "resnet18")
    assert res.exit_code == 2 and f"cannot read {path} as a torch checkpoint" in res.output
    assert "arbitrary code" not in res.output


# --------------------------------------------------------------------------- weights fetch: a mistyped --sha256


@pytest.fixture
def server(tmp_path, monkeypatch):
    """An HTTP server on 127.0.0.1 serving one checkpoint at /w.pth, and the GET requests it answered."""
    monkeypatch.setenv("SSLRECIPE_CACHE", str(tmp_path / "cache"))
    for k in ("SSLRECIPE_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    body = os.urandom(3000)
    gets: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            gets.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/w.pth", body, gets
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("cached_first", [True, False])
def test_a_mistyped_sha256_keeps_a_verified_cached_copy(tmp_path, server, cached_first):
    url, body, gets = server
    good, typo = hashlib.sha256(body).hexdigest(), "0" * 63 + "1"
    if cached_first:
        assert cli("weights", "fetch", url, "--sha256", good).exit_code == 0
    res = cli("weights", "fetch", url, "--sha256", typo)
    assert res.exit_code == 2, res.output
    assert typo in res.output and good in res.output
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.name != "checksums.json"]
    if cached_first:  # the cached, verified copy is kept, and nothing is downloaded again
        assert "The cached copy was kept" in res.output and len(gets) == 1
        assert [p.read_bytes() for p in files] == [body]
        again = cli("weights", "fetch", url)
        assert again.exit_code == 0 and "verified" in again.output and len(gets) == 1
    else:  # a fresh download with the wrong checksum is rejected and removed
        assert "The download was deleted; nothing was cached" in res.output and files == []
