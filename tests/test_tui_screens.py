"""The TUI at 80x24 and 120x40: what each screen shows, read back as the text on the screen.

The screens are compared by their text and layout (rendered through Textual's compositor), not by SVG bytes,
so a fresh install of another Textual version does not break them: every test asserts what a user must see
(status and metric before a cut run name, the differing recipe keys before the metrics, the evaluation metrics
with units, the advisor's first pick and why) and that it is not cut off.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
import yaml

from test_tui import _app, _append, _event, _progress, make_run, wait_for

SIZES = [(80, 24), (120, 40)]
LONG = "advised-resim-r50-hit-uav-25-shots-20260105-120000"


def screen_lines(app) -> list[str]:
    """The screen as lines of text, as the terminal shows them."""
    return [strip.text for strip in app.screen._compositor.render_strips()]


def assert_fits(lines: list[str], size: tuple[int, int]) -> None:
    width, height = size
    assert len(lines) == height
    assert all(len(line.rstrip()) <= width for line in lines), "a line is wider than the terminal"


def _recipe(run: Path, **sections) -> None:
    data = yaml.safe_load((run / "resolved.yaml").read_text())
    data.update(sections)
    (run / "resolved.yaml").write_text(yaml.safe_dump(data))


# --------------------------------------------------------------------------- the run list


def test_middle_cut_keeps_start_and_end():
    from sslrecipe.tui.runs_screen import cut_middle

    assert cut_middle("short", 10) == "short"
    cut = cut_middle(LONG, 24)
    assert cut == "advised-…20260105-120000"
    assert cut_middle("study-20250101-000000/advised-dino", 16) == "study-20…ed-dino"


@pytest.mark.parametrize("size", SIZES)
def test_run_list_shows_status_and_metric_before_a_cut_name_and_the_recipe(tmp_path, size):
    make_run(tmp_path, LONG, metrics={"bbox/mAP": 12.5}, weights="pretrain", age=120)
    _recipe(tmp_path / LONG, pretrain={"method": "resim"})
    make_run(tmp_path, "quickstart-20261205-203000", status="running", pid=os.getpid(), age=5)
    make_run(tmp_path, "stopped", status="interrupted", age=300)  # the widest status

    async def scenario():
        app = _app(tmp_path)
        async with app.run_test(size=size) as pilot:
            await wait_for(pilot, lambda: len(app.screen.rows) == 3, what="the runs")
            await pilot.press("down")  # the long-named run: its recipe below the table
            await pilot.pause(0.2)
            lines = screen_lines(app)
        assert_fits(lines, size)
        row = next(line for line in lines if "finished" in line and "mAP" in line)
        assert row.index("finished") < row.index("mAP 12.5") < row.index("advised")
        if size[0] == 80:  # cut in the middle: what it is and when it ran both stay
            assert "…" in row and "20260105-120000" in row and LONG not in row
        else:
            assert LONG in row
        assert any("resnet18 · resim pre-train" in line for line in lines), "the recipe summary is not visible"
        running = next(line for line in lines if "running" in line and "loss" in line)
        assert running.index("running") < running.index("loss 1.400") < running.index("quicksta")
        assert "finetune" in running and "50%" in running  # the stage's progress is in view too

    asyncio.run(scenario())


# --------------------------------------------------------------------------- compare


def _compare_runs(root: Path) -> list[Path]:
    """A scratch run (its resolved pretrain section holds defaults) and two pre-trained ones."""
    scratch = make_run(root, "scratch", metrics={"bbox/mAP": 10.0, "bbox/AP50": 20.0})
    mae = make_run(root, "mae", metrics={"bbox/mAP": 14.0, "bbox/AP50": 26.0}, weights="pretrain")
    dino = make_run(root, "dino", metrics={"bbox/mAP": 12.0, "bbox/AP50": 25.0}, weights="pretrain")
    _recipe(scratch, pretrain={"method": None, "epochs": 100, "lr": None, "options": {}})
    _recipe(mae, pretrain={"method": "mae", "epochs": 5, "lr": 0.001, "options": {"mae": {"mask_ratio": 0.75}}})
    _recipe(dino, pretrain={"method": "dino", "epochs": 5, "lr": 0.001, "options": {"dino": {"out_dim": 256}}})
    return [scratch, mae, dino]


def test_compare_leaves_out_keys_a_run_does_not_read(tmp_path):
    from sslrecipe.report.compare import build_table, load_runs

    runs = _compare_runs(tmp_path)
    table = build_table(load_runs(runs), "flat")  # what `sslrecipe compare` prints
    # pretrain.epochs and pretrain.lr differ only against the scratch run, which never reads them; each method's
    # options apply to that method only
    assert sorted(c.label for c in table.key_columns) == ["pretrain.method", "weights.source"]
    scratch = next(r for r in table.rows if r.label == "scratch")
    assert scratch.keys["pretrain.method"] is None  # shown as — (not read), not as the default
    assert "| — |" in table.to_markdown()
    # two scratch runs that differ only in unused pre-training keys are the same experiment
    other = make_run(tmp_path, "scratch-2", metrics={"bbox/mAP": 11.0})
    _recipe(other, pretrain={"method": None, "epochs": 7, "lr": 0.5})
    assert build_table(load_runs([runs[0], other]), "flat").key_columns == []


@pytest.mark.parametrize("size", SIZES)
def test_compare_screen_puts_the_differing_keys_first(tmp_path, size):
    runs = _compare_runs(tmp_path)

    async def scenario():
        app = _app(tmp_path)
        async with app.run_test(size=size) as pilot:
            app.push_compare([(r, r.name) for r in runs])
            screen = app.screen
            await wait_for(pilot, lambda: screen.table is not None, what="the comparison")
            await pilot.pause(0.2)
            lines = screen_lines(app)
        assert_fits(lines, size)
        header = next(line for line in lines if "weights.source" in line)
        assert header.index("run") < header.index("weights.source") < header.index("mAP")
        assert header.index("pretrain.method") < header.index("mAP")
        assert not any("pretrain.epochs" in line or "pretrain.lr" in line for line in lines)
        scratch = next(line for line in lines if "│ scratch" in line)
        assert "—" in scratch and "10.0" in scratch

    asyncio.run(scenario())


# --------------------------------------------------------------------------- the monitor


METRICS = {"bbox/mAP": 1.0, "bbox/AP50": 2.5, "bbox/AP_small": None, "agnostic/AP_small@0.3": 3.25,
           "agnostic/AP@0.05": 7.0, "F1": 9.5, "F1_threshold": 0.31, "finetune/pretrained_fpn_tensors": 143,
           "data/split": {"train": 8, "val": 2, "test": 2}, "data/invalid_dropped": 0}


def resumed_run(root: Path) -> Path:
    """Attempt 1 warns in fine-tuning and is interrupted after 100 s; attempt 2 resumes and finishes in 50 s."""
    run = root / "resumed"
    run.mkdir()
    (run / "resolved.yaml").write_text(yaml.safe_dump({"name": "resumed", "backbone": {"name": "resnet18"},
                                                      "weights": {"source": "scratch"}}))
    t = time.time() - 1000
    d = {s: str(run / f"{s}-1") for s in ("data", "weights", "finetune", "evaluate")}
    events = [_event("run_start", ts=t, pid=1, name="resumed")]
    for i, s in enumerate(("data", "weights")):
        events += [_event("stage_start", s, ts=t + i, dir=d[s], hash="1"),
                   _event("stage_end", s, ts=t + i + 0.5, dir=d[s], seconds=0.5)]
    events += [_event("stage_start", "finetune", ts=t + 3, dir=d["finetune"], hash="1"),
               _progress("finetune", 2, 4, 1.5),
               _event("warning", "finetune", ts=t + 50, message="loss spike at step 2"),
               _event("warning", "finetune", ts=t + 99, message="finetune interrupted at step 2; checkpoint written"),
               _event("run_end", ts=t + 100, status="interrupted", seconds=100.0)]
    t2 = t + 500
    events += [_event("run_start", ts=t2, pid=2, name="resumed")]
    events += [_event("stage_cached", s, ts=t2 + 1, dir=d[s], hash="1") for s in ("data", "weights")]
    events += [_event("stage_start", "finetune", ts=t2 + 2, dir=d["finetune"], hash="1"),
               _event("resume", "finetune", ts=t2 + 2, step=2),
               _progress("finetune", 4, 4, 1.0),
               _event("stage_end", "finetune", ts=t2 + 30, dir=d["finetune"], seconds=28.0),
               _event("stage_start", "evaluate", ts=t2 + 31, dir=d["evaluate"], hash="1")]
    events += [_event("metric", "evaluate", ts=t2 + 40, name=k, value=v) for k, v in METRICS.items()]
    events += [_event("stage_end", "evaluate", ts=t2 + 41, dir=d["evaluate"], seconds=10.0),
               _event("run_end", ts=t2 + 50, status="finished", seconds=50.0)]
    _append(run, *events)
    return run


def test_open_notes_resolve_with_a_later_attempt(tmp_path):
    from sslrecipe.tui.runs import RunWatcher

    run = resumed_run(tmp_path)
    lines = (run / "events.jsonl").read_text().splitlines()
    cut = next(i for i, line in enumerate(lines) if '"stage_end"' in line and '"finetune"' in line)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "events.jsonl").write_text("\n".join(lines[:cut]) + "\n")  # attempt 2 is still fine-tuning
    w = RunWatcher(partial)
    w.poll()
    notes, resolved = w.state.open_notes()
    assert resolved == 0 and notes[0].message == "loss spike at step 2"
    w = RunWatcher(run)
    w.poll()
    assert w.state.open_notes() == ([], 2)
    assert w.state.total_seconds() == pytest.approx(150.0)
    assert w.summary().seconds == pytest.approx(150.0)  # the runs list shows the whole run too


@pytest.mark.parametrize("size", SIZES)
def test_monitor_shows_evaluation_metrics_with_units_and_the_whole_resumed_run(tmp_path, size):
    run = resumed_run(tmp_path)

    async def scenario():
        app = _app(tmp_path)
        async with app.run_test(size=size) as pilot:
            monitor = app.open_run(run)
            await wait_for(pilot, lambda: monitor.polls > 0, what="the first poll")
            table = monitor.query_one("#metrics")
            await wait_for(pilot, lambda: monitor.watcher.status()[0] == "finished" and table.row_count > 1,
                           what="the metrics table")
            await pilot.pause(0.3)
            rows = [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]
            notes = " ".join(line.text for line in monitor.query_one("#notes").lines)
            lines = screen_lines(app)
        # the evaluation metrics, the survey's small-object ones among the first; no counters of other stages
        assert rows == [["mAP", "1.0 %"], ["AP50", "2.5 %"], ["AP_S", "n/a"], ["AP_S@0.3 (no cls)", "3.2 %"],
                        ["AP@0.05 (no cls)", "7.0 %"], ["F1", "9.5 %"], ["F1_threshold", "0.31"]]
        assert_fits(lines, size)
        screen = "\n".join(lines)
        assert "│ mAP" in screen and "1.0 %" in screen and "AP_S@0.3 (no cls)" in screen  # not cut off
        assert "2m30s in 2 attempts" in lines[1]  # the whole run: 100 s + 50 s
        # attempt 1's warnings were resolved by attempt 2, which finished the run
        assert "loss spike" not in notes and "interrupted" not in notes and "2 resolved (earlier attempts)" in notes

    asyncio.run(scenario())


@pytest.mark.parametrize("size", SIZES)
def test_monitor_shows_the_epoch_and_the_whole_run_eta(tmp_path, size):
    run = make_run(tmp_path, "live", status="running", pid=os.getpid(), age=5)
    _append(run, _event("stage_start", "pretrain", dir=str(run / "pretrain-1"), hash="1"),
            {**_progress("pretrain", 30, 120, 0.8), "epoch": 1, "epochs": 4, "eta_s": 180.0, "run_eta_s": 725.0,
             "run_eta_covers": ["finetune"], "run_eta_excludes": ["evaluate"]})

    async def scenario():
        app = _app(tmp_path)
        async with app.run_test(size=size) as pilot:
            monitor = app.open_run(run)
            await wait_for(pilot, lambda: monitor.watcher.state.progress_stage == "pretrain", what="the pretrain progress")
            await pilot.pause(0.3)
            lines = screen_lines(app)
        assert_fits(lines, size)
        screen = " ".join(line.strip() for line in lines)
        assert "30/120" in screen and "epoch 2/4" in screen  # 1-based for the reader
        assert "stage ETA 3m00s" in screen and "run ETA ~12m05s + evaluate" in screen

    asyncio.run(scenario())


# --------------------------------------------------------------------------- the advisor


@pytest.mark.parametrize("size", SIZES)
def test_advisor_screen_answers_first(tmp_path, size, monkeypatch):
    from textual.widgets import Input, Select

    monkeypatch.chdir(tmp_path)

    async def scenario():
        app = _app(tmp_path / "runs")
        async with app.run_test(size=size) as pilot:
            await pilot.press("a")
            screen = app.screen
            await wait_for(pilot, lambda: screen.advice is not None, what="the first advice")
            screen.query_one("#c-backbone", Select).value = "resnet"
            screen.query_one("#c-shots", Input).value = "25"
            await wait_for(pilot, lambda: screen.advice.best.label == "ReSim R50", what="the few-shot advice")
            await pilot.pause(0.2)
            lines = screen_lines(app)
        assert_fits(lines, size)
        text = "\n".join(lines)
        for label in ("backbone", "model size", "domain shift", "own pretrain", "labeled", "dataset"):
            assert f"│ {label} " in text, f"the form field {label!r} is cut"
        first = next(i for i, line in enumerate(lines) if "1 ReSim R50" in line)
        why = next(i for i, line in enumerate(lines) if "Why 1: ReSim R50" in line)
        assert first < why < len(lines) - 2, "the ranking and why the first leads are on the first screen"
        assert "50.4" in lines[first]  # the number that decided, beside the pick

    asyncio.run(scenario())


def test_advisor_errors_name_the_field_and_clear_the_stale_ranking(tmp_path, monkeypatch):
    from textual.widgets import Input

    monkeypatch.chdir(tmp_path)

    async def scenario():
        app = _app(tmp_path / "runs")
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("a")
            screen = app.screen
            await wait_for(pilot, lambda: screen.advice is not None, what="the first advice")
            screen.query_one("#c-shots", Input).value = "0"
            await wait_for(pilot, lambda: screen.error is not None, what="the error")
            await pilot.pause(0.1)
            assert "--" not in screen.error and screen.error.startswith("labeled 0")
            assert "leave labeled empty" in screen.error
            assert screen.query_one("#f-shots").has_class("invalid")
            assert screen.advice is None  # "Write recipe" cannot write the ranking of the form before
            text = "\n".join(screen_lines(app))
            assert "MAE" not in text and "Why 1" not in text and "Fix the form" in text
            await pilot.press("w")
            assert any("labeled 0" in n.message for n in app._notifications)
            screen.query_one("#c-shots", Input).value = ""
            await wait_for(pilot, lambda: screen.advice is not None, what="the advice again")
            assert not screen.query_one("#f-shots").has_class("invalid")

    asyncio.run(scenario())


def test_advisor_fields_keep_fast_typing_and_pastes(tmp_path, monkeypatch):
    from textual import events
    from textual.widgets import Input

    monkeypatch.chdir(tmp_path)
    path = "/data/flights/wall-q/train.json"  # letters that are also keys elsewhere (a, l, q, w)

    async def scenario():
        app = _app(tmp_path / "runs")
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("a")
            screen = app.screen
            await wait_for(pilot, lambda: screen.advice is not None, what="the first advice")
            shots = screen.query_one("#c-shots", Input)
            shots.focus()
            await pilot.press(*"1234567")  # one key after another, no pause
            assert shots.value == "1234567"
            shots.value = ""
            shots.post_message(events.Paste(" 2,500\n"))  # copied from a spreadsheet or a report
            await pilot.pause(0.1)
            assert shots.value == "2500"
            data = screen.query_one("#c-data", Input)
            data.focus()
            await pilot.press(*path)
            assert data.value == path and app.screen is screen
            data.value = ""
            data.post_message(events.Paste(path + "\n"))
            await pilot.pause(0.1)
            assert data.value == path
            await wait_for(pilot, lambda: screen.advice is not None and screen.advice.constraints.shots == 2500,
                           what="the advice for the pasted number")

    asyncio.run(scenario())


def test_write_and_launch_asks_first_and_takes_overrides(tmp_path, monkeypatch):
    from textual.widgets import Button, Input

    from sslrecipe.tui.dialogs import ConfirmDialog, LaunchDialog, WriteRecipeDialog

    monkeypatch.chdir(tmp_path)
    launched: list[tuple] = []

    async def scenario():
        app = _app(tmp_path / "runs")
        monkeypatch.setattr(app, "launch_recipe", lambda path, overrides=(): launched.append((path, list(overrides))))
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("a")
            screen = app.screen
            await wait_for(pilot, lambda: screen.advice is not None, what="the first advice")
            await pilot.press("w")
            await wait_for(pilot, lambda: isinstance(app.screen, WriteRecipeDialog), what="the write dialog")
            dialog = app.screen
            target = tmp_path / "advised.yaml"
            dialog.query_one("#write-path", Input).value = str(target)
            dialog.query_one("#write-set", Input).value = "finetune.steps"  # no value
            dialog.query_one("#write-launch", Button).press()  # not a click: a toast may cover it
            await wait_for(pilot, lambda: dialog.query_one("#write-error").display, what="the error")
            assert app.screen is dialog and "--set finetune.steps" in str(dialog.query_one("#write-error").content)
            dialog.query_one("#write-set", Input).value = "finetune.steps=30 'data.val=my val.json'"
            dialog.query_one("#write-launch", Button).press()  # not a click: a toast may cover it
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDialog), what="the confirmation")
            question = str(app.screen.query_one("#confirm-question").content)
            assert "advised.yaml" in question and "--set finetune.steps=30" in question
            await pilot.press("escape")  # no: nothing written, nothing launched
            assert app.screen is dialog and not target.exists() and not launched
            dialog.query_one("#write-launch", Button).press()  # not a click: a toast may cover it
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDialog), what="the confirmation")
            app.screen.query_one("#confirm-yes", Button).press()
            await wait_for(pilot, lambda: bool(launched), what="the launch")
            assert target.is_file()
            assert launched == [(str(target), ["finetune.steps=30", "data.val=my val.json"])]
            # the launch dialog takes overrides too
            await pilot.press("escape", "l")
            await wait_for(pilot, lambda: isinstance(app.screen, LaunchDialog), what="the launch dialog")
            app.screen.query_one("#recipe-path", Input).value = str(target)
            app.screen.query_one("#launch-set", Input).value = "seed=3"
            app.screen.query_one("#launch", Button).press()
            await wait_for(pilot, lambda: len(launched) == 2, what="the second launch")
            assert launched[1] == (str(target), ["seed=3"])

    asyncio.run(scenario())


def test_overrides_reach_the_run_command(tmp_path):
    from sslrecipe.errors import SSLRecipeError
    from sslrecipe.tui.control import run_command, split_overrides

    cmd = run_command(tmp_path / "r.yaml", tmp_path / "run", split_overrides("seed=3 finetune.steps=30"))
    assert cmd[cmd.index("--set") + 1] == "seed=3" and cmd.count("--set") == 2
    with pytest.raises(SSLRecipeError, match="--set"):
        split_overrides("seed=3 'unclosed")
