"""Compare runs side by side, in the layouts of `sslrecipe compare` (flat, or the survey's Tables III, IV, VI,
VII): the table is built by `sslrecipe.report.compare.build_table`, the same code that writes a matrix's
comparison.md, so the three agree. `t` switches the layout; the best value of each column is highlighted."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from rich.text import Text
from sslrecipe.tui.common import error_message, guarded, status_text
from sslrecipe.tui.runs import RunWatcher, format_value
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from sslrecipe.report.compare import LAYOUTS, RunRecord, Table, build_table, matrix_of

MAX_KEYS = 5


def record_of(watcher: RunWatcher) -> RunRecord:
    """A run as the comparison sees it, from what the TUI already follows (status with the process check)."""
    from sslrecipe.engine.matrix import read_cell_info

    status, _ = watcher.status()
    errors = [n.message for n in watcher.state.notes if n.kind == "error"]
    return RunRecord(watcher.path, watcher.label, watcher.recipe.data if watcher.recipe else {}, dict(watcher.metrics),
                     status, errors[-1] if errors and status != "finished" else None,
                     read_cell_info(watcher.path) or {})


class CompareScreen(Screen):
    BINDINGS = [Binding("escape", "back", "Back"), Binding("t", "layout", "Layout")]

    def __init__(self, runs: list[tuple[Path, str]], layout: str = "flat"):
        super().__init__()
        self.runs = runs
        self.layout_name = layout
        self.records: list[RunRecord] = []
        self.table: Optional[Table] = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="compare-head")
        yield DataTable(id="compare-table", zebra_stripes=True, cursor_type="row")
        yield Static(id="compare-note")
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        self.query_one("#compare-head", Static).update(Text("reading runs…", "dim"))
        self._load()

    @work(thread=True, exit_on_error=False)
    def _load(self) -> None:
        records, error = None, None
        try:
            records = []
            for path, label in self.runs:
                w = RunWatcher(path, label)
                w.poll()
                if w.refused is not None:  # a newer run-directory layout: left out, and said so
                    self.app.call_from_thread(self.notify, w.refused, title="compare: skipped", severity="warning",
                                              markup=False)
                    continue
                records.append(record_of(w))
        except Exception as e:  # noqa: BLE001 - shown as a notification
            error = e
        try:
            self.app.call_from_thread(self._loaded, records, error)
        except RuntimeError:
            pass

    @guarded
    def _loaded(self, records: Optional[list[RunRecord]], error: Optional[BaseException]) -> None:
        if error is not None:
            self.notify(error_message(error), title="compare", severity="error", markup=False)
            return
        self.records = records or []
        self._show()

    def action_layout(self) -> None:
        self.layout_name = LAYOUTS[(LAYOUTS.index(self.layout_name) + 1) % len(LAYOUTS)]
        if self.records:
            self._show()

    @guarded
    def _show(self) -> None:
        self.sub_title = f"comparing {len(self.records)} run{'s' * (len(self.records) != 1)} · layout {self.layout_name} (t: next)"
        matrix = matrix_of(self.records) if self.layout_name == "flat" else None
        self.table = table = build_table(self.records, self.layout_name, matrix=matrix)
        keys = table.key_columns[:MAX_KEYS]
        metrics = table.metric_columns
        replicated = any(r.replicates > 1 for r in table.rows)
        widget = self.query_one("#compare-table", DataTable)
        widget.clear(columns=True)
        # what sets the runs apart first (the recipe keys that differ), then their metrics: at 80 columns the
        # metrics scroll off to the right, the differences do not
        widget.add_column("run" if self.layout_name == "flat" else "method · backbone", key="row")
        for c in keys:
            widget.add_column(c.label, key=c.key)
        for c in metrics:
            widget.add_column(c.label, key=c.key)
        if replicated:
            widget.add_column("seeds", key="seeds")
        widget.add_column("status", key="status")
        for i, r in enumerate(table.rows):
            cells: list = [Text(r.label, "bold")]
            cells += [Text(format_value(r.keys.get(c.label)) if r.keys.get(c.label) is not None else "—",
                           "cyan" if r.keys.get(c.label) is not None else "dim") for c in keys]
            for c in metrics:
                v = r.values[c.key]
                cell = Text(v.text(), "dim" if v.mean is None else "", justify="right")
                if v.best:
                    cell.stylize("bold green")
                cells.append(cell)
            if replicated:
                cells.append(Text(str(r.replicates), "dim", justify="right"))
            word, _, count = r.status.partition(" ")  # e.g. "failed (1/3)"
            cells.append(Text.assemble(status_text(word), (f" {count}" if count else "", "dim")) if word != "finished"
                         else Text("finished", "dim"))
            widget.add_row(*cells, key=f"{i}:{r.label}", height=None)
        head = Text.assemble((table.title + "\n", "bold"), (" ".join(n.replace("**", "") for n in table.notes), "dim"))
        self.query_one("#compare-head", Static).update(head)
        note = self.query_one("#compare-note", Static)
        errors = [e for r in table.rows for e in r.errors]
        if errors:
            note.update(Text("failed: " + " · ".join(e.splitlines()[0] for e in errors), "red"))
        elif len(table.key_columns) > MAX_KEYS:
            note.update(Text("Also different: " + ", ".join(c.label for c in table.key_columns[MAX_KEYS:]), "dim"))
        elif self.layout_name == "flat" and not table.key_columns and len(table.rows) > 1:
            note.update(Text("The runs' recipes are identical (apart from their names and seeds).", "dim"))
        else:
            note.update(Text("t: next layout (flat, Tables III, IV, VI, VII) · Esc: back", "dim"))

    def action_back(self) -> None:
        self.app.pop_screen()
