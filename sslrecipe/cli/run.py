"""`sslrecipe run` and `sslrecipe validate`."""

from __future__ import annotations

import sys

import click

from sslrecipe.engine.names import STAGE_ORDER

from sslrecipe.recipe import recipe_to_yaml

_SET_HELP = "Override a recipe key, value parsed as YAML (repeatable): --set finetune.epochs=2"


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option("--print", "print_", is_flag=True, help="Print the fully resolved recipe as YAML.")
def validate(recipe: str, overrides: tuple[str, ...], print_: bool) -> None:
    """Check a recipe without running it: types, unknown keys, extends, overrides, and what the SSL methods and
    timm refuse (unknown method, options or backbone, img_size against the stride/patch), every matrix cell."""
    from sslrecipe.recipe.checks import check_recipe_file

    resolved = check_recipe_file(recipe, overrides)
    if resolved.weights.source == "pretrain":
        from sslrecipe.ssl.registry import apply_method_defaults  # the method's official optimizer keys

        resolved = apply_method_defaults(resolved)
    if print_:
        click.echo(recipe_to_yaml(resolved), nl=False)
    else:
        click.echo(f"{recipe}: valid")


def _check_before_run(target: str, overrides: tuple[str, ...]) -> None:
    """Load and check the recipe before any stage runs or any run directory is made: a recipe error ends the
    command here (exit 2), not after the data stage.

    runtime.omp_wait_policy must be in the environment before torch loads, so it is applied between reading the
    recipe (no torch) and the checks (which import the methods and timm)."""
    from pathlib import Path

    from sslrecipe.engine.cpu_threads import apply_wait_policy
    from sslrecipe.errors import RecipeError
    from sslrecipe.recipe.checks import check_recipe
    from sslrecipe.recipe.loader import load_recipe_and_raw

    path = Path(target)
    if path.is_dir():  # a run directory: resume it with its own resolved.yaml
        path = path / "resolved.yaml"
        if not path.is_file():
            raise RecipeError(f"{target} is a directory without resolved.yaml: give a recipe file or a run directory")
    recipe, raw = load_recipe_and_raw(path, overrides)
    apply_wait_policy(recipe.runtime.omp_wait_policy)
    check_recipe(recipe, raw)


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
    _check_before_run(recipe, overrides)
    skipped = _skip_unavailable(recipe, overrides, cells, until)
    if skipped:
        cells = skipped[0]
    from sslrecipe.signals import Interrupted
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
    if skipped:  # the other cells ran; the skipped ones are a problem the user has to act on
        for blocked in skipped[1]:
            click.secho(f"not run: {blocked.line()}", fg="red", err=True)
        sys.exit(1)


def _skip_unavailable(recipe: str, overrides, cells, until):
    """Before any stage: the matrix cells whose fetched weights cannot be had are named (one line each, with the
    choices) and left out, so the others (the baseline arm) still run. Returns (cells to run, skipped) or None;
    a run with nothing left to run stops here."""
    from sslrecipe.engine.preflight import preflight
    from sslrecipe.errors import SSLRecipeError

    runnable, blocked = preflight(recipe, overrides, cells, until)
    if not blocked:
        return None
    if not runnable:
        raise SSLRecipeError("\n".join(b.line() for b in blocked))
    for b in blocked:
        click.secho(f"warning: {b.line()} Running {', '.join(runnable)} without it.", fg="yellow", err=True)
    return tuple(runnable), blocked
