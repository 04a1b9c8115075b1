"""`matrix:` — one recipe, several runs (named arms x the cartesian product of axes), one comparison table.

Each cell is an ordinary run directory `RUN/<cell>/` (cached and resumable like any run); the parent
holds `resolved.yaml` (with the matrix) and `comparison.md` / `comparison.json`.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from sslrecipe.engine.checkpoint import atomic_write_text
from sslrecipe.errors import RecipeError
from sslrecipe.recipe import Recipe, recipe_to_yaml
from sslrecipe.recipe.loader import recipe_from_dict, set_dotted

COMPARED = ("bbox/mAP", "bbox/AP50", "bbox/AP75", "bbox/AP_small", "bbox/AP_medium", "bbox/AP_large")


def _slug(value: Any) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in str(value))


def expand_matrix(recipe: Recipe) -> list[tuple[str, Recipe]]:
    """The cells of a matrix recipe as (name, recipe without matrix)."""
    assert recipe.matrix is not None
    base = recipe.model_dump(mode="json", exclude={"matrix", "extends"})
    arms = recipe.matrix.arms or []
    axes = recipe.matrix.axes or {}
    arm_list = [(a.name, a.set) for a in arms] or [("", {})]
    names = [k for k in axes]
    combos = list(itertools.product(*(axes[k] for k in names))) if names else [()]
    cells: list[tuple[str, Recipe]] = []
    for arm_name, arm_set in arm_list:
        for combo in combos:
            data = json.loads(json.dumps(base))
            for key, value in arm_set.items():
                set_dotted(data, key, value)
            for key, value in zip(names, combo):
                set_dotted(data, key, value)
            parts = [arm_name] if arm_name else []
            parts += [f"{k.rsplit('.', 1)[-1]}{_slug(v)}" for k, v in zip(names, combo)]
            name = "-".join(p for p in parts if p) or "cell"
            data["name"] = f"{recipe.name}-{name}"
            try:
                cells.append((name, recipe_from_dict(data, source=f"matrix cell {name}")))
            except RecipeError as e:
                raise RecipeError(f"matrix cell '{name}': {e}") from None
    seen = set()
    for name, _ in cells:
        if name in seen:
            raise RecipeError(f"matrix: two cells are both named '{name}'; give the arms distinct names")
        seen.add(name)
    return cells


def comparison_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| cell | " + " | ".join(k.split("/", 1)[1] for k in COMPARED) + " |", "|---" * (len(COMPARED) + 1) + "|"]
    for row in rows:
        values = [row["metrics"].get(k) for k in COMPARED]
        shown = ["n/a" if v is None else f"{v:.1f}" for v in values]
        lines.append(f"| {row['cell']} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def run_matrix(
    recipe: Recipe,
    run_dir: Path,
    run_cell: Callable[[Recipe, Path], Path],
    only: Optional[Iterable[str]] = None,
) -> Path:
    cells = expand_matrix(recipe)
    if only:
        wanted = set(only)
        unknown = wanted - {n for n, _ in cells}
        if unknown:
            raise RecipeError(f"no matrix cell named {', '.join(sorted(unknown))}; cells: {', '.join(n for n, _ in cells)}")
        cells = [(n, r) for n, r in cells if n in wanted]
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "resolved.yaml", recipe_to_yaml(recipe))
    rows = []
    for name, cell in cells:
        cell_dir = run_cell(cell, run_dir / name)
        metrics_path = Path(cell_dir) / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        rows.append({"cell": name, "run_dir": str(cell_dir), "metrics": metrics})
    atomic_write_text(run_dir / "comparison.json", json.dumps(rows, indent=1))
    text = f"# {recipe.name}: comparison\n\nCOCO box metrics in percent on each cell's evaluation split.\n\n{comparison_table(rows)}\n"
    atomic_write_text(run_dir / "comparison.md", text)
    return run_dir
