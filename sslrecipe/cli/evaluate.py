"""`sslrecipe eval` (placeholder until the evaluation command lands)."""

import click

from sslrecipe.errors import NotYetAvailable


@click.command("eval", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def eval_cmd(args) -> None:
    """COCO evaluation of a detections file against ground truth (not available as a command in this version yet)."""
    raise NotYetAvailable("`sslrecipe eval` is not implemented as a command yet; `sslrecipe run` evaluates in its evaluate stage.")
