"""Matrices as a user runs them: cells share one stage cache (a pre-training runs once for every shot count, arm
and fine-tuning seed that needs it), `matrix.seeds` repeats fine-tuning only, a failed cell fails alone, a rerun
finishes only what is missing, and comparison.csv/.md carry the arms, axes, survey metrics, mean ± std and deltas."""

import csv
import io
import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from sslrecipe.cli import main
from sslrecipe.engine.events import read_events
from sslrecipe.engine.pipeline import stable_hash
from sslrecipe.engine.stages import build_pipeline
from sslrecipe.recipe import load_recipe

TINY = Path(__file__).with_name("tiny.yaml")
SURVEY_METRICS = ("agnostic/mAP", "agnostic/AP_small@0.3", "agnostic/AP@0.05", "F1")


def write_recipe(path: Path, **keys) -> Path:
    path.write_text(yaml.safe_dump({"extends": str(TINY), "report": {"images": 0}, **keys}, sort_keys=False))
    return path


def run(*args, code=0):
    res = CliRunner().invoke(main, ["run", *map(str, args)], catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res


def starts(run_dir: Path, since: dict | None = None) -> Counter:
    """stage_start events over every cell of a matrix (after the event counts in `since`)."""
    counts: Counter = Counter()
    for events in sorted(Path(run_dir).glob("*/events.jsonl")):
        for e in list(read_events(events))[(since or {}).get(events.parent.name, 0):]:
            if e["event"] == "stage_start":
                counts[e["stage"]] += 1
    return counts


def event_counts(run_dir: Path) -> dict:
    return {p.parent.name: len(list(read_events(p))) for p in Path(run_dir).glob("*/events.jsonl")}


def csv_rows(run_dir: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO((Path(run_dir) / "comparison.csv").read_text())))


def test_default_keys_keep_the_stage_hashes_of_existing_runs():
    """finetune.seed / data.shots_seed at their defaults (null) must not change any stage hash: run directories
    written before they existed resume instead of recomputing. Pinned: the hashes of the previous code."""
    expected = {
        (): {"data": "d9585d7a328b", "weights": "f2e6350bfbd9", "finetune": "5799728113b3", "evaluate": "1393222e5218",
             "report": "2fcefabae7ca"},
        ("data.shots=5",): {"data": "885d15bb2b3f", "finetune": "3c1de72752aa"},
    }
    for sets, pinned in expected.items():
        recipe = load_recipe(TINY, sets)
        hashes: dict = {}
        for stage in build_pipeline().stages:
            if stage.enabled(recipe):
                upstream = stage.needs if stage.hash_upstream is None else stage.hash_upstream
                hashes[stage.name] = stable_hash({"stage": stage.name, "config": stage.config(recipe),
                                                  "upstream": {n: hashes[n] for n in upstream if n in hashes},
                                                  "fingerprint": stage.fingerprint(recipe)})
        assert {k: hashes[k] for k in pinned} == pinned
        # an explicit fine-tuning seed equal to `seed` is the same computation: the same stages
        same = load_recipe(TINY, (*sets, "finetune.seed=0", "data.shots_seed=0"))
        assert [s.config(same) for s in build_pipeline().stages] == [s.config(recipe) for s in build_pipeline().stages]


# --------------------------------------------------------------------------- sharing and seeds


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """2 arms (the second changes fine-tuning only) x 2 shot counts x 2 fine-tuning seeds = 8 cells, one pre-training."""
    root = tmp_path_factory.mktemp("matrix")
    recipe = write_recipe(
        root / "study.yaml", name="study", weights={"source": "pretrain"},
        pretrain={"method": "hybrid", "steps": 2, "batch_size": 4, "img_size": 64}, finetune={"steps": 2},
        matrix={"arms": [{"name": "base", "set": {}}, {"name": "lowlr", "set": {"finetune.lr": 0.0001}}],
                "axes": {"data.shots": [4, 6]}, "seeds": 2, "baseline": "base"},
    )
    run(recipe, "--run-dir", root / "run")
    return recipe, root / "run"


