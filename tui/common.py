"""Small pieces shared by the screens: error guarding, status and stage styling."""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Optional, TypeVar

from rich.text import Text

from sslrecipe.errors import SSLRecipeError

F = TypeVar("F", bound=Callable[..., Any])

RICH_STATUS = {
    "running": ("●", "bold green"),
    "starting": ("◌", "green"),
    "finished": ("✓", "bold cyan"),
    "failed": ("✗", "bold red"),
    "interrupted": ("■", "yellow"),
    "new": ("○", "dim"),
}


def status_text(status: str) -> Text:
    glyph, style = RICH_STATUS.get(status, ("?", ""))
    return Text.assemble((glyph + " ", style), (status, style))


def error_message(e: BaseException) -> str:
    if isinstance(e, SSLRecipeError):
        return str(e)
    if isinstance(e, OSError):
        return f"{e.strerror or type(e).__name__}: {e.filename or e}"
    return f"{type(e).__name__}: {e}"


_last_error: dict[int, tuple[str, float]] = {}


def notify_error(node: Any, e: BaseException, title: str = "") -> None:
    """Show an error as a notification (never a traceback); the same message repeated within 10 s
    (e.g. from a poll timer) is shown once."""
    app = node.app
    message = error_message(e)
    last = _last_error.get(id(app))
    now = time.monotonic()
    if last is not None and last[0] == message and now - last[1] < 10:
        return
    _last_error[id(app)] = (message, now)
    app.notify(message, title=title or "error", severity="error", markup=False, timeout=8)


def guarded(fn: F) -> F:
    """Turn any exception raised by an action or event handler into an error notification."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the UI shows every failure as a notification
            notify_error(self, e)
            return None

    return wrapper  # type: ignore[return-value]


def started_text(ts: Optional[float]) -> str:
    if ts is None:
        return "—"
    now = time.time()
    if now - ts < 20 * 3600:
        return time.strftime("%H:%M", time.localtime(ts))
    return time.strftime("%b %d", time.localtime(ts))


def bar_text(fraction: Optional[float], width: int = 8) -> Text:
    """A small progress bar: ██████░░ 75%."""
    if fraction is None:
        return Text("")
    filled = int(round(fraction * width))
    return Text.assemble(("█" * filled, "green"), ("░" * (width - filled), "dim"), f" {fraction * 100:3.0f}%")


def size_classes(node: Any, width: int, height: int, narrow_below: int, short_below: int) -> None:
    """Set the `narrow` / `short` classes the stylesheet uses for small terminals (one restyle at most)."""
    want = {"narrow": width < narrow_below, "short": height < short_below}
    if all(node.has_class(name) == on for name, on in want.items()):
        return
    for name, on in want.items():
        node.set_class(on, name, update=False)
    node.update_node_styles()
