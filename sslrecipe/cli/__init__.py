"""The `sslrecipe` command line: thin click commands over the library.

Each command group lives in its own module; `main` only assembles them and turns every
`SSLRecipeError` into one clear message on stderr with exit status 2 (never a traceback).
"""

from __future__ import annotations

import signal
import sys
import threading

import click

from sslrecipe import __version__
from sslrecipe.cli.terminal import MAX_WIDTH, PipeSafeGroup, fit_help
from sslrecipe.engine.cpu_threads import set_default_wait_policy
from sslrecipe.errors import SSLRecipeError

set_default_wait_policy()  # before any command imports torch: OpenMP reads it once, at load


def _interrupt_once(signum, frame):
    # Ctrl-C outside a run's graceful stop ends the command; its exit path is not interrupted again
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


class _FriendlyGroup(PipeSafeGroup):
    def invoke(self, ctx: click.Context):
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, _interrupt_once) if main_thread else None
        status = None
        try:
            try:
                return super().invoke(ctx)
            except SSLRecipeError as e:
                status = 2
                click.secho(f"error: {e}", fg="red", err=True)
            except KeyboardInterrupt:  # e.g. Ctrl-C while still importing, before a run can checkpoint
                status = 130
                click.secho("interrupted", fg="yellow", err=True)
            except SystemExit as e:  # `run` exits 130 itself after a graceful stop
                status = e.code
                raise
        except KeyboardInterrupt:  # Ctrl-C again while the first one was being reported
            status = 130
        finally:
            if main_thread:
                # exiting after Ctrl-C: one more must not turn the interpreter's shutdown into a traceback
                signal.signal(signal.SIGINT, signal.SIG_IGN if status == 130 else (previous or signal.SIG_DFL))
        sys.exit(status)


@click.group(cls=_FriendlyGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": MAX_WIDTH})
@click.version_option(__version__, prog_name="sslrecipe")
def main() -> None:
    """Self-supervised pre-training recipes for small-object detection."""


# what `sslrecipe --help` lists for each command, in this order
SHORT_HELP = {
    "advise": "which SSL pre-training the survey's evidence supports for you",
    "run": "data -> [pre-train] -> weights -> fine-tune -> evaluate -> report",
    "validate": "check a recipe and print it fully resolved",
    "data": "synthetic IR data, dataset conversion, checks and statistics",
    "weights": "public SSL checkpoints: fetch, convert, cache; encoder export",
    "eval": "COCO evaluation with small-object metrics",
    "predict": "a fine-tuned detector on new images, folders and videos",
    "export": "a fine-tuned detector as ONNX / .pt2 (encoders: `weights export`)",
    "compare": "runs side by side, laid out like the survey's tables",
    "runs": "run directories: remove stages the latest recipe no longer uses",
    "tui": "terminal app: advisor, run monitor, launcher",
}


def _register() -> None:
    from sslrecipe.cli import advise, compare, data, evaluate, run, runs, tui, weights
    from sslrecipe.cli import export as export_cli, predict as predict_cli

    main.add_command(advise.advise)
    main.add_command(run.run)
    main.add_command(run.validate)
    main.add_command(data.data)
    main.add_command(weights.weights)
    main.add_command(evaluate.eval_cmd)
    main.add_command(predict_cli.predict)
    main.add_command(export_cli.export_cmd)
    main.add_command(compare.compare)
    main.add_command(runs.runs)
    main.add_command(tui.tui)
    fit_help(main, SHORT_HELP)


_register()
