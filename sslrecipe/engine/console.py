"""What a run prints: a rich progress bar with ETA on a terminal, plain lines otherwise. Driven by events."""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _fmt_loss(event: dict[str, Any]) -> str:
    loss = event.get("loss")
    return "nan" if loss is None else f"{loss:.4f}"


class ConsoleReporter:
    """Subscribe to an EventLog: `events.subscribe(reporter)`; call `close()` at the end."""

    def __init__(self, mode: str = "auto", stream=None):
        self.stream = stream or sys.stderr
        interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.rich = mode == "rich" or (mode == "auto" and interactive)
        self.console = Console(file=self.stream, highlight=False, force_terminal=self.rich if mode == "rich" else None)
        # soft_wrap: a line in a log file is one line, whatever the (absent) terminal width
        self._say = lambda text, style=None: self.console.print(text, style=style, markup=False, soft_wrap=True)
        self.progress: Optional[Progress] = None
        self.tasks: dict[str, int] = {}
        self._last_plain = 0.0

    def _ensure_progress(self) -> Progress:
        if self.progress is None:
            self.progress = Progress(
                TextColumn("[bold]{task.fields[stage]:<9}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[ips]} img/s"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console, transient=False,
            )
            self.progress.start()
        return self.progress

    def __call__(self, e: dict[str, Any]) -> None:
        kind, stage = e["event"], e.get("stage")
        if kind == "run_start":
            self._say(f"run dir: {e['run_dir']}")
        elif kind == "stage_start":
            self._say(f"[{stage}] started ({e['dir']})")
        elif kind == "stage_cached":
            self._say(f"[{stage}] cached, skipped ({e['dir']})")
        elif kind == "resume":
            self._say(f"[{stage}] {e.get('message', 'resuming from step %s' % e.get('step'))}")
        elif kind == "progress":
            self._progress(e)
        elif kind == "metric":
            value = e.get("value")
            if e.get("name", "").startswith("bbox/"):
                shown = "n/a" if value is None else f"{value:.2f}"
                self._say(f"[{stage}] {e['name']} = {shown}")
            elif e.get("name") == "data/sources" and isinstance(value, dict):  # which set each split came from
                for split, o in value.items():
                    n = o.get("images")
                    where = ", ".join(([str(o["file"])] if "file" in o else [])
                                      + ([f"{o['share']:.0%} of it"] if "share" in o else []))
                    self._say(f"[{stage}] {split}: {n} image{'' if n == 1 else 's'} from {o.get('from')}"
                              + (f" ({where})" if where else ""))
        elif kind == "warning":
            self._say(f"[{stage or 'run'}] warning: {e.get('message')}", style="yellow")
        elif kind == "stage_end":
            if self.progress is not None and stage in self.tasks:
                self.progress.stop()
                self.progress = None
                self.tasks.clear()
            self._say(f"[{stage}] done in {e.get('seconds', 0):.1f}s")
        elif kind == "run_end":
            self.close()
            self._say(f"run {e.get('status')} in {e.get('seconds', 0):.1f}s")

    def _progress(self, e: dict[str, Any]) -> None:
        stage = e["stage"]
        if self.rich:
            progress = self._ensure_progress()
            if stage not in self.tasks:
                self.tasks[stage] = progress.add_task(stage, total=e["total"], stage=stage, loss="-", ips="-")
            progress.update(self.tasks[stage], completed=e["step"], total=e["total"], loss=_fmt_loss(e), ips=e.get("images_per_s", "-"))
            return
        now = time.monotonic()
        if e["step"] == e["total"] or now - self._last_plain >= 2.0:
            self._last_plain = now
            lr = e.get("lr")
            self._say(
                f"[{stage}] step {e['step']}/{e['total']} loss {_fmt_loss(e)} lr {lr:.3g} "
                f"{e.get('images_per_s', 0)} img/s eta {e.get('eta_s', 0):.0f}s"
            )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
