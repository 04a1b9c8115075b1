"""`sslrecipe run` and `sslrecipe validate`."""

from __future__ import annotations

import sys

import click

from sslrecipe.engine.names import STAGE_ORDER

from sslrecipe.recipe import load_recipe, recipe_to_yaml

_SET_HELP = "Override a recipe key, value parsed as YAML (repeatable): --set finetune.epochs=2"


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option("--print", "print_", is_flag=True, help="Print the fully resolved recipe as YAML.")
def validate(recipe: str, overrides: tuple[str, ...], print_: bool) -> None:
    """Check a recipe (types, unknown keys, extends, overrides) without running it."""
    resolved = load_recipe(recipe, overrides)
    if resolved.weights.source == "pretrain":
        from sslrecipe.ssl.registry import apply_method_defaults  # the method's official optimizer keys

        resolved = apply_method_defaults(resolved)
    if print_:
        click.echo(recipe_to_yaml(resolved), nl=False)
    else:
        click.echo(f"{recipe}: valid")


def _apply_wait_policy(target: str, overrides: tuple[str, ...]) -> None:
    """runtime.omp_wait_policy must be in the environment before torch loads, so read it first.

    A recipe that does not load is left for the run to report, with its full message.
    """
    from pathlib import Path

    from sslrecipe.engine.cpu_threads import apply_wait_policy
    from sslrecipe.errors import SSLRecipeError

    path = Path(target) / "resolved.yaml" if Path(target).is_dir() else Path(target)
    try:
        apply_wait_policy(load_recipe(path, overrides).runtime.omp_wait_policy)
    except SSLRecipeError:
        pass


@click.command()
@click.argument("recipe", type=click.Path())
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option("--run-dir", type=click.Path(file_okay=False), help="Run directory (default runs/<name>-<timestamp>); reuse one to skip finished stages and resume.")
@click.option("--until", type=click.Choice(STAGE_ORDER), help="Stop after this stage.")
@click.option("--force", multiple=True, type=click.Choice(STAGE_ORDER), help="Rerun this stage and the ones after it (repeatable).")
@click.option("--progress", type=click.Choice(["auto", "rich", "plain"]), default=None, help="Progress display (default: runtime.progress).")
@click.option("--cell", "cells", multiple=True, help="With a matrix: run only this cell (repeatable).")
def run(recipe: str, overrides: tuple[str, ...], run_dir: str | None, until: str | None, force: tuple[str, ...],
        progress: str | None, cells: tuple[str, ...]) -> None:
    """Run RECIPE: data -> [pretrain] -> weights -> finetune -> evaluate -> report.

    RECIPE is a recipe file, or a run directory to resume with its own resolved.yaml.
    A recipe with `matrix:` runs every cell in RUN/<cell>/ and writes RUN/comparison.md.
    Finished stages are skipped; an interrupted stage resumes from its last checkpoint.
    Ctrl-C stops gracefully with a checkpoint.
    """
    _apply_wait_policy(recipe, overrides)
    from sslrecipe.engine.loop import Interrupted  # torch is imported only when a run starts
    from sslrecipe.engine.matrix import MatrixFailed
    from sslrecipe.engine.runner import run_recipe

    try:
        target = run_recipe(recipe, overrides, run_dir=run_dir, until=until, force=force, progress=progress, cells=cells)
    except Interrupted as e:
        click.secho(f"interrupted: {e}", fg="yellow", err=True)
        sys.exit(130)
    except MatrixFailed as e:  # the other cells finished and the table is written: a check that found problems
        click.secho(f"error: {e}", fg="red", err=True)
        click.echo(f"run dir: {e.run_dir}\ncomparison:  {e.run_dir / 'comparison.md'}")
        sys.exit(1)
    click.echo(f"run dir: {target}")
    for name in ("report.md", "comparison.md"):
        if (target / name).is_file():
            click.echo(f"{name.split('.')[0]}:  {target / name}")