def test_cells_share_one_pretraining_and_one_subset_per_shot_count(study):
    _, run_dir = study
    assert sorted(p.name for p in run_dir.iterdir() if (p / "cell.json").is_file()) == [
        f"{arm}-shots{s}-fseed{k}" for arm in ("base", "lowlr") for s in (4, 6) for k in (0, 1)]
    assert starts(run_dir) == {"data": 2, "pretrain": 1, "weights": 1, "finetune": 8, "evaluate": 8, "report": 8}
    # the stages live in one shared cache; each cell's events point there
    assert all(p.parent == run_dir / "stages" for p in run_dir.glob("stages/*-*"))
    assert not list(run_dir.glob("base-shots4-fseed0/*-*/done.json"))


def test_seeds_repeat_fine_tuning_on_the_same_subset(study):
    _, run_dir = study
    cell = {k: json.loads((run_dir / f"base-shots4-fseed{k}" / "cell.json").read_text()) for k in (0, 1)}
    assert [cell[k]["finetune_seed"] for k in (0, 1)] == [0, 1] and cell[0]["group"] == "base-shots4"
    dirs = {}
    for k in (0, 1):
        done = {e["stage"]: e["dir"] for e in read_events(run_dir / f"base-shots4-fseed{k}" / "events.jsonl")
                if e["event"] in ("stage_start", "stage_cached")}
        dirs[k] = done
    assert dirs[0]["data"] == dirs[1]["data"] and dirs[0]["pretrain"] == dirs[1]["pretrain"]
    assert dirs[0]["finetune"] != dirs[1]["finetune"]
    resolved = yaml.safe_load((run_dir / "base-shots4-fseed1" / "resolved.yaml").read_text())
    assert resolved["finetune"]["seed"] == 1 and resolved["seed"] == 0
    loss = [json.loads((Path(dirs[k]["finetune"]) / "done.json").read_text())["final_loss"] for k in (0, 1)]
    assert loss[0] != loss[1]  # another seed really fine-tuned differently


def test_comparison_has_arms_axes_survey_metrics_mean_std_best_and_delta(study):
    _, run_dir = study
    rows = csv_rows(run_dir)
    assert [(r["arm"], r["data.shots"], r["seeds"]) for r in rows] == [
        ("base", "4", "2"), ("base", "6", "2"), ("lowlr", "4", "2"), ("lowlr", "6", "2")]
    header = list(rows[0])
    for metric in ("bbox/mAP", *SURVEY_METRICS):
        assert metric in header and f"{metric}_std" in header and f"{metric}_delta" in header
    for r in rows:
        assert r["status"] == "finished" and all(0 <= float(r[m]) <= 100 for m in SURVEY_METRICS)
        # delta against the baseline arm at the same shots, on the baseline itself nothing
        assert (r["F1_delta"] == "") == (r["arm"] == "base")
    by = {(r["arm"], r["data.shots"]): r for r in rows}
    assert float(by["lowlr", "4"]["agnostic/AP@0.05_delta"]) == pytest.approx(
        float(by["lowlr", "4"]["agnostic/AP@0.05"]) - float(by["base", "4"]["agnostic/AP@0.05"]), abs=1e-3)
    # the per-seed numbers are the cells' own metrics
    per_seed = [json.loads((run_dir / f"base-shots4-fseed{k}" / "metrics.json").read_text())["F1"] for k in (0, 1)]
    assert float(by["base", "4"]["F1"]) == pytest.approx(sum(per_seed) / 2, abs=1e-3)
    md = (run_dir / "comparison.md").read_text()
    assert "| arm | data.shots |" in md and "±" in md and "AP_S@0.3 (no cls)" in md
    assert "baseline arm 'base'" in md


def test_a_cell_directory_resumes_from_the_shared_stages(study):
    _, run_dir = study
    before = event_counts(run_dir)
    run(run_dir / "lowlr-shots6-fseed1")
    assert starts(run_dir, before) == {}
    events = list(read_events(run_dir / "lowlr-shots6-fseed1" / "events.jsonl"))[before["lowlr-shots6-fseed1"]:]
    assert [e["stage"] for e in events if e["event"] == "stage_cached"] == [
        "data", "pretrain", "weights", "finetune", "evaluate", "report"]


def test_force_reruns_a_shared_stage_once(study):
    recipe, run_dir = study
    before = event_counts(run_dir)
    run(recipe, "--run-dir", run_dir, "--force", "pretrain", "--cell", "base-shots4-fseed0", "--cell", "lowlr-shots6-fseed0")
    assert starts(run_dir, before)["pretrain"] == 1
    assert starts(run_dir, before)["finetune"] == 2


