"""`sslrecipe advise` (placeholder until the advisor lands)."""

import click

from sslrecipe.errors import NotYetAvailable


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def advise(args) -> None:
    """Recommend an SSL pre-training strategy from the survey's evidence (not available in this version yet)."""
    raise NotYetAvailable("`sslrecipe advise` is not implemented in this version yet; see docs/advisor.md when it lands.")
