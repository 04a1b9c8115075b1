"""`matrix:` — one recipe, several runs (named arms x the cartesian product of axes x fine-tuning seeds), one
comparison table.

Layout of a matrix run directory `RUN/`:

- `RUN/<cell>/`: one ordinary run per cell (`resolved.yaml`, `events.jsonl`, `report.md`, `metrics.json`) plus
  `cell.json` (its arm, axis values, fine-tuning seed and where its stages live);
- `RUN/stages/<stage>-<hash>/`: the stage cache the cells share, so a pre-training (or data stage, or fine-tuning)
  that several cells need runs once: cells that differ in shots, in fine-tuning keys or in fine-tuning seed reuse
  one pre-training;
- `RUN/resolved.yaml` (with the matrix), `RUN/comparison.md`, `RUN/comparison.csv`, `RUN/comparison.json`.

A matrix directory written before the shared cache existed keeps its stages inside each cell (`RUN/<cell>/*-<hash>/`);
such a cell keeps using them. A cell that fails is reported (its own events, the console, the table) and the other
cells still run; `run_matrix` then raises `MatrixFailed` (the CLI exits 1) with the table written. Rerunning the
same command finishes only what is missing: every finished stage is cached.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from sslrecipe.atomic import atomic_write_text
from sslrecipe.engine.names import CELL_FILE, DONE_NAME, STAGES_DIR
from sslrecipe.errors import RecipeError, SSLRecipeError
from sslrecipe.recipe import Recipe, recipe_to_yaml
from sslrecipe.recipe.loader import recipe_from_dict, set_dotted
from sslrecipe.signals import Interrupted

SEED_PREFIX = "fseed"  # cell-name suffix of a fine-tuning seed: <cell>-fseed1


class MatrixFailed(SSLRecipeError):
    """Some cells failed; the others finished and the comparison table is written (the CLI exits 1)."""

    def __init__(self, run_dir: Path, failed: list[tuple[str, str]], total: int):
        self.run_dir, self.failed, self.total = Path(run_dir), failed, total
        lines = "\n".join(f"  {name}: {message}" for name, message in failed)
        super().__init__(
            f"{len(failed)} of {total} matrix cells failed (the others finished; the table is in "
            f"{self.run_dir / 'comparison.md'}):\n{lines}\nFix the cause and rerun the same command: only what is "
            "missing runs."
        )


@dataclass
class Cell:
    """One run of a matrix: its name (its directory), recipe, and what distinguishes it."""

    name: str
    recipe: Recipe
    arm: Optional[str] = None
    axes: dict[str, Any] = field(default_factory=dict)  # dotted key -> value
    finetune_seed: Optional[int] = None  # set when matrix.seeds > 1
    replicate: Optional[int] = None  # 0..seeds-1 when matrix.seeds > 1
    group: str = ""  # the name without the seed suffix: the replicates of one cell share it

    def info(self, stage_root: str) -> dict[str, Any]:
        return {"cell": self.name, "group": self.group, "arm": self.arm, "axes": self.axes,
                "finetune_seed": self.finetune_seed, "replicate": self.replicate, "stage_root": stage_root}


def _slug(value: Any) -> str:
    if isinstance(value, str) and ("/" in value or "\\" in value):  # a path: its file name says enough
        value = Path(value).stem
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in str(value))


# keys whose values are paths: relative ones in arms and axes are relative to the recipe file, like the
# recipe's own data paths (the loader resolves those)
_PATH_KEYS = {"data.unlabeled", "data.images", "weights.path", "pretrain.init.path", "pretrain.first.init.path",
              *(f"data.{s}{sub}" for s in ("train", "val", "test") for sub in ("", ".annotations", ".images"))}


def _absolute(key: str, value: Any, base: Path) -> Any:
    if isinstance(value, dict):  # e.g. data.train: {annotations, images}
        return {k: _absolute(f"{key}.{k}", v, base) for k, v in value.items()}
    if key in _PATH_KEYS and isinstance(value, str) and value and "://" not in value and not Path(value).is_absolute():
        return str((base / value).resolve())
    return value


def with_absolute_paths(recipe: Recipe, base: Path) -> Recipe:
    """The recipe with the relative paths its matrix arms and axes set made absolute against `base` (the recipe
    file's folder), so RUN/resolved.yaml runs from anywhere."""
    m = recipe.matrix
    if m is None:
        return recipe
    arms = [a.model_copy(update={"set": {k: _absolute(k, v, base) for k, v in a.set.items()}}) for a in m.arms]
    axes = {k: [_absolute(k, v, base) for v in values] for k, values in m.axes.items()}
    return recipe.model_copy(update={"matrix": m.model_copy(update={"arms": arms, "axes": axes})})


def baseline_arm(recipe: Recipe) -> Optional[str]:
    """`matrix.baseline`, or the one arm whose name starts with 'baseline' (the advisor's `baseline-scratch`)."""
    m = recipe.matrix
    if m is None:
        return None
    names = [a.name for a in m.arms]
    if m.baseline is not None:
        if m.baseline not in names:
            raise RecipeError(f"matrix.baseline is '{m.baseline}' but no arm has that name; arms: {', '.join(names) or '(none)'}")
        return m.baseline
    found = [n for n in names if n.startswith("baseline")]
    return found[0] if len(found) == 1 else None


def matrix_cells(recipe: Recipe) -> list[Cell]:
    """Every cell of a matrix recipe, each with a recipe that has no matrix."""
    assert recipe.matrix is not None
    base = recipe.model_dump(mode="json", exclude={"matrix", "extends"})
    arms = recipe.matrix.arms or []
    axes = recipe.matrix.axes or {}
    seeds = recipe.matrix.seeds
    arm_list = [(a.name, a.set) for a in arms] or [(None, {})]
    names = [k for k in axes]
    combos = list(itertools.product(*(axes[k] for k in names))) if names else [()]
    cells: list[Cell] = []
    for arm_name, arm_set in arm_list:
        for combo in combos:
            data = json.loads(json.dumps(base))
            for key, value in arm_set.items():
                set_dotted(data, key, value)
            for key, value in zip(names, combo):
                set_dotted(data, key, value)
            parts = [arm_name] if arm_name else []
            parts += [f"{k.rsplit('.', 1)[-1]}{_slug(v)}" for k, v in zip(names, combo)]
            group = "-".join(p for p in parts if p) or "cell"
            first_seed = (data.get("finetune") or {}).get("seed")
            first_seed = data.get("seed", 0) if first_seed is None else first_seed
            for i in range(seeds):
                name, fseed = group, None
                if seeds > 1:  # fine-tuning seeds: the same pre-training and labeled subset, fine-tuned again
                    fseed = first_seed + i
                    set_dotted(data, "finetune.seed", fseed)
                    name = "-".join(p for p in (*parts, f"{SEED_PREFIX}{fseed}") if p)
                data["name"] = f"{recipe.name}-{name}"
                try:
                    cell_recipe = recipe_from_dict(data, source=f"matrix cell {name}")
                except RecipeError as e:
                    raise RecipeError(f"matrix cell '{name}': {e}") from None
                cells.append(Cell(name, cell_recipe, arm_name, dict(zip(names, combo)), fseed,
                                  i if seeds > 1 else None, group))
    seen = set()
    for cell in cells:
        if cell.name in seen:
            raise RecipeError(f"matrix: two cells are both named '{cell.name}'; give the arms distinct names")
        seen.add(cell.name)
    baseline_arm(recipe)  # an unknown matrix.baseline is an error before any cell runs
    return cells


def expand_matrix(recipe: Recipe) -> list[tuple[str, Recipe]]:
    """The cells of a matrix recipe as (name, recipe without matrix)."""
    return [(c.name, c.recipe) for c in matrix_cells(recipe)]


def _has_own_stages(cell_dir: Path) -> bool:
    """A cell written before the shared cache: its stage directories are inside it."""
    if not cell_dir.is_dir():
        return False
    return any((p / DONE_NAME).is_file() or (p / "checkpoint.pt").is_file()
               for p in cell_dir.iterdir() if p.is_dir() and "-" in p.name)


def cell_stage_root(cell_dir: Path) -> Optional[Path]:
    """Where a matrix cell's stages live (from its `cell.json`), or None for a run that is not a matrix cell."""
    path = Path(cell_dir) / CELL_FILE
    if not path.is_file():
        return None
    try:
        root = json.loads(path.read_text()).get("stage_root")
    except (OSError, ValueError):
        return None
    return (Path(cell_dir) / root).resolve() if isinstance(root, str) else None


def read_cell_info(cell_dir: Path) -> Optional[dict[str, Any]]:
    """A cell's `cell.json`; for a cell of a matrix written before it existed, rebuilt from the parent's recipe."""
    cell_dir = Path(cell_dir)
    path = cell_dir / CELL_FILE
    try:
        if path.is_file():
            info = json.loads(path.read_text())
            return info if isinstance(info, dict) else None
        parent = cell_dir.parent / "resolved.yaml"
        if not (cell_dir / "events.jsonl").is_file() or not parent.is_file():
            return None
        from sslrecipe.recipe import load_recipe

        recipe = load_recipe(parent)
        if recipe.matrix is None:
            return None
        for cell in matrix_cells(recipe):
            if cell.name == cell_dir.name:
                return cell.info(".")
    except (OSError, ValueError, SSLRecipeError):
        return None
    return None


def _say(text: str) -> None:
    print(f"[matrix] {text}", file=sys.stderr, flush=True)


def run_matrix(
    recipe: Recipe,
    run_dir: Path,
    run_cell: Callable[[Recipe, Path, Path, set], Path],
    only: Optional[Iterable[str]] = None,
    say: Optional[Callable[[str], None]] = _say,
) -> Path:
    """Run every cell (or the cells named in `only`), sharing `RUN/stages/`; write the comparison.

    `run_cell(recipe, cell_dir, stage_root, forced)` runs one cell. A failed cell does not stop the others;
    `MatrixFailed` is raised at the end, after the table is written. An interrupt stops the matrix (the table of
    what is finished is written first)."""

    cells = matrix_cells(recipe)
    if only:
        wanted = set(only)
        unknown = wanted - {c.name for c in cells}
        if unknown:
            raise RecipeError(f"no matrix cell named {', '.join(sorted(unknown))}; cells: {', '.join(c.name for c in cells)}")
        to_run = [c for c in cells if c.name in wanted]
    else:
        to_run = cells
    say = say or (lambda text: None)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "resolved.yaml", recipe_to_yaml(recipe))
    shared = run_dir / STAGES_DIR
    forced: set = set()  # a shared stage that --force names is rerun once, not once per cell
    failed: list[tuple[str, str]] = []
    try:
        for i, cell in enumerate(to_run, 1):
            cell_dir = run_dir / cell.name
            stage_root = cell_dir if _has_own_stages(cell_dir) else shared
            cell_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cell_dir / CELL_FILE, json.dumps(cell.info(os.path.relpath(stage_root, cell_dir)), indent=1))
            say(f"cell {i}/{len(to_run)}: {cell.name}")
            try:
                run_cell(cell.recipe, cell_dir, stage_root, forced)
            except (Interrupted, KeyboardInterrupt):
                raise
            except Exception as e:  # noqa: BLE001 - one cell's failure must not stop the others
                message = str(e) if isinstance(e, SSLRecipeError) else f"{type(e).__name__}: {e}"
                failed.append((cell.name, message))
                say(f"cell {cell.name} failed: {message}")
            if i < len(to_run):
                write_comparison(recipe, run_dir, cells)  # the table so far, for whoever watches
    finally:
        write_comparison(recipe, run_dir, cells)
    if failed:
        raise MatrixFailed(run_dir, failed, len(to_run))
    return run_dir


