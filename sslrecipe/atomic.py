"""Atomic file writes, the one implementation every layer uses (data, weights, report, guide, engine).

A file is written to a temp file beside it, fsynced, given the mode `open()` would give, and renamed over the
old one: a kill at any moment leaves the previous version or the new one, never a torn file. A second Ctrl-C
waits for a write under way (`signals.deferred_interrupts`). A write that fails on an OS error (a full disk)
raises that OSError naming the file the user knows (not the temp file), and leaves the previous version.
Free of torch, so the torch-free layers (the advisor, the recipe loader) can use it.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

from sslrecipe.signals import deferred_interrupts

PathLike = Union[str, "os.PathLike[str]"]

_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK  # what open() would give; mkstemp makes 0600 files


def os_error_in(exc: BaseException) -> Optional[OSError]:
    """The OSError behind `exc`: itself, one in its cause/context chain (torch's zip writer wraps a failed write in
    a RuntimeError), or the errno a Rust library (safetensors) prints as "(os error N)"."""
    seen = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        e = e.__cause__ or e.__context__
    match = re.search(r"\(os error (\d+)\)", str(exc))
    if match:
        code = int(match.group(1))
        return OSError(code, os.strerror(code))
    return None


def atomic_replace(path: PathLike, fill: Callable[[int, str], None], suffix: str = ".tmp") -> None:
    """`fill(fd, tmp)` writes a temp file beside `path` (and closes fd), which is then renamed over `path`."""
    path = Path(path)
    with deferred_interrupts():
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
            fill(fd, tmp)
            os.chmod(tmp, _FILE_MODE)
            os.replace(tmp, path)
        except BaseException as e:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            if isinstance(e, Exception):
                cause = os_error_in(e)
                if cause is not None:  # name the file the user knows, not the temp file (or nothing at all)
                    raise type(cause)(cause.errno, cause.strerror, str(path)) from e
            raise


def atomic_write(path: PathLike, mode: str, write: Callable) -> None:
    """`write(file)` into a temp file beside `path` opened with `mode` ("w" text in UTF-8, or "wb"), fsync, rename."""

    def fill(fd: int, tmp: str) -> None:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())

    atomic_replace(path, fill)


def atomic_write_file(path: PathLike, write_to: Callable[[str], None], suffix: str = ".tmp") -> None:
    """For writers that take a file name (safetensors' `save_file`, matplotlib's `savefig`): `write_to(tmp)` beside
    `path`, fsync, rename. `write_to` may also check the temp file and raise to keep the previous version."""

    def fill(fd: int, tmp: str) -> None:
        os.close(fd)
        write_to(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    atomic_replace(path, fill, suffix)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write(path, "w", lambda f: f.write(text))
