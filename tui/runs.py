"""Run directories as the TUI sees them: status, stages, progress, curves, metrics, warnings.

Everything here is read from the run directory alone (`RUN/events.jsonl`, `RUN/resolved.yaml`,
`RUN/metrics.json`, `RUN/run.log`), so a run started anywhere — another shell, a tmux pane, a batch
job — can be watched, and a finished one reopened. `RunWatcher.poll()` parses only the lines appended
since the last poll, so polling a long run costs what it wrote since the last look, not its history.

No Textual here: the screens call this module from worker threads.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from sslrecipe.engine.names import DONE_NAME, STAGE_ORDER  # torch-free: the TUI starts fast
from sslrecipe.engine.rundir import FORMAT_NAME, RunLayoutError, run_layout

EVENTS_NAME = "events.jsonl"
LOG_NAME = "run.log"  # stdout/stderr of runs the TUI launches

# stage states
PENDING, RUNNING, CACHED, DONE, FAILED, INTERRUPTED = "pending", "running", "cached", "done", "failed", "interrupted"
# run statuses
STATUSES = ("running", "starting", "finished", "failed", "interrupted", "new")

KEY_METRIC = "bbox/mAP"
# the evaluation metrics a user reads first (COCO's and the survey's small-object ones), then the other evaluation
# metrics by family; internal counters (data/*, finetune/*, ...) are not evaluation metrics and are not shown
HEADLINE_METRICS = ("bbox/mAP", "bbox/AP50", "bbox/AP_small", "agnostic/AP_small@0.3", "agnostic/AP@0.05", "F1")
EVALUATION_FAMILIES = ("bbox/", "agnostic/", "F1", "precision", "recall", "segm/", "tiled/", "per_class/")


# --------------------------------------------------------------------------- processes


def _boot_time() -> Optional[float]:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def pid_alive(pid: Optional[int], started_at: Optional[float] = None) -> bool:
    """Is process `pid` alive (and not a zombie)? With `started_at` (the run's `run_start` time), a
    process that started clearly later is a recycled pid, not the run."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").is_file():
        try:
            text = stat.read_text()
        except OSError:
            return False
        fields = text[text.rindex(")") + 2:].split()  # fields from the 3rd (state) on
        if not fields or fields[0] in ("Z", "X", "x"):
            return False
        boot = _boot_time()
        if started_at is not None and boot is not None and len(fields) > 19:
            began = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
            if began > started_at + 5.0:
                return False
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- incremental file reading


