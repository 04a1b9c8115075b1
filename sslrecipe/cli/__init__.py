"""The `sslrecipe` command line: thin click commands over the library.

Each command group lives in its own module; `main` only assembles them and turns every
`SSLRecipeError` into one clear message on stderr with exit status 2 (never a traceback).
"""

from __future__ import annotations

import sys

import click

from sslrecipe import __version__
from sslrecipe.engine.cpu_threads import set_default_wait_policy
from sslrecipe.errors import SSLRecipeError

set_default_wait_policy()  # before any command imports torch: OpenMP reads it once, at load


class _FriendlyGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SSLRecipeError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)
        except KeyboardInterrupt:  # e.g. Ctrl-C while still importing, before a run can checkpoint
            click.secho("interrupted", fg="yellow", err=True)
            sys.exit(130)


@click.group(cls=_FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sslrecipe")
def main() -> None:
    """Self-supervised pre-training recipes for small-object detection.

    \b
    advise    which SSL strategy the survey's evidence supports for your constraints
    run       data -> [pre-train] -> weights -> fine-tune -> evaluate -> report, resumable
    validate  check a recipe and print it fully resolved
    data      synthetic IR data, dataset conversion, checks and statistics
    weights   public SSL checkpoints: list, fetch, convert
    eval      COCO evaluation with small-object metrics
    compare   runs side by side, laid out like the survey's tables
    tui       terminal app: advisor, run monitor, launcher
    """


def _register() -> None:
    from sslrecipe.cli import advise, compare, data, evaluate, run, tui, weights

    main.add_command(run.run)
    main.add_command(run.validate)
    main.add_command(advise.advise)
    main.add_command(data.data)
    main.add_command(weights.weights)
    main.add_command(evaluate.eval_cmd)
    main.add_command(compare.compare)
    main.add_command(tui.tui)


_register()
