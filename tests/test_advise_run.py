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