class EventTail:
    """Reads the complete lines appended to a JSONL file since the last call; a torn last line waits."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0
        self._partial = b""

    def read_new(self) -> tuple[list[dict[str, Any]], bool]:
        """(new events, reset): `reset` is True when the file shrank or was replaced (start over)."""
        try:
            size = self.path.stat().st_size
        except OSError:
            return [], False
        reset = False
        if size < self.offset:
            self.offset, self._partial, reset = 0, b"", True
        if size == self.offset:
            return [], reset
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(size - self.offset)
        self.offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()  # b"" when the chunk ended with a newline
        out = []
        for line in lines:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(event, dict) and "event" in event:
                out.append(event)
        return out, reset


class TextTail:
    """The lines appended to a text file since the last call (the first call returns the last `first` lines)."""

    def __init__(self, path: Path, first: int = 200, max_bytes: int = 256_000):
        self.path = Path(path)
        self.first = first
        self.max_bytes = max_bytes
        self.offset: Optional[int] = None
        self._partial = ""

    def read_new(self) -> list[str]:
        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        if self.offset is None or size < self.offset:
            start = max(0, size - self.max_bytes)
            with open(self.path, "rb") as f:
                f.seek(start)
                text = f.read(size - start).decode("utf-8", "replace")
            self.offset = size
            lines = text.split("\n")
            self._partial = lines.pop()
            if start > 0 and lines:
                lines = lines[1:]  # the first line is cut
            return [_clean(x) for x in lines[-self.first:]]
        if size == self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(min(size - self.offset, self.max_bytes))
        self.offset += len(chunk)
        lines = (self._partial + chunk.decode("utf-8", "replace")).split("\n")
        self._partial = lines.pop()
        return [_clean(x) for x in lines]


def _clean(line: str) -> str:
    # progress bars redraw with carriage returns: keep what the terminal would show last
    return line.rstrip("\r").rsplit("\r", 1)[-1]


# --------------------------------------------------------------------------- curves


class Series:
    """A curve with a bounded number of points: past `cap` points every other one is dropped and
    only every `stride`-th new point is kept, so memory and plotting cost stay flat on long runs.
    The latest point is always kept. A step that goes back (a resumed stage replays steps after its
    checkpoint) cuts the curve there first."""

    def __init__(self, cap: int = 2000):
        self.cap = cap
        self.xs: list[float] = []
        self.ys: list[float] = []
        self.stride = 1
        self._seen = 0
        self.last: Optional[tuple[float, float]] = None

    def __len__(self) -> int:
        return len(self.points())

    def add(self, x: float, y: Optional[float]) -> None:
        if y is None or not isinstance(y, (int, float)) or not math.isfinite(y):
            return
        if self.last is not None and x <= self.last[0]:
            keep = 0
            while keep < len(self.xs) and self.xs[keep] < x:
                keep += 1
            del self.xs[keep:], self.ys[keep:]
        self.last = (x, y)
        self._seen += 1
        if self._seen % self.stride == 0:
            self.xs.append(x)
            self.ys.append(y)
        if len(self.xs) > self.cap:
            self.xs, self.ys = self.xs[::2], self.ys[::2]
            self.stride *= 2

    def points(self) -> tuple[list[float], list[float]]:
        xs, ys = list(self.xs), list(self.ys)
        if self.last is not None and (not xs or xs[-1] != self.last[0]):
            xs.append(self.last[0])
            ys.append(self.last[1])
        return xs, ys


# --------------------------------------------------------------------------- state


@dataclass
class StageInfo:
    name: str
    state: str = PENDING
    hash: Optional[str] = None
    dir: Optional[str] = None
    step: Optional[int] = None
    total: Optional[int] = None
    seconds: Optional[float] = None
    started: Optional[float] = None
    resumed_from: Optional[int] = None


@dataclass
class Note:
    kind: str  # warning | error
    stage: Optional[str]
    message: str
    ts: float
    attempt: int = 1  # the run_start it came after


@dataclass
class RecipeSummary:
    name: Optional[str] = None
    backbone: Optional[str] = None
    weights: Optional[str] = None
    method: Optional[str] = None
    first_method: Optional[str] = None  # pretrain.first.method: an earlier pre-training (its own stage)
    shots: Optional[int] = None
    matrix: bool = False
    data: dict[str, Any] = field(default_factory=dict)  # the resolved recipe as loaded

    def short(self) -> str:
        parts = [self.backbone or "?"]
        if self.weights == "pretrain" and self.method:
            parts.append(f"{self.first_method} → {self.method} pre-train" if self.first_method else f"{self.method} pre-train")
        elif self.weights:
            parts.append(self.weights)
        if self.shots:
            parts.append(f"{self.shots} shots")
        return " · ".join(parts)


def read_recipe_summary(path: Path) -> Optional[RecipeSummary]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None

    def get(*keys: str) -> Any:
        node: Any = data
        for k in keys:
            if not isinstance(node, dict):
                return None
            node = node.get(k)
        return node

    weights = get("weights", "source")
    return RecipeSummary(
        name=get("name"), backbone=get("backbone", "name"), weights=weights,
        method=get("pretrain", "method") if weights == "pretrain" else None,
        first_method=get("pretrain", "first", "method") if weights == "pretrain" else None,
        shots=get("data", "shots"), matrix=get("matrix") is not None, data=data,
    )


class RunState:
    """What the events of a run say, folded one event at a time (`apply`)."""

    def __init__(self) -> None:
        self.name: Optional[str] = None
        self.pid: Optional[int] = None
        self.started: Optional[float] = None  # first run_start
        self.attempt_started: Optional[float] = None  # latest run_start
        self.attempts = 0
        self.end_status: Optional[str] = None
        self.ended: Optional[float] = None
        self.seconds: Optional[float] = None
        self.last_ts: Optional[float] = None
        self.stages: dict[str, StageInfo] = {}
        self.current: Optional[str] = None  # the stage running (or last run)
        self.progress_stage: Optional[str] = None  # the last stage that reported progress
        self.progress: dict[str, dict[str, Any]] = {}  # stage -> its last progress event
        self.metrics: dict[str, Any] = {}
        self.notes: list[Note] = []
        self.loss: dict[str, Series] = {}
        self.lr: dict[str, Series] = {}
        self.errors_this_attempt = 0
        self.earlier_seconds = 0.0  # the attempts before the latest one, together
        self.events = 0

    def total_seconds(self, now: Optional[float] = None) -> Optional[float]:
        """The whole run's duration over all its attempts (the latest one until now while it runs)."""
        if self.seconds is not None and isinstance(self.seconds, (int, float)):
            latest = float(self.seconds)
        elif self.attempt_started is not None and self.end_status is None and now is not None:
            latest = max(0.0, now - self.attempt_started)
        elif self.attempts > 1:
            latest = 0.0
        else:
            return None
        return self.earlier_seconds + latest

    def open_notes(self) -> tuple[list[Note], int]:
        """(the warnings and errors still open, how many of earlier attempts were resolved). A note of an
        earlier attempt is resolved once a later attempt finished the run, or finished (or found cached) the
        stage it was about; the latest attempt's notes stay."""
        shown, resolved = [], 0
        for n in self.notes:
            if n.attempt < self.attempts and (
                self.end_status == "finished"
                or (n.stage is not None and n.stage in self.stages and self.stages[n.stage].state in (DONE, CACHED))
            ):
                resolved += 1
            else:
                shown.append(n)
        return shown, resolved

    def stage(self, name: str) -> StageInfo:
        if name not in self.stages:
            self.stages[name] = StageInfo(name)
        return self.stages[name]

    def apply(self, e: dict[str, Any]) -> None:
        self.events += 1
        kind, stage = e.get("event"), e.get("stage")
        ts = e.get("ts") if isinstance(e.get("ts"), (int, float)) else None
        previous_ts = self.last_ts
        if ts is not None:
            self.last_ts = ts
        if kind == "run_start":
            if self.attempts:  # the attempt before: its run_end's seconds, or (killed) until its last event
                if isinstance(self.seconds, (int, float)):
                    self.earlier_seconds += self.seconds
                elif self.attempt_started is not None and previous_ts is not None:
                    self.earlier_seconds += max(0.0, previous_ts - self.attempt_started)
            self.attempts += 1
            self.pid = e.get("pid") if isinstance(e.get("pid"), int) else None
            self.name = e.get("name") or self.name
            self.started = self.started or ts
            self.attempt_started = ts
            self.end_status = self.ended = self.seconds = None
            self.errors_this_attempt = 0
            self.current = None
            for info in self.stages.values():  # this attempt re-announces finished stages as cached
                info.state = PENDING
        elif kind in ("stage_start", "stage_cached") and stage:
            info = self.stage(stage)
            if info.hash is not None and info.hash != e.get("hash"):
                self.loss.pop(stage, None)  # another configuration: its old curve does not apply
                self.lr.pop(stage, None)
                self.progress.pop(stage, None)
                info.step = info.total = info.resumed_from = None
            info.hash, info.dir = e.get("hash"), e.get("dir")
            if kind == "stage_start":
                info.state, info.started, info.seconds = RUNNING, ts, None
                self.current = stage
            else:
                info.state = CACHED
        elif kind == "progress" and stage:
            info = self.stage(stage)
            step, total = e.get("step"), e.get("total")
            if isinstance(step, (int, float)):
                info.step = int(step)
                self.loss.setdefault(stage, Series()).add(step, e.get("loss"))
                self.lr.setdefault(stage, Series()).add(step, e.get("lr"))
            if isinstance(total, (int, float)):
                info.total = int(total)
            self.progress[stage] = e
            self.progress_stage = stage
        elif kind == "resume" and stage:
            info = self.stage(stage)
            if isinstance(e.get("step"), int):
                info.resumed_from = e["step"]
                info.step = e["step"]
        elif kind == "metric":
            name = e.get("name")
            if isinstance(name, str):
                self.metrics[name] = e.get("value")
        elif kind in ("warning", "error"):
            self.notes.append(Note(kind, stage, str(e.get("message", "")), ts or 0.0, max(1, self.attempts)))
            if kind == "error":
                self.errors_this_attempt += 1
                if stage:
                    self.stage(stage).state = FAILED
        elif kind == "stage_end" and stage:
            info = self.stage(stage)
            info.state = DONE
            info.seconds = e.get("seconds")
            if info.total is not None:
                info.step = info.total
        elif kind == "run_end":
            status = e.get("status")
            self.end_status = status if status in ("finished", "failed", "interrupted") else "failed"
            self.ended = ts
            self.seconds = e.get("seconds")
            for info in self.stages.values():
                if info.state == RUNNING:
                    info.state = INTERRUPTED if self.end_status == "interrupted" else FAILED


