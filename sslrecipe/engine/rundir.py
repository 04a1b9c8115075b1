"""The run directory as a resource: created with one clear error when it cannot be, held by one run at a time,
and the OS errors of writing it (a full disk, a read-only or foreign directory) told as what to do.

The lock is `RUN/run.lock`, held with `flock` for the whole run: the kernel drops it when the process ends,
however it ends (`kill -9` included), so a run directory is never left locked. The file records who holds it
(pid, host, start time) for the message a second run prints; that record may be stale, the flock never is.
Only the process that writes the run directory takes it: under torchrun that is rank 0. Within that process the
lock is reentrant (a matrix holds its directory and its shared stage cache while each cell's pipeline asks again).

The layout a run directory is written in is recorded in `RUN/format.json` (`record_run_layout`) and checked by every
reader (`run_layout`): a newer layout is refused with one message, never misread.

Free of torch (an import-linter contract in pyproject.toml keeps it so): the TUI and the CLI use it, with
`events.read_events` and `names`, to place and read run directories without loading the training stack.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from sslrecipe.atomic import atomic_write_text, os_error_in
from sslrecipe.errors import SSLRecipeError
from sslrecipe.versions import LEGACY_RUN_LAYOUT, RUN_LAYOUT_VERSION

if TYPE_CHECKING:
    from sslrecipe.recipe import Recipe

LOCK_NAME = "run.lock"
FORMAT_NAME = "format.json"  # {"layout": N, "sslrecipe": version}: the layout the run directory is written in
DEFAULT_ROOT = Path("runs")
_held: dict[Path, int] = {}  # directories this process holds -> how many holders


def default_run_dir(recipe: "Recipe", root: Path = DEFAULT_ROOT) -> Path:
    """`runs/<recipe name>-<date>-<time>`: where `sslrecipe run` and the TUI's launch put a run without --run-dir."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{recipe.name}-{stamp}"


class RunLayoutError(SSLRecipeError):
    """A run directory written in a layout this sslrecipe does not know (a newer one), or whose record is unreadable."""


def run_layout(run_dir: Path) -> int:
    """The layout version `run_dir` is written in, checked: every reader of a run directory (resume, the TUI's run
    list, compare, load_detector, runs clean) asks here before reading it. A directory without `format.json` was
    written before layouts were recorded, in `LEGACY_RUN_LAYOUT`, and reads as that. Raises `RunLayoutError` for
    a newer layout (refused, never misread) or a record that cannot be read."""
    path = Path(run_dir) / FORMAT_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):  # no record, or no directory yet (creating it says why not)
        return LEGACY_RUN_LAYOUT
    except OSError as e:
        raise RunLayoutError(f"cannot read {path} ({e.strerror}): it says which layout the run directory {run_dir} "
                             "is written in; make it readable") from None
    try:
        data = json.loads(text)
        layout = data["layout"]
        if not isinstance(layout, int) or isinstance(layout, bool) or layout < 1:
            raise ValueError(layout)
    except (ValueError, KeyError, TypeError):
        raise RunLayoutError(f"{path} is not a run-layout record (expected {{\"layout\": {RUN_LAYOUT_VERSION}, ...}}): "
                             f"the run directory {run_dir} cannot be read safely; restore that file (this sslrecipe "
                             f"writes {{\"layout\": {RUN_LAYOUT_VERSION}}})") from None
    if layout > RUN_LAYOUT_VERSION:
        by = f"sslrecipe {data['sslrecipe']}" if isinstance(data.get("sslrecipe"), str) else "a newer sslrecipe"
        raise RunLayoutError(f"{run_dir} is written in run-directory layout {layout} (by {by}); this "
                             f"sslrecipe reads layouts up to {RUN_LAYOUT_VERSION} and will not misread it: "
                             "upgrade sslrecipe to read or resume it")
    return layout


def record_run_layout(run_dir: Path, written_by: str) -> None:
    """Check `run_dir`'s layout, then record the current one (atomically) when none is recorded yet (a new or a
    legacy directory; a recorded one is never rewritten); `written_by`: the sslrecipe version, for a refusal to name."""
    run_layout(run_dir)
    if (Path(run_dir) / FORMAT_NAME).is_file():
        return
    atomic_write_text(Path(run_dir) / FORMAT_NAME,
                      json.dumps({"layout": RUN_LAYOUT_VERSION, "sslrecipe": written_by}) + "\n")


