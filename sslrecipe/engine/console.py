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


def _fmt_seconds(seconds: float) -> str:
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s" if minutes else f"{sec}s"


def epoch_label(e: dict[str, Any]) -> Optional[str]:
    """"epoch 2/3" (1-based) for a progress event that carries `epochs`; None for older events."""
    if not isinstance(e.get("epoch"), int) or not isinstance(e.get("epochs"), int):
        return None
    return f"epoch {min(e['epoch'] + 1, e['epochs'])}/{e['epochs']}"


def run_eta_label(e: dict[str, Any], fmt=_fmt_seconds) -> Optional[str]:
    """"run ETA ~12m05s + evaluate": the whole-run estimate, "~" when it includes later stages (projected from this
    stage's speed), and the later stages it could not estimate named; None when the event has none."""
    seconds = e.get("run_eta_s")
    if not isinstance(seconds, (int, float)):
        return None
    text = f"run ETA {'~' if e.get('run_eta_covers') else ''}{fmt(seconds)}"
    excludes = e.get("run_eta_excludes") or []
    return text + (f" + {', '.join(excludes)}" if excludes else "")


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
                TextColumn("[bold]{task.fields[stage]:<9}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[epoch]}"),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[ips]} img/s"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[run_eta]}"),
                console=self.console, transient=False,
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
                self.tasks[stage] = progress.add_task(stage, total=e["total"], stage=stage, loss="-", ips="-", epoch="", run_eta="")
            progress.update(self.tasks[stage], completed=e["step"], total=e["total"], loss=_fmt_loss(e), ips=e.get("images_per_s", "-"),
                            epoch=epoch_label(e) or "", run_eta=run_eta_label(e) or "")
            return
        now = time.monotonic()
        if e["step"] == e["total"] or now - self._last_plain >= 2.0:
            self._last_plain = now
            lr = e.get("lr")
            epoch, run_eta = epoch_label(e), run_eta_label(e)
            self._say(
                f"[{stage}] step {e['step']}/{e['total']}{f' {epoch}' if epoch else ''} loss {_fmt_loss(e)} lr {lr:.3g} "
                f"{e.get('images_per_s', 0)} img/s eta {e.get('eta_s', 0):.0f}s{f', {run_eta}' if run_eta else ''}"
            )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
