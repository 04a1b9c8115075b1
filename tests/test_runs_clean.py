"""`sslrecipe runs clean RUN_DIR`: after a recipe change, the stage directories the latest resolved.yaml no longer
uses are listed with their sizes (dry run), deleted with --yes, and a rerun of RUN_DIR then redoes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sslrecipe.cli import main

TINY = [
    "backbone.name=resnet18", "backbone.in_chans=1",
    "data.synthetic={images: 12, width: 96, height: 64, objects_per_image: [1, 2]}",
    "finetune.batch_size=2", "finetune.img_size=96", "finetune.fpn_channels=16", "finetune.rois_per_image=16",
    "evaluate.batch_size=4", "report.images=0",
    "runtime={device: cpu, workers: 0, checkpoint_every: 1, progress: plain}",
]


def _run(target: Path, run_dir: Path, *sets: str) -> None:
    args = ["run", str(target), "--run-dir", str(run_dir)]
    for kv in sets:
        args += ["--set", kv]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output


def _stage_dirs(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.iterdir() if p.is_dir() and "-" in p.name}


@pytest.fixture
def changed_run(tmp_path):
    """A run fine-tuned for 1 step, then rerun in the same directory with 2 steps: two finetune/evaluate/report
    directories, one data and one weights directory."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: tiny\nseed: 0\n")
    run_dir = tmp_path / "run"
    _run(recipe, run_dir, *TINY, "finetune.steps=1")
    first = _stage_dirs(run_dir)
    _run(recipe, run_dir, *TINY, "finetune.steps=2")
    second = _stage_dirs(run_dir)
    return run_dir, first, second


def test_dry_run_lists_the_stale_stages_with_sizes_then_yes_deletes_only_them(changed_run):
    run_dir, first, second = changed_run
    stale = {n for n in first if n.split("-")[0] in ("finetune", "evaluate", "report")}
    assert len(stale) == 3 and stale < second  # the data and weights stages were reused

    res = CliRunner().invoke(main, ["runs", "clean", str(run_dir)], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    listed = {line.split()[0] for line in res.output.splitlines() if line.split() and line.split()[0] in second}
    assert listed == stale
    finetune_line = next(line for line in res.output.splitlines() if line.startswith("finetune-"))
    assert "finished" in finetune_line and ("KB" in finetune_line or "MB" in finetune_line)
    assert "3 unused stage directories" in res.output and "--yes" in res.output
    assert _stage_dirs(run_dir) == second  # a dry run deletes nothing

    res = CliRunner().invoke(main, ["runs", "clean", str(run_dir), "--yes"])
    assert res.exit_code == 0, res.output
    assert "deleted 3 unused stage directories" in res.output
    assert _stage_dirs(run_dir) == second - stale

    # what is left is exactly what the latest recipe uses: resuming the run directory redoes nothing
    _run(run_dir, run_dir)
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    last = events[max(i for i, e in enumerate(events) if e["event"] == "run_start"):]
    assert not [e for e in last if e["event"] == "stage_start"]
    assert {e["stage"] for e in last if e["event"] == "stage_cached"} == {"data", "weights", "finetune", "evaluate", "report"}
    res = CliRunner().invoke(main, ["runs", "clean", str(run_dir)])
    assert res.exit_code == 0 and "nothing to clean" in res.output


def test_clean_refuses_what_it_cannot_judge(tmp_path):
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    res = CliRunner().invoke(main, ["runs", "clean", str(not_a_run)])
    assert res.exit_code == 2 and "has no resolved.yaml" in res.output and "Traceback" not in res.output

    cell = tmp_path / "matrix" / "arm-a"
    cell.mkdir(parents=True)
    (cell / "resolved.yaml").write_text("name: x\n")
    (cell / "cell.json").write_text("{}")
    res = CliRunner().invoke(main, ["runs", "clean", str(cell)])
    assert res.exit_code == 2 and "clean the matrix directory instead" in res.output

    # the data moved: no stage directory matches the latest recipe, so nothing is judged unused
    run = tmp_path / "moved"
    run.mkdir()
    (run / "resolved.yaml").write_text(
        f"name: moved\ndata: {{train: {{annotations: {tmp_path / 'gone.json'}}}}}\n")
    stale = run / "data-0123456789ab"
    stale.mkdir()
    (stale / "done.json").write_text("{}")
    res = CliRunner().invoke(main, ["runs", "clean", str(run), "--yes"])
    assert res.exit_code == 2 and "Nothing was deleted" in res.output
    assert stale.is_dir()
