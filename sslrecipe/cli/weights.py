"""`sslrecipe weights` (placeholder until the weights catalogue lands)."""

import click

from sslrecipe.errors import NotYetAvailable


@click.group()
def weights() -> None:
    """Public SSL checkpoints: list, fetch (checksummed, cached), convert (not available in this version yet)."""


@weights.command("list")
def list_cmd() -> None:
    """List the catalogue of public SSL checkpoints."""
    raise NotYetAvailable("`sslrecipe weights list` is not implemented in this version yet; use weights.source: file with a local checkpoint.")
