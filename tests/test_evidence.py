"""The survey's evidence as data: shape, exact transcription, internal consistency, citations."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from sslrecipe.guide.evidence import BACKBONES, METHODS, ROW_KEYS, TABLES, load_evidence
from sslrecipe.guide.rules import load_rules

SURVEY_TABLES = Path(__file__).resolve().parents[2] / "shared" / "reference" / "survey-tables.md"
LABEL_TO_BACKBONE = {v[0]: k for k, v in BACKBONES.items()}


@pytest.fixture(scope="module")
def ev():
    return load_evidence()


def test_shape(ev):
    assert {r.table for r in ev.rows} == set(TABLES)
    counts = {t: sum(1 for r in ev.rows if r.table == t) for t in TABLES}
    # III: 8 rows x 5 columns; IV: 11 x 4; VI: scratch 2 + 4 x 4; VII: 8 x 4
    assert counts == {"III": 40, "IV": 44, "VI": 18, "VII": 32}
    for r in ev.rows:
        assert r.method in METHODS
        assert r.backbone in BACKBONES and BACKBONES[r.backbone][0] == r.backbone_label
        assert r.size == BACKBONES[r.backbone][2]
        assert r.pretrain_data in ("ImageNet-1k", "SSL-IR", "none")
        assert (r.method == "scratch") == (r.pretrain_data == "none")
        assert r.column and r.metric and r.setting
    raw = yaml.safe_load((Path(__import__("sslrecipe.guide").guide.__file__).parent / "evidence.yaml").read_text())
    for row in raw["rows"]:
        assert set(ROW_KEYS) <= set(row) <= set(ROW_KEYS) | {"note"}
    assert set(raw["tables"]) == set(TABLES)


@pytest.mark.parametrize(
    "table, method, backbone, column, value",
    [
        ("VII", "resim", "resnet50", "25-shot AP", 50.4),
        ("VII", "scratch", "vit_small_patch16_224", "25-shot F1", 6.8),
        ("VII", "dino", "resnet50", "50-shot F1", 53.3),
        ("III", "spark", "resnet200", "AP_S (no cls)", 35.2),
        ("III", "dino", "vit_base_patch16_224", "AP_S@0.3 (no cls)", 68.1),
        ("III", "mae", "vit_base_patch16_224", "mAP (cls)", 47.8),
        ("IV", "mae", "vit_small_patch16_224", "IR AP", 88.4),
        ("IV", "dino", "vit_base_patch16_224", "RGB F1", 89.6),
        ("IV", "scratch", "vit_base_patch16_224", "IR AP", 58.5),
        ("VI", "mae", "vit_small_patch16_224", "IR AP", 88.3),
        ("VI", "leopart", "vit_small_patch16_224", "IR F1", 76.7),
        ("VI", "resim", "resnet50", "delta AP", -8.5),
        ("VI", "spark", "resnet50", "delta F1", -3.4),
    ],
)
def test_spot_values(ev, table, method, backbone, column, value):
    assert ev.require(table, method, backbone, column).value == value


def test_citation_format(ev):
    row = ev.require("VII", "resim", "resnet50", "25-shot AP")
    assert row.cite() == "Table VII, ReSim R50, 25-shot AP 50.4"
    assert row.as_json() == {"table": "Table VII", "row": "ReSim R50", "metric": "25-shot AP", "value": 50.4}
    assert ev.require("VI", "mae", "vit_small_patch16_224", "delta AP").cite() == "Table VI, MAE-IR ViT/S-16, delta AP -0.1"


def test_mae_vits_rows_say_weights_are_not_public(ev):
    rows = [r for r in ev.rows if r.method == "mae" and r.backbone == "vit_small_patch16_224" and r.table in ("IV", "VII")]
    assert len(rows) == 8 and all(r.note and "not public" in r.note for r in rows)


def test_table_vi_deltas_match_table_iv(ev):
    """Table VI's deltas are Table VI minus the same method's ImageNet row in Table IV (IR)."""
    for r in ev.find(table="VI", metric="AP"):
        if r.method == "scratch":
            continue
        base = ev.require("IV", r.method, r.backbone, "IR AP").value
        assert ev.require("VI", r.method, r.backbone, "delta AP").value == pytest.approx(r.value - base, abs=0.051)
        f1 = ev.require("VI", r.method, r.backbone, "IR F1").value
        base_f1 = ev.require("IV", r.method, r.backbone, "IR F1").value
        assert ev.require("VI", r.method, r.backbone, "delta F1").value == pytest.approx(f1 - base_f1, abs=0.051)


def _markdown_tables(text: str) -> dict[str, list[list[str]]]:
    """Rows of each '## Table N' section of survey-tables.md (header and rule lines dropped)."""
    out: dict[str, list[list[str]]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"## Table (III|IV|VI|VII)\b", line)
        if m:
            current = m.group(1)
            out[current] = []
            continue
        if line.startswith("## "):
            current = None
        if current and line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[0] in ("size", "method"):
                continue
            out[current].append(cells)
    return out


@pytest.mark.skipif(not SURVEY_TABLES.is_file(), reason="survey-tables.md is not beside the checkout")
def test_every_number_matches_survey_tables(ev):
    tables = _markdown_tables(SURVEY_TABLES.read_text(encoding="utf-8"))
    columns = {
        "III": ["mAP (cls)", "AP (no cls)", "AP50 (no cls)", "AP_S (no cls)", "AP_S@0.3 (no cls)"],
        "IV": ["RGB AP", "RGB F1", "IR AP", "IR F1"],
        "VI": ["IR AP", "delta AP", "IR F1", "delta F1"],
        "VII": ["25-shot AP", "25-shot F1", "50-shot AP", "50-shot F1"],
    }
    seen = 0
    for table, rows in tables.items():
        for cells in rows:
            if table in ("III", "IV"):
                cells = cells[1:]  # the size group
            label, backbone_label, values = cells[0], cells[1], cells[2:]
            method = label.lower().removesuffix("-ir")
            backbone = LABEL_TO_BACKBONE[backbone_label]
            for column, text in zip(columns[table], values):
                if not text:
                    assert ev.get(table, method, backbone, column) is None
                    continue
                row = ev.require(table, method, backbone, column)
                assert row.value == float(text), (table, label, backbone_label, column)
                assert row.method_label.lower() == label.lower()
                seen += 1
    assert seen == len(ev.rows) == 134


def test_rule_texts_cite_existing_rows(ev):
    rules = load_rules()
    texts = [n["text"] for n in rules.notes] + [c.unavailable for c in rules.candidates if c.unavailable]
    refs = [row for t in texts for row in ev.references(t)]
    assert len(refs) > 40  # the notes quote the survey's numbers through the evidence file
    for t in texts:
        rendered = ev.render(t)
        assert "{ev:" not in rendered and "{cite:" not in rendered


def test_catalogue_names_exist():
    catalogue = Path(__import__("sslrecipe").__file__).parent / "weights" / "catalogue.yaml"
    if not catalogue.is_file():
        pytest.skip("the weights catalogue has not landed")
    names = {e["name"] for e in yaml.safe_load(catalogue.read_text())["entries"]}
    entries = {e["name"]: e for e in yaml.safe_load(catalogue.read_text())["entries"]}
    for c in load_rules().candidates:
        for name in (c.weights, c.continue_from):
            if name is not None:
                assert name in names, name
                assert entries[name]["backbone"] == c.backbone and entries[name]["method"] == c.method
