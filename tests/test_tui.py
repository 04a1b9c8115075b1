"""The Textual TUI (`sslrecipe tui`): run directories read live, screens, advisor form, launch / stop / resume.

Driven with Textual's `App.run_test()` pilot at 80x24 (the smallest size it supports).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sslrecipe.tui.runs import EventTail, RunIndex, RunWatcher, Series, differing_keys

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "tiny.yaml"
SIZE = (80, 24)


def _event(event: str, stage=None, ts=None, **fields) -> dict:
    return {"ts": ts if ts is not None else round(time.time(), 3), "event": event, "stage": stage, **fields}


def _append(run: Path, *events: dict) -> None:
    with open(run / "events.jsonl", "a", encoding="utf-8") as f:
        for e in events:
            f.write(json.dumps(e) + "\n")


def _progress(stage: str, step: int, total: int, loss: float, lr: float = 1e-3) -> dict:
    return _event("progress", stage, step=step, total=total, epoch=0, loss=loss, losses={"a": loss / 2},
                  lr=lr, images_per_s=12.5, eta_s=float(total - step))


def make_run(root: Path, name: str, status: str = "finished", pid: int = 1, metrics: dict | None = None,
             backbone: str = "resnet18", weights: str = "scratch", age: float = 60.0) -> Path:
    """A run directory as the pipeline leaves it (events, resolved.yaml, metrics.json)."""
    run = root / name
    run.mkdir(parents=True)
    (run / "resolved.yaml").write_text(yaml.safe_dump(
        {"name": name, "seed": 0, "backbone": {"name": backbone, "in_chans": 1}, "weights": {"source": weights},
         "finetune": {"steps": 4, "lr": 0.001}}))
    t = time.time() - age
    events = [_event("run_start", ts=t, pid=pid, name=name, world_size=1)]
    for i, stage in enumerate(("data", "weights")):
        events += [_event("stage_start", stage, ts=t + i, dir=str(run / f"{stage}-abc"), hash="abc"),
                   _event("stage_end", stage, ts=t + i + 0.5, dir=str(run / f"{stage}-abc"), seconds=0.5)]
    events.append(_event("stage_start", "finetune", ts=t + 3, dir=str(run / "finetune-abc"), hash="abc"))
    events += [_progress("finetune", s, 4, 2.0 - 0.3 * s) for s in range(1, 3)]
    if status == "finished":
        events += [_progress("finetune", s, 4, 2.0 - 0.3 * s) for s in range(3, 5)]
        events.append(_event("stage_end", "finetune", seconds=2.0, dir=str(run / "finetune-abc")))
        for k, v in (metrics or {}).items():
            events.append(_event("metric", "evaluate", name=k, value=v))
        events.append(_event("run_end", status="finished", seconds=20.0))
        (run / "metrics.json").write_text(json.dumps(metrics or {}))
    elif status == "failed":
        events += [_event("error", "finetune", message="StageError: non-finite loss at step 3"),
                   _event("run_end", status="failed", seconds=5.0)]
    elif status == "interrupted":
        events += [_event("warning", "finetune", message="finetune interrupted at step 2; checkpoint written"),
                   _event("run_end", status="interrupted", seconds=5.0)]
    _append(run, *events)
    return run


async def wait_for(pilot, condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await pilot.pause(0.1)


def _app(runs: Path, **kwargs):
    from sslrecipe.tui.app import SSLRecipeApp

    return SSLRecipeApp(runs, poll_interval=0.3, monitor_interval=0.2, plot_interval=0.3, **kwargs)


def _plain(renderable) -> str:
    from rich.console import Console

    console = Console(width=100, color_system=None)
    with console.capture() as capture:
        console.print(renderable)
    return capture.get()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --------------------------------------------------------------------------- reading run directories



def test_status_comes_from_events_and_the_process(tmp_path):
    metrics = {"bbox/mAP": 12.5, "bbox/AP50": 30.0, "bbox/AP_small": None}
    finished = make_run(tmp_path, "a-finished", metrics=metrics)
    make_run(tmp_path, "b-failed", status="failed")
    make_run(tmp_path, "c-interrupted", status="interrupted")
    make_run(tmp_path, "d-running", status="running", pid=os.getpid(), age=4)
    make_run(tmp_path, "e-killed", status="running", pid=_dead_pid())
    (tmp_path / "not-a-run").mkdir()
    rows = {r.label: r for r in RunIndex(tmp_path).scan()}
    assert {k: r.status for k, r in rows.items()} == {
        "a-finished": "finished", "b-failed": "failed", "c-interrupted": "interrupted",
        "d-running": "running", "e-killed": "interrupted",
    }
    assert rows["a-finished"].metric == 12.5 and rows["a-finished"].recipe.short() == "resnet18 · scratch"
    assert rows["d-running"].stage == "finetune" and (rows["d-running"].step, rows["d-running"].total) == (2, 4)
    assert rows["d-running"].loss == pytest.approx(1.4)
    assert "killed" in rows["e-killed"].detail
    assert rows["b-failed"].last_note.kind == "error"
    w = RunWatcher(finished)
    w.poll()
    assert [(i.name, i.state) for i in w.stage_infos()] == [
        ("data", "done"), ("weights", "done"), ("finetune", "done"), ("evaluate", "pending"), ("report", "pending")]


def test_the_cells_of_a_matrix_are_runs(tmp_path):
    parent = tmp_path / "study-20250101-000000"
    make_run(parent, "advised-dino", metrics={"bbox/mAP": 30.0})
    make_run(parent, "baseline-scratch", status="interrupted")
    (parent / "resolved.yaml").write_text("name: study\n")
    index = RunIndex(tmp_path)
    index.note_launch(parent, _dead_pid())
    rows = index.scan()
    assert sorted((r.label, r.status) for r in rows) == [
        ("study-20250101-000000/advised-dino", "finished"), ("study-20250101-000000/baseline-scratch", "interrupted")]


def test_a_pid_reused_by_a_later_process_is_not_the_run(tmp_path):
    run = make_run(tmp_path, "old", status="running", pid=os.getpid(), age=4)
    lines = (run / "events.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["ts"] = time.time() - 10 * 24 * 3600  # the run started long before this process did
    (run / "events.jsonl").write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    w = RunWatcher(run)
    w.poll()
    assert w.status()[0] == "interrupted"


def test_event_tail_waits_for_a_torn_line_and_restarts_on_truncation(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps(_event("run_start", pid=1)) + "\n" + '{"ts": 1, "event": "stage_st')
    tail = EventTail(path)
    events, reset = tail.read_new()
    assert [e["event"] for e in events] == ["run_start"] and not reset
    with open(path, "a") as f:
        f.write('art", "stage": "data"}\n')
    events, _ = tail.read_new()
    assert [e["event"] for e in events] == ["stage_start"]
    path.write_text("")
    assert tail.read_new() == ([], True)


def test_series_caps_points_and_cuts_at_a_replayed_step():
    s = Series(cap=100)
    for step in range(1, 1001):
        s.add(step, 1.0 / step)
    xs, ys = s.points()
    assert len(xs) <= 101 and xs[0] == 1 and xs[-1] == 1000
    s.add(500, 0.5)  # a resumed stage replays the steps after its checkpoint
    xs, ys = s.points()
    assert xs[-1] == 500 and ys[-1] == 0.5 and all(x < 500 for x in xs[:-1])
    s.add(501, float("nan"))  # non-finite losses are not plotted
    assert s.points()[0][-1] == 500


def test_differing_recipe_keys(tmp_path):
    a = RunWatcher(make_run(tmp_path, "a", weights="scratch"))
    b = RunWatcher(make_run(tmp_path, "b", weights="pretrain"))
    a.poll(), b.poll()
    assert differing_keys([a.recipe, b.recipe]) == ["weights.source"]


# --------------------------------------------------------------------------- screens


def test_navigation_between_screens(tmp_path):
    from sslrecipe.tui.advisor import AdvisorScreen
    from sslrecipe.tui.compare import CompareScreen
    from sslrecipe.tui.dialogs import LaunchDialog
    from sslrecipe.tui.monitor import MonitorScreen
    from sslrecipe.tui.runs_screen import RunsScreen

    make_run(tmp_path, "a-run", metrics={"bbox/mAP": 20.0, "bbox/AP50": 41.0})
    time.sleep(0.01)
    make_run(tmp_path, "b-run", metrics={"bbox/mAP": 25.0, "bbox/AP50": 39.0}, weights="pretrain")

    async def scenario():
        app = _app(tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            runs = app.screen
            assert isinstance(runs, RunsScreen)
            await wait_for(pilot, lambda: len(runs.rows) == 2, what="the runs list")
            table = runs.query_one("#runs-table")
            assert table.row_count == 2
            make_run(tmp_path, "c-new", status="running", pid=os.getpid(), age=1)  # started while we watch
            await wait_for(pilot, lambda: table.row_count == 3, what="the new run to appear")
            assert runs.rows[0].label == "c-new" and runs.rows[0].status == "running"
            assert runs.selected().label == "b-run"  # the cursor stays on its run
            await pilot.press("enter")
            assert isinstance(app.screen, MonitorScreen)
            monitor = app.screen
            await wait_for(pilot, lambda: monitor.polls > 0, what="the monitor's first poll")
            assert monitor.path.name == "b-run"
            await pilot.press("escape")
            assert app.screen is runs
            await pilot.press("a")
            assert isinstance(app.screen, AdvisorScreen)
            await pilot.press("escape")
            assert app.screen is runs
            await pilot.press("space", "space")  # mark both rows (the cursor moves down)
            assert len(runs.marked) == 2
            await pilot.press("c")
            compare = app.screen
            assert isinstance(compare, CompareScreen)
            await wait_for(pilot, lambda: compare.table is not None, what="the comparison")
            assert [c.label for c in compare.table.key_columns] == ["weights.source"]
            assert [r.value("bbox/mAP").mean for r in compare.table.rows] == [25.0, 20.0]
            assert compare.table.rows[0].value("bbox/mAP").best
            assert compare.query_one("#compare-table").row_count == 2
            await pilot.press("t")  # the next layout: the survey's Table III
            assert compare.table.layout == "table3"
            assert [r.value("bbox/mAP").mean for r in compare.table.rows] == [25.0, 20.0]
            await pilot.press("escape", "l")
            assert isinstance(app.screen, LaunchDialog)
            await pilot.press("escape")
            assert app.screen is runs
            await pilot.press("s")  # a finished run cannot be stopped: a notification, no crash
            await pilot.pause(0.1)
            assert any("only a running run" in n.message for n in app._notifications)
            await pilot.press("q")
        assert app.return_code in (0, None)

    asyncio.run(scenario())


def test_monitor_follows_a_run_as_events_are_appended(tmp_path):
    run = tmp_path / "live"
    run.mkdir()
    (run / "resolved.yaml").write_text(yaml.safe_dump({"name": "live", "backbone": {"name": "resnet18"},
                                                      "weights": {"source": "scratch"}}))
    _append(run, _event("run_start", pid=os.getpid(), name="live"),
            _event("stage_start", "data", dir=str(run / "data-1"), hash="1"),
            _event("stage_end", "data", dir=str(run / "data-1"), seconds=0.2))

    async def scenario():
        from sslrecipe.tui.widgets import LossPlot

        app = _app(tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            monitor = app.open_run(run)
            await wait_for(pilot, lambda: monitor.polls > 0, what="the first poll")
            assert monitor.watcher.status()[0] == "running"
            bar = monitor.query_one("#bar")
            _append(run, _event("stage_start", "finetune", dir=str(run / "finetune-1"), hash="1"))
            await wait_for(pilot, lambda: monitor.watcher.state.current == "finetune", what="finetune")
            for step in range(1, 6):
                # 50 steps an epoch (epochs 4); the run's ETA is the stage's, with evaluate not estimated
                _append(run, {**_progress("finetune", step, 200, 3.0 / step), "epochs": 4, "run_eta_s": float(200 - step),
                              "run_eta_covers": [], "run_eta_excludes": ["evaluate"]})
                await pilot.pause(0.05)
            await wait_for(pilot, lambda: bar.progress == 5 and bar.total == 200, what="the progress bar")
            speed = _plain(monitor.query_one("#speed").content)
            assert "5/200" in speed and "epoch 1/4" in speed and "12.5 img/s" in speed
            assert "stage ETA 3m15s" in speed and "run ETA 3m15s + evaluate" in speed
            plot = monitor.query_one(LossPlot)
            await wait_for(pilot, lambda: len(plot._loss[0]) == 5, what="the loss curve")
            # many steps at once: the plot redraws on its own timer, not once per event
            draws, t0 = plot.draws, time.monotonic()
            for chunk in range(4):
                _append(run, *[_progress("finetune", s, 200, 1.0 / s) for s in range(6 + 45 * chunk, 51 + 45 * chunk)])
                await pilot.pause(0.15)
            await wait_for(pilot, lambda: plot._loss[0][-1] == 185, what="the last step on the curve")
            assert plot.draws - draws <= (time.monotonic() - t0) / app.plot_interval + 2
            _append(run, _event("warning", "finetune", message="loss spike at step 120"),
                    _event("stage_end", "finetune", dir=str(run / "finetune-1"), seconds=9.0),
                    _event("metric", "evaluate", name="bbox/mAP", value=31.25),
                    _event("metric", "evaluate", name="bbox/AP_small", value=None),
                    _event("run_end", status="finished", seconds=12.0))
            await wait_for(pilot, lambda: monitor.watcher.status()[0] == "finished", what="run_end")
            await wait_for(pilot, lambda: monitor.query_one("#metrics").row_count == 2, what="the metrics table")
            table = monitor.query_one("#metrics")
            assert [str(c) for c in table.get_row_at(0)] == ["mAP", "31.2 %"]
            assert [str(c) for c in table.get_row_at(1)] == ["AP_S", "n/a"]
            notes = monitor.query_one("#notes")
            assert "loss spike" in " ".join(line.text.strip() for line in notes.lines)
            pipeline = _plain(monitor.query_one("#pipeline").content)
            assert "✓ finetune" in pipeline and "○ evaluate" in pipeline
            log = monitor.query_one("#log")
            assert any("[finetune] started" in line.text for line in log.lines)

    asyncio.run(scenario())


def test_advisor_form_changes_the_recommendation_and_writes_the_recipe(tmp_path, monkeypatch):
    from textual.widgets import Input, Select

    from sslrecipe.recipe import load_recipe
    from sslrecipe.tui.advisor import AdvisorScreen
    from sslrecipe.tui.dialogs import WriteRecipeDialog

    monkeypatch.chdir(tmp_path)

    async def scenario():
        app = _app(tmp_path / "runs")
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("a")
            screen = app.screen
            assert isinstance(screen, AdvisorScreen)
            await wait_for(pilot, lambda: screen.advice is not None, what="the first advice")
            first = screen.advice.best.label
            screen.query_one("#c-backbone", Select).value = "resnet"
            screen.query_one("#c-shots", Input).value = "25"
            await wait_for(pilot, lambda: screen.advice.best.label == "ReSim R50", what="the few-shot ResNet advice")
            assert first != "ReSim R50"
            cards = _plain(screen.query_one("#advice-cards").content)
            assert "25-shot AP" in cards and "50.4" in cards  # the survey's number behind the advice
            screen.query_one("#c-shots", Input).value = "0"
            await wait_for(pilot, lambda: screen.error is not None, what="the error")
            assert "at least 1" in screen.error
            assert any("at least 1" in n.message for n in app._notifications)
            screen.query_one("#c-shots", Input).value = "25"
            await wait_for(pilot, lambda: screen.error is None, what="the error to clear")
            await pilot.click("#write")
            await wait_for(pilot, lambda: isinstance(app.screen, WriteRecipeDialog), what="the write dialog")
            dialog = app.screen
            await pilot.pause()
            dialog.query_one("#write-path", Input).value = str(tmp_path / "advised.yaml")
            await pilot.click("#write-only")
            await wait_for(pilot, lambda: app.screen is screen, what="the dialog to close")
        recipe = load_recipe(tmp_path / "advised.yaml")
        assert recipe.backbone.name == "resnet50" and recipe.matrix is not None

    asyncio.run(scenario())


@pytest.mark.slow
def test_launch_stop_resume_a_real_tiny_run(tmp_path):
    """Launch tests/tiny.yaml from the TUI, stop it with s (SIGINT: checkpoint), resume it with r, see it finish."""
    from textual.widgets import Input

    from sslrecipe.tui.dialogs import LaunchDialog
    from sslrecipe.tui.monitor import MonitorScreen

    runs = tmp_path / "runs"
    app = _app(runs, env={"OMP_NUM_THREADS": "1"})

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("l")
            dialog = app.screen
            assert isinstance(dialog, LaunchDialog)
            dialog.query_one("#recipe-path", Input).value = str(TINY)
            await pilot.press("enter")
            await wait_for(pilot, lambda: isinstance(app.screen, MonitorScreen), timeout=60, what="the launch")
            monitor = app.screen
            state = monitor.watcher.state
            await wait_for(pilot, lambda: "finetune" in state.stages, timeout=60, what="fine-tuning to start")
            await pilot.press("s")
            await wait_for(pilot, lambda: monitor.watcher.status()[0] == "interrupted", timeout=30,
                           what="the graceful stop")
            stage_dir = Path(state.stages["finetune"].dir)
            assert (stage_dir / "checkpoint.pt").is_file() and not (stage_dir / "done.json").exists()
            assert any("interrupted" in n.message for n in state.notes)
            await pilot.press("r")
            await wait_for(pilot, lambda: state.attempts == 2, timeout=60, what="the resumed attempt")
            await wait_for(pilot, lambda: monitor.watcher.status()[0] == "finished", timeout=60, what="the finish")
            assert state.stages["finetune"].resumed_from is not None
            await wait_for(pilot, lambda: monitor.query_one("#metrics").row_count >= 5, what="the metrics")
            assert str(monitor.query_one("#metrics").get_row_at(0)[0]) == "mAP"
            await pilot.press("escape")
            await wait_for(pilot, lambda: app.screen.rows and app.screen.rows[0].status == "finished",
                           what="the runs list")
        log = (monitor.path / "run.log").read_text()
        assert "interrupted" in log and "run finished" in log

    try:
        asyncio.run(scenario())
    finally:
        for item in app.launcher.processes:
            if item.process.poll() is None:
                item.process.kill()
                item.process.wait()