class StorageError(SSLRecipeError):
    """The run directory cannot be created or written (a file in the way, read-only, no space left)."""


class RunLocked(SSLRecipeError):
    """Another run holds the run directory."""


_RESUME = "rerun the same command to resume (finished stages are kept; an unfinished one resumes from its last checkpoint)"


def storage_error(exc: BaseException, run_dir: Path) -> Optional[StorageError]:
    """One message that names the file and says what to do, for the OS errors a user fixes outside sslrecipe;
    None for any other error."""
    e = os_error_in(exc)
    if e is None:
        return None
    path = e.filename if e.filename is not None else f"a file in {run_dir}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"no space left on the device to write {path} ({e.strerror}): free space, then {_RESUME}. "
                            "The previous checkpoint and every finished file are intact.")
    if e.errno == errno.EROFS:
        return StorageError(f"cannot write {path}: the file system is read-only. Make {run_dir} writable or choose "
                            "another --run-dir, then rerun the same command.")
    if e.errno in (errno.EACCES, errno.EPERM):
        inside = _is_within(Path(str(path)), run_dir)
        advice = (f"make {run_dir} writable for this user or choose another --run-dir" if inside
                  else "give this user access to it")
        return StorageError(f"permission denied on {path}: {advice}, then rerun the same command.")
    return None


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(Path(folder).resolve())
        return True
    except (ValueError, OSError):
        return False


def make_run_dir(run_dir: Path) -> None:
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), run_dir)
        raise StorageError(f"cannot create the run directory {run_dir}: {blocker} is a file, not a directory. "
                           "Choose another --run-dir (or move that file away).") from None
    except OSError as e:
        raise (storage_error(e, run_dir) or e) from e


def _is_writer() -> bool:
    # torchrun sets RANK in every process; only rank 0 writes the run directory, so only it takes the lock
    return int(os.environ.get("RANK", "0")) == 0


class RunLock:
    """`with RunLock(run_dir):` creates the run directory and holds it, or raises `RunLocked` naming the holder."""

    def __init__(self, run_dir: Path, enabled: Optional[bool] = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.enabled = _is_writer() if enabled is None else enabled
        self.unsupported: Optional[str] = None  # why the file system could not lock, when it could not
        self._fd: Optional[int] = None
        self._key: Optional[Path] = None

    def __enter__(self) -> "RunLock":
        make_run_dir(self.run_dir)
        if not self.enabled:
            return self
        key = self.run_dir.resolve()
        if key in _held:
            _held[key] += 1
            self._key = key
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise (storage_error(e, self.run_dir) or e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLocked(self._held_message(holder)) from None
        except OSError as e:  # e.g. ENOLCK on a network file system without locking: run, but say so
            self.unsupported = f"{self.path} could not be locked ({e.strerror}); nothing stops a second run here"
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "started_ts": round(time.time(), 3)}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError as e:
            os.close(fd)
            raise (storage_error(e, self.run_dir) or e) from e
        self._fd, self._key = fd, key
        _held[key] = 1
        return self

    def __exit__(self, *exc) -> None:
        if self._key is None:
            return
        _held[self._key] -= 1
        if not _held[self._key]:
            del _held[self._key]
            os.close(self._fd)  # closing the only descriptor releases the flock
        self._fd = self._key = None

    def _held_message(self, holder: dict) -> str:
        if holder.get("pid"):
            who = f"pid {holder['pid']} on {holder.get('host', '?')}, since {holder.get('started', '?')}"
            stop = f"stop it (Ctrl-C in its terminal, s in the TUI, or kill {holder['pid']} on {holder.get('host', '?')})"
        else:
            who, stop = "a process that has just started", "stop it"
        return (f"{self.run_dir} is in use by another sslrecipe run ({who}). Wait for it to finish, or {stop} and rerun "
                "this command, which then resumes it; give another --run-dir to run both at once.")


def _read_holder(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}

