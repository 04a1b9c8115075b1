"""`sslrecipe tui` (placeholder until the Textual app lands)."""

import click

from sslrecipe.errors import NotYetAvailable


@click.command()
@click.option("--runs", default="runs", show_default=True, help="Runs directory to watch.")
def tui(runs: str) -> None:
    """Terminal app: advisor, run monitor, launcher (not available in this version yet)."""
    raise NotYetAvailable("`sslrecipe tui` is not implemented in this version yet; follow a run with `tail -f RUN/events.jsonl`.")
