"""The advisor's --write-recipe output runs as written (at tiny scale): both matrix arms, the advised one
fetching its weights from a real HTTP server on 127.0.0.1, and a comparison table at the end."""

import functools
import http.server
import json
import threading
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from sslrecipe.cli import main
from sslrecipe.engine.events import read_events

TINY = [
    "backbone.name=resnet18", "backbone.in_chans=1",
    "data.synthetic={images: 16, width: 128, height: 96, objects_per_image: [2, 4]}", "data.shots=6",
    "finetune.steps=2", "finetune.batch_size=2", "finetune.img_size=128", "finetune.fpn_channels=32",
    "finetune.rois_per_image=32", "evaluate.batch_size=4", "report.images=1",
    "runtime={device: cpu, workers: 0, checkpoint_every: 2, progress: plain}",
]


def stage_dir(cell: Path, stage: str) -> Path:
    """Where a matrix cell's stage ran (the cells share RUN/stages/): from the cell's events."""
    return next(Path(e["dir"]) for e in read_events(cell / "events.jsonl")
                if e["event"] in ("stage_start", "stage_cached") and e["stage"] == stage)


@pytest.fixture
def weights_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    torch.manual_seed(7)
    state = timm.create_model("resnet18", num_classes=0).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "resnet18-ssl.safetensors"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/resnet18-ssl.safetensors", state
    server.shutdown()
    server.server_close()


def test_written_recipe_runs_both_arms_and_compares(tmp_path, weights_server, monkeypatch):
    url, served = weights_server
    monkeypatch.setenv("SSLRECIPE_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    recipe = tmp_path / "advised.yaml"
    res = runner.invoke(main, ["advise", "--backbone", "resnet", "--shots", "25", "--write-recipe", str(recipe)])
    assert res.exit_code == 0, res.output
    assert "resim" in recipe.read_text().lower()

    sets = [a for kv in [*TINY, f"weights.id={url}", "weights.format=timm"] for a in ("--set", kv)]
    res = runner.invoke(main, ["run", str(recipe), "--run-dir", str(tmp_path / "run"), *sets], catch_exceptions=False)
    assert res.exit_code == 0, res.output

    rows = json.loads((tmp_path / "run" / "comparison.json").read_text())
    assert [r["cell"] for r in rows] == ["advised-resim", "baseline-scratch"]
    assert all("bbox/mAP" in r["metrics"] for r in rows)
    assert "baseline-scratch" in (tmp_path / "run" / "comparison.md").read_text()

    # the advised arm really fine-tuned from the served weights (first conv adapted RGB -> 1 channel)
    enc_dir = stage_dir(tmp_path / "run" / "advised-resim", "weights")
    encoder = load_file(str(enc_dir / "encoder.safetensors"))
    assert torch.equal(encoder["layer4.1.conv2.weight"], served["layer4.1.conv2.weight"])
    assert encoder["conv1.weight"].shape[1] == 1
    scratch_dir = stage_dir(tmp_path / "run" / "baseline-scratch", "weights")
    assert not torch.equal(load_file(str(scratch_dir / "encoder.safetensors"))["layer4.1.conv2.weight"], served["layer4.1.conv2.weight"])


def test_offline_the_advised_arm_is_named_with_the_choices_and_the_baseline_still_runs(tmp_path, monkeypatch):
    """Downloads off and nothing cached: before any stage, one line says which arm cannot run and what to do;
    the baseline arm runs; the exit status says the matrix is incomplete."""
    monkeypatch.setenv("SSLRECIPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SSLRECIPE_OFFLINE", "1")
    runner = CliRunner()
    recipe = tmp_path / "advised.yaml"
    res = runner.invoke(main, ["advise", "--backbone", "resnet", "--shots", "25", "--write-recipe", str(recipe)])
    assert res.exit_code == 0, res.output
    sets = [a for kv in TINY for a in ("--set", kv)]
    res = runner.invoke(main, ["run", str(recipe), "--run-dir", str(tmp_path / "run"), *sets])
    assert res.exit_code == 1, res.output
    warning = next(line for line in res.output.splitlines() if line.startswith("warning:"))
    assert "matrix cell advised-resim cannot start" in warning and "resim-fpn-resnet50-400ep" in warning
    assert "SSLRECIPE_OFFLINE=1" in warning and "sslrecipe weights fetch resim-fpn-resnet50-400ep" in warning
    assert "weights.source=scratch" in warning and "Running baseline-scratch without it" in warning
    assert "Traceback" not in res.output
    # the baseline ran to its report; the advised arm never started a stage
    assert (tmp_path / "run" / "baseline-scratch" / "report.md").is_file()
    assert not (tmp_path / "run" / "advised-resim" / "events.jsonl").exists()
    assert "not run: matrix cell advised-resim" in res.output


def test_offline_without_a_baseline_the_run_stops_before_any_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("SSLRECIPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SSLRECIPE_OFFLINE", "1")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\ndata: {synthetic: {images: 8}}\nweights: {source: fetch, id: dino-resnet50}\n"
                      "backbone: {name: resnet50}\n")
    res = CliRunner().invoke(main, ["run", str(recipe), "--run-dir", str(tmp_path / "run")])
    assert res.exit_code == 2, res.output
    assert "this run cannot start: weights.id dino-resnet50" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run").exists()


def test_a_recipe_written_with_data_reads_the_users_set_and_pool(tmp_path, monkeypatch):
    """--data FILE --pool DIR: the written recipe's data stage reads that file and its images, carves a seeded
    val/test split from it, and lists the pool; nothing synthetic."""
    import numpy as np
    from PIL import Image

    monkeypatch.setenv("SSLRECIPE_OFFLINE", "1")  # the advised arm's weights are not needed before that stage
    monkeypatch.setenv("SSLRECIPE_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    (tmp_path / "data").mkdir()
    (tmp_path / "pool").mkdir()
    images, anns = [], []
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (64, 80), dtype=np.uint8)).save(tmp_path / "data" / f"im{i}.png")
        images.append({"id": i + 1, "file_name": f"im{i}.png", "width": 80, "height": 64})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [8, 8, 10, 10], "area": 100, "iscrowd": 0})
    (tmp_path / "data" / "train.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "car"}]}))
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 80), dtype=np.uint8)).save(tmp_path / "pool" / f"u{i}.png")
    runner = CliRunner()
    recipe = tmp_path / "advised.yaml"
    res = runner.invoke(main, ["advise", "--data", str(tmp_path / "data" / "train.json"), "--pool",
                               str(tmp_path / "pool"), "--custom-pretrain", "required", "--backbone", "resnet",
                               "--write-recipe", str(recipe)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["run", str(recipe), "--run-dir", str(tmp_path / "run"), "--until", "data",
                               "--cell", "baseline-scratch"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    [done] = (tmp_path / "run").rglob("data-*/done.json")
    summary = json.loads(done.read_text())
    assert (summary["train"], summary["val"], summary["test"], summary["unlabeled"]) == (6, 2, 2, 3)
    manifest = json.loads((done.parent / "data.json").read_text())
    assert manifest["splits"]["train"]["image_root"] == str((tmp_path / "data").resolve())