# --------------------------------------------------------------------------- one run


@dataclass
class RunSummary:
    """One row of the runs screen."""

    path: Path
    label: str  # directory name (parent/cell for a matrix cell)
    recipe: Optional[RecipeSummary]
    status: str
    detail: str  # why the status (e.g. "process ended without run_end")
    stage: Optional[str]
    step: Optional[int]
    total: Optional[int]
    loss: Optional[float]
    metric: Optional[float]
    started: Optional[float]
    seconds: Optional[float]
    pid: Optional[int]
    alive: bool
    last_note: Optional[Note]

    @property
    def fraction(self) -> Optional[float]:
        if self.step is None or not self.total:
            return None
        return max(0.0, min(1.0, self.step / self.total))


class RunWatcher:
    """A run directory followed incrementally: call `poll()`, then read `state` / `summary()`."""

    def __init__(self, path: Path, label: Optional[str] = None):
        self.path = Path(path)
        self.label = label or self.path.name
        self.tail = EventTail(self.path / EVENTS_NAME)
        self.state = RunState()
        self.recipe: Optional[RecipeSummary] = None
        self._recipe_mtime: Optional[float] = None
        self._metrics_mtime: Optional[float] = None
        self.file_metrics: dict[str, Any] = {}
        self.launched_pid: Optional[int] = None  # set by the TUI for a process it started
        self.alive = False
        self.new_events: list[dict[str, Any]] = []  # what the last poll read
        self.refused: Optional[str] = None  # why the directory is not read (a newer layout), shown as its status
        self._layout_stamp: Any = ()

    def poll(self) -> bool:
        """Read what is new; True when anything changed."""
        changed = self._check_layout()
        if self.refused is not None:  # never misread: nothing else of it is read
            self.new_events, self.alive = [], False
            return changed
        events, reset = self.tail.read_new()
        if reset:
            self.state = RunState()
            changed = True
        for e in events:
            self.state.apply(e)
        self.new_events = events
        changed = changed or bool(events)
        changed = self._read_recipe() or changed
        changed = self._read_metrics() or changed
        alive = self._alive()
        changed = changed or alive != self.alive
        self.alive = alive
        return changed

    def _check_layout(self) -> bool:
        try:
            st = (self.path / FORMAT_NAME).stat()
            stamp: Any = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp == self._layout_stamp:  # read again only when format.json changes
            return False
        self._layout_stamp = stamp
        try:
            run_layout(self.path)
            refused = None
        except RunLayoutError as e:
            refused = str(e)
        changed = refused != self.refused
        self.refused = refused
        return changed

    def _read_recipe(self) -> bool:
        path = self.path / "resolved.yaml"
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return False
        if mtime == self._recipe_mtime:
            return False
        self._recipe_mtime = mtime
        self.recipe = read_recipe_summary(path)
        return True

    def _read_metrics(self) -> bool:
        path = self.path / "metrics.json"
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return False
        if mtime == self._metrics_mtime:
            return False
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False  # being written: try again next poll
        self._metrics_mtime = mtime
        if isinstance(data, dict):
            self.file_metrics = data
        return True

    def _alive(self) -> bool:
        s = self.state
        if s.pid is not None and s.end_status is None:
            return pid_alive(s.pid, s.attempt_started)
        if self.launched_pid is not None and (s.pid is None or s.end_status is not None):
            # launched by us and not (yet) announced by run_start: e.g. still importing torch
            return pid_alive(self.launched_pid) and (s.end_status is None or self.launched_pid != s.pid)
        return False

    @property
    def metrics(self) -> dict[str, Any]:
        return {**self.state.metrics, **self.file_metrics}

    def status(self) -> tuple[str, str]:
        if self.refused is not None:
            return "unreadable", self.refused
        s = self.state
        if s.end_status is not None:
            if self.alive and self.launched_pid is not None and self.launched_pid != s.pid:
                return "starting", "a new attempt is starting"
            return s.end_status, {
                "finished": "finished", "failed": "stopped by an error",
                "interrupted": "stopped with a checkpoint: resume with r",
            }[s.end_status]
        if s.pid is not None:
            if self.alive:
                return "running", f"pid {s.pid}"
            if s.errors_this_attempt:
                return "failed", "the process ended after an error"
            return "interrupted", "the process ended without finishing (killed?): resume with r"
        if self.alive:
            return "starting", f"pid {self.launched_pid}"
        if self.launched_pid is not None:
            return "failed", f"the process exited before the run started: see {LOG_NAME}"
        return "new", "no events yet"

    def planned_stages(self) -> list[str]:
        """The stages this run goes through, in order (the pre-training stages only when the recipe has them)."""
        weights = self.recipe.weights if self.recipe else None
        first = self.recipe.first_method if self.recipe else None
        wanted = {"pretrain": weights == "pretrain", "pretrain_first": weights == "pretrain" and bool(first)}
        names = [n for n in STAGE_ORDER if wanted.get(n, True) or n in self.state.stages]
        names += [n for n in self.state.stages if n not in names]
        return names

    def stage_infos(self) -> list[StageInfo]:
        out = []
        for name in self.planned_stages():
            info = self.state.stages.get(name) or StageInfo(name)
            if info.state == PENDING and info.dir and (Path(info.dir) / DONE_NAME).is_file():
                info = StageInfo(**{**info.__dict__, "state": CACHED})
            out.append(info)
        return out

    def summary(self) -> RunSummary:
        s = self.state
        status, detail = self.status()
        stage = s.current
        step = total = None
        loss = None
        if stage and stage in s.stages:
            info = s.stages[stage]
            step, total = info.step, info.total
        p = s.progress.get(stage or "") or (s.progress.get(s.progress_stage) if s.progress_stage else None)
        if p is not None:
            loss = p.get("loss")
        metric = self.metrics.get(KEY_METRIC)
        recent = [n for n in s.notes if s.attempt_started is None or n.ts >= s.attempt_started]
        note = recent[-1] if recent else None
        seconds = s.total_seconds(time.time() if status == "running" else None)
        return RunSummary(
            path=self.path, label=self.label, recipe=self.recipe, status=status, detail=detail, stage=stage,
            step=step, total=total, loss=loss if isinstance(loss, (int, float)) else None,
            metric=metric if isinstance(metric, (int, float)) else None, started=s.started, seconds=seconds,
            pid=s.pid or self.launched_pid, alive=self.alive, last_note=note,
        )


