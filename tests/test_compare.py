"""`sslrecipe compare` in each layout, on run directories written as the pipeline writes them (no training):
the survey tables' rows and columns, seeds averaged (mean ± sample std), the best marked, Table VI's deltas,
CSV, --metric, failed runs; and the TUI's compare screen showing the very same table."""

import asyncio
import csv
import io
import json
import statistics
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from sslrecipe.cli import main
from sslrecipe.report.compare import build_table, load_runs


def make_run(root: Path, name: str, metrics: dict | None, *, method: str | None = None, weights: str = "scratch",
             wid: str | None = None, backbone: str = "resnet50", in_chans: int = 3, shots: int | None = None,
             seed: int = 0, fseed: int | None = None, train: str = "/data/vedai/rgb.json", lr: float = 0.0002,
             error: str | None = None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    recipe = {"name": name, "seed": seed, "backbone": {"name": backbone, "in_chans": in_chans},
              "data": {"train": {"annotations": train, "images": "/data/vedai/images"}, "shots": shots},
              "weights": {"source": weights, "id": wid}, "pretrain": {"method": method},
              "finetune": {"lr": lr, "seed": fseed}, "runtime": {"device": "cpu"}}
    (run / "resolved.yaml").write_text(yaml.safe_dump(recipe))
    t = time.time()
    events = [{"ts": t, "event": "run_start", "stage": None, "pid": 1}]
    if error:
        events += [{"ts": t, "event": "error", "stage": "finetune", "message": error},
                   {"ts": t, "event": "run_end", "stage": None, "status": "failed"}]
    else:
        events.append({"ts": t, "event": "run_end", "stage": None, "status": "finished"})
        (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run


def m(ap05: float, f1: float, **more) -> dict:
    return {"agnostic/AP@0.05": ap05, "F1": f1, "bbox/mAP": ap05 / 2, "agnostic/mAP": ap05 / 3,
            "agnostic/AP50": ap05 / 1.5, "agnostic/AP_small": ap05 / 4, "agnostic/AP_small@0.3": ap05 / 2.5, **more}


def compare(*args, code=0):
    res = CliRunner().invoke(main, ["compare", *map(str, args)], catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res.output


def test_table7_groups_shots_and_averages_seeds(tmp_path):
    for shots in (25, 50):
        for k, (ap, f1) in enumerate([(30.0, 20.0), (34.0, 24.0)]):
            make_run(tmp_path, f"scratch-{shots}-{k}", m(ap + shots / 5, f1), shots=shots, fseed=k)
        make_run(tmp_path, f"resim-{shots}", m(50.0 + shots / 5, 52.0), shots=shots, weights="fetch",
                 wid="resim-fpn-resnet50-400ep")
    table = build_table(load_runs([tmp_path]), "table7")
    assert [c.label for c in table.metric_columns] == ["25-shot AP", "25-shot F1", "50-shot AP", "50-shot F1"]
    rows = {r.label: r for r in table.rows}
    scratch, resim = rows["scratch R50"], rows["ReSim (public) R50"]
    v = scratch.value("agnostic/AP@0.05", "25-shot")
    assert (v.mean, v.n) == (37.0, 2) and v.std == pytest.approx(statistics.stdev([35.0, 39.0]))
    assert scratch.replicates == 2 and resim.value("F1", "50-shot").std is None
    assert resim.value("agnostic/AP@0.05", "25-shot").best and not scratch.value("agnostic/AP@0.05", "25-shot").best
    out = compare(tmp_path, "--layout", "table7", "--csv", tmp_path / "t7.csv")
    assert "| scratch R50 | 37.0 ± 2.8 | 22.0 ± 2.8 | 42.0 ± 2.8 | 22.0 ± 2.8 | 2 |" in out
    assert "| ReSim (public) R50 | **55.0** | **52.0** | **60.0** | **52.0** | 1 |" in out
    rows = {r["row"]: r for r in csv.DictReader(io.StringIO((tmp_path / "t7.csv").read_text()))}
    assert rows["scratch R50"]["25-shot/agnostic/AP@0.05"] == "37"
    assert rows["scratch R50"]["25-shot/agnostic/AP@0.05_std"] == "2.8284"
    assert rows["ReSim (public) R50"]["best"].split() == ["25-shot/agnostic/AP@0.05", "25-shot/F1", "50-shot/agnostic/AP@0.05", "50-shot/F1"]


def test_table4_domains_come_from_the_data_that_differs(tmp_path):
    for domain, bonus in (("rgb", 5.0), ("ir", 0.0)):
        make_run(tmp_path, f"dino-r50-{domain}", m(80.0 + bonus, 75.0 + bonus), weights="fetch", wid="dino-resnet50",
                 train=f"/data/vedai/{domain}.json")
        make_run(tmp_path, f"mae-vitb-{domain}", m(90.0 + bonus, 85.0 + bonus), weights="fetch", wid="mae-vitb16",
                 backbone="vit_base_patch16_224", train=f"/data/vedai/{domain}.json")
    out = compare(tmp_path, "--layout", "table4")
    assert "| row | ir AP | ir F1 | rgb AP | rgb F1 |" in out  # groups in the order the runs come
    assert "| MAE (public) ViT/B-16 | **90.0** | **85.0** | **95.0** | **90.0** |" in out
    # without differing data, the channels say the domain
    other = tmp_path / "one"
    make_run(other, "a", m(60.0, 60.0), in_chans=1)
    make_run(other, "b", m(61.0, 61.0), in_chans=1, weights="fetch", wid="spark-resnet50")
    assert "| row | IR AP | IR F1 |" in compare(other, "--layout", "table4")


def test_table6_deltas_against_the_same_methods_public_weights(tmp_path):
    make_run(tmp_path, "scratch", m(61.3, 60.9))
    make_run(tmp_path, "resim-own", m(76.6, 72.9), weights="pretrain", method="resim")
    make_run(tmp_path, "resim-public", m(85.1, 81.6), weights="fetch", wid="resim-fpn-resnet50-400ep")
    make_run(tmp_path, "mae-own", m(88.3, 82.8), weights="pretrain", method="mae", backbone="vit_small_patch16_224")
    table = build_table(load_runs([tmp_path]), "table6")
    by = {r.label: r for r in table.rows}
    assert by["ReSim (own data) R50"].value("agnostic/AP@0.05").delta == pytest.approx(-8.5)
    assert by["ReSim (own data) R50"].value("F1").delta == pytest.approx(-8.7)
    assert by["MAE (own data) ViT/S-16"].value("F1").delta is None  # no public counterpart among the runs
    assert by["scratch R50"].value("F1").delta is None
    assert "| ReSim (own data) R50 | 76.6 (-8.5) | 72.9 (-8.7) |" in table.to_markdown()


def test_table3_columns_and_extra_keys_in_row_names(tmp_path):
    make_run(tmp_path, "a", m(40.0, 50.0), weights="fetch", wid="spark-resnet50")
    make_run(tmp_path, "b", m(45.0, 50.0), weights="fetch", wid="spark-resnet50", lr=0.0001)
    out = compare(tmp_path, "--layout", "table3")
    assert "| row | mAP (cls) | AP (no cls) | AP50 (no cls) | AP_S (no cls) | AP_S@0.3 (no cls) |" in out
    # the two runs differ in a key the layout does not show: it is named in the row
    assert "| SparK (public) R50 · finetune.lr=0.0001 | **22.5** | **15.0** | **30.0** | **11.2** | **18.0** |" in out


def test_flat_layout_failed_runs_metric_override_and_errors(tmp_path):
    make_run(tmp_path, "a", m(40.0, 50.0, **{"F1@0.05": 55.0}))
    make_run(tmp_path, "b", m(45.0, 40.0, **{"F1@0.05": 45.0}), lr=0.0001)
    make_run(tmp_path, "c", None, lr=1.0e6, error="finetune: non-finite loss at step 2")
    out = compare(*(tmp_path / n for n in "abc"), "--csv", tmp_path / "flat.csv")
    assert "| row | finetune.lr | mAP |" in out and "| status |" in out
    assert "| c | 1000000.0 | n/a | n/a | n/a | n/a | n/a | failed |" in out
    assert "- c: finetune: non-finite loss at step 2" in out
    rows = {r["row"]: r for r in csv.DictReader(io.StringIO((tmp_path / "flat.csv").read_text()))}
    assert rows["c"]["status"] == "failed" and rows["c"]["F1"] == "" and "non-finite" in rows["c"]["error"]
    assert rows["a"]["best"].split() == ["F1"] and "agnostic/AP@0.05" in rows["b"]["best"].split()
    out = compare(tmp_path / "a", tmp_path / "b", "--metric", "F1@0.05")
    assert "| row | finetune.lr | F1@0.05 |" in out and "**55.0**" in out
    assert "F1@0.05_threshold" not in out
    err = compare(tmp_path / "a", "--metric", "F1@0.5", code=2)
    assert "--metric F1@0.5: in none of these runs' metrics" in err and "F1@0.05" in err
    err = compare(tmp_path / "nope", code=2)
    assert "no such run directory" in err


def test_the_tui_compare_screen_shows_the_same_table(tmp_path):
    from sslrecipe.tui.app import SSLRecipeApp
    from sslrecipe.tui.compare import CompareScreen

    runs = [make_run(tmp_path, f"s{k}", m(30.0 + k, 20.0), shots=25, fseed=k) for k in range(2)]
    runs.append(make_run(tmp_path, "resim", m(50.0, 52.0), shots=25, weights="fetch", wid="resim-fpn-resnet50-400ep"))
    expected = {layout: build_table(load_runs(runs), layout).to_markdown() for layout in ("flat", "table7")}

    async def scenario():
        app = SSLRecipeApp(tmp_path, poll_interval=0.3)
        async with app.run_test(size=(120, 40)) as pilot:
            screen = CompareScreen([(r, r.name) for r in runs])
            await app.push_screen(screen)
            deadline = time.monotonic() + 10
            while screen.table is None and time.monotonic() < deadline:
                await pilot.pause(0.1)
            assert screen.table.to_markdown() == expected["flat"]
            for _ in range(4):  # flat -> table3 -> table4 -> table6 -> table7
                await pilot.press("t")
            assert screen.layout_name == "table7" and screen.table.to_markdown() == expected["table7"]
            assert screen.query_one("#compare-table").row_count == 2

    asyncio.run(scenario())