def write_comparison(recipe: Recipe, run_dir: Path, cells: Optional[list[Cell]] = None) -> None:
    """RUN/comparison.md, .csv and .json: one row per cell (its replicates over fine-tuning seeds aggregated)."""
    from sslrecipe.report.compare import build_table, read_run

    cells = cells if cells is not None else matrix_cells(recipe)
    records = [read_run(Path(run_dir) / c.name, c.name, cell=c.info(".")) for c in cells]
    table = build_table(records, "flat", matrix=matrix_spec(recipe))
    rows = [{"cell": r.label, "run_dir": str(r.path), "status": r.status, "error": r.error, "arm": r.cell.get("arm"),
             "axes": r.cell.get("axes"), "finetune_seed": r.cell.get("finetune_seed"), "metrics": r.metrics}
            for r in records]
    atomic_write_text(Path(run_dir) / "comparison.json", json.dumps(rows, indent=1, default=str))
    atomic_write_text(Path(run_dir) / "comparison.csv", table.to_csv())
    atomic_write_text(Path(run_dir) / "comparison.md", f"# {recipe.name}: comparison\n\n{table.to_markdown(heading=False)}\n")


def matrix_spec(recipe: Recipe) -> dict[str, Any]:
    """What the comparison needs to know about a matrix: its arms, axes, seeds and baseline arm."""
    m = recipe.matrix
    assert m is not None
    return {"arms": [a.name for a in m.arms], "axes": list(m.axes), "seeds": m.seeds, "baseline": baseline_arm(recipe)}
