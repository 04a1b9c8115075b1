"""The start screen: every run under the runs directory, updated live."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from sslrecipe.tui.common import bar_text, error_message, guarded, started_text, status_text
from sslrecipe.tui.runs import RunSummary, format_seconds

# what a glance needs first (status, metric), then the name cut to fit 80 columns; the recipe summary is in the
# detail pane below the table (its column, and the start time, scroll off to the right at 80 columns)
COLUMNS = (("mark", " "), ("status", "status"), ("metric", "mAP%/loss"), ("run", "run"),
           ("stage", "stage · progress"), ("recipe", "recipe"), ("started", "started"))


def cut_middle(text: str, width: int) -> str:
    """`advised-res…-20260105-120000`: a long run name keeps its start (what) and its end (up to 16 characters:
    the timestamp the run directory ends with, or a matrix cell)."""
    if len(text) <= width:
        return text
    if width < 2:
        return text[:width]
    tail = max((width - 1) // 2, min(16, width - 1 - 8))
    return text[:width - 1 - tail] + "…" + text[len(text) - tail:]


def name_width(screen_width: int) -> int:
    """Room for the run name: 24 characters at 80 columns (beside status, metric and a stage's progress bar),
    up to 60."""
    return max(16, min(60, screen_width - 56))


class RunsTable(DataTable):
    """The runs table; Enter opens the highlighted run."""

    BINDINGS = [Binding("enter", "select_cursor", "Open", show=True)]


class RunsScreen(Screen):
    """Runs under the runs directory with their status, stage, progress and key metric."""

    BINDINGS = [
        Binding("space", "mark", "Mark"),
        Binding("c", "compare", "Compare"),
        Binding("s", "stop", "Stop"),
        Binding("r", "resume", "Resume"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[RunSummary] = []
        self.marked: set[Path] = set()
        self._busy = False
        self._shown: dict[str, tuple] = {}

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="runs-title")
        table = RunsTable(id="runs-table", cursor_type="row", zebra_stripes=True)
        for key, label in COLUMNS:
            table.add_column(label, key=key)
        yield table
        yield Static(id="runs-empty")
        yield Static(id="run-detail")
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        self.refresh_runs()
        self.set_interval(self.app.poll_interval, self.refresh_runs)

    def on_screen_resume(self) -> None:
        self.refresh_runs()

    def on_resize(self) -> None:
        if self.rows:
            self._fill_table()  # the names are cut to the new width

    # ------------------------------------------------------------------ polling

    def refresh_runs(self) -> None:
        if self._busy or not self.is_current:
            return
        self._busy = True
        self._scan()

    @work(thread=True, group="scan", exit_on_error=False)
    def _scan(self) -> None:
        rows, error = None, None
        try:
            self.app.launcher.reap()
            rows = self.app.index.scan()
        except Exception as e:  # noqa: BLE001 - shown as a notification
            error = e
        try:
            self.app.call_from_thread(self._show, rows, error)
        except RuntimeError:  # the app is shutting down
            pass

    @guarded
    def _show(self, rows: Optional[list[RunSummary]], error: Optional[BaseException]) -> None:
        self._busy = False
        if error is not None:
            self.notify(error_message(error), title="reading runs", severity="error", markup=False)
            return
        self.rows = rows or []
        self._fill_table()
        running = sum(r.status == "running" for r in self.rows)
        finished = sum(r.status == "finished" for r in self.rows)
        title = Text.assemble(
            ("Runs in ", "dim"), (str(self.app.runs_dir), "bold"), ("  ·  ", "dim"),
            f"{len(self.rows)} run{'s' * (len(self.rows) != 1)}", ("  ·  ", "dim"),
            (f"{running} running", "green" if running else "dim"), ("  ·  ", "dim"), f"{finished} finished",
        )
        if self.marked:
            title.append(f"  ·  {len(self.marked)} marked for compare", "bold magenta")
        self.query_one("#runs-title", Static).update(title)
        empty = self.query_one("#runs-empty", Static)
        empty.display = not self.rows
        self.query_one(RunsTable).display = bool(self.rows)
        if not self.rows:
            empty.update(Text.assemble(
                "No runs yet in ", (str(self.app.runs_dir), "bold"), ".\n\n",
                ("l", "bold reverse"), "  launch a recipe (try tests/tiny.yaml or recipes/quickstart.yaml)\n",
                ("a", "bold reverse"), "  ask the advisor which SSL strategy fits your problem, and write its recipe\n\n",
                ("Runs started elsewhere with `sslrecipe run RECIPE --run-dir "
                 f"{self.app.runs_dir}/NAME` appear here too.", "dim"),
            ))
        self._show_detail()

    def _cells(self, r: RunSummary) -> tuple:
        mark = Text("◆", "bold magenta") if r.path in self.marked else Text(" ")
        recipe = Text(r.recipe.short() if r.recipe else "—", "dim" if not r.recipe else "")
        if r.status == "finished":
            stage = Text("all stages done", "dim")
        else:
            stage = Text(r.stage or "—", "bold" if r.status == "running" else "dim")
            if r.fraction is not None:
                stage.append(" ")
                stage.append_text(bar_text(r.fraction, 5))
        if r.metric is not None:
            metric = Text(f"mAP {r.metric:.1f}", "bold")  # COCO AP in percent, as the header says
        elif r.loss is not None:
            metric = Text(f"loss {r.loss:.3f}")
        else:
            metric = Text("—", "dim")
        name = Text(cut_middle(r.label, name_width(self.size.width or 80)), "bold")
        return (mark, status_text(r.status), metric, name, stage, recipe, Text(started_text(r.started), "dim"))

    def _fill_table(self) -> None:
        table = self.query_one(RunsTable)
        keys = [str(r.path) for r in self.rows]
        cells = {str(r.path): self._cells(r) for r in self.rows}
        if keys == list(self._shown):
            for key in keys:
                old, new = self._shown[key], cells[key]
                for (col, _), a, b in zip(COLUMNS, old, new):
                    if a != b:
                        table.update_cell(key, col, b, update_width=True)
        else:
            current = self._current_key()
            table.clear()
            for key in keys:
                table.add_row(*cells[key], key=key)
            if current in keys:
                table.move_cursor(row=keys.index(current), animate=False)
        self._shown = cells

    def _current_key(self) -> Optional[str]:
        table = self.query_one(RunsTable)
        if not table.row_count:
            return None
        try:
            return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        except Exception:  # noqa: BLE001 - an empty or shrinking table
            return None

    def selected(self) -> Optional[RunSummary]:
        key = self._current_key()
        return next((r for r in self.rows if str(r.path) == key), None)

    def _show_detail(self) -> None:
        detail = self.query_one("#run-detail", Static)
        r = self.selected()
        detail.display = r is not None
        if r is None:
            return
        # line 1: what the run is (the recipe summary, which the table's 80 columns leave out); line 2: where and when
        text = Text.assemble(status_text(r.status), "  ", (r.recipe.short() if r.recipe else "no recipe yet", "cyan"))
        if r.detail != r.status:
            text.append(f"  {r.detail}", "dim")
        text.append("\n")
        text.append(str(r.path), "dim")
        if r.seconds is not None:
            text.append(f"  ·  {format_seconds(r.seconds)}", "dim")
        if r.started is not None:
            text.append(time.strftime("  ·  started %Y-%m-%d %H:%M", time.localtime(r.started)), "dim")
        if r.recipe is not None and r.recipe.name:
            text.append(f"  ·  recipe {r.recipe.name}", "dim")
        if r.last_note is not None:
            style = "red" if r.last_note.kind == "error" else "yellow"
            text.append(f"\n{r.last_note.kind}: {r.last_note.message}", style)
        elif r.metric is not None:
            text.append(f"\nmAP {r.metric:.1f} %", "bold")
        detail.update(text)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_detail()

    @guarded
    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        r = next((r for r in self.rows if str(r.path) == event.row_key.value), None)
        if r is not None:
            self.app.open_run(r.path, r.label)

    # ------------------------------------------------------------------ actions

    @guarded
    def action_mark(self) -> None:
        r = self.selected()
        if r is None:
            return
        self.marked.symmetric_difference_update({r.path})
        self._show(self.rows, None)
        table = self.query_one(RunsTable)
        if table.cursor_row < table.row_count - 1:
            table.move_cursor(row=table.cursor_row + 1)

    @guarded
    def action_compare(self) -> None:
        chosen = [r for r in self.rows if r.path in self.marked]
        if not chosen:
            chosen = [r for r in self.rows if r.status == "finished"]
        if len(chosen) < 1:
            self.notify("No finished runs to compare yet: mark runs with space, then press c.", severity="warning")
            return
        self.app.push_compare([(r.path, r.label) for r in chosen])

    @guarded
    def action_stop(self) -> None:
        r = self.selected()
        if r is None:
            return
        self.app.stop_run(r.path, r.label)
        self.refresh_runs()

    @guarded
    def action_resume(self) -> None:
        r = self.selected()
        if r is None:
            return
        self.app.resume_run(r.path, r.label, r.status)
        self.refresh_runs()
