"""Graceful stop: the first Ctrl-C / SIGINT / SIGTERM asks the running stage to checkpoint and stop at
the next step boundary (so the checkpoint is exactly on the trajectory); a second one aborts at once."""

from __future__ import annotations

import contextlib
import signal
import threading

_stop = threading.Event()


def stop_requested() -> bool:
    return _stop.is_set()


def request_stop() -> None:
    _stop.set()


@contextlib.contextmanager
def graceful_stop():
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    _stop.clear()

    def handler(signum, frame):
        if _stop.is_set():
            raise KeyboardInterrupt
        _stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _stop.clear()