def test_compare_lays_a_matrix_out_in_every_layout(study, tmp_path):
    _, run_dir = study
    out = {}
    for layout in ("flat", "table3", "table4", "table6", "table7"):
        res = CliRunner().invoke(main, ["compare", str(run_dir), "--layout", layout, "--csv", str(tmp_path / f"{layout}.csv")])
        assert res.exit_code == 0, res.output
        out[layout] = res.output
    assert "| arm | data.shots |" in out["flat"]  # a matrix's own columns
    assert "4-shot AP | 4-shot F1 | 6-shot AP | 6-shot F1" in out["table7"]
    assert "IR AP | IR F1" in out["table4"]
    assert "Hybrid (own data) R18" in out["table3"]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "table7.csv").read_text())))
    assert [r["seeds"] for r in rows] == ["2", "2"]


# --------------------------------------------------------------------------- failures and resume


def test_a_diverging_cell_fails_alone_and_a_rerun_finishes_only_what_is_missing(tmp_path):
    recipe = write_recipe(
        tmp_path / "fail.yaml", name="fail", finetune={"steps": 3, "warmup_steps": 0},
        matrix={"arms": [{"name": "diverge", "set": {"finetune.lr": 1.0e6}}, {"name": "ok", "set": {}},
                         {"name": "ok2", "set": {"finetune.lr": 0.0001}}]},
    )
    run_dir = tmp_path / "run"
    run(recipe, "--run-dir", run_dir, "--cell", "ok")
    rows = {r["row"]: r for r in csv_rows(run_dir)}
    assert rows["ok"]["status"] == "finished" and rows["ok2"]["status"] == "not run"

    before = event_counts(run_dir)
    res = run(recipe, "--run-dir", run_dir, code=1)
    assert "1 of 3 matrix cells failed" in res.output and "non-finite loss" in res.output
    # ok was finished: nothing of it reruns; diverge fails in fine-tuning; ok2 still runs after it
    ok_events = list(read_events(run_dir / "ok" / "events.jsonl"))[before["ok"]:]
    assert not [e for e in ok_events if e["event"] == "stage_start"]
    diverge = list(read_events(run_dir / "diverge" / "events.jsonl"))
    assert diverge[-2]["event"] == "error" and diverge[-2]["stage"] == "finetune"
    assert diverge[-1] == {**diverge[-1], "event": "run_end", "status": "failed"}
    rows = {r["row"]: r for r in csv_rows(run_dir)}
    assert rows["ok2"]["status"] == rows["ok"]["status"] == "finished"
    assert rows["ok2"]["F1"] != "" and rows["ok"]["F1"] != ""
    assert rows["diverge"]["status"] == "failed" and "non-finite loss" in rows["diverge"]["error"]
    assert rows["diverge"]["F1"] == ""
    assert "Failed:" in (run_dir / "comparison.md").read_text()

    # the fix: only the diverging cell's fine-tuning runs again, on its cached data and weights
    before = event_counts(run_dir)
    run(recipe, "--run-dir", run_dir, "--set", "matrix.arms=[{name: diverge, set: {finetune.lr: 0.0003}}, {name: ok}, "
        "{name: ok2, set: {finetune.lr: 0.0001}}]")
    assert starts(run_dir, before) == {"finetune": 1, "evaluate": 1, "report": 1}
    assert {r["status"] for r in csv_rows(run_dir)} == {"finished"}


def test_a_matrix_written_before_the_shared_cache_keeps_its_stages(tmp_path):
    """An older matrix directory: stages inside each cell, no cell.json. It resumes from them and compares."""
    old = tmp_path / "old"
    run(TINY, "--run-dir", old / "only", "--set", "report.images=0", "--set", "name=tiny-only")  # the old layout's cell
    (old / "resolved.yaml").write_text(yaml.safe_dump({
        **yaml.safe_load((old / "only" / "resolved.yaml").read_text()), "name": "tiny",
        "matrix": {"arms": [{"name": "only", "set": {}}]}}))
    res = CliRunner().invoke(main, ["compare", str(old)])
    assert res.exit_code == 0 and "| only | only |" in res.output, res.output
    before = event_counts(old)
    run(old)
    assert starts(old, before)["finetune"] == 0 and not (old / "stages").exists()
    assert json.loads((old / "only" / "cell.json").read_text())["stage_root"] == "."
