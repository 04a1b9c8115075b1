"""The stage pipeline as a user runs it: caching, what reruns when a key changes, resume after kill -9, events."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from sslrecipe.cli import main
from sslrecipe.engine.events import EVENT_NAMES, read_events

TINY = Path(__file__).with_name("tiny.yaml")


def run_cli(*args):
    res = CliRunner().invoke(main, ["run", str(TINY), *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def events_of(run_dir):
    return list(read_events(Path(run_dir) / "events.jsonl"))


def stage_events(run_dir, kind, start=0):
    return [e["stage"] for e in events_of(run_dir)[start:] if e["event"] == kind]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    run_cli("--run-dir", str(run_dir))
    return run_dir


def test_run_produces_report_metrics_and_strict_encoder(finished_run):
    import timm

    metrics = json.loads((finished_run / "metrics.json").read_text())
    for key in ("bbox/mAP", "bbox/AP50", "bbox/AP75", "bbox/AP_small", "bbox/AR100"):
        assert key in metrics
    assert all(v is None or 0 <= v <= 100 for v in metrics.values())
    report = (finished_run / "report.md").read_text()
    assert "mAP" in report
    assert (finished_run / "loss_curve.png").stat().st_size > 1000
    assert (finished_run / "detections.png").stat().st_size > 1000
    [weights] = finished_run.glob("weights-*")
    meta = json.loads((weights / "encoder.json").read_text())
    model = timm.create_model(meta["timm_name"], **meta["timm_kwargs"])
    model.load_state_dict(load_file(str(weights / "encoder.safetensors")), strict=True)
    resolved = finished_run / "resolved.yaml"
    assert resolved.is_file()
    res = CliRunner().invoke(main, ["validate", str(resolved)])
    assert res.exit_code == 0, res.output


def test_events_follow_the_schema(finished_run):
    events = events_of(finished_run)
    assert all({"ts", "event", "stage"} <= set(e) and e["event"] in EVENT_NAMES for e in events)
    assert events[0]["event"] == "run_start" and events[0]["world_size"] == 1 and "torch" in events[0]["versions"]
    assert events[-1] == {**events[-1], "event": "run_end", "status": "finished"}
    assert stage_events(finished_run, "stage_end") == ["data", "weights", "finetune", "evaluate", "report"]
    assert any(e["event"] == "metric" and e["name"] == "bbox/mAP" for e in events)


def test_rerun_skips_finished_stages_and_finetune_change_keeps_upstream(finished_run):
    n = len(events_of(finished_run))
    run_cli("--run-dir", str(finished_run))
    assert stage_events(finished_run, "stage_cached", n) == ["data", "weights", "finetune", "evaluate", "report"]
    assert stage_events(finished_run, "stage_start", n) == []

    n = len(events_of(finished_run))
    run_cli("--run-dir", str(finished_run), "--set", "evaluate.max_dets=50")
    assert stage_events(finished_run, "stage_cached", n) == ["data", "weights", "finetune"]
    assert stage_events(finished_run, "stage_start", n) == ["evaluate", "report"]


def test_until_stops_and_force_reruns(tmp_path):
    run_dir = tmp_path / "r"
    run_cli("--run-dir", str(run_dir), "--until", "weights")
    assert stage_events(run_dir, "stage_end") == ["data", "weights"]
    n = len(events_of(run_dir))
    run_cli("--run-dir", str(run_dir), "--until", "weights", "--force", "weights")
    assert stage_events(run_dir, "stage_cached", n) == ["data"]
    assert stage_events(run_dir, "stage_start", n) == ["weights"]


def test_killed_finetune_resumes_on_the_same_trajectory(tmp_path, finished_run):
    """kill -9 in the middle of fine-tuning, rerun: the final detector equals the uninterrupted one."""
    run_dir = tmp_path / "killed"
    args = [sys.executable, "-m", "sslrecipe.cli", "run", str(TINY), "--run-dir", str(run_dir),
            "--set", "finetune.steps=12", "--until", "finetune"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    checkpoint = None
    while time.time() < deadline and proc.poll() is None:
        found = list(run_dir.glob("finetune-*/checkpoint.pt"))
        if found:
            checkpoint = found[0]
            break
        time.sleep(0.05)
    assert checkpoint is not None, "fine-tuning never wrote a checkpoint"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list(run_dir.glob("finetune-*/done.json"))

    res = CliRunner().invoke(main, ["run", str(TINY), "--run-dir", str(run_dir), "--set", "finetune.steps=12", "--until", "finetune"])
    assert res.exit_code == 0, res.output
    resumes = [e for e in events_of(run_dir) if e["event"] == "resume"]
    assert resumes and resumes[-1]["stage"] == "finetune" and 0 < resumes[-1]["step"] < 12
    assert f"resuming finetune from step {resumes[-1]['step']}" in res.output

    reference = tmp_path / "reference"
    run_cli("--run-dir", str(reference), "--set", "finetune.steps=12", "--until", "finetune")
    [a] = run_dir.glob("finetune-*/detector.safetensors")
    [b] = reference.glob("finetune-*/detector.safetensors")
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] == wb[k]).all(), k


def test_bad_recipe_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"extends: {TINY}\nfinetune:\n  epoch: 3\n")
    res = CliRunner().invoke(main, ["run", str(bad)])
    assert res.exit_code == 2
    assert "unknown key 'finetune.epoch'" in res.output and "Traceback" not in res.output


def test_finetune_img_size_null_is_chosen_from_the_training_boxes(tmp_path):
    """finetune.img_size: null picks the size the training boxes call for and records it."""
    from sslrecipe.data.coco import load_coco
    from sslrecipe.detect.faster_rcnn import suggest_img_size
    from sslrecipe.engine.stages import read_manifest

    run_dir = tmp_path / "r"
    run_cli("--run-dir", str(run_dir), "--set", "finetune.img_size=null", "--set", "finetune.steps=1", "--until", "finetune")
    [data] = run_dir.glob("data-*")
    [finetune] = run_dir.glob("finetune-*")
    manifest = read_manifest(data)
    train = load_coco(data / manifest["splits"]["train"]["annotations"])
    chosen = json.loads((finetune / "done.json").read_text())["img_size"]
    assert chosen == suggest_img_size(train) and chosen % 32 == 0 and chosen >= 128  # 128x96 scenes, small objects
    assert json.loads((finetune / "detector.json").read_text())["img_size"] == chosen
    assert [e["value"] for e in events_of(run_dir) if e.get("name") == "finetune/img_size"] == [chosen]


def test_progress_shows_epochs_and_a_run_eta_that_covers_later_training(tmp_path):
    run_dir = tmp_path / "r"
    res = run_cli("--run-dir", str(run_dir), "--set", "weights.source=pretrain",
                  "--set", "pretrain={method: spark, steps: 4, batch_size: 4, img_size: 64}", "--until", "finetune")
    progress = [e for e in events_of(run_dir) if e["event"] == "progress"]
    by_stage = {s: [e for e in progress if e["stage"] == s] for s in ("pretrain", "finetune")}
    assert all(by_stage.values())
    for events in by_stage.values():
        assert all(0 <= e["epoch"] < e["epochs"] for e in events)
        assert events[-1]["epoch"] == events[-1]["epochs"] - 1  # the last step is in the last epoch
    # while pre-training, the run's ETA adds fine-tuning's planned steps (at pre-training's speed): it outlasts the stage
    for e in by_stage["pretrain"]:
        assert e["run_eta_covers"] == ["finetune"] and e["run_eta_s"] > e["eta_s"]
    # fine-tuning is the last stage of this run: the run's ETA is the stage's
    for e in by_stage["finetune"]:
        assert e["run_eta_covers"] == [] and e["run_eta_s"] == e["eta_s"]
    last = by_stage["pretrain"][-1]
    assert f"step 4/4 epoch {last['epochs']}/{last['epochs']} " in res.output and ", run ETA ~" in res.output
