"""`run_recipe`: load a recipe, pick the run directory, run the pipeline, publish the report."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from sslrecipe import __version__
from sslrecipe.engine.console import ConsoleReporter
from sslrecipe.engine.cpu_threads import apply_wait_policy, plan_threads
from sslrecipe.engine.loop import resolve_device
from sslrecipe.engine.rundir import RunLock, default_run_dir, record_run_layout, run_layout, storage_error
from sslrecipe.engine.stages import build_pipeline, publish
from sslrecipe.recipe import Recipe, load_recipe
from sslrecipe.report.trackers import build_trackers, check_trackers
from sslrecipe.signals import graceful_stop


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def configure_cpu(recipe: Recipe) -> dict:
    """Apply the recipe's wait policy and thread count; returns what is in effect, for `run_start`."""
    policy = apply_wait_policy(recipe.runtime.omp_wait_policy)
    plan = plan_threads(recipe.runtime.threads, recipe.runtime.workers, resolve_device(recipe.runtime.device).type)
    torch.set_num_threads(plan.threads)
    return {"threads": plan.threads, "threads_from": plan.source, "workers": plan.workers,
            "usable_cores": plan.cores, "omp_wait_policy": policy}


def resolve_run_target(target: str | Path, run_dir: Optional[str | Path]) -> tuple[Path, Optional[Path]]:
    """A run directory given as RECIPE means: resume it with its own resolved.yaml."""
    target = Path(target)
    if target.is_dir():
        run_layout(target)  # a newer layout is refused before its resolved.yaml is read
        resolved = target / "resolved.yaml"
        if not resolved.is_file():
            from sslrecipe.errors import RecipeError

            raise RecipeError(f"{target} is a directory without resolved.yaml: give a recipe file or a run directory")
        return resolved, Path(run_dir) if run_dir else target
    return target, Path(run_dir) if run_dir else None


def run_recipe(
    recipe_path: Optional[str | Path],
    overrides: Iterable[str] = (),
    run_dir: Optional[str | Path] = None,
    until: Optional[str] = None,
    force: Iterable[str] = (),
    progress: Optional[str] = None,
    listeners: Iterable[Callable[[dict], None]] = (),
    recipe: Optional[Recipe] = None,
    cells: Iterable[str] = (),
    stage_root: Optional[Path] = None,
    forced: Optional[set] = None,
) -> Path:
    """Run a recipe (or resume a run directory); a recipe with `matrix:` runs each cell and compares them
    (`MatrixFailed` when some cells failed: the others ran and the table is written).

    `stage_root`, `forced`: a matrix cell's shared stage cache (see `Pipeline.run`); a cell directory given
    as RECIPE finds its own in its `cell.json`."""
    from sslrecipe.engine.inputs import check_inputs
    from sslrecipe.engine.matrix import cell_stage_root

    recipe_file, chosen_dir = resolve_run_target(recipe_path, run_dir) if recipe is None else (None, run_dir and Path(run_dir))
    recipe = recipe or load_recipe(recipe_file, overrides)
    if recipe.weights.source == "pretrain":
        from sslrecipe.ssl.registry import apply_method_defaults

        recipe = apply_method_defaults(recipe)
    check_inputs(recipe, recipe_file)  # before any work: every missing path at once, with the key to set
    check_trackers(recipe)  # report.loggers' libraries, before any stage
    if recipe.matrix is not None:
        from sslrecipe.engine.matrix import matrix_cells, run_matrix, with_absolute_paths

        if recipe_file is not None:
            recipe = with_absolute_paths(recipe, Path(recipe_file).resolve().parent)
        for cell in matrix_cells(recipe):  # an arm may set its own paths
            check_inputs(cell.recipe, recipe_file, what=f"matrix cell {cell.name}")

        def run_cell(cell: Recipe, cell_dir: Path, cell_stages: Path, cell_forced: set) -> Path:
            return run_recipe(None, run_dir=cell_dir, until=until, force=force, progress=progress,
                              listeners=listeners, recipe=cell, stage_root=cell_stages, forced=cell_forced)

        root = chosen_dir or default_run_dir(recipe)
        # the matrix directory is held as a whole (its cells share it); each cell's pipeline holds its own too
        with graceful_stop():
            try:
                run_layout(root)  # before anything is written in it
                with RunLock(root):
                    record_run_layout(root, __version__)
                    return run_matrix(recipe, root, run_cell, only=tuple(cells) or None)
            except OSError as e:
                fault = storage_error(e, root)
                if fault is None:
                    raise
                raise fault from e
    if cells:
        from sslrecipe.errors import RecipeError

        raise RecipeError("--cell names a matrix cell, but this recipe has no matrix:")
    run_info = configure_cpu(recipe)
    seed_everything(recipe.seed)
    target = chosen_dir or default_run_dir(recipe)
    if stage_root is None and chosen_dir is not None:
        stage_root = cell_stage_root(chosen_dir)  # `sslrecipe run RUN/<cell>`: the matrix's shared stages
    reporter = ConsoleReporter(progress or recipe.runtime.progress) if progress != "off" else None
    trackers = build_trackers(recipe, target)  # report.loggers: TensorBoard, MLflow
    all_listeners = tuple(listeners) + ((reporter,) if reporter else ()) + tuple(trackers)

    def finish(done: dict[str, Path]) -> None:  # while the run directory is still held
        if "report" in done:
            publish(target, done["report"])

    try:
        build_pipeline().run(recipe, target, until=until, force=tuple(force), listeners=all_listeners,
                             run_info=run_info, finish=finish, stage_root=stage_root, forced=forced)
    finally:
        for tracker in trackers:  # normally closed by run_end already
            tracker.close()
        if reporter:
            reporter.close()
    return target
