"""The run monitor: one run directory, followed live (or reopened after the fact)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Optional

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, ProgressBar, RichLog, Static

from sslrecipe.engine.console import epoch_label, run_eta_label
from sslrecipe.tui.common import error_message, guarded, size_classes, status_text
from sslrecipe.tui.runs import (
    LOG_NAME, RUNNING, Note, RunWatcher, TextTail, describe_event, evaluation_metrics, format_metric, format_seconds,
    metric_label,
)
from sslrecipe.tui.widgets import LossPlot, StagePipeline

LOG_STYLE = {"info": "", "dim": "dim", "warning": "yellow", "error": "bold red"}


class MonitorScreen(Screen):
    """Stages, progress, loss / lr curve, metrics, warnings and the log of one run."""

    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("s", "stop", "Stop"),
        Binding("r", "resume", "Resume"),
        Binding("c", "cycle_curve", "Curve"),
    ]

    def __init__(self, path: Path, label: Optional[str] = None, launched_pid: Optional[int] = None):
        super().__init__()
        self.path = Path(path)
        self.label = label or self.path.name
        self.watcher = RunWatcher(self.path, self.label)
        self.watcher.launched_pid = launched_pid
        self.log_tail = TextTail(self.path / LOG_NAME)
        self.curve_stage: Optional[str] = None  # None: follow the stage that is training
        self._lock = threading.Lock()
        self._notes_shown: Optional[tuple[list[Note], int]] = None
        self._metrics_shown: Optional[list] = None
        self._curve_key: Any = None
        self._log_source: Optional[str] = None
        self.polls = 0

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="mon-head")
        yield StagePipeline(id="pipeline")
        with Horizontal(id="progress-row"):
            yield ProgressBar(id="bar", show_eta=False)
            yield Static(id="speed")
        with Horizontal(id="mon-main"):
            yield LossPlot(id="plot", redraw_every=self.app.plot_interval)
            with Vertical(id="side"):
                yield DataTable(id="metrics", show_cursor=False, zebra_stripes=True)
                yield RichLog(id="notes", wrap=True, min_width=20, max_lines=200)
        yield RichLog(id="log", wrap=True, min_width=20, max_lines=1000)
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        self.sub_title = str(self.path)
        self.query_one("#plot").border_title = "loss · lr"
        self.query_one("#metrics").border_title = "metrics"
        self.query_one("#notes").border_title = "warnings & errors"
        self.query_one("#log").border_title = "log"
        self.poll()
        self.set_interval(self.app.monitor_interval, self.poll)

    def on_resize(self, event) -> None:
        size_classes(self, event.size.width, event.size.height, narrow_below=100, short_below=32)

    # ------------------------------------------------------------------ polling (worker thread)

    def poll(self) -> None:
        if self.polls and not self.is_current:
            return  # another screen is on top: catch up when it is closed
        self._poll()

    def on_screen_resume(self) -> None:
        self._poll()

    @work(thread=True, group="monitor-poll", exit_on_error=False)
    def _poll(self) -> None:
        if not self._lock.acquire(blocking=False):
            return  # the previous poll is still reading
        try:
            error = None
            lines: list[tuple[str, str]] = []
            try:
                self.watcher.poll()
                if (self.path / LOG_NAME).is_file():
                    if self._log_source != "log":
                        lines.append((f"── {LOG_NAME} ──", "dim"))
                    self._log_source = "log"
                    lines += [(line, _log_style(line)) for line in self.log_tail.read_new()]
                else:
                    self._log_source = "events"
                    for e in self.watcher.new_events:
                        described = describe_event(e)
                        if described is not None:
                            lines.append(described)
                snapshot = self._snapshot()
            except Exception as e:  # noqa: BLE001 - shown as a notification
                error, snapshot = e, None
            try:
                self.app.call_from_thread(self._apply, snapshot, lines, error)
            except RuntimeError:  # the app is shutting down
                pass
        finally:
            self._lock.release()

    def _snapshot(self) -> dict[str, Any]:
        """Everything the widgets show, copied so the UI thread never reads what the poller writes."""
        w, s = self.watcher, self.watcher.state
        status, detail = w.status()
        curve = self.curve_stage if self.curve_stage in s.loss else s.progress_stage
        shown = s.current if s.current in s.progress else s.progress_stage
        infos = w.stage_infos()
        current_info = next((i for i in infos if i.name == s.current), None)
        return {
            "status": status, "detail": detail, "recipe": w.recipe, "infos": infos,
            "current": s.current, "current_running": current_info is not None and current_info.state == RUNNING,
            "progress_stage": shown, "progress": dict(s.progress.get(shown) or {}) if shown else {},
            "progress_info": s.stages.get(shown) if shown else None,
            "curve": curve, "loss": s.loss[curve].points() if curve in s.loss else ([], []),
            "lr": s.lr[curve].points() if curve in s.lr else ([], []),
            "curve_stages": list(s.loss),
            "metrics": evaluation_metrics(w.metrics),
            "split": w.metrics.get("data/split"), "notes": s.open_notes(),
            "started": s.attempt_started, "seconds": s.total_seconds(time.time() if status == "running" else None),
            "pid": s.pid or w.launched_pid, "attempts": s.attempts,
        }

    # ------------------------------------------------------------------ showing (UI thread)

    @guarded
    def _apply(self, snap: Optional[dict[str, Any]], lines: list[tuple[str, str]], error: Optional[BaseException]) -> None:
        self.polls += 1
        if error is not None:
            self.notify(error_message(error), title="reading the run", severity="error", markup=False)
            return
        if not self.is_attached or snap is None:
            return
        self._show_head(snap)
        self.query_one(StagePipeline).show(snap["infos"])
        self._show_progress(snap)
        self._show_curve(snap)
        self._show_metrics(snap["metrics"])
        self._show_notes(snap["notes"])
        log = self.query_one("#log", RichLog)
        for line, style in lines:
            log.write(Text(line, LOG_STYLE.get(style, style)))

    def _show_head(self, snap: dict[str, Any]) -> None:
        text = Text.assemble((self.label, "bold"), "  ", status_text(snap["status"]))
        if snap["seconds"] is not None:  # the whole run: every attempt's time together
            text.append(f"  {format_seconds(snap['seconds'])}", "dim")
        if snap["attempts"] > 1:
            text.append(f" in {snap['attempts']} attempts", "dim")
        if snap["status"] not in ("running", "finished"):
            text.append(f"  {snap['detail']}", "dim")
        recipe = snap["recipe"]
        if recipe is not None:
            text.append(f"   {recipe.short()}", "cyan")
        split = snap["split"]
        if isinstance(split, dict) and split:
            text.append("   images " + "/".join(str(v) for v in split.values()), "dim")
            text.append(" (" + "/".join(str(k) for k in split) + ")", "dim")
        self.query_one("#mon-head", Static).update(text)

    def _show_progress(self, snap: dict[str, Any]) -> None:
        bar = self.query_one("#bar", ProgressBar)
        speed = self.query_one("#speed", Static)
        p, info = snap["progress"], snap["progress_info"]
        current, stage = snap["current"], snap["progress_stage"]
        if snap["current_running"] and current != stage:
            bar.update(total=None)  # a stage without steps (data, evaluate, report): indeterminate
            speed.update(Text.assemble((current or "", "bold yellow"), " running…"))
            return
        if not p:
            if snap["status"] == "finished":
                bar.update(total=1, progress=1)
                speed.update(Text("no training steps in this run", "dim"))
            else:
                bar.update(total=None if snap["status"] in ("running", "starting") else 1, progress=0)
                speed.update(Text("waiting for the first step…" if snap["status"] in ("running", "starting") else "",
                                  "dim"))
            return
        step = info.step if info is not None and info.step is not None else p.get("step", 0)
        total = (info.total if info is not None else None) or p.get("total") or 1
        bar.update(total=total, progress=min(step, total))
        parts: list[Any] = [(stage or "", "bold"), f" {step}/{total}"]
        if epoch_label(p):
            parts += [("  ·  ", "dim"), epoch_label(p)]
        if isinstance(p.get("images_per_s"), (int, float)):
            parts += [("  ·  ", "dim"), f"{p['images_per_s']:.3g} img/s"]
        if snap["status"] == "running" and step < total and isinstance(p.get("eta_s"), (int, float)):
            parts += [("  ·  ", "dim"), "stage ETA ", (format_seconds(p["eta_s"]), "bold")]
            if run_eta_label(p):
                parts += [("  ·  ", "dim"), (run_eta_label(p, format_seconds), "bold")]
        if isinstance(p.get("loss"), (int, float)):
            parts += [("  ·  ", "dim"), f"loss {p['loss']:.4f}"]
        if isinstance(p.get("lr"), (int, float)):
            parts += [("  ·  ", "dim"), f"lr {p['lr']:.2e}"]
        speed.update(Text.assemble(*parts))

    def _show_curve(self, snap: dict[str, Any]) -> None:
        xs, ys = snap["loss"]
        key = (snap["curve"], len(xs), xs[-1] if xs else None, ys[-1] if ys else None)
        if key == self._curve_key:
            return
        self._curve_key = key
        plot = self.query_one(LossPlot)
        plot.show(snap["curve"], snap["loss"], snap["lr"])
        stages = snap["curve_stages"]
        plot.border_subtitle = f"c: {len(stages)} stages" if len(stages) > 1 else ""

    def _show_metrics(self, metrics: list[tuple[str, Any]]) -> None:
        if metrics == self._metrics_shown:
            return
        self._metrics_shown = metrics
        table = self.query_one("#metrics", DataTable)
        table.clear(columns=True)  # columns are re-measured for the new values
        if not metrics:
            table.add_column(Text("not evaluated yet", "dim"), key="metric")
            return
        # a fixed-width value column, so a long metric name is cropped rather than a number
        label_width = max(8, min(max(len(metric_label(n)) for n, _ in metrics),
                                 table.size.width - 2 - 7 - 4 - (2 if len(metrics) > 8 else 0)))
        table.add_column("metric", key="metric", width=label_width)
        table.add_column("value", key="value", width=7)
        for name, value in metrics:
            shown = Text(format_metric(name, value), "bold" if name == "bbox/mAP" else "", justify="right")
            if value is None:
                shown.stylize("dim")
            table.add_row(metric_label(name), shown)
        table.border_subtitle = f"{len(metrics)}" if len(metrics) > 8 else ""

    def _show_notes(self, open_notes: tuple[list[Note], int]) -> None:
        """The open warnings and errors; those of earlier attempts go once resolved (`RunState.open_notes`)."""
        if open_notes == self._notes_shown:
            return
        log = self.query_one("#notes", RichLog)
        notes, resolved = open_notes
        before = self._notes_shown
        if before is not None and before[1] == resolved and notes[:len(before[0])] == before[0] and before[0]:
            new = notes[len(before[0]):]  # only appended: keep the scroll position
        else:
            log.clear()
            new = notes
            if resolved:
                log.write(Text(f"{resolved} resolved (earlier attempts)", "dim"))
            if not notes:
                log.write(Text("none", "dim"))
        for note in new:
            style = "bold red" if note.kind == "error" else "yellow"
            log.write(Text.assemble((f"{note.kind} ", style), (f"[{note.stage or 'run'}] ", "dim"), note.message))
        self._notes_shown = (list(notes), resolved)
        log.border_title = f"warnings & errors ({len(notes)})" if notes else "warnings & errors"
        log.set_class(any(n.kind == "error" for n in notes), "has-errors")

    # ------------------------------------------------------------------ actions

    def action_back(self) -> None:
        self.app.pop_screen()

    @guarded
    def action_stop(self) -> None:
        self.app.stop_run(self.path, self.label, watcher=self.watcher)

    @guarded
    def action_resume(self) -> None:
        status, _ = self.watcher.status()
        launched = self.app.resume_run(self.path, self.label, status)
        if launched is not None:
            self.watcher.launched_pid = launched.pid

    @guarded
    def action_cycle_curve(self) -> None:
        stages = list(self.watcher.state.loss)
        if len(stages) < 2:
            self.notify("This run has one training stage: nothing to switch to.")
            return
        now = self.curve_stage if self.curve_stage in stages else self.watcher.state.progress_stage
        self.curve_stage = stages[(stages.index(now) + 1) % len(stages)] if now in stages else stages[0]
        self.poll()


def _log_style(line: str) -> str:
    low = line.lower()
    if "error" in low or "traceback" in low:
        return "error"
    if "warning" in low or "interrupted" in low:
        return "warning"
    if " step " in low:
        return "dim"
    return "info"
