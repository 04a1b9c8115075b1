"""What `sslrecipe run` checks before any stage runs, per run or matrix cell: can the checkpoints it fetches be
had (cached, or their server answers)? A cell that cannot run is named in one line with the user's choices,
and the cells that can run still do (an advised recipe offline still runs its baseline arm).

Each check takes one cell's recipe and the stage the run stops after, and returns the reasons it cannot run;
a later check (e.g. a licence that must be accepted) is one more function in `CHECKS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from sslrecipe.engine.names import STAGE_ORDER
from sslrecipe.recipe import Recipe


@dataclass
class Blocked:
    cell: Optional[str]  # None: the recipe has no matrix
    reason: str  # one sentence: what is missing
    choices: str  # what the user can do

    def line(self) -> str:
        what = f"matrix cell {self.cell}" if self.cell else "this run"
        return f"{what} cannot start: {self.reason}. {self.choices}"


def _reaches(until: Optional[str], stage: str) -> bool:
    return until is None or STAGE_ORDER.index(until) >= STAGE_ORDER.index(stage)


def fetched_weights(recipe: Recipe, until: Optional[str] = None) -> list[tuple[str, str]]:
    """(recipe key, spec) of every checkpoint the run downloads, in the stages it reaches."""
    out: list[tuple[str, str]] = []
    w = recipe.weights
    if w.source == "fetch" and w.id and _reaches(until, "weights"):
        out.append(("weights.id", w.id))
    if w.source == "pretrain":
        pre = recipe.pretrain
        first = getattr(pre, "first", None)
        for key, section, stage in (("pretrain.first.init", getattr(first, "init", None), "pretrain_first"),
                                    ("pretrain.init", pre.init, "pretrain")):
            if section is not None and section.source == "fetch" and section.id and _reaches(until, stage):
                out.append((key, section.id))
    return out


def weights_reachable(recipe: Recipe, until: Optional[str]) -> list[tuple[str, str]]:
    """(reason, choices) for each fetched checkpoint that is neither cached nor downloadable now."""
    from sslrecipe.weights.cache import availability
    from sslrecipe.weights.fetch import cache_root

    out = []
    for key, spec in fetched_weights(recipe, until):
        why = availability(spec)
        if why is None:
            continue
        alternative = ("weights.source=scratch, or weights.source=pretrain to pre-train on your own pool"
                       if key == "weights.id" else f"drop {key} to pre-train from random weights")
        out.append((
            f"{key} {spec}: {why}",
            (f"Cache it with `sslrecipe weights fetch {spec}` where there is network and copy {cache_root()} here "
             f"(or set SSLRECIPE_CACHE to the copy), or run the arm without it (--set {alternative})."),
        ))
    return out


CHECKS: tuple[Callable[[Recipe, Optional[str]], list[tuple[str, str]]], ...] = (weights_reachable,)


def preflight(target: str | Path, overrides: Iterable[str] = (), cells: Iterable[str] = (),
              until: Optional[str] = None) -> tuple[list[str], list[Blocked]]:
    """(the matrix cells that can run, the runs that cannot). Without a matrix the first list is empty and the
    second holds the run itself when it cannot start. `cells`: the --cell selection (empty: every cell)."""
    from sslrecipe.engine.runner import resolve_run_target
    from sslrecipe.recipe import load_recipe

    recipe_file, _ = resolve_run_target(target, None)
    recipe = load_recipe(recipe_file, tuple(overrides))
    if recipe.matrix is None:
        blocked = [Blocked(None, reason, choices) for check in CHECKS for reason, choices in check(recipe, until)]
        return [], blocked[:1]
    from sslrecipe.engine.matrix import expand_matrix

    wanted = set(cells)
    runnable, blocked = [], []
    for name, cell in expand_matrix(recipe):
        if wanted and name not in wanted:
            continue
        problems = [p for check in CHECKS for p in check(cell, until)]
        if problems:
            blocked.append(Blocked(name, *problems[0]))
        else:
            runnable.append(name)
    return runnable, blocked
