"""`sslrecipe export`: the fine-tuned Faster R-CNN as ONNX and as a torch.export program, run without sslrecipe.

A tiny run (tests/tiny.yaml with a measured dataset normalisation) is exported; a subprocess that cannot import
sslrecipe reads HIT-UAV images with Pillow and numpy, prepares them as the export's JSON says, runs the file
(onnxruntime alone; torch + torchvision for .pt2) and its boxes and scores are compared with the PyTorch model's.
Tolerance: boxes within 0.01 px, scores within 1e-4 (float32 kernels of different libraries).
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import sslrecipe
from sslrecipe.cli import main
from sslrecipe.engine.runner import run_recipe

TINY = Path(__file__).with_name("tiny.yaml")
BOX_TOL, SCORE_TOL = 1e-2, 1e-4

# what a user's program does with the export's JSON: no sslrecipe, only numpy + Pillow (+ the runtime)
STANDALONE = r'''
import json, sys
sys.modules["sslrecipe"] = None  # importing sslrecipe fails here: the file must run without it
import numpy as np
from PIL import Image

model_file, images, out = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
meta = json.load(open(model_file + ".json"))

def prepare(path):
    with Image.open(path) as im:
        arr = np.asarray(im)
    arr = arr.astype(np.float32) / (65535.0 if arr.dtype == np.uint16 else 255.0)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    norm = meta["data_normalization"]
    if norm is not None:  # the data's percentiles -> 0..1, clipped
        lo, hi = np.asarray(norm["low"], np.float32), np.asarray(norm["high"], np.float32)
        if arr.shape[2] != lo.size:
            lo, hi = (lo.mean(keepdims=True), hi.mean(keepdims=True)) if arr.shape[2] == 1 else (lo, hi)
        arr = np.clip((arr - lo) / np.maximum(hi - lo, 1e-12), 0.0, 1.0)
    c = meta["input"]["channels"]
    if arr.shape[2] == 3 and c == 1:
        arr = arr.mean(axis=2, keepdims=True)
    elif arr.shape[2] == 1 and c == 3:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)

results = {}
if meta["format"] == "onnx":
    import onnxruntime as ort
    assert "torch" not in sys.modules
    session = ort.InferenceSession(model_file, providers=["CPUExecutionProvider"])
    run = lambda x: session.run(None, {"image": x})
else:
    import torch, torchvision  # torchvision registers the nms / roi_align kernels the program calls
    program = torch.export.load(model_file).module()
    run = lambda x: [t.detach().numpy() for t in program(torch.from_numpy(x))]
for i, path in enumerate(images):
    boxes, scores, labels = run(prepare(path))
    results[f"boxes{i}"], results[f"scores{i}"], results[f"labels{i}"] = boxes, scores, labels
np.savez(out, **results)
'''


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("export") / "run"
    run_recipe(TINY, ["data.normalize.mode=dataset"], run_dir=run_dir, until="finetune", progress="plain")
    return run_dir


def _cli(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_export_runs_without_sslrecipe_and_agrees(tiny_run, hit_uav, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="the test extra installs onnxruntime: pip install -e '.[test]'")
        pytest.importorskip("onnxscript", reason="the test extra installs onnxscript: pip install -e '.[test]'")
    out = tmp_path / f"detector.{fmt}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = _cli("export", tiny_run, "--format", fmt, "--out", out)
    assert res.exit_code == 0, res.output
    assert res.output.strip().endswith(str(out)) and out.is_file()
    if fmt == "pt2":  # the PyTorch-native format comes without deprecation warnings (TorchScript would not)
        assert not [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))], \
            [str(w.message) for w in caught]
    meta = json.loads(out.with_name(out.name + ".json").read_text())
    assert meta["data_normalization"]["method"] == "percentile" and meta["input"]["channels"] == 1

    images = sorted((hit_uav / "val").glob("*.jpg"))[:3]
    result = tmp_path / "standalone.npz"
    script = tmp_path / "standalone.py"
    script.write_text(STANDALONE)
    proc = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", str(script), str(out),
                           *map(str, images), str(result)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(result)

    detector = sslrecipe.load_detector(tiny_run)
    for i, path in enumerate(images):
        with torch.inference_mode():
            ref = detector.model([detector.prepare(path)])[0]
        assert got[f"boxes{i}"].shape == tuple(ref["boxes"].shape) and len(ref["scores"]) > 0
        np.testing.assert_allclose(got[f"scores{i}"], ref["scores"].numpy(), atol=SCORE_TOL)  # same ranking
        _assert_same_detections(ref, got[f"boxes{i}"], got[f"scores{i}"], got[f"labels{i}"], path.name)


def _assert_same_detections(ref, boxes, scores, labels, name) -> None:
    """Every PyTorch detection has its own counterpart in the export (same label, score and box within the
    tolerance); detections with equal scores may come in another order."""
    used = np.zeros(len(scores), dtype=bool)
    for box, score, label in zip(ref["boxes"].numpy(), ref["scores"].numpy(), ref["labels"].numpy()):
        close = (~used & (labels == label) & (np.abs(scores - score) <= SCORE_TOL)
                 & (np.abs(boxes - box).max(axis=1) <= BOX_TOL))
        assert close.any(), f"{name}: no exported detection matches {label} {score:.5f} {box}"
        used[np.argmax(close)] = True


def test_export_refuses_what_it_cannot(tiny_run, tmp_path):
    res = _cli("export", tiny_run, "--format", "torchscript")
    assert res.exit_code == 2 and "onnx" in res.output
    res = _cli("export", tmp_path, "--format", "pt2")
    assert res.exit_code == 2 and "neither a run directory" in res.output
    help_text = _cli("--help").output
    assert "encoder export" in help_text and "ONNX / .pt2" in help_text


def test_mask_rcnn_export_is_refused_with_the_reason():
    from types import SimpleNamespace

    from sslrecipe.detect.export import export_program
    from sslrecipe.errors import SSLRecipeError

    with pytest.raises(SSLRecipeError, match="mask_rcnn .*loop over detections"):
        export_program(SimpleNamespace(spec={"detector": "mask_rcnn"}))
