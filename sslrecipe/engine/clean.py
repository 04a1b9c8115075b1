"""`sslrecipe runs clean`: the stage directories a run directory holds that its latest recipe no longer uses.

A stage directory is `<stage>-<hash>` (see `pipeline.py`); a run reuses it while the recipe hashes to the
same name. After a recipe change (a new fine-tuning schedule, other shots, another method) the old
directories stay behind, often gigabytes of checkpoints. The ones to keep are those named by the hashes
that the run's latest `resolved.yaml` gives, computed by `Pipeline.stage_hashes` exactly as a run does; for
a matrix, each cell's latest `resolved.yaml`, for the cells the matrix still has. Stage directories are
looked for in the run directory, in a matrix's shared `stages/` and inside its cells.

Hashing needs the stages' definitions (and so torch); the module imports them only when asked.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from sslrecipe.engine.names import CELL_FILE, DONE_NAME, STAGE_ORDER
from sslrecipe.engine.rundir import run_layout
from sslrecipe.errors import SSLRecipeError

STAGE_DIR = re.compile(rf"^({'|'.join(STAGE_ORDER)})-([0-9a-f]{{12}})$")


@dataclass
class StageDir:
    path: Path
    stage: str
    finished: bool
    bytes: int


@dataclass
class CleanPlan:
    run_dir: Path
    unused: list[StageDir]
    kept: list[StageDir]
    notes: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.unused)


def _size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _stage_dirs(run_dir: Path) -> list[Path]:
    """`<stage>-<hash>` directories in the run directory and one level below (a matrix's `stages/`, its cells)."""
    found: list[Path] = []
    for child in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        if STAGE_DIR.match(child.name):
            found.append(child)
            continue
        for grandchild in sorted(p for p in child.iterdir() if p.is_dir()):
            if STAGE_DIR.match(grandchild.name):
                found.append(grandchild)
    return found


def _used_names(resolved: Path) -> set[str]:
    """The stage directory names a run of this resolved.yaml uses (hashed as `sslrecipe run` hashes them)."""
    from sslrecipe.engine.stages import build_pipeline
    from sslrecipe.recipe import load_recipe

    try:
        recipe = load_recipe(resolved)
    except SSLRecipeError as e:
        raise SSLRecipeError(f"{resolved} does not load, so the stages it uses are unknown; nothing was deleted:\n{e}") from None
    if recipe.weights.source == "pretrain":  # as the runner does before hashing
        from sslrecipe.ssl.registry import apply_method_defaults

        recipe = apply_method_defaults(recipe)
    return {f"{name}-{h}" for name, h in build_pipeline().stage_hashes(recipe).items()}


def plan_clean(run_dir: str | Path) -> CleanPlan:
    """What `runs clean` would delete in `run_dir`, and what it keeps. Raises SSLRecipeError for a directory
    that is not a run, a matrix cell (its stages are shared: clean the matrix), or when the latest recipe
    matches none of the stage directories (the data moved or changed: keeping everything is the safe answer)."""
    run_dir = Path(run_dir)
    run_layout(run_dir)  # a newer layout is refused: its stage directories may not mean what this code thinks
    resolved = run_dir / "resolved.yaml"
    if not resolved.is_file():
        raise SSLRecipeError(f"{run_dir} has no resolved.yaml: give a run directory (the one `sslrecipe run` printed)")
    if (run_dir / CELL_FILE).is_file():
        raise SSLRecipeError(
            f"{run_dir} is one cell of the matrix run {run_dir.parent}, whose cells share their stages: "
            f"clean the matrix directory instead (sslrecipe runs clean {run_dir.parent})"
        )
    import yaml

    notes: list[str] = []
    try:
        top = yaml.safe_load(resolved.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SSLRecipeError(f"{resolved}: cannot read it ({e}); nothing was deleted") from None
    if isinstance(top, dict) and top.get("matrix"):
        from sslrecipe.engine.matrix import expand_matrix
        from sslrecipe.recipe import load_recipe

        names = [name for name, _ in expand_matrix(load_recipe(resolved))]
        used: set[str] = set()
        for name in names:
            cell_resolved = run_dir / name / "resolved.yaml"
            if cell_resolved.is_file():
                used |= _used_names(cell_resolved)
        gone = sorted(p.name for p in run_dir.iterdir()
                      if p.is_dir() and (p / "resolved.yaml").is_file() and p.name not in names)
        if gone:
            notes.append(f"cells no longer in the matrix (their stages are not kept; their reports are): {', '.join(gone)}")
    else:
        used = _used_names(resolved)

    unused, kept = [], []
    for path in _stage_dirs(run_dir):
        entry = StageDir(path, STAGE_DIR.match(path.name).group(1), (path / DONE_NAME).is_file(), _size(path))
        (kept if path.name in used else unused).append(entry)
    if unused and not kept:
        raise SSLRecipeError(
            f"none of the {len(unused)} stage directories in {run_dir} is one its latest resolved.yaml uses: the data "
            "moved or changed (the data stage's hash covers the files' sizes and times), or the run never got "
            "past writing its recipe. Nothing was deleted; remove the run directory by hand if it is no longer "
            "needed."
        )
    return CleanPlan(run_dir, unused, kept, notes)


def delete_unused(plan: CleanPlan) -> int:
    """Delete the plan's unused stage directories while holding the run directory (no run may start meanwhile);
    returns the bytes freed."""
    from sslrecipe.engine.rundir import RunLock

    freed = 0
    with RunLock(plan.run_dir):
        for entry in plan.unused:
            shutil.rmtree(entry.path)
            freed += entry.bytes
    return freed


def human(n: Optional[int]) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"
