"""report.loggers: TensorBoard and MLflow mirror a run's progress and metric events (their local file backends)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sslrecipe.cli import main
from sslrecipe.engine.events import EventLog, read_events
from sslrecipe.engine.runner import run_recipe
from sslrecipe.engine.stages import build_pipeline
from sslrecipe.recipe import load_recipe
from sslrecipe.report.trackers import MLflowTracker, TensorBoardTracker, mlflow_key

TINY = Path(__file__).with_name("tiny.yaml")
BOTH = ("report.loggers=[tensorboard, mlflow]",)


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> Path:
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        run = tmp_path_factory.mktemp("tracked") / "run"
        run_recipe(TINY, BOTH, run_dir=run, progress="off")
    finally:
        mp.undo()
    return run


def _events(run: Path, kind: str, stage: str) -> list[dict]:
    return [e for e in read_events(run / "events.jsonl") if e["event"] == kind and e["stage"] == stage]


def test_tensorboard_holds_the_finetuning_loss_per_step_and_the_metrics(tracked_run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked_run / "tensorboard"))
    acc.Reload()
    progress = _events(tracked_run, "progress", "finetune")
    assert progress, "the tiny run reports fine-tuning progress"
    loss = {s.step: s.value for s in acc.Scalars("finetune/loss")}
    assert sorted(loss) == sorted(e["step"] for e in progress)
    for e in progress:
        assert loss[e["step"]] == pytest.approx(e["loss"], rel=1e-5)
    tags = acc.Tags()["scalars"]
    assert {"finetune/lr", "finetune/images_per_s"} <= set(tags)
    assert any(t.startswith("finetune/losses/") for t in tags)  # the named loss parts
    metrics = [e for e in _events(tracked_run, "metric", "evaluate") if isinstance(e["value"], (int, float))]
    assert metrics
    for e in metrics:
        assert acc.Scalars(f"evaluate/{e['name']}")[0].value == pytest.approx(e["value"], rel=1e-5, abs=1e-7)


def test_mlflow_file_store_holds_the_run_its_metrics_and_params(tracked_run: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tracked_run / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("tiny")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["finetune.steps"] == "6" and run.data.params["report.loggers"] == "['tensorboard', 'mlflow']"
    progress = _events(tracked_run, "progress", "finetune")
    history = client.get_metric_history(run.info.run_id, "finetune/loss")
    assert sorted(m.step for m in history) == sorted(e["step"] for e in progress)
    for e in _events(tracked_run, "metric", "evaluate"):
        if isinstance(e["value"], (int, float)):
            assert run.data.metrics[mlflow_key(f"evaluate/{e['name']}")] == pytest.approx(e["value"], rel=1e-5, abs=1e-7)
    assert not [e for e in read_events(tracked_run / "events.jsonl") if e["event"] == "warning"]


def test_loggers_are_off_by_default_and_out_of_every_stage_hash(tmp_path: Path):
    recipe = load_recipe(TINY)
    assert recipe.report.loggers == []
    hashes = build_pipeline().stage_hashes(recipe)
    assert hashes["report"] == "2fcefabae7ca"  # pinned in test_matrix: the report hash before report.loggers
    assert build_pipeline().stage_hashes(load_recipe(TINY, BOTH)) == hashes
    run = tmp_path / "run"
    run_recipe(TINY, ("finetune.steps=2",), run_dir=run, progress="off")
    assert not (run / "tensorboard").exists() and not (run / "mlruns").exists()


def test_mlflow_honours_the_users_tracking_uri(tmp_path: Path, monkeypatch):
    recipe = load_recipe(TINY, BOTH)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert MLflowTracker(tmp_path, recipe).tracking_uri() == (tmp_path / "mlruns").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert MLflowTracker(tmp_path, recipe).tracking_uri() == "http://mlflow.example:5000"


@pytest.mark.parametrize(("module", "logger"), [("torch.utils.tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_a_missing_library_names_its_extra_before_any_stage(tmp_path: Path, monkeypatch, module, logger):
    monkeypatch.setitem(sys.modules, module, None)  # `import` raises ImportError
    run = tmp_path / "run"
    res = CliRunner().invoke(main, ["run", str(TINY), "--run-dir", str(run), "--set", f"report.loggers=[{logger}]"])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and f"pip install 'sslrecipe[{logger}]'" in res.output, res.output
    assert not run.exists()  # nothing ran


def test_a_failing_tracker_warns_once_and_the_run_goes_on(tmp_path: Path):
    events = EventLog(tmp_path / "events.jsonl")
    tracker = TensorBoardTracker(tmp_path, load_recipe(TINY))
    calls = []

    def broken(values, step):
        calls.append(step)
        raise OSError("disk quota exceeded")

    tracker.scalars = broken
    events.subscribe(tracker)
    for step in (1, 2, 3):
        events.emit("progress", "finetune", step=step, total=3, loss=1.0, lr=0.1)
    warnings = [e for e in read_events(tmp_path / "events.jsonl") if e["event"] == "warning"]
    assert calls == [1] and len(warnings) == 1
    assert "tensorboard failed" in warnings[0]["message"] and "disk quota exceeded" in warnings[0]["message"]
    assert len([e for e in read_events(tmp_path / "events.jsonl") if e["event"] == "progress"]) == 3
