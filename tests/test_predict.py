"""`sslrecipe predict` and `sslrecipe.load_detector(path).predict(images)` on a tiny fine-tuned detector.

The tiny run (tests/tiny.yaml, 16-bit synthetic thermal frames, so the data stage measures a dataset normalisation)
stops after fine-tuning; predict must read new images exactly as training read them and keep going past a broken
one.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import sslrecipe
from sslrecipe.cli import main
from sslrecipe.engine.runner import run_recipe

TINY = Path(__file__).with_name("tiny.yaml")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("predict") / "run"
    run_recipe(TINY, ["data.synthetic.bit_depth=16"], run_dir=run_dir, until="finetune", progress="plain")
    return run_dir


def cli(*args) -> "object":
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    return res


def _mixed_folder(root: Path, run_dir: Path) -> Path:
    """A folder (with a subfolder) of: a training frame (16-bit, 1 channel), an 8-bit grey, an 8-bit RGB image
    and a broken PNG."""
    folder = root / "mixed"
    (folder / "sub").mkdir(parents=True)
    [train] = run_dir.glob("data-*/synthetic/images")
    frame = sorted(train.iterdir())[0]
    (folder / "thermal16.png").write_bytes(frame.read_bytes())
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 128), dtype=np.uint8), "L").save(folder / "grey8.png")
    Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8), "RGB").save(folder / "sub" / "rgb.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return folder


def test_detector_json_records_what_predict_needs(tiny_run):
    [spec_file] = tiny_run.glob("finetune-*/detector.json")
    spec = json.loads(spec_file.read_text())
    assert spec["data_normalization"]["method"] == "percentile"  # 16-bit data: the dataset's percentiles
    [data_dir] = tiny_run.glob("data-*")
    categories = json.loads((data_dir / "data.json").read_text())["categories"]
    assert spec["categories"] == [{"id": c["id"], "name": c["name"]} for c in sorted(categories, key=lambda c: c["id"])]
    assert spec["in_chans"] == 1 and spec["img_size"] == 128


def test_library_predict_reads_images_as_training_did(tiny_run):
    from sslrecipe.data.coco import DetectionDataset, load_coco

    detector = sslrecipe.load_detector(tiny_run)
    assert detector.directory.name.startswith("finetune-")
    [data_dir] = tiny_run.glob("data-*")
    manifest = json.loads((data_dir / "data.json").read_text())
    entry = manifest["splits"]["test"]
    coco = load_coco(data_dir / entry["annotations"])
    dataset = DetectionDataset(coco, entry["image_root"], 1, normalize=manifest["normalization"])
    path = dataset.image_path(0)
    # the same tensor the evaluate stage feeds the model
    assert torch.equal(detector.prepare(path), dataset[0][0])

    [pred] = detector.predict(path, score=0.0, max_dets=7)
    assert len(pred) == 7 and pred.boxes.shape == (7, 4)
    assert list(pred.scores) == sorted(pred.scores, reverse=True)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert all(names[int(cid)] == name for cid, name in zip(pred.category_ids, pred.names))
    assert (pred.width, pred.height) == (coco["images"][0]["width"], coco["images"][0]["height"])
    # a detector directory stands alone: copied away from its run, it predicts the same
    alone = tiny_run.parent / "alone"
    alone.mkdir()
    for f in ("detector.json", "detector.safetensors"):
        (alone / f).write_bytes((detector.directory / f).read_bytes())
    [again] = sslrecipe.load_detector(alone).predict([path], score=0.0, max_dets=7)
    np.testing.assert_allclose(again.boxes, pred.boxes, atol=1e-4)
    # tiled inference runs through the same call
    [tiled] = detector.predict([path], score=0.0, tile=64, overlap=0.25, max_dets=5)
    assert len(tiled) == 5


def test_predict_cli_folder_with_broken_image(tiny_run, tmp_path):
    folder = _mixed_folder(tmp_path, tiny_run)
    out = tmp_path / "out"
    res = cli("predict", tiny_run, folder, "--out", out, "--score", "0.0", "--max-dets", "5")
    assert res.exit_code == 1, res.output  # one input skipped
    assert "broken.png" in res.output and "skipped" in res.output
    doc = json.loads((out / "detections.json").read_text())
    assert [im["file_name"] for im in doc["images"]] == ["grey8.png", "sub/rgb.jpg", "thermal16.png"]
    assert [s["path"] for s in doc["skipped"]] == [str(folder / "broken.png")]
    assert {(im["width"], im["height"]) for im in doc["images"]} == {(128, 96), (100, 80)}
    assert len(doc["annotations"]) == 15 and all(a["score"] >= 0 and len(a["bbox"]) == 4 for a in doc["annotations"])
    ids = {c["id"] for c in doc["categories"]}
    assert {a["category_id"] for a in doc["annotations"]} <= ids
    from pycocotools.coco import COCO

    assert len(COCO(str(out / "detections.json")).getAnnIds()) == 15  # a COCO file as it is
    rows = list(csv.DictReader((out / "counts.csv").open()))
    assert [r["file_name"] for r in rows] == ["grey8.png", "sub/rgb.jpg", "thermal16.png"]
    assert all(int(r["total"]) == 5 for r in rows)
    drawn = sorted(p.name for p in (out / "drawn").iterdir())
    assert drawn == ["grey8.png.jpg", "sub__rgb.jpg.jpg", "thermal16.png.jpg"]
    # the results of an earlier predict are not replaced without --overwrite
    again = cli("predict", tiny_run, folder / "grey8.png", "--out", out)
    assert again.exit_code == 2 and "--overwrite" in again.output
    ok = cli("predict", tiny_run, str(folder / "*.png"), "--out", out, "--overwrite", "--no-draw")
    assert ok.exit_code == 1  # the glob matches broken.png again
    assert len(json.loads((out / "detections.json").read_text())["images"]) == 2


def test_small_boxes_are_drawn_at_a_visible_size():
    from sslrecipe.detect.detector import Prediction
    from sslrecipe.detect.predict_files import draw_prediction, min_drawn_side

    pixels = np.zeros((200, 300, 3), dtype=np.uint8)
    pred = Prediction("x", 300, 200, np.array([[100, 100, 102, 102]], dtype=np.float32), np.array([0.9], np.float32),
                      np.array([1]), ["person"])
    im = np.asarray(draw_prediction(pixels, pred, ["person"]))
    lit_x = np.nonzero(im.any(axis=2).any(axis=0))[0]
    side = min_drawn_side(300, 200)
    assert lit_x.max() - lit_x.min() >= side  # a 2-pixel box is marked at least `side` pixels wide


def test_predict_video(tiny_run, tmp_path):
    av = pytest.importorskip("av", reason="PyAV (the `video` extra) is not installed: pip install av")
    video = tmp_path / "clip.mp4"
    rng = np.random.default_rng(0)
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        for _ in range(7):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    out = tmp_path / "out"
    res = cli("predict", tiny_run, video, "--out", out, "--video-stride", "3", "--score", "0", "--max-dets", "2")
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "detections.json").read_text())
    assert [im["frame"] for im in doc["images"]] == [0, 3, 6]
    assert [im["file_name"] for im in doc["images"]] == [f"clip.mp4/frame_{i:06d}" for i in (0, 3, 6)]
    assert all(im["video"] == str(video) for im in doc["images"])
    assert len(doc["annotations"]) == 6


def test_run_dir_without_finetune_and_missing_inputs(tiny_run, tmp_path):
    res = cli("predict", tmp_path / "nowhere", tmp_path)
    assert res.exit_code == 2 and "not found" in res.output
    res = cli("predict", tiny_run, tmp_path / "no-such-image.png")
    assert res.exit_code == 2 and "no-such-image.png: not found" in res.output


def test_older_detector_json_takes_its_inputs_from_the_run(tiny_run, tmp_path):
    """A detector.json written before the inputs were recorded: they come from the run's data stage; a lone copy
    of such a directory warns and scales by bit depth."""
    [new_dir] = tiny_run.glob("finetune-*")
    spec = json.loads((new_dir / "detector.json").read_text())
    old_spec = {k: v for k, v in spec.items() if k not in ("categories", "data_normalization")}
    old_dir = tiny_run / "finetune-older"
    old_dir.mkdir()
    (old_dir / "detector.json").write_text(json.dumps(old_spec))
    (old_dir / "detector.safetensors").write_bytes((new_dir / "detector.safetensors").read_bytes())
    old = sslrecipe.load_detector(old_dir)
    assert old.categories == spec["categories"] and old.data_normalization == spec["data_normalization"]
    lone = tmp_path / "lone"
    lone.mkdir()
    for f in ("detector.json", "detector.safetensors"):
        (lone / f).write_bytes((old_dir / f).read_bytes())
    warnings = []
    alone = sslrecipe.load_detector(lone, warn=warnings.append)
    assert alone.data_normalization is None and "bit depth" in warnings[0]
    assert alone.class_names == [str(c["id"]) for c in spec["categories"]]


def test_matrix_cell_finds_its_detector_in_the_shared_stages(tmp_path):
    """A cell's events name its stages under the matrix's stages/ (by the path the run was started with); a
    matrix directory itself asks for a cell."""
    from sslrecipe.detect.detector import resolve_detector_dir
    from sslrecipe.errors import SSLRecipeError

    matrix = tmp_path / "study"
    cell = matrix / "hybrid-shots25"
    cell.mkdir(parents=True)
    for name in ("finetune-aaa", "finetune-bbb"):
        (matrix / "stages" / name).mkdir(parents=True)
        (matrix / "stages" / name / "detector.json").write_text("{}")
    events = [{"event": "stage_start", "stage": "finetune", "dir": f"relative/elsewhere/stages/{n}"}
              for n in ("finetune-aaa", "finetune-bbb")]
    (cell / "events.jsonl").write_text("".join(json.dumps({"ts": 0, **e}) + "\n" for e in events))
    assert resolve_detector_dir(cell) == (matrix / "stages" / "finetune-bbb", cell)  # the newest
    with pytest.raises(SSLRecipeError, match="matrix with 1 cells; give one cell"):
        resolve_detector_dir(matrix)


def test_interrupted_predict_keeps_what_it_did(tiny_run, tmp_path):
    """Ctrl-C during predict: the images done are written (detections.json says it was interrupted)."""
    from sslrecipe.detect.predict_files import collect_inputs, predict_files

    folder = _mixed_folder(tmp_path, tiny_run)
    detector = sslrecipe.load_detector(tiny_run)
    done = []

    def stop_after_two(name):
        done.append(name)
        if len(done) == 2:  # broken.png (skipped), then grey8.png
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict_files(detector, collect_inputs([str(folder)]), tmp_path / "out", score=0.0, max_dets=3,
                      on_item=stop_after_two)
    doc = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert done == ["broken.png", "grey8.png"] and doc["info"]["interrupted"] is True
    assert [im["file_name"] for im in doc["images"]] == ["grey8.png"] and len(doc["annotations"]) == 3
    assert [s["path"] for s in doc["skipped"]] == [str(folder / "broken.png")]
    assert (tmp_path / "out" / "counts.csv").read_text().count("\n") == 2  # header + the one image


def test_drawn_pixels_keep_the_grey_levels_of_raw_and_scaled_frames():
    """Video frames arrive as raw uint8, images as 0..1 floats: both draw with their own grey levels."""
    from sslrecipe.detect.predict_files import display_pixels

    raw = np.full((4, 4, 3), 128, dtype=np.uint8)
    scaled = np.full((4, 4, 1), 0.5, dtype=np.float32)
    assert display_pixels(raw, stretch=False).max() == 128
    assert display_pixels(scaled, stretch=False).max() == 128
