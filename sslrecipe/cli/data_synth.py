"""`sslrecipe data synth` (filled in with the synthetic generator)."""

import click

from sslrecipe.errors import NotYetAvailable


@click.command()
@click.argument("out", type=click.Path())
@click.option("--images", default=120, show_default=True)
@click.option("--seed", default=0, show_default=True)
def synth(out: str, images: int, seed: int) -> None:
    """Write synthetic infrared scenes with small vehicles and people (images + COCO JSON)."""
    raise NotYetAvailable("synthetic generator not wired yet")
