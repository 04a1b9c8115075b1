"""Formats carry a version (issue 18, item 8): a recipe's `version:` and a run directory's `RUN/format.json`.
A newer one is refused with one clear message, never misread; a run directory without a version (written before
they were recorded) is read and resumed as before; the recipe's version enters no stage hash, so runs still resume."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from sslrecipe.cli import main
from sslrecipe.engine.events import read_events
from sslrecipe.engine.rundir import FORMAT_NAME, RunLayoutError, run_layout
from sslrecipe.errors import RecipeError
from sslrecipe.recipe import load_recipe, recipe_from_dict, recipe_to_yaml
from sslrecipe.versions import RECIPE_VERSION, RUN_LAYOUT_VERSION

TINY = Path(__file__).with_name("tiny.yaml")
NEWER = RUN_LAYOUT_VERSION + 1


def tiny_dict() -> dict:
    return yaml.safe_load(TINY.read_text())


def write_newer_layout(run_dir: Path) -> None:
    (run_dir / FORMAT_NAME).write_text(json.dumps({"layout": NEWER, "sslrecipe": "9.9.9"}))


def fake_run(run_dir: Path, layout=None, name="fake") -> Path:
    """A run directory as a finished run leaves it (resolved.yaml, events, metrics), optionally of a given layout."""
    run_dir.mkdir(parents=True)
    (run_dir / "resolved.yaml").write_text(recipe_to_yaml(recipe_from_dict({**tiny_dict(), "name": name})))
    events = [{"ts": 1.0, "event": "run_start", "stage": None, "pid": 1, "name": name},
              {"ts": 2.0, "event": "metric", "stage": "evaluate", "name": "bbox/mAP", "value": 0.5},
              {"ts": 3.0, "event": "run_end", "stage": None, "status": "finished", "seconds": 2.0}]
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run_dir / "metrics.json").write_text(json.dumps({"bbox/mAP": 0.5}))
    if layout is not None:
        (run_dir / FORMAT_NAME).write_text(json.dumps({"layout": layout, "sslrecipe": "9.9.9"}))
    return run_dir


# --------------------------------------------------------------------------- the recipe's version


def test_recipe_version_defaults_validates_and_round_trips(tmp_path):
    assert recipe_from_dict(tiny_dict()).version == RECIPE_VERSION
    text = recipe_to_yaml(recipe_from_dict({**tiny_dict(), "version": RECIPE_VERSION}))
    assert yaml.safe_load(text)["version"] == RECIPE_VERSION  # resolved.yaml carries it
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    assert load_recipe(path).version == RECIPE_VERSION
    for bad in (0, "one"):
        with pytest.raises(RecipeError, match="version"):
            recipe_from_dict({**tiny_dict(), "version": bad})


def test_a_recipe_for_a_newer_sslrecipe_is_refused_at_its_line(tmp_path):
    path = tmp_path / "new.yaml"
    path.write_text(f"name: new\nseed: 0\nversion: {RECIPE_VERSION + 1}\n" + TINY.read_text().split("seed: 0\n", 1)[1])
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    message = str(e.value)
    assert message.startswith(f"{path}:3:") and "newer sslrecipe" in message and "upgrade sslrecipe" in message
    assert message.count("\n") == 0  # one message
    with pytest.raises(RecipeError, match="newer sslrecipe"):  # --set too
        load_recipe(TINY, [f"version={RECIPE_VERSION + 1}"])


def test_the_recipe_version_enters_no_stage_hash():
    from sslrecipe.engine.stages import build_pipeline

    pipeline = build_pipeline()
    without = tiny_dict()
    assert "version" not in without
    reference = pipeline.stage_hashes(recipe_from_dict(without))
    assert pipeline.stage_hashes(recipe_from_dict({**without, "version": RECIPE_VERSION})) == reference
    # another value changes no hash either (bypassing validation, which would refuse it)
    assert pipeline.stage_hashes(recipe_from_dict(without).model_copy(update={"version": 99})) == reference


# --------------------------------------------------------------------------- the run directory's layout


def test_run_layout_reads_legacy_and_refuses_newer_or_unreadable(tmp_path):
    assert run_layout(tmp_path) == RUN_LAYOUT_VERSION  # no format.json: written before layouts were recorded
    (tmp_path / FORMAT_NAME).write_text(json.dumps({"layout": RUN_LAYOUT_VERSION}))
    assert run_layout(tmp_path) == RUN_LAYOUT_VERSION
    write_newer_layout(tmp_path)
    with pytest.raises(RunLayoutError) as e:
        run_layout(tmp_path)
    assert str(tmp_path) in str(e.value) and f"layout {NEWER}" in str(e.value) and "9.9.9" in str(e.value)
    assert "upgrade sslrecipe" in str(e.value)
    (tmp_path / FORMAT_NAME).write_text("{not json")
    with pytest.raises(RunLayoutError, match=FORMAT_NAME):
        run_layout(tmp_path)


@pytest.fixture(scope="module")
def data_run(tmp_path_factory):
    """A run of the data stage alone, as a user resumes it."""
    run_dir = tmp_path_factory.mktemp("runs") / "r"
    res = CliRunner().invoke(main, ["run", str(TINY), "--run-dir", str(run_dir), "--until", "data"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return run_dir


def test_a_run_records_its_layout(data_run):
    assert json.loads((data_run / FORMAT_NAME).read_text())["layout"] == RUN_LAYOUT_VERSION
    start = next(e for e in read_events(data_run / "events.jsonl") if e["event"] == "run_start")
    assert start["layout"] == RUN_LAYOUT_VERSION
    assert yaml.safe_load((data_run / "resolved.yaml").read_text())["version"] == RECIPE_VERSION


def test_a_legacy_run_without_a_version_still_resumes(data_run, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(data_run, legacy)
    (legacy / FORMAT_NAME).unlink()
    resolved = yaml.safe_load((legacy / "resolved.yaml").read_text())
    del resolved["version"]  # a resolved.yaml written before the key existed
    (legacy / "resolved.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    n = len(list(read_events(legacy / "events.jsonl")))
    res = CliRunner().invoke(main, ["run", str(legacy), "--until", "data"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    new = list(read_events(legacy / "events.jsonl"))[n:]
    assert [e["stage"] for e in new if e["event"] == "stage_cached"] == ["data"]  # the same hash: nothing reran
    assert not [e for e in new if e["event"] == "stage_start"]
    assert json.loads((legacy / FORMAT_NAME).read_text())["layout"] == RUN_LAYOUT_VERSION


def test_resume_refuses_a_newer_layout_and_writes_nothing(data_run, tmp_path):
    newer = tmp_path / "newer"
    shutil.copytree(data_run, newer)
    write_newer_layout(newer)
    before = {p: p.stat().st_mtime_ns for p in newer.rglob("*")}
    for args in (["run", str(newer)], ["run", str(TINY), "--run-dir", str(newer)]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2, res.output
        assert str(newer) in res.output and f"layout {NEWER}" in res.output and "Traceback" not in res.output
    assert {p: p.stat().st_mtime_ns for p in newer.rglob("*")} == before


def test_compare_skips_a_newer_run_with_a_note(tmp_path):
    from sslrecipe.report.compare import load_runs

    root = tmp_path / "runs"
    fake_run(root / "old", name="old")
    fake_run(root / "current", layout=RUN_LAYOUT_VERSION, name="current")
    fake_run(root / "newer", layout=NEWER, name="newer")
    skipped: list[str] = []
    assert sorted(r.label for r in load_runs([root], skipped)) == ["runs/current", "runs/old"]
    assert len(skipped) == 1 and str(root / "newer") in skipped[0]
    with pytest.raises(RunLayoutError):  # without a list for notes: refused
        load_runs([root / "newer"])
    res = CliRunner().invoke(main, ["compare", str(root)])
    assert res.exit_code == 0, res.output
    assert "skipped:" in res.stderr and str(root / "newer") in res.stderr
    assert "runs/old" in res.stdout and "runs/newer" not in res.stdout
    res = CliRunner().invoke(main, ["compare", str(root / "newer")])
    assert res.exit_code == 2 and "nothing to compare" in res.output and f"layout {NEWER}" in res.output


def test_tui_run_list_shows_a_newer_run_as_unreadable_without_reading_it(tmp_path):
    from sslrecipe.tui.runs import RunIndex

    root = tmp_path / "runs"
    fake_run(root / "old", name="old")
    fake_run(root / "newer", layout=NEWER, name="newer")
    rows = {r.label: r for r in RunIndex(root).scan()}
    assert rows["old"].status == "finished" and rows["old"].metric == 0.5
    newer = rows["newer"]
    assert newer.status == "unreadable" and f"layout {NEWER}" in newer.detail and "upgrade" in newer.detail
    assert newer.started is None and newer.metric is None and newer.recipe is None  # nothing of it was read


def test_load_detector_and_runs_clean_refuse_a_newer_layout(tmp_path):
    import sslrecipe
    from sslrecipe.engine.clean import plan_clean

    run_dir = fake_run(tmp_path / "newer", layout=NEWER)
    with pytest.raises(RunLayoutError, match=f"layout {NEWER}"):
        sslrecipe.load_detector(run_dir)
    with pytest.raises(RunLayoutError, match=f"layout {NEWER}"):
        plan_clean(run_dir)
    res = CliRunner().invoke(main, ["runs", "clean", str(run_dir), "--yes"])
    assert res.exit_code == 2 and f"layout {NEWER}" in res.output
