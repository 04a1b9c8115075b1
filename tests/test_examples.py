"""The recipes and examples a user starts from: `recipes/ir_custom.yaml` (its message on unset paths, and a tiny
run on generated 16-bit data), `recipes/survey/*` (each validates, expands into its cells and names the data
it expects), and every script in `examples/`, run as a user runs them (a subprocess) at tiny size."""

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from sslrecipe.cli import main
from sslrecipe.data.synth import generate_synthetic
from sslrecipe.engine.inputs import check_inputs
from sslrecipe.engine.matrix import matrix_cells, with_absolute_paths
from sslrecipe.errors import DataError
from sslrecipe.recipe import load_recipe
from sslrecipe.weights.catalogue import find_entry

REPO = Path(__file__).resolve().parents[1]
IR_CUSTOM = REPO / "recipes" / "ir_custom.yaml"
SURVEY = sorted((REPO / "recipes" / "survey").glob("*.yaml"))
EXAMPLES = REPO / "examples"


def cli(*args, code=0):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res


# --------------------------------------------------------------------------- recipes/ir_custom.yaml


def test_ir_custom_names_every_path_to_set_and_stops_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = cli("run", IR_CUSTOM, code=2)
    for key in ("data.train.annotations", "data.train.images", "data.val.annotations", "data.test.annotations",
                "data.unlabeled"):
        assert f"  {key} (line " in res.output, res.output
    assert "7 input paths do not exist" in res.output and "Traceback" not in res.output
    assert str(REPO / "recipes" / "my_ir_data" / "annotations" / "train.json") in res.output
    assert not (tmp_path / "runs").exists()  # no run directory, no stage started
    # one path given: only the others are named
    res = cli("run", IR_CUSTOM, "--set", f"data.unlabeled={tmp_path}", code=2)
    assert "6 input paths" in res.output and "data.unlabeled" not in res.output


def test_ir_custom_runs_on_16_bit_thermal_frames(tmp_path):
    sets = {}
    for split, seed, n in (("train", 1, 10), ("val", 2, 3), ("test", 3, 3)):
        ann = generate_synthetic(tmp_path / split, images=n, width=128, height=96, seed=seed,
                                 objects_per_image=(2, 4), bit_depth=16)
        sets[split] = ann
    pool = generate_synthetic(tmp_path / "pool", images=8, width=128, height=96, seed=4, bit_depth=16).parent / "images"
    tiny = [f"data.{s}={{annotations: {a}, images: {a.parent / 'images'}}}" for s, a in sets.items()] + [
        f"data.unlabeled={pool}", "data.shots=4", "backbone.name=resnet18",
        "pretrain.steps=2", "pretrain.batch_size=4", "pretrain.img_size=64",
        "finetune.steps=2", "finetune.batch_size=2", "finetune.img_size=128", "finetune.fpn_channels=32",
        "finetune.rois_per_image=32", "evaluate.batch_size=4", "report.images=1",
        "runtime={device: cpu, workers: 0, checkpoint_every: 2, progress: plain}"]
    run_dir = tmp_path / "run"
    cli("run", IR_CUSTOM, "--run-dir", run_dir, *[a for s in tiny for a in ("--set", s)])
    resolved = yaml.safe_load((run_dir / "resolved.yaml").read_text())
    assert resolved["pretrain"]["method"] == "hybrid" and resolved["backbone"]["in_chans"] == 1
    assert resolved["pretrain"]["options"]["hybrid"]["crop_scale"] == [0.1, 0.3]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"agnostic/AP@0.05", "agnostic/AP_small@0.3", "F1"} <= set(metrics)
    [data_dir] = run_dir.glob("data-*")
    manifest = json.loads((data_dir / "data.json").read_text())
    assert manifest["normalization"] is not None  # 16-bit frames: per-dataset statistics, not a blind >> 8
    assert manifest["splits"]["train"]["images"] == 4 and manifest["unlabeled"]["images"] >= 1


# --------------------------------------------------------------------------- recipes/survey/


