"""Load a recipe: YAML with positions, `extends:` deep-merge, dotted `--set` overrides, validation.

Every error names the file, line and column, the dotted key, and what was expected; an unknown key
gets the closest valid key as a suggestion. The caller never sees a pydantic or YAML traceback.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml
from pydantic import BaseModel, ValidationError

from sslrecipe.errors import RecipeError
from sslrecipe.recipe.schema import Recipe


@dataclass(frozen=True)
class Origin:
    """Where a key's value was written: a file position or a command-line override."""

    source: str
    line: Optional[int] = None
    column: Optional[int] = None

    def __str__(self) -> str:
        if self.line is None:
            return self.source
        return f"{self.source}:{self.line}:{self.column}"


@dataclass
class RawRecipe:
    """A merged but not yet validated recipe, with the origin of every dotted key."""

    data: dict[str, Any]
    origins: dict[str, Origin] = field(default_factory=dict)
    path: Optional[Path] = None


# --------------------------------------------------------------------------- YAML with positions


def _node_to_python(node: yaml.Node, source: str, prefix: str, origins: dict[str, Origin]) -> Any:
    """Convert a composed YAML node to Python, recording the position of every mapping key."""
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = yaml.safe_load(yaml.serialize(key_node))
            key = str(key)
            dotted = f"{prefix}.{key}" if prefix else key
            origins[dotted] = Origin(source, key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = _node_to_python(value_node, source, dotted, origins)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            dotted = f"{prefix}.{i}"
            origins.setdefault(dotted, Origin(source, item.start_mark.line + 1, item.start_mark.column + 1))
            items.append(_node_to_python(item, source, dotted, origins))
        return items
    return yaml.safe_load(yaml.serialize(node))


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, Origin]]:
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise RecipeError(f"{where}: invalid YAML: {e.problem}") from None
    origins: dict[str, Origin] = {}
    if node is None:
        return {}, origins
    if not isinstance(node, yaml.MappingNode):
        raise RecipeError(f"{path}:1:1: a recipe must be a mapping of keys (name, data, backbone, ...)")
    return _node_to_python(node, str(path), "", origins), origins


# --------------------------------------------------------------------------- merging


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; any other value in `override` replaces the base value."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_with_extends(path: Path, chain: tuple[Path, ...] = ()) -> RawRecipe:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise RecipeError(f"{path}: `extends` forms a cycle: {cycle}")
    data, origins = _read_yaml(path)
    bases = data.pop("extends", None)
    if bases is None:
        return RawRecipe(data, origins, path)
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise RecipeError(f"{origins.get('extends', path)}: extends must be a path or a list of paths")
    merged: dict[str, Any] = {}
    merged_origins: dict[str, Origin] = {}
    for base in bases:
        base_path = Path(base) if Path(base).is_absolute() else path.parent / base
        if not base_path.is_file():
            raise RecipeError(f"{origins.get('extends', path)}: extends: base recipe {base_path} not found")
        raw = _load_with_extends(base_path, (*chain, path))
        merged = deep_merge(merged, raw.data)
        merged_origins.update(raw.origins)
    merged = deep_merge(merged, data)
    merged_origins.update(origins)
    return RawRecipe(merged, merged_origins, path)


