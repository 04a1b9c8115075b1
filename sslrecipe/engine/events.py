"""`RUN/events.jsonl`: the append-only record of a run that the CLI, the TUI and reports read.

One JSON object a line, flushed (and fsynced on stage boundaries) per line, each with `ts` (UNIX
seconds), `event` and `stage` (null for run-level events). Event names and their extra keys:

- run_start: world_size, versions, recipe (path of resolved.yaml), run_dir, pid, layout (of the run directory)
- stage_start: dir, hash
- stage_cached: dir, hash
- progress: step, total, epoch (0-based; shown 1-based), epochs (of the stage), loss, losses (named parts), lr,
  images_per_s, eta_s (this stage), run_eta_s (the whole run: this stage plus the later training stages' planned
  images at this stage's measured seconds per image; null before anything is measured), run_eta_covers (the later
  stages counted in it) and run_eta_excludes (later stages whose work is unknown in advance, e.g. evaluate: not counted)
- metric: name, value (also written to RUN/metrics.json at the end)
- resume: step, checkpoint
- warning / error: message
- stage_end: dir, seconds
- run_end: status (finished | failed | interrupted), seconds
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

EVENT_NAMES = (
    "run_start", "stage_start", "stage_cached", "progress", "metric", "resume",
    "warning", "error", "stage_end", "run_end",
)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; readers see null
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


class EventLog:
    """Appends events to a JSONL file. Safe to share between threads; only rank 0 should write."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._lock = threading.Lock()
        self._listeners: list[Any] = []
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def subscribe(self, listener) -> None:
        """`listener(event_dict)` is called for every event (the console printer uses this). A listener with an
        `attach(events)` method is given this log (an experiment tracker reports its own failure with it)."""
        self._listeners.append(listener)
        if hasattr(listener, "attach"):
            listener.attach(self)

    def emit(self, event: str, stage: Optional[str] = None, **fields: Any) -> dict[str, Any]:
        if event not in EVENT_NAMES:
            raise ValueError(f"unknown event {event!r}")
        record = {"ts": round(time.time(), 3), "event": event, "stage": stage, **_jsonable(fields)}
        if self.enabled:
            line = json.dumps(record, separators=(",", ":"))
            with self._lock, open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
                if event not in ("progress", "metric"):
                    os.fsync(f.fileno())
        for listener in self._listeners:
            listener(record)
        return record


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the events of a run; a torn last line (the writer was killed mid-write) is ignored."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue
