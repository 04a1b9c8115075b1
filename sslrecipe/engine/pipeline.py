"""The stage pipeline: data -> [pretrain] -> weights -> finetune -> evaluate -> report.

Each stage runs in `RUN/<stage>-<hash>/`. The hash covers the stage's resolved config, the hashes of
the stages it reads and (for the data stage) a fingerprint of the input files, so a rerun skips
finished stages (`stage_cached`) and changing a fine-tuning key never reruns pre-training. A stage
directory without `done.json` is unfinished: the stage resumes from its checkpoint there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from sslrecipe import __version__
from sslrecipe.atomic import atomic_write_text
from sslrecipe.engine.events import EventLog
from sslrecipe.engine.names import DONE_NAME, STAGE_ORDER  # noqa: F401  (re-exported)
from sslrecipe.engine.rundir import RunLock, record_run_layout, run_layout, storage_error
from sslrecipe.errors import SSLRecipeError
from sslrecipe.recipe import Recipe, recipe_to_yaml
from sslrecipe.signals import Interrupted, deferred_interrupts, graceful_stop, stop_requested
from sslrecipe.versions import RUN_LAYOUT_VERSION


def stable_hash(obj: Any, length: int = 12) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass
class StageContext:
    """What a running stage sees: its directory, the recipe, the event log and its upstream stages."""

    name: str
    recipe: Recipe
    run_dir: Path
    stage_dir: Path
    stage_hash: str
    events: EventLog
    upstream: dict[str, Path] = field(default_factory=dict)  # stage name -> finished stage dir
    later: tuple[str, ...] = ()  # the enabled stages after this one in this invocation (for the whole-run ETA)

    def warn(self, message: str) -> None:
        self.events.emit("warning", self.name, message=message)

    def metric(self, name: str, value: Any) -> None:
        self.events.emit("metric", self.name, name=name, value=value)


@dataclass
class Stage:
    name: str
    needs: tuple[str, ...]
    config: Callable[[Recipe], Any]  # the part of the recipe this stage's output depends on
    run: Callable[[StageContext], Optional[dict]]  # returns a summary stored in done.json
    enabled: Callable[[Recipe], bool] = lambda recipe: True
    fingerprint: Callable[[Recipe], Any] = lambda recipe: None  # content of external inputs
    hash_upstream: Optional[tuple[str, ...]] = None  # upstream stages whose hash enters ours; None = needs


def _versions() -> dict[str, str]:
    import timm
    import torchvision

    return {
        "sslrecipe": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "timm": timm.__version__,
    }


class Pipeline:
    def __init__(self, stages: list[Stage]):
        self.stages = stages
        self.by_name = {s.name: s for s in stages}

    def stage_hash(self, stage: Stage, recipe: Recipe, hashes: dict[str, str]) -> str:
        """The hash in a stage's directory name: its config, the hashes of the stages it reads (`hashes`, by name)
        and its inputs' fingerprint."""
        upstream = stage.needs if stage.hash_upstream is None else stage.hash_upstream
        return stable_hash(
            {
                "stage": stage.name,
                "config": stage.config(recipe),
                "upstream": {n: hashes[n] for n in upstream if n in hashes},
                "fingerprint": stage.fingerprint(recipe),
            }
        )

    def stage_hashes(self, recipe: Recipe) -> dict[str, str]:
        """Every enabled stage's hash for `recipe`, as a run computes them (`sslrecipe runs clean` keeps these)."""
        hashes: dict[str, str] = {}
        for stage in self.stages:
            if stage.enabled(recipe):
                hashes[stage.name] = self.stage_hash(stage, recipe, hashes)
        return hashes

    def run(
        self,
        recipe: Recipe,
        run_dir: Path,
        until: Optional[str] = None,
        force: tuple[str, ...] = (),
        listeners: tuple[Callable[[dict], None], ...] = (),
        run_info: Optional[dict] = None,
        stage_root: Optional[Path] = None,
        forced: Optional[set] = None,
        finish: Optional[Callable[[dict[str, Path]], None]] = None,
    ) -> dict[str, Path]:
        """`stage_root`: where the stage directories live (default: the run directory); the cells of a matrix
        share one, so a stage that several cells need runs once. `forced`: stage directories that `force` already
        reran in this invocation (shared by a matrix's cells, so a shared stage is forced once); updated.
        `finish(done)` runs while the run directory is still held (publishing the report).

        The run directory is locked for the whole run (`RunLock`): a second run on it stops with a message naming
        the holder. OS errors a user fixes outside sslrecipe (no space left, read-only) become one `StorageError`."""
        for name in (until, *force):
            if name is not None and name not in self.by_name:
                raise SSLRecipeError(f"unknown stage {name!r}; stages are: {', '.join(self.by_name)}")
        run_dir = Path(run_dir)
        run_layout(run_dir)  # a directory of a newer layout is refused before anything is written in it
        # the graceful stop spans the run's last events too, and the lock everything written in the run directory
        with graceful_stop():
            try:
                # a matrix cell's stages live in the matrix's shared cache: held too, so that a cell run on its own
                # and the matrix never write one stage at once
                shared = stage_root is not None and Path(stage_root).resolve() != run_dir.resolve()
                with RunLock(run_dir) as lock, RunLock(stage_root) if shared else contextlib.nullcontext():
                    done = self._run_held(recipe, run_dir, until, force, listeners, run_info, lock, stage_root, forced)
                    if finish is not None:
                        finish(done)
                    return done
            except OSError as e:  # before the event log exists, or in `finish`: a full disk, a read-only directory
                fault = storage_error(e, run_dir)
                if fault is None:
                    raise
                raise fault from e

    def _run_held(self, recipe, run_dir, until, force, listeners, run_info, lock, stage_root, forced) -> dict[str, Path]:
        events = EventLog(run_dir / "events.jsonl")
        for listener in listeners:
            events.subscribe(listener)
        record_run_layout(run_dir, __version__)
        resolved = run_dir / "resolved.yaml"
        atomic_write_text(resolved, recipe_to_yaml(recipe))
        events.emit(
            "run_start", None, world_size=1, versions=_versions(), recipe=str(resolved), run_dir=str(run_dir.resolve()),
            pid=os.getpid(), name=recipe.name, layout=RUN_LAYOUT_VERSION, **(run_info or {}),
        )
        started = time.time()
        done: dict[str, Path] = {}
        hashes: dict[str, str] = {}
        forcing = False
        status = "failed"
        current: Optional[str] = None
        if lock.unsupported:
            events.emit("warning", None, message=lock.unsupported)
        planned = [s.name for s in self.stages if s.enabled(recipe)]
        if until in planned:
            planned = planned[: planned.index(until) + 1]
        try:
            for stage in self.stages:
                if not stage.enabled(recipe):
                    continue
                current = stage.name
                forcing = forcing or stage.name in force
                stage_hash = self.stage_hash(stage, recipe, hashes)
                hashes[stage.name] = stage_hash
                stage_dir = Path(stage_root or run_dir) / f"{stage.name}-{stage_hash}"
                if forcing and stage_dir.exists() and stage_dir not in (forced or ()):
                    shutil.rmtree(stage_dir)
                if forcing and forced is not None:
                    forced.add(stage_dir)
                if (stage_dir / DONE_NAME).is_file():
                    events.emit("stage_cached", stage.name, dir=str(stage_dir), hash=stage_hash)
                elif stop_requested():  # Ctrl-C during a stage without a training loop: the next one does not start
                    raise Interrupted(stage.name, 0, message=f"stopped before {stage.name} (the stages before it are "
                                                             "finished and kept); rerun the same command to continue")
                else:
                    later = tuple(planned[planned.index(stage.name) + 1:])
                    self._run_stage(stage, recipe, run_dir, stage_dir, stage_hash, events, done, later)
                done[stage.name] = stage_dir
                if until == stage.name:
                    break
            current = None
            status = "finished"
            return done
        except Interrupted as e:
            status = "interrupted"
            _last_event(events, "warning", e.stage, message=str(e))
            raise
        except SSLRecipeError as e:
            _last_event(events, "error", current, message=str(e))
            raise
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        except Exception as e:  # an unexpected failure: recorded for the TUI, re-raised for the CLI
            fault = storage_error(e, run_dir)  # a full disk, a read-only directory: one message that says what to do
            _last_event(events, "error", current, message=str(fault) if fault else f"{type(e).__name__}: {e}")
            if fault is not None:
                raise fault from e
            raise
        finally:
            _last_event(events, "run_end", None, status=status, seconds=round(time.time() - started, 2))

    def _run_stage(self, stage, recipe, run_dir, stage_dir, stage_hash, events, done, later=()) -> None:
        stage_dir.mkdir(parents=True, exist_ok=True)
        events.emit("stage_start", stage.name, dir=str(stage_dir), hash=stage_hash)
        t0 = time.time()
        ctx = StageContext(stage.name, recipe, run_dir, stage_dir, stage_hash, events, {n: done[n] for n in stage.needs if n in done}, later)
        summary = stage.run(ctx) or {}
        seconds = round(time.time() - t0, 2)
        atomic_write_text(
            stage_dir / DONE_NAME,
            json.dumps({"stage": stage.name, "hash": stage_hash, "seconds": seconds, **summary}, indent=2, default=str),
        )
        events.emit("stage_end", stage.name, dir=str(stage_dir), seconds=seconds)


def _last_event(events: EventLog, event: str, stage: Optional[str], **fields: Any) -> None:
    """The events of a run's end: written whole (a second Ctrl-C waits for them), and never a second failure on
    top of the first (on a full or read-only disk they may not be written at all)."""
    with deferred_interrupts(raise_pending=False):
        try:
            events.emit(event, stage, **fields)
        except OSError:
            pass


