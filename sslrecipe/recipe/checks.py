"""The recipe checks that need the SSL method registry or timm, for `sslrecipe validate` and the start of
`sslrecipe run` (before the data stage, before a run directory exists).

`load_recipe` checks types, ranges and keys without torch; what only the methods and timm know is checked here:
an unknown `pretrain.method` or options block, an unknown `backbone.name`, `backbone.kwargs` timm refuses, and
everything a method's builder refuses (its options, `pretrain.img_size` against the ViT patch or the 32-px stride,
the backbone family it supports, ...). The builders are that knowledge: each is run once on PyTorch's meta device
(shapes only: no memory, no compute), so this module holds no copy of their rules. Every matrix cell is checked.

Importing this module imports neither torch nor timm; `check_recipe` does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

from sslrecipe.errors import RecipeError, SSLRecipeError
from sslrecipe.recipe.loader import Origin, RawRecipe, _suggest, matrix_variants, origin_for
from sslrecipe.recipe.schema import Recipe

_built: dict[str, Optional[str]] = {}  # what one meta build found (None = nothing), by its arguments


def check_recipe(recipe: Recipe, raw: Optional[RawRecipe] = None) -> None:
    """Raise one RecipeError listing every problem of `recipe` (and of each matrix cell) that the method registry
    or timm finds; `raw` (from `load_recipe_and_raw`) locates each in the file."""
    if raw is None:
        raw = RawRecipe(recipe.model_dump(mode="json"), {}, None)
    fallback = str(raw.path) if raw.path else "recipe"
    found: dict[str, str] = {}  # message -> the matrix cell it was first found in ("" outside a matrix)
    variants = matrix_variants(raw)
    if not variants:  # with a matrix only the cells run, never the recipe under it
        for message in _problems(recipe, raw.origins, fallback):
            found.setdefault(message, "")
    for variant in variants:
        cell = Recipe.model_validate(variant.data)  # valid: load_recipe validated every cell
        for message in _problems(cell, variant.origins, variant.where):
            found.setdefault(message, variant.label)
    if found:
        raise RecipeError("\n".join(m + (f" (in the matrix cell {label})" if label else "") for m, label in found.items()))


def _problems(recipe: Recipe, origins: dict[str, Origin], fallback: str) -> list[str]:
    from sslrecipe.ssl.registry import available

    problems: list[str] = []
    b = recipe.backbone
    backbone_problem = _build_once("backbone", b.name, b.in_chans, b.kwargs)
    if backbone_problem:
        key = "backbone.kwargs" if b.kwargs and "kwargs" in backbone_problem else "backbone.name"
        problems.append(f"{origin_for(origins, key, fallback)}: {key}: {backbone_problem}")
    methods = sorted(available())
    configs = [("pretrain", recipe.pretrain)] + ([("pretrain.first", recipe.pretrain.first)] if recipe.pretrain.first else [])
    for key, p in configs:
        known = True
        if p.method and p.method not in methods:
            known = False
            close = _suggest(p.method, methods, cutoff=0.6)
            hint = f" Did you mean '{close}'?" if close else ""
            problems.append(f"{origin_for(origins, f'{key}.method', fallback)}: {key}.method: unknown method "
                            f"'{p.method}'.{hint} Methods: {', '.join(methods)}")
        for name in p.options:
            if name not in methods:
                close = _suggest(name, methods, cutoff=0.6)
                hint = f" Did you mean '{key}.options.{close}'?" if close else ""
                problems.append(f"{origin_for(origins, f'{key}.options.{name}', fallback)}: {key}.options.{name}: options "
                                f"are keyed by method name, and '{name}' is not a method.{hint} Methods: {', '.join(methods)}")
        used = recipe.weights.source == "pretrain" and p.method
        if used and known and not backbone_problem:
            problem = _build_once("method", p.method, b.name, b.in_chans, p.img_size, p.options.get(p.method, {}),
                                  b.kwargs, f"{key}.method")
            if problem:
                if key != "pretrain":  # the builders name the main section's keys: name this one's
                    problem = re.sub(r"\bpretrain\.(?!first\.)", f"{key}.", problem)
                problems.append(f"{_locate(problem, origins, key, fallback)}: {problem}")
    return problems


def _locate(message: str, origins: dict[str, Origin], key: str, fallback: str) -> str:
    """Where a builder's message points: the longest key of this pre-training (`key`.*) it names, else `key`.method."""
    named = [k for k in origins if k.startswith(key + ".") and k in message]
    return origin_for(origins, max(named, key=len) if named else f"{key}.method", fallback)


def _build_once(kind: str, *args: Any) -> Optional[str]:
    cache_key = json.dumps([kind, *args], sort_keys=True, default=str)
    if cache_key not in _built:
        _built[cache_key] = _build_backbone(*args) if kind == "backbone" else _build_method(*args)
    return _built[cache_key]


def _build_backbone(name: str, in_chans: int, kwargs: dict[str, Any]) -> Optional[str]:
    """What timm says about this backbone (None: it builds)."""
    import torch

    from sslrecipe.models.backbone import create_backbone

    try:
        with torch.device("meta"):
            create_backbone(name, in_chans=in_chans, **kwargs)
    except SSLRecipeError as e:  # unknown name (with the closest timm names), kwargs the model does not take
        return str(e)
    except Exception as e:  # noqa: BLE001 - timm refusing a kwarg's value (ValueError, AssertionError, ...)
        if _meta_limit(e):
            return None
        return f"timm cannot build {name!r} with backbone.kwargs {kwargs}: {type(e).__name__}: {e}"
    return None


def _build_method(method: str, timm_name: str, in_chans: int, img_size: int, options: dict[str, Any],
                  timm_kwargs: dict[str, Any], key: str) -> Optional[str]:
    """What the method's builder refuses (None: nothing it can tell without real tensors)."""
    import torch

    from sslrecipe.ssl.registry import create_method

    try:
        with torch.device("meta"):
            create_method(method, timm_name, in_chans, img_size, options, timm_kwargs, key=key)
    except SSLRecipeError as e:
        return str(e)
    except Exception:  # noqa: BLE001
        # Past the recipe checks a builder may compute on tensors (SparK verifies its sparse convolutions with a
        # forward pass), which the meta device cannot; the pre-training stage builds it for real and reports then.
        return None
    return None


def _meta_limit(e: Exception) -> bool:
    """An error of the meta device itself (no data behind the tensors), not of the recipe."""
    return isinstance(e, NotImplementedError) or "meta" in str(e).lower()


def check_recipe_file(path: str | Path, overrides=()) -> Recipe:
    """Load a recipe and run every check on it; the Recipe (without the method defaults applied)."""
    from sslrecipe.recipe.loader import load_recipe_and_raw

    recipe, raw = load_recipe_and_raw(path, overrides)
    check_recipe(recipe, raw)
    return recipe
