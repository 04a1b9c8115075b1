"""The Textual app of sslrecipe (installed as `sslrecipe.tui`; `sslrecipe tui [--runs DIR]`).

    from sslrecipe.tui import SSLRecipeApp
    SSLRecipeApp("runs").run()

`sslrecipe.tui.runs` reads run directories without Textual (status, stages, curves, metrics) and
`sslrecipe.tui.control` starts, stops and resumes run processes; the screens build on both.
"""

from __future__ import annotations

__all__ = ["SSLRecipeApp", "run_app"]


def __getattr__(name: str):
    # Textual is imported on first use, so `import sslrecipe.tui.runs` stays light
    if name in __all__:
        from sslrecipe.tui import app

        return getattr(app, name)
    raise AttributeError(name)