@pytest.mark.parametrize("path", SURVEY, ids=[p.stem for p in SURVEY])
def test_survey_recipe_is_valid_and_says_what_it_needs(path, tmp_path, monkeypatch):
    head = path.read_text().split("\nname:")[0]
    assert "Data it expects" in head and "Compute" in head and "sslrecipe compare" in head
    cli("validate", path)
    recipe = with_absolute_paths(load_recipe(path), path.parent)
    cells = matrix_cells(recipe)
    assert len(cells) >= 8
    for cell in cells:
        w = cell.recipe.weights
        if w.source == "fetch":  # every public checkpoint is in the catalogue, for the arm's backbone
            entry = find_entry(w.id)
            assert entry is not None and entry.backbone == cell.recipe.backbone.name, (cell.name, w.id)
        elif w.source == "pretrain":
            assert cell.recipe.data.unlabeled is not None
    # unedited, a run stops before any work (exit 2) and the input check names the data paths to set
    monkeypatch.chdir(tmp_path)
    cli("run", path, code=2)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(DataError, match=r"data\.train\.annotations \(line \d+\): .* does not exist"):
        check_inputs(recipe, path)


def test_survey_layouts_match_the_recipes():
    """Each survey recipe produces the axes its compare layout groups by."""
    by_name = {p.stem: with_absolute_paths(load_recipe(p), p.parent) for p in SURVEY}
    assert list(by_name["table7_few_shot"].matrix.axes) == ["data.shots"] and by_name["table7_few_shot"].matrix.seeds == 3
    assert list(by_name["table4_vedai_rgb_ir"].matrix.axes) == ["data.train.annotations"]
    arms = {a.name for a in by_name["table6_in_domain"].matrix.arms}
    assert {"resim-own", "resim-public", "spark-own", "spark-public"} <= arms
    assert by_name["table3_coco_mask_rcnn"].finetune.detector == "mask_rcnn"


# --------------------------------------------------------------------------- examples/


def run_example(name, *args, cwd):
    env = {**os.environ, "SSLRECIPE_EXAMPLES_TINY": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


@pytest.fixture(scope="module")
def advised(tmp_path_factory):
    """examples/01: advise -> write the recipe -> run it (a matrix: the advised arm and the baseline)."""
    work = tmp_path_factory.mktemp("examples")
    out = run_example("01_advise_write_run.py", work / "advised", cwd=work)
    return work, out


def test_example_advise_write_run(advised):
    work, out = advised
    assert out.startswith("1. Hybrid R50: method hybrid") and "baseline to beat" in out
    rows = list(csv.DictReader(io.StringIO((work / "advised" / "run" / "comparison.csv").read_text())))
    assert [(r["arm"], r["status"]) for r in rows] == [("advised-hybrid", "finished"), ("baseline-scratch", "finished")]
    assert "| advised-hybrid |" in out  # the comparison is printed


def test_example_bring_your_own_dataset(tmp_path):
    out = run_example("02_bring_your_own_dataset.py", cwd=tmp_path)
    assert "(yolo) ->" in out and "check: 0 problem(s)" in out and '"boxes":' in out
    coco = json.loads((tmp_path / "runs" / "example-dataset" / "train.json").read_text())
    assert len(coco["images"]) == 12 and coco["annotations"]


def test_example_detect_new_images(advised):
    work, _ = advised
    cell = work / "advised" / "run" / "advised-hybrid"
    out = run_example("03_detect_new_images.py", cell, cwd=work)
    results = json.loads((cell / "detections_new.json").read_text())
    assert results and all({"image", "detections"} <= set(r) for r in results)
    assert f"wrote {cell / 'detections_new.json'}" in out
    # explicit image files work too
    one = results[0]["image"]
    run_example("03_detect_new_images.py", cell, one, cwd=work)
    assert [r["image"] for r in json.loads((cell / "detections_new.json").read_text())] == [one]


def test_example_compare_runs(advised):
    work, _ = advised
    out = run_example("04_compare_runs.py", work / "advised" / "run", cwd=work)
    assert "Table III layout" in out and "Table VII layout" in out and "difference to the baseline arm" in out
    rows = list(csv.DictReader(io.StringIO((work / "compare.csv").read_text())))
    assert [r["arm"] for r in rows] == ["advised-hybrid", "baseline-scratch"]
