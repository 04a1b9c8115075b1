"""Graceful stop: the first Ctrl-C / SIGINT / SIGTERM asks the running stage to checkpoint and stop at
the next step boundary (so the checkpoint is exactly on the trajectory); a second one aborts at once.

"At once" never tears a file: a write started inside `deferred_interrupts()` (every atomic write of a
checkpoint, weights or done.json) finishes first, then the abort is raised as `DeferredInterrupt`. A
third signal during such a write aborts the write too (its temp file is removed; the previous version of
the file stays). Once the abort has been raised, further signals are ignored so that the run's last
events and its exit message are written whole.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Optional

_stop = threading.Event()
_state = {"signals": 0, "deferring": 0, "pending": False, "aborting": False, "installed": False}


class DeferredInterrupt(KeyboardInterrupt):
    """The abort asked for during a deferred write, raised once that write has completed."""


def stop_requested() -> bool:
    return _stop.is_set()


def request_stop() -> None:
    _stop.set()


def _reset() -> None:
    _stop.clear()
    _state.update(signals=0, deferring=0, pending=False, aborting=False)


def _abort(exc=KeyboardInterrupt) -> None:
    _state["aborting"] = True
    _state["pending"] = False
    raise exc


def _handler(signum, frame) -> None:
    if _state["aborting"]:
        return  # already aborting: let the exit path finish
    _state["signals"] += 1
    if _state["signals"] == 1:
        _stop.set()
    elif _state["deferring"] and _state["signals"] == 2:
        _state["pending"] = True  # a write is under way: finish it, then abort
    else:
        _abort()


@contextlib.contextmanager
def deferred_interrupts(raise_pending: bool = True):
    """Let the body (a file write) finish before a second Ctrl-C aborts. With `raise_pending=False` the
    pending abort is dropped instead of raised (the run's own teardown: it is ending anyway)."""
    if not _state["installed"]:
        yield  # no graceful handler (library use, a worker thread): Python's own Ctrl-C behaviour
        return
    _state["deferring"] += 1
    ok = False
    try:
        yield
        ok = True
    finally:
        _state["deferring"] -= 1
        if ok and _state["deferring"] == 0 and _state["pending"]:
            if raise_pending:
                _abort(DeferredInterrupt)
            _state["pending"] = False


@contextlib.contextmanager
def graceful_stop():
    if threading.current_thread() is not threading.main_thread() or _state["installed"]:
        yield  # signal handlers can only be installed from the main thread; nested: the outer one holds them
        return
    _reset()
    previous = {sig: signal.signal(sig, _handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    _state["installed"] = True
    try:
        yield
    finally:
        _state["installed"] = False
        for sig, old in previous.items():
            signal.signal(sig, old)
        _reset()


class Interrupted(Exception):
    """Raised after a graceful stop (Ctrl-C / SIGINT / SIGTERM) once the checkpoint is written, or after an abort
    (a second Ctrl-C) with the step of the checkpoint that remains (`checkpoint_step`, None when there is none)."""

    def __init__(self, stage: str, step: int, checkpoint_step: Optional[int] = None, aborted: bool = False,
                 message: Optional[str] = None):
        if message is None and not aborted:
            message = f"{stage} interrupted at step {step}; checkpoint written, rerun the same command to resume"
        elif message is None:
            resume = (f"resumes from its checkpoint at step {checkpoint_step}" if checkpoint_step
                      else "starts again from step 0 (no checkpoint had been written yet)")
            message = f"{stage} aborted at step {step}; rerun the same command: it {resume}"
        super().__init__(message)
        self.stage = stage
        self.step = step
        self.checkpoint_step = checkpoint_step
