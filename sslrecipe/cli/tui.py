"""`sslrecipe tui`: the terminal app (advisor, runs, run monitor, launcher)."""

from __future__ import annotations

import click


@click.command()
@click.option("--runs", default="runs", show_default=True, type=click.Path(file_okay=False),
              help="Runs directory to list and watch (created when a run is launched).")
def tui(runs: str) -> None:
    """Terminal app: the advisor, your runs live, launch / stop / resume, compare.

    \b
    Keys: Enter open a run · a advisor · l launch a recipe · s stop (checkpoint)
          r resume · space mark, c compare · Escape back · q quit
    Works over SSH; runs keep going when the app quits.
    """
    from sslrecipe.tui.app import run_app

    run_app(runs)
