"""Compare runs side by side: one row per run, the recipe keys that differ, then the box metrics
(the layout of the survey's tables and of a matrix's comparison.md); the best value of each metric
is highlighted."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from sslrecipe.tui.common import error_message, guarded, status_text
from sslrecipe.tui.runs import (
    METRIC_ORDER, RunWatcher, differing_keys, flatten, format_seconds, format_value, metric_label,
)

MAX_KEYS = 5
# the columns of the survey's tables (and of a matrix's comparison.md), then the low-IoU / counting views
COMPARED = METRIC_ORDER + ("bbox/AP@0.05", "agnostic/mAP", "agnostic/AP_small@0.3", "F1", "F1@0.05")


def comparison(watchers: list[RunWatcher]) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """(recipe keys that differ, metric names, one row per run)."""
    recipes = [w.recipe for w in watchers]
    keys = differing_keys(recipes)
    metrics = [m for m in COMPARED if any(m in w.metrics for w in watchers)]
    rows = []
    for w in watchers:
        flat = flatten(w.recipe.data) if w.recipe else {}
        status, _ = w.status()
        rows.append({"label": w.label, "path": w.path, "status": status, "seconds": w.state.seconds,
                     "keys": {k: flat.get(k) for k in keys}, "present": {k for k in keys if k in flat}, "metrics": {m: w.metrics.get(m) for m in metrics}})
    return keys, metrics, rows


class CompareScreen(Screen):
    BINDINGS = [Binding("escape", "back", "Back")]

    def __init__(self, runs: list[tuple[Path, str]]):
        super().__init__()
        self.runs = runs
        self.keys: list[str] = []
        self.metrics: list[str] = []
        self.rows: list[dict[str, Any]] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="compare-head")
        yield DataTable(id="compare-table", zebra_stripes=True, cursor_type="row")
        yield Static(id="compare-note")
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        self.sub_title = f"comparing {len(self.runs)} run{'s' * (len(self.runs) != 1)}"
        self.query_one("#compare-head", Static).update(Text("reading runs…", "dim"))
        self._load()

    @work(thread=True, exit_on_error=False)
    def _load(self) -> None:
        result, error = None, None
        try:
            watchers = []
            for path, label in self.runs:
                w = RunWatcher(path, label)
                w.poll()
                watchers.append(w)
            result = comparison(watchers)
        except Exception as e:  # noqa: BLE001 - shown as a notification
            error = e
        try:
            self.app.call_from_thread(self._show, result, error)
        except RuntimeError:
            pass

    @guarded
    def _show(self, result: Optional[tuple], error: Optional[BaseException]) -> None:
        if error is not None:
            self.notify(error_message(error), title="compare", severity="error", markup=False)
            return
        self.keys, self.metrics, self.rows = result
        shown_keys = self.keys[:MAX_KEYS]
        table = self.query_one("#compare-table", DataTable)
        table.clear(columns=True)
        table.add_column("run", key="run")
        for m in self.metrics:
            table.add_column(metric_label(m), key=f"metric:{m}")
        table.add_column("time", key="time")
        for k in shown_keys:
            table.add_column(k, key=f"key:{k}")
        best = {}
        for m in self.metrics:
            values = [r["metrics"][m] for r in self.rows if isinstance(r["metrics"][m], (int, float))]
            if len(values) > 1 and max(values) > min(values):
                best[m] = max(values)
        for r in self.rows:
            cells: list[Any] = [Text.assemble((r["label"], "bold"), "\n", status_text(r["status"]))
                                if r["status"] != "finished" else Text(r["label"], "bold")]
            for m in self.metrics:
                v = r["metrics"][m]
                cell = Text(format_value(v), "dim" if v is None else "", justify="right")
                if m in best and v == best[m]:
                    cell.stylize("bold green")
                cells.append(cell)
            cells.append(Text(format_seconds(r["seconds"]), "dim"))
            cells += [Text(format_value(r["keys"][k]) if k in r["present"] else "—", "cyan") for k in shown_keys]
            table.add_row(*cells, key=str(r["path"]), height=None)
        head = Text.assemble(("COCO box metrics in percent on each run's evaluation split; ", "dim"),
                             ("best", "bold green"), (" of each column highlighted.", "dim"))
        self.query_one("#compare-head", Static).update(head)
        note = self.query_one("#compare-note", Static)
        if not self.keys:
            note.update(Text("The runs' recipes are identical (apart from their names).", "dim"))
        elif len(self.keys) > MAX_KEYS:
            note.update(Text("Also different: " + ", ".join(self.keys[MAX_KEYS:]), "dim"))
        else:
            note.update(Text("Recipe keys shown (cyan): the ones that differ between these runs.", "dim"))

    def action_back(self) -> None:
        self.app.pop_screen()