# --------------------------------------------------------------------------- --set overrides


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value parsed as YAML)."""
    if "=" not in text:
        raise RecipeError(f"--set {text}: expected KEY=VALUE with a dotted key, e.g. --set finetune.epochs=2")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set {text}: the key must be dotted names such as finetune.lr")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise RecipeError(f"--set {text}: the value is not valid YAML ({e})") from None
    return key, parsed


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def apply_overrides(raw: RawRecipe, overrides: Iterable[str]) -> RawRecipe:
    data = copy.deepcopy(raw.data)
    origins = dict(raw.origins)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value)
        for dotted in [k for k in origins if k == key or k.startswith(key + ".")]:
            del origins[dotted]
        origins[key] = Origin(f"--set {text}")
    return RawRecipe(data, origins, raw.path)


# --------------------------------------------------------------------------- validation


def _model_at(loc: tuple[Any, ...]) -> Optional[type[BaseModel]]:
    """The pydantic model that holds the key at `loc` (None where the path leaves the models)."""
    model: Any = Recipe
    for part in loc[:-1]:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        info = model.model_fields.get(str(part))
        if info is None:
            return None
        model = _first_model(info.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _first_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # pydantic adds union-member tags such as 'LabeledSource' or 'str' to locations: drop them
    out = []
    for part in loc:
        if isinstance(part, str) and (part[:1].isupper() or part in ("str", "int", "float", "list", "dict", "none")):
            continue
        if isinstance(part, str) and ("[" in part or part.startswith("function-")):
            continue
        out.append(part)
    return tuple(out)


def _origin_for(origins: dict[str, Origin], dotted: str, fallback: str) -> str:
    probe = dotted
    while probe:
        if probe in origins:
            return str(origins[probe])
        probe = probe.rpartition(".")[0]
    return fallback


def _format_errors(err: ValidationError, raw: RawRecipe) -> str:
    fallback = str(raw.path) if raw.path else "recipe"
    lines: list[str] = []
    seen: set[str] = set()
    for e in err.errors():
        loc = _clean_loc(tuple(e["loc"]))
        dotted = ".".join(str(p) for p in loc)
        where = _origin_for(raw.origins, dotted, fallback)
        if e["type"] == "extra_forbidden":
            model = _model_at(loc)
            valid = sorted(model.model_fields) if model else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            prefix = ".".join(str(p) for p in loc[:-1])
            hint = f" Did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            parent = ".".join(str(p) for p in loc[:-1]) or "the recipe's top level"
            msg = f"{where}: unknown key '{dotted}'.{hint} Valid keys in {parent}: {', '.join(valid)}"
        elif dotted:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            msg = f"{where}: {dotted}: {e['msg']}{shown}"
        else:
            msg = f"{where}: {e['msg'].removeprefix('Value error, ')}"
        if msg not in seen:
            seen.add(msg)
            lines.append(msg)
    return "\n".join(lines)


def validate(raw: RawRecipe) -> Recipe:
    try:
        recipe = Recipe.model_validate(raw.data)
    except ValidationError as e:
        raise RecipeError(_format_errors(e, raw)) from None
    return recipe


def _absolutize_paths(data: dict[str, Any], base: Path) -> None:
    """Relative data/weights paths are relative to the recipe file, not the working directory."""

    def fix(value: Any) -> Any:
        if isinstance(value, str) and value and not Path(value).is_absolute() and "://" not in value:
            return str((base / value).resolve())
        return value

    section = data.get("data")
    if isinstance(section, dict):
        for key in ("unlabeled", "train", "val", "test", "images"):
            v = section.get(key)
            if isinstance(v, str):
                section[key] = fix(v)
            elif isinstance(v, dict):
                for sub in ("annotations", "images"):
                    if isinstance(v.get(sub), str):
                        v[sub] = fix(v[sub])
    for section in (data.get("weights"), (data.get("pretrain") or {}).get("init") if isinstance(data.get("pretrain"), dict) else None):
        if isinstance(section, dict) and isinstance(section.get("path"), str):
            section["path"] = fix(section["path"])


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Read, merge, override and validate a recipe. Raises RecipeError with a precise message."""
    raw = _load_with_extends(Path(path))
    _absolutize_paths(raw.data, raw.path.parent if raw.path else Path.cwd())
    raw = apply_overrides(raw, overrides)
    return validate(raw)


def recipe_to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe (every default filled in) as YAML; itself a valid recipe."""
    data = recipe.model_dump(mode="json", exclude={"extends"})
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    return validate(RawRecipe(copy.deepcopy(data), {}, Path(source)))
