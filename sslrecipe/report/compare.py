"""Compare runs side by side: a matrix's `comparison.md` / `.csv`, `sslrecipe compare` and the TUI's compare screen
all build their table here (`build_table`), so they agree.

Layouts:

- `flat`: one row per run, or per cell of a matrix: the recipe keys that differ (for a matrix: its arm and axes)
  as columns, then the COCO box metrics and the survey's (class-agnostic AP, AP_S@0.3, AP@0.05, F1).
- `table3`, `table4`, `table6`, `table7`: the survey's tables. Rows are (method, backbone); the columns are the
  table's metrics: Table III the COCO box AP with classes and class-agnostic; Table IV AP@0.05 and F1 per input
  domain (IR = 1 channel, RGB = 3); Table VI AP@0.05 and F1 with the change against the same method's public
  weights; Table VII AP@0.05 and F1 per number of shots.

Runs that differ only in a seed (`seed`, `finetune.seed`, and in the survey layouts `data.shots_seed`; a matrix's
`matrix.seeds`) are one row: mean ± sample std over them. The best value of each metric is marked within its
group (a matrix: the rows that differ only in the arm; else the whole column). A matrix's arms are compared with its
baseline arm: `(+1.2)` is the difference to the baseline at the same axis values.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from sslrecipe.engine.rundir import RunLayoutError, run_layout
from sslrecipe.errors import DataError

LAYOUTS = ("flat", "table3", "table4", "table6", "table7")
BOX = ("bbox/mAP", "bbox/AP50", "bbox/AP75", "bbox/AP_small", "bbox/AP_medium", "bbox/AP_large")
SURVEY = ("agnostic/mAP", "agnostic/AP_small@0.3", "agnostic/AP@0.05", "F1")
FLAT_METRICS = BOX + SURVEY

METRIC_LABELS = {
    "bbox/mAP": "mAP", "bbox/AP50": "AP50", "bbox/AP75": "AP75", "bbox/AP_small": "AP_S", "bbox/AP_medium": "AP_M",
    "bbox/AP_large": "AP_L", "bbox/AR100": "AR100", "bbox/AP@0.05": "AP@0.05",
    "agnostic/mAP": "AP (no cls)", "agnostic/AP50": "AP50 (no cls)", "agnostic/AP_small": "AP_S (no cls)",
    "agnostic/AP_small@0.3": "AP_S@0.3 (no cls)", "agnostic/AP@0.05": "AP@0.05 (no cls)",
}

# seeds: runs that differ only in these are replicates of one row
RUN_REPLICATES = ("seed", "finetune.seed")
SURVEY_REPLICATES = RUN_REPLICATES + ("data.shots_seed",)
_SKIPPED = ("name", "extends", "version")  # the recipe format version is no difference between experiments
_SKIPPED_PREFIXES = ("matrix.", "runtime.")


@dataclass(frozen=True)
class Layout:
    name: str
    title: str
    metrics: tuple[tuple[str, str], ...]  # (metric key, column label)
    group_by: Optional[str] = None  # facet whose values make column groups: "domain" | "shots"
    delta_public: bool = False  # Table VI: own-data pre-training against the same method's public weights


SURVEY_LAYOUTS = {
    "table3": Layout("table3", "Table III layout (COCO Mask R-CNN): box AP with classes, then class-agnostic",
                     (("bbox/mAP", "mAP (cls)"), ("agnostic/mAP", "AP (no cls)"), ("agnostic/AP50", "AP50 (no cls)"),
                      ("agnostic/AP_small", "AP_S (no cls)"), ("agnostic/AP_small@0.3", "AP_S@0.3 (no cls)"))),
    "table4": Layout("table4", "Table IV layout (VEDAI RGB/IR Faster R-CNN): class-agnostic AP at IoU 0.05 and F1 per domain",
                     (("agnostic/AP@0.05", "AP"), ("F1", "F1")), group_by="domain"),
    "table6": Layout("table6", "Table VI layout (in-domain pre-training): AP@0.05 and F1, (delta) against the same "
                     "method's public weights", (("agnostic/AP@0.05", "AP"), ("F1", "F1")), delta_public=True),
    "table7": Layout("table7", "Table VII layout (few-shot): class-agnostic AP at IoU 0.05 and F1 per number of shots",
                     (("agnostic/AP@0.05", "AP"), ("F1", "F1")), group_by="shots"),
}


# --------------------------------------------------------------------------- reading runs


@dataclass
class RunRecord:
    """What a comparison needs from one run directory."""

    path: Path
    label: str
    recipe: dict[str, Any]  # resolved.yaml
    metrics: dict[str, Any]
    status: str = "finished"  # finished | failed | interrupted | unfinished | running | not run
    error: Optional[str] = None
    cell: dict[str, Any] = field(default_factory=dict)  # a matrix cell's cell.json


def _status_from_events(path: Path) -> tuple[str, Optional[str], dict[str, Any]]:
    from sslrecipe.engine.events import read_events

    status, error, metrics, started = "not run", None, {}, False
    for e in read_events(path):
        kind = e.get("event")
        if kind == "run_start":
            status, error, started = "unfinished", None, True
        elif kind == "error":
            error = e.get("message")
        elif kind == "run_end":
            status = e.get("status") or "unfinished"
        elif kind == "metric" and isinstance(e.get("name"), str):
            metrics[e["name"]] = e.get("value")
    if not started and error:
        status = "failed"
    return status, error if status != "finished" else None, metrics


def read_run(path: Path, label: Optional[str] = None, cell: Optional[dict] = None) -> RunRecord:
    """A run directory as a record; a missing or unreadable file leaves its part empty (never an exception)."""
    from sslrecipe.engine.matrix import read_cell_info

    path = Path(path)
    try:
        recipe = yaml.safe_load((path / "resolved.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        recipe = None
    status, error, metrics = _status_from_events(path / "events.jsonl")
    try:
        stored = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
        if isinstance(stored, dict):
            metrics.update(stored)
    except (OSError, ValueError):
        pass
    if cell is None:
        cell = read_cell_info(path) or {}
    return RunRecord(path, label or path.name, recipe if isinstance(recipe, dict) else {}, metrics, status, error, cell)


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "events.jsonl").is_file()


def _layout_refusal(path: Path) -> Optional[str]:
    """Why `path` (a run or a matrix folder) is not read: a newer run-directory layout; None when it is readable."""
    try:
        run_layout(path)
    except RunLayoutError as e:
        return str(e)
    return None


def run_dirs(paths: Iterable[str | Path], skipped: Optional[list[str]] = None) -> list[tuple[Path, str]]:
    """(run directory, label) for each path: a run, or the runs inside a folder (a matrix's cells, a runs folder).
    A directory of a newer layout is left out, with the reason appended to `skipped` (raised when it is None)."""
    out: list[tuple[Path, str]] = []
    refused: list[str] = []

    def readable(path: Path) -> bool:
        refusal = _layout_refusal(path)
        if refusal is not None and skipped is None:
            raise RunLayoutError(refusal)
        if refusal is not None:
            refused.append(refusal)
            skipped.append(refusal)
        return refusal is None

    for given in paths:
        p = Path(given)
        if is_run_dir(p):
            if readable(p):
                out.append((p, p.name))
            continue
        if not p.is_dir():
            raise DataError(f"{p}: no such run directory")
        found = []
        before = len(refused)
        if not readable(p):  # a matrix folder of a newer layout: its cells are left out with it
            continue
        for child in sorted(c for c in p.iterdir() if c.is_dir()):
            if is_run_dir(child):
                if readable(child):
                    found.append((child, f"{p.name}/{child.name}"))
                continue
            if not readable(child):
                continue
            # a matrix run inside a runs folder: its cells
            found += [(c, f"{child.name}/{c.name}") for c in sorted(child.iterdir())
                      if c.is_dir() and is_run_dir(c) and readable(c)]
        if not found and len(refused) > before:  # every run in it is of a newer layout: said in `skipped`
            continue
        if not found:
            raise DataError(f"{p}: not a run directory (no events.jsonl) and no runs inside it; give run directories, "
                            "e.g. runs/<name>-<timestamp> or a matrix run's folder")
        out.extend(found)
    return out


def load_runs(paths: Iterable[str | Path], skipped: Optional[list[str]] = None) -> list[RunRecord]:
    """The runs at `paths`; those of a newer layout are refused, or with `skipped` left out with a note there (see
    `run_dirs`); when that leaves none, a DataError says why."""
    found = run_dirs(paths, skipped)
    if not found:
        raise DataError("nothing to compare: " + "; ".join(skipped or []))
    return [read_run(p, label) for p, label in found]


def matrix_of(records: list[RunRecord]) -> Optional[dict[str, Any]]:
    """The matrix spec when every record is a cell of one matrix run (then a flat table has arm/axis columns)."""
    if not records or not all(r.cell for r in records):
        return None
    parents = {r.path.resolve().parent for r in records}
    if len(parents) != 1:
        return None
    from sslrecipe.engine.matrix import matrix_spec
    from sslrecipe.errors import SSLRecipeError
    from sslrecipe.recipe import load_recipe

    try:
        recipe = load_recipe(parents.pop() / "resolved.yaml")
    except (SSLRecipeError, OSError):
        return None
    return matrix_spec(recipe) if recipe.matrix is not None else None


# --------------------------------------------------------------------------- facets of a run


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif prefix:
        out[prefix[:-1]] = data
    return out


METHOD_NAMES = {"mae": "MAE", "dino": "DINO", "resim": "ReSim", "leopart": "Leopart", "spark": "SparK", "hybrid": "Hybrid"}
_VIT_SIZES = {"tiny": "T", "small": "S", "base": "B", "large": "L", "huge": "H"}


def backbone_label(name: Any) -> str:
    """resnet50 -> R50, vit_small_patch16_224 -> ViT/S-16 (the survey's names); anything else as it is."""
    name = str(name or "?")
    m = re.fullmatch(r"resnet(\d+)[a-z]?", name)
    if m:
        return f"R{m.group(1)}"
    m = re.match(r"vit_(tiny|small|base|large|huge)_patch(\d+)", name)
    if m:
        return f"ViT/{_VIT_SIZES[m.group(1)]}-{m.group(2)}"
    return name


def method_of(flat: dict[str, Any]) -> tuple[str, str]:
    """(method, initialisation): ("scratch", "scratch"), ("resim", "own data"), ("dino", "public"), ("x", "file")."""
    source = flat.get("weights.source", "scratch")
    if source == "pretrain":
        method, first = flat.get("pretrain.method") or "?", flat.get("pretrain.first.method")
        return (f"{first}→{method}" if first else str(method)), "own data"
    if source == "fetch":
        wid = str(flat.get("weights.id") or "?")
        try:
            from sslrecipe.weights.catalogue import find_entry

            entry = find_entry(wid)
        except Exception:  # noqa: BLE001 - an unreadable catalogue leaves the id as the name
            entry = None
        return (str(entry.method) if entry is not None and getattr(entry, "method", None) else wid), "public"
    if source == "file":
        return Path(str(flat.get("weights.path") or "?")).stem, "file"
    return "scratch", "scratch"


def method_label(method: str, init: str) -> str:
    shown = "→".join(METHOD_NAMES.get(m, m) for m in method.split("→"))
    return {"own data": f"{shown} (own data)", "public": f"{shown} (public)", "file": f"{shown} (file)"}.get(init, shown)


def domain_of(flat: dict[str, Any]) -> str:
    chans = flat.get("backbone.in_chans", 3)
    return {1: "IR", 3: "RGB"}.get(chans, f"{chans}-band")


def shots_of(flat: dict[str, Any]) -> str:
    shots = flat.get("data.shots")
    return f"{shots}-shot" if shots else "all labels"


# keys a facet accounts for: runs that differ in them are told apart by the facet, not by an extra label
_EXPLAINED = {
    "method": ("weights.", "pretrain.", "data.unlabeled", "data.dedup", "data.allow_leakage"),
    "backbone": ("backbone.name", "backbone.kwargs"),
    "domain": ("backbone.in_chans", "data.train", "data.val", "data.test", "data.images", "data.format",
               "data.synthetic", "data.normalize", "data.split"),
    "shots": ("data.shots",),
}


def _explained(key: str, facets: Iterable[str]) -> bool:
    for facet in facets:
        for prefix in _EXPLAINED[facet]:
            if key.startswith(prefix) if prefix.endswith(".") else (key == prefix or key.startswith(prefix + ".")):
                return True
    return False


# keys read only for one weights source: a scratch run's resolved pretrain.* (defaults) is not a difference
_SOURCE_KEYS = (("pretrain.", "pretrain"), ("data.unlabeled", "pretrain"), ("data.dedup", "pretrain"),
                ("data.allow_leakage", "pretrain"), ("weights.id", "fetch"), ("weights.path", "file"),
                ("weights.sha256", ("fetch", "file")), ("weights.format", ("fetch", "file")))


def applies(key: str, flat: dict[str, Any]) -> bool:
    """Whether a run reads this recipe key: pre-training keys only with `weights.source: pretrain` (and only the
    options of its own method), `weights.id` only when fetching, `weights.path` only from a file."""
    source = flat.get("weights.source", "scratch")
    for prefix, sources in _SOURCE_KEYS:
        if key == prefix or key.startswith(prefix if prefix.endswith(".") else prefix + "."):
            if source not in ((sources,) if isinstance(sources, str) else sources):
                return False
    for section in ("pretrain.", "pretrain.first."):
        if key.startswith(section + "options."):
            method = key[len(section + "options."):].split(".", 1)[0]
            if method != flat.get(section + "method"):
                return False
    return True


def differing_keys(flats: list[dict[str, Any]], ignore: Iterable[str] = ()) -> list[str]:
    """Recipe keys whose values differ between the runs that read them (`applies`): keys all of them have first,
    then keys only some have."""
    if len(flats) < 2:
        return []
    ignore = set(ignore)
    keys: list[str] = []
    for f in flats:
        keys += [k for k in f if k not in keys]
    common, partial = [], []
    for k in keys:
        if k in ignore or k in _SKIPPED or k.startswith(_SKIPPED_PREFIXES):
            continue
        using = [f for f in flats if applies(k, f)]
        if len(using) > 1 and len({json.dumps(f.get(k), sort_keys=True, default=str) for f in using}) > 1:
            (common if all(k in f for f in using) else partial).append(k)
    return common + partial


# --------------------------------------------------------------------------- the table


@dataclass
class Column:
    key: str  # unique within the table
    label: str
    kind: str  # "key" | "metric"
    metric: Optional[str] = None
    group: Optional[str] = None  # a column group (Table IV: the domain; Table VII: the shots)


@dataclass
class Value:
    mean: Optional[float] = None
    std: Optional[float] = None  # sample std over seeds (n >= 2)
    n: int = 0
    best: bool = False
    delta: Optional[float] = None  # against the baseline row (or Table VI: the public weights)

    def text(self, digits: int = 1) -> str:
        if self.mean is None:
            return "n/a"
        out = f"{self.mean:.{digits}f}"
        if self.std is not None:
            out += f" ± {self.std:.{digits}f}"
        if self.delta is not None:
            out += f" ({round(self.delta, digits) + 0.0:+.{digits}f})"  # + 0.0: no "-0.0"
        return out


@dataclass
class Row:
    label: str
    keys: dict[str, Any]  # key column label (a recipe key, or "arm") -> value
    values: dict[str, Value]  # metric column -> value
    members: list[RunRecord]
    group: tuple = ()  # rows with the same group compete for "best"
    replicates: int = 1  # runs averaged into one value (seeds)
    facets: dict[str, Any] = field(default_factory=dict)  # survey layouts: method, init, backbone, extra keys

    def value(self, metric: str, group: Optional[str] = None) -> Value:
        """This row's value of `metric` (in column group `group`: Table IV's domain, Table VII's shots)."""
        return self.values[_metric_key(metric, group)]

    @property
    def status(self) -> str:
        """finished, or the worst state of its runs, with how many of them are in it: `failed (1/3)`."""
        states = [m.status for m in self.members]
        if all(s == "finished" for s in states):
            return "finished"
        worst = next((s for s in ("failed", "interrupted", "running", "unfinished", "not run") if s in states), states[0])
        count = states.count(worst)
        return worst if count == len(states) else f"{worst} ({count}/{len(states)})"

    @property
    def errors(self) -> list[str]:
        return [f"{m.label}: {m.error}" for m in self.members if m.error]


@dataclass
class Table:
    layout: str
    title: str
    columns: list[Column]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)

    @property
    def key_columns(self) -> list[Column]:
        return [c for c in self.columns if c.kind == "key"]

    @property
    def metric_columns(self) -> list[Column]:
        return [c for c in self.columns if c.kind == "metric"]

    def _replicated(self) -> bool:
        return any(r.replicates > 1 for r in self.rows)

    def _show_status(self) -> bool:
        return any(r.status != "finished" for r in self.rows)

    def to_markdown(self, heading: bool = True) -> str:
        head = ["run" if self.layout == "flat" and not self.key_columns else "row"]
        head += [c.label for c in self.key_columns] + [c.label for c in self.metric_columns]
        if self._replicated():
            head.append("seeds")
        if self._show_status():
            head.append("status")
        lines = ([self.title, ""] if heading else []) + list(self.notes) + ([""] if self.notes else [])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [r.label] + [_fmt_key(r.keys.get(c.label)) for c in self.key_columns]
            for c in self.metric_columns:
                v = r.values[c.key]
                cells.append(f"**{v.text()}**" if v.best else v.text())
            if self._replicated():
                cells.append(str(r.replicates))
            if self._show_status():
                cells.append(r.status)
            lines.append("| " + " | ".join(s.replace("|", "\\|") for s in cells) + " |")
        errors = [e for r in self.rows for e in r.errors]
        if errors:
            lines += ["", "Failed:", ""] + [f"- {e.splitlines()[0]}" for e in errors]
        return "\n".join(lines)

    def to_csv(self) -> str:
        """One row per table row: the key columns, then each metric column's mean (and `_std`, `_delta` where
        any row has them), the seeds, the status, the columns where the row is best, errors and run dirs."""
        stds = {c.key for c in self.metric_columns if any(r.values[c.key].std is not None for r in self.rows)}
        deltas = {c.key for c in self.metric_columns if any(r.values[c.key].delta is not None for r in self.rows)}
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        header = ["row"] + [c.label for c in self.key_columns]
        for c in self.metric_columns:
            name = _csv_name(c)
            header += [name] + ([f"{name}_std"] if c.key in stds else []) + ([f"{name}_delta"] if c.key in deltas else [])
        writer.writerow(header + ["seeds", "status", "best", "error", "runs"])
        for r in self.rows:
            line: list[Any] = [r.label] + [_fmt_key(r.keys.get(c.label)) for c in self.key_columns]
            for c in self.metric_columns:
                v = r.values[c.key]
                line += [_num(v.mean)] + ([_num(v.std)] if c.key in stds else []) + ([_num(v.delta)] if c.key in deltas else [])
            best = [_csv_name(c) for c in self.metric_columns if r.values[c.key].best]
            writer.writerow(line + [r.replicates, r.status, " ".join(best), " | ".join(e.replace("\n", " ") for e in r.errors),
                                    " ".join(str(m.path) for m in r.members)])
        return out.getvalue()


def _csv_name(c: Column) -> str:
    return f"{c.group}/{c.metric}" if c.group else str(c.metric)


def _num(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.4g}" if abs(v) < 1 else f"{v:.4f}".rstrip("0").rstrip(".")


def _short(v: Any) -> str:
    """A path's file name without its suffix (rgb.json -> rgb); anything else as written."""
    if isinstance(v, str) and ("/" in v or "\\" in v):
        return Path(v).stem
    return _fmt_key(v)


def _fmt_key(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def _aggregate(members: list[RunRecord], metric: str) -> Value:
    values = [m.metrics.get(metric) for m in members if m.status == "finished"]
    values = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not values:
        return Value(None, None, 0)
    return Value(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def _mark_best(rows: list[Row], columns: list[Column]) -> None:
    for c in columns:
        groups: dict[tuple, list[Row]] = {}
        for r in rows:
            groups.setdefault(r.group, []).append(r)
        for members in groups.values():
            scored = [r for r in members if r.values[c.key].mean is not None]
            if len(scored) < 2:
                continue
            top = max(r.values[c.key].mean for r in scored)
            if top > min(r.values[c.key].mean for r in scored):
                for r in scored:
                    r.values[c.key].best = r.values[c.key].mean == top


def _group_rows(records: list[RunRecord], identity) -> list[tuple[Any, list[RunRecord]]]:
    grouped: dict[str, tuple[Any, list[RunRecord]]] = {}
    for r in records:
        ident = identity(r)
        key = json.dumps(ident, sort_keys=True, default=str)
        grouped.setdefault(key, (ident, []))[1].append(r)
    return list(grouped.values())


def _row_label(members: list[RunRecord]) -> str:
    labels = [m.label for m in members]
    return labels[0] if len(labels) == 1 else " + ".join(labels) if len(labels) <= 3 else f"{labels[0]} (+{len(labels) - 1})"


def build_table(records: list[RunRecord], layout: str = "flat", metrics: Optional[Iterable[str]] = None,
                matrix: Optional[dict[str, Any]] = None) -> Table:
    """The comparison of `records` in `layout`; `metrics` replaces the layout's metric columns; `matrix` (a
    `matrix_spec`) makes a flat table of a matrix's cells: arm and axis columns, seeds aggregated, deltas."""
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout '{layout}'; layouts: {', '.join(LAYOUTS)}")
    metrics = list(metrics) if metrics else None
    if layout == "flat":
        return _flat(records, metrics, matrix)
    return _survey(records, SURVEY_LAYOUTS[layout], metrics)


def _metric_key(metric: str, group: Optional[str] = None) -> str:
    return f"metric:{group or ''}|{metric}"


def _metric_columns(records: list[RunRecord], wanted: list[str], labels: dict[str, str], group: Optional[str] = None,
                    keep_all: bool = False) -> list[Column]:
    present = [m for m in wanted if keep_all or any(m in r.metrics for r in records)]
    prefix = f"{group} " if group else ""
    return [Column(_metric_key(m, group), prefix + labels.get(m, METRIC_LABELS.get(m, m)), "metric", m, group)
            for m in present]


def _flat(records: list[RunRecord], metrics: Optional[list[str]], matrix: Optional[dict[str, Any]]) -> Table:
    notes = [("COCO box metrics and the survey's class-agnostic AP, AP_S@0.3, AP@0.05 and F1, in percent, on each "
              "run's evaluation split.")]
    baseline = None
    if matrix is not None:
        key_names = (["arm"] if matrix.get("arms") else []) + list(matrix.get("axes") or [])

        def keys_of(r: RunRecord) -> dict[str, Any]:
            axes = r.cell.get("axes") or {}
            return {"arm": r.cell.get("arm"), **{k: axes.get(k) for k in matrix.get("axes") or []}}

        grouped = _group_rows(records, lambda r: r.cell.get("group") or r.label)
        baseline = matrix.get("baseline")
        if matrix.get("seeds", 1) > 1:
            notes.append(f"Mean ± std over {matrix['seeds']} fine-tuning seeds (`matrix.seeds`).")
    else:
        flats = [flatten(r.recipe) for r in records]
        key_names = differing_keys(flats, ignore=RUN_REPLICATES)
        by_path = {id(r): f for r, f in zip(records, flats)}

        def keys_of(r: RunRecord) -> dict[str, Any]:
            flat = by_path[id(r)]
            return {k: flat.get(k) if applies(k, flat) else None for k in key_names}  # —: not read

        grouped = _group_rows(records, keys_of)
        if any(len(m) > 1 for _, m in grouped):
            notes.append("Runs that differ only in a seed (`seed`, `finetune.seed`) are one row: mean ± std.")
    columns = [Column(f"key:{k}", k, "key") for k in key_names]
    columns += _metric_columns(records, metrics or list(FLAT_METRICS), {}, keep_all=bool(metrics))
    rows = []
    for _ident, members in grouped:
        keys = keys_of(members[0])
        values = {c.key: _aggregate(members, c.metric) for c in columns if c.kind == "metric"}
        label = members[0].cell.get("group") if matrix is not None and members[0].cell.get("group") else _row_label(members)
        # best among the rows that differ only in the arm (a matrix with arms), or only in the first axis, or all
        if matrix is not None and matrix.get("arms"):
            group = tuple(json.dumps(keys.get(k), default=str) for k in key_names if k != "arm")
        elif matrix is not None and len(key_names) > 1:
            group = tuple(json.dumps(keys.get(k), default=str) for k in key_names[1:])
        else:
            group = ()
        rows.append(Row(label, keys, values, members, group, replicates=len(members)))
    _mark_best(rows, [c for c in columns if c.kind == "metric"])
    if baseline is not None:
        base = {r.group: r for r in rows if r.keys.get("arm") == baseline}
        for r in rows:
            ref = base.get(r.group)
            if ref is None or r is ref:
                continue
            for c in columns:
                if c.kind == "metric" and r.values[c.key].mean is not None and ref.values[c.key].mean is not None:
                    r.values[c.key].delta = r.values[c.key].mean - ref.values[c.key].mean
        notes.append(f"(+x): difference to the baseline arm '{baseline}' at the same axis values.")
    notes.append("**Bold**: the best value of its column" + (" among the arms at the same axis values." if
                 matrix is not None and matrix.get("arms") else "."))
    return Table("flat", "Comparison", columns, rows, notes)


def _survey(records: list[RunRecord], layout: Layout, metrics: Optional[list[str]]) -> Table:
    flats = [flatten(r.recipe) for r in records]
    facets = ("method", "backbone") + ((layout.group_by,) if layout.group_by else ())
    differing = differing_keys(flats, ignore=SURVEY_REPLICATES)
    extras = [k for k in differing if not _explained(k, facets)]
    # Table IV's domains: the labeled data that differs between the runs (e.g. rgb.json / ir.json), else the channels
    domain_keys = [k for k in differing if _explained(k, ("domain",)) and k != "backbone.in_chans"]
    info = []
    for r, f in zip(records, flats):
        method, init = method_of(f)
        extra = {k: f.get(k) for k in extras}
        label = f"{method_label(method, init)} {backbone_label(f.get('backbone.name'))}"
        label += "".join(f" · {k}={_fmt_key(v)}" for k, v in extra.items())
        if layout.group_by == "domain":
            group = "/".join(_short(f.get(k)) for k in domain_keys) if domain_keys else domain_of(f)
        else:
            group = shots_of(f) if layout.group_by == "shots" else None
        info.append({"record": r, "label": label, "group": group, "method": method, "init": init,
                     "backbone": f.get("backbone.name"), "extra": extra, "shots": f.get("data.shots")})
    groups: list[Optional[str]] = []
    for i in info:
        if i["group"] not in groups:
            groups.append(i["group"])
    if layout.group_by == "shots":  # 25-shot before 50-shot, then all labels
        groups.sort(key=lambda g: (g == "all labels", int(g.split("-")[0]) if g and g[0].isdigit() else 0))
    wanted = metrics or [m for m, _ in layout.metrics]
    labels = dict(layout.metrics)
    columns = [c for g in groups for c in _metric_columns(records, wanted, labels, g, keep_all=True)]
    rows: list[Row] = []
    by_label: dict[str, list[dict]] = {}
    for i in info:
        by_label.setdefault(i["label"], []).append(i)
    for label, items in by_label.items():
        values = {}
        for c in columns:
            members = [i["record"] for i in items if i["group"] == c.group]
            values[c.key] = _aggregate(members, c.metric)
        replicates = max(sum(1 for i in items if i["group"] == g) for g in groups)
        rows.append(Row(label, {}, values, [i["record"] for i in items], replicates=replicates, facets=items[0]))
    _mark_best(rows, columns)
    notes = ["Metrics in percent on each run's evaluation split; **bold**: the best of its column."]
    if any(r.replicates > 1 for r in rows):
        notes.append("Runs that differ only in a seed are one cell: mean ± std.")
    if layout.delta_public:
        for r in rows:
            f = r.facets
            if f["init"] != "own data":
                continue
            ref = next((o for o in rows if o.facets["init"] == "public" and o.facets["method"] == f["method"]
                        and o.facets["backbone"] == f["backbone"] and o.facets["extra"] == f["extra"]), None)
            if ref is None:
                continue
            for c in columns:
                a, b = r.values[c.key].mean, ref.values[c.key].mean
                if a is not None and b is not None:
                    r.values[c.key].delta = a - b
        notes.append("(delta): own-data pre-training minus the same method and backbone with public weights, as in "
                     "Table VI (there: SSL-IR minus ImageNet).")
    if layout.group_by == "domain":
        notes.append(f"Domains: {', '.join(domain_keys)} (the data that differs between the runs)." if domain_keys
                     else "Domain from backbone.in_chans: 1 channel = IR, 3 = RGB.")
    return Table(layout.name, layout.title, columns, rows, notes)