# --------------------------------------------------------------------------- the runs directory


def find_run_dirs(root: Path) -> list[tuple[Path, str]]:
    """(run directory, label) under `root`: a directory with events.jsonl or resolved.yaml is a run;
    the cells of a matrix (`RUN/<cell>/events.jsonl`) are runs labelled `RUN/<cell>`."""
    root = Path(root)
    out: list[tuple[Path, str]] = []
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return out
    for child in children:
        if (child / EVENTS_NAME).is_file():
            out.append((child, child.name))
            continue
        try:
            cells = sorted(p for p in child.iterdir() if p.is_dir() and (p / EVENTS_NAME).is_file())
        except OSError:
            cells = []
        if cells:
            out.extend((c, f"{child.name}/{c.name}") for c in cells)
        elif (child / "resolved.yaml").is_file() or (child / LOG_NAME).is_file():
            out.append((child, child.name))  # launched, nothing written yet
    return out


class RunIndex:
    """Every run under a runs directory, each followed by its own `RunWatcher`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.watchers: dict[Path, RunWatcher] = {}
        self.launched: dict[Path, int] = {}  # run dir -> pid of a process the TUI started
        self._lock = threading.Lock()  # scan() runs in a worker thread

    def note_launch(self, path: Path, pid: int) -> None:
        with self._lock:
            path = Path(path)
            self.launched[path] = pid
            if path in self.watchers:
                self.watchers[path].launched_pid = pid

    def watcher(self, path: Path, label: Optional[str] = None) -> RunWatcher:
        path = Path(path)
        w = self.watchers.get(path)
        if w is None:
            w = self.watchers[path] = RunWatcher(path, label)
            w.launched_pid = self.launched.get(path)
        return w

    def scan(self) -> list[RunSummary]:
        with self._lock:
            return self._scan()

    def _scan(self) -> list[RunSummary]:
        found = find_run_dirs(self.root)
        wanted = {p for p, _ in found}
        for gone in [p for p in self.watchers if p not in wanted and p not in self.launched]:
            del self.watchers[gone]
        out = []
        for path, label in found:
            w = self.watcher(path, label)
            w.label = label
            w.poll()
            out.append(w.summary())
        for path in list(self.launched):  # launched into a directory outside the scan (or not created yet)
            if path not in wanted and not any(p.parent == path for p in wanted):  # (a matrix: its cells are listed)
                w = self.watcher(path)
                w.poll()
                out.append(w.summary())
        out.sort(key=lambda r: (r.started is None, -(r.started or 0.0), r.label))
        return out


# --------------------------------------------------------------------------- text helpers


def describe_event(e: dict[str, Any]) -> Optional[tuple[str, str]]:
    """A log line for an event, with a style name (info | warning | error | dim), or None to skip it."""
    kind, stage = e.get("event"), e.get("stage") or "run"
    ts = e.get("ts")
    clock = time.strftime("%H:%M:%S", time.localtime(ts)) if isinstance(ts, (int, float)) else "--:--:--"
    prefix = f"{clock} [{stage}]"
    if kind == "run_start":
        return f"{prefix} started (pid {e.get('pid')})", "info"
    if kind == "stage_start":
        return f"{prefix} started", "info"
    if kind == "stage_cached":
        return f"{prefix} cached, skipped", "dim"
    if kind == "progress":
        parts = [f"step {e.get('step')}/{e.get('total')}"]
        if isinstance(e.get("loss"), (int, float)):
            parts.append(f"loss {e['loss']:.4f}")
        if isinstance(e.get("lr"), (int, float)):
            parts.append(f"lr {e['lr']:.3g}")
        if isinstance(e.get("images_per_s"), (int, float)):
            parts.append(f"{e['images_per_s']:.3g} img/s")
        return f"{prefix} " + " ".join(parts), "dim"
    if kind == "metric":
        return f"{prefix} {e.get('name')} = {format_value(e.get('value'))}", "info"
    if kind == "resume":
        return f"{prefix} {e.get('message') or 'resuming from step %s' % e.get('step')}", "info"
    if kind == "warning":
        return f"{prefix} warning: {e.get('message')}", "warning"
    if kind == "error":
        return f"{prefix} error: {e.get('message')}", "error"
    if kind == "stage_end":
        return f"{prefix} done in {format_seconds(e.get('seconds'))}", "info"
    if kind == "run_end":
        return f"{prefix} {e.get('status')} after {format_seconds(e.get('seconds'))}", \
            "error" if e.get("status") == "failed" else "info"
    return None


def format_value(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.3g}"
    if isinstance(value, dict):
        return " · ".join(f"{k} {format_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    return str(value)


def format_seconds(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        return "—"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def metric_label(name: str) -> str:
    """The compare table's names (`bbox/AP_small` -> `AP_S`, `agnostic/AP_small@0.3` -> `AP_S@0.3 (no cls)`),
    `per_class/person/AP` -> `person AP`, `tiled/bbox/mAP` -> `tiled mAP`; other names as they are."""
    from sslrecipe.report.compare import METRIC_LABELS

    if name.startswith("tiled/"):
        return "tiled " + metric_label(name[6:])
    if name in METRIC_LABELS:
        return METRIC_LABELS[name]
    if name.startswith(("bbox/", "segm/")):
        return name[5:] if name.startswith("bbox/") else "mask " + name[5:]
    if name.startswith("per_class/"):
        return name[10:].replace("/", " ")
    return name


def metric_unit(name: str) -> str:
    """AP, AR, F1, precision and recall are in percent; a score threshold is a score."""
    return "" if name.endswith("threshold") else "%"


def is_evaluation_metric(name: str) -> bool:
    return name.startswith(EVALUATION_FAMILIES)


def _metric_rank(name: str) -> tuple:
    if name in HEADLINE_METRICS:
        return (0, HEADLINE_METRICS.index(name), "")
    family = next(i for i, f in enumerate(EVALUATION_FAMILIES) if name.startswith(f))
    return (1 + family, int(name.endswith("threshold")), name)


def evaluation_metrics(metrics: dict[str, Any]) -> list[tuple[str, Any]]:
    """The evaluation metrics of a run (what `evaluate` measured), the headline ones first: mAP, AP50, AP_S,
    the survey's class-agnostic AP_S@0.3 and AP@0.05, F1; then the rest by family. Counters other stages log
    (`finetune/pretrained_fpn_tensors`, `data/split`, ...) are left out."""
    names = [k for k, v in metrics.items() if is_evaluation_metric(k) and not isinstance(v, (dict, list))]
    return [(n, metrics[n]) for n in sorted(names, key=_metric_rank)]


def format_metric(name: str, value: Any) -> str:
    """`31.2 %`; `n/a` where undefined (an empty size bucket)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        unit = metric_unit(name)
        return f"{value:.1f} %" if unit == "%" else f"{value:.2f}"
    return format_value(value)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: recipe keys for comparisons."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = data
    return out


def differing_keys(recipes: Iterable[Optional[RecipeSummary]], skip: tuple[str, ...] = ("name",)) -> list[str]:
    """Recipe keys whose values differ between the runs that read them: the comparison's rule
    (`sslrecipe.report.compare.differing_keys`: a scratch run's pre-training keys are no difference)."""
    from sslrecipe.report.compare import differing_keys as shared

    return shared([flatten(r.data) if r else {} for r in recipes], ignore=skip)
