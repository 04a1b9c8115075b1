"""Load a recipe: YAML with positions, `extends:` deep-merge, dotted `--set` overrides, validation.

Every error names the file, line and column, the dotted key, and what was expected; an unknown key
gets the closest valid key as a suggestion. The caller never sees a pydantic or YAML traceback.

This module must not import torch or timm: `sslrecipe validate --help`, `advise` and the TUI read recipes
without them. The checks that need the method registry or timm are in `sslrecipe.recipe.checks`.
"""

from __future__ import annotations

import copy
import datetime
import difflib
import itertools
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml
from pydantic import BaseModel, ValidationError

from sslrecipe.errors import RecipeError
from sslrecipe.recipe import schema
from sslrecipe.recipe.schema import Recipe

# Structural limits, so that a hostile or runaway file is refused by its shape, not by a timer.
MAX_FILE_BYTES = 4 * 1024 * 1024  # a recipe is a few kilobytes
MAX_NODES = 100_000  # YAML values after aliases are expanded (a recipe has a few hundred): refuses a "billion laughs"
MAX_DEPTH = 50  # nesting of mappings and lists (a recipe nests four deep)
MAX_MATRIX_CELLS = 1000  # cells a matrix may expand to (each is a whole run)
# Keys a matrix arm or axis may not set: each cell is named after its arm and values; bases are merged on reading.
_MATRIX_FORBIDDEN = ("name", "matrix", "extends")


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
    """A merged but not yet validated recipe, with the origin of every dotted key.

    `texts` holds, for each plain (unquoted) scalar that YAML typed as a number, boolean or date, the text the user
    wrote and the value YAML made of it: a key whose type is a string gets the text back (`sha256: 000...0` stays
    the 64 zeros, `name: 2024` the name "2024")."""

    data: dict[str, Any]
    origins: dict[str, Origin] = field(default_factory=dict)
    path: Optional[Path] = None
    texts: dict[str, tuple[str, Any]] = field(default_factory=dict)


# --------------------------------------------------------------------------- YAML with positions


def _where(source: str, mark: Optional[yaml.Mark]) -> str:
    return f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source


class _Reader:
    """Composed YAML nodes -> Python, recording each key's position and refusing what a recipe cannot mean:
    duplicate keys, keys that are not names, recursive aliases, and more than MAX_NODES values."""

    def __init__(self, source: str):
        self.source = source
        self.origins: dict[str, Origin] = {}
        self.texts: dict[str, tuple[str, Any]] = {}
        self.count = 0
        self.open: set[int] = set()  # ids of the collections being converted (an alias to one of them recurses)
        self.constructor = yaml.SafeLoader("")  # SafeLoader's scalar typing, node by node

    def origin(self, node: yaml.Node) -> Origin:
        return Origin(self.source, node.start_mark.line + 1, node.start_mark.column + 1)

    def convert(self, node: yaml.Node, prefix: str) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise RecipeError(
                f"{_where(self.source, node.start_mark)}: the recipe expands to more than {MAX_NODES} YAML values "
                "through anchors and aliases (a recipe has a few hundred; this looks like a YAML bomb); write the "
                "values out, or use fewer nested aliases"
            )
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, prefix)
        if id(node) in self.open:
            raise RecipeError(
                f"{_where(self.source, node.start_mark)}: {prefix}: this alias refers to a value that contains it "
                "(a recursive YAML anchor), which never ends; remove the alias or write the value out"
            )
        if len(self.open) >= MAX_DEPTH:
            raise RecipeError(f"{_where(self.source, node.start_mark)}: {prefix}: nested more than {MAX_DEPTH} levels "
                              "deep; a recipe nests a few levels")
        self.open.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self.mapping(node, prefix)
            if isinstance(node, yaml.SequenceNode):
                items = []
                for i, item in enumerate(node.value):
                    dotted = f"{prefix}.{i}"
                    self.origins.setdefault(dotted, self.origin(item))
                    items.append(self.convert(item, dotted))
                return items
        finally:
            self.open.discard(id(node))
        raise RecipeError(f"{_where(self.source, node.start_mark)}: unsupported YAML node")  # pragma: no cover

    def mapping(self, node: yaml.MappingNode, prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise RecipeError(
                    f"{_where(self.source, key_node.start_mark)}: a key must be a name such as `finetune`, not a "
                    f"{'list' if isinstance(key_node, yaml.SequenceNode) else 'mapping'}"
                )
            # A key is the name as written: YAML's typing of `~`, `null`, `yes` or `1` does not apply to names.
            key = key_node.value
            dotted = f"{prefix}.{key}" if prefix else key
            line = key_node.start_mark.line + 1
            if key in lines:
                raise RecipeError(
                    f"{_where(self.source, key_node.start_mark)}: duplicate key '{dotted}' (also on line {lines[key]}); "
                    "YAML keeps only the last one, so the first block would be silently dropped: merge them into one"
                )
            lines[key] = line
            self.origins[dotted] = self.origin(key_node)
            out[key] = self.convert(value_node, dotted)
        return out

    def scalar(self, node: yaml.ScalarNode, prefix: str) -> Any:
        try:
            value = self.constructor.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as e:
            raise RecipeError(f"{_where(self.source, e.problem_mark or node.start_mark)}: invalid YAML: {e.problem}") from None
        except ValueError as e:  # e.g. a date such as 2024-13-45
            raise RecipeError(f"{_where(self.source, node.start_mark)}: {prefix}: cannot read {node.value!r}: {e}") from None
        if node.style is None and isinstance(value, (bool, int, float, datetime.date)):
            self.texts[prefix] = (node.value, value)
        return value


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise RecipeError(
            f"{path}:{line}:{column}: the recipe is not UTF-8 text (byte 0x{data[e.start]:02x}); is it a recipe? "
            "Save it as UTF-8 (a Latin-1 file converts with: iconv -f latin1 -t utf-8)"
        ) from None


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, Origin], dict[str, tuple[str, Any]]]:
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise RecipeError(f"{path}: {size / 2**20:.1f} MiB is not a recipe (a recipe is a few kilobytes of YAML)")
        text = _decode(path, path.read_bytes())
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe: {e.strerror or e}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise RecipeError(f"{path}: invalid YAML: nested too deeply to be a recipe") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise RecipeError(f"{_where(str(path), mark)}: invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:  # the reader: control characters such as NUL (a binary file)
        position = getattr(e, "position", None)
        where = str(path)
        if isinstance(position, int):
            line = text.count("\n", 0, position) + 1
            where = f"{path}:{line}:{position - (text.rfind(chr(10), 0, position) + 1) + 1}"
        raise RecipeError(f"{where}: invalid YAML: {e}".split("\n")[0] + "; is it a recipe?") from None
    if node is None:
        return {}, {}, {}
    if not isinstance(node, yaml.MappingNode):
        raise RecipeError(f"{path}:1:1: a recipe must be a mapping of keys (name, data, backbone, ...)")
    reader = _Reader(str(path))
    return reader.convert(node, ""), reader.origins, reader.texts


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
    data, origins, texts = _read_yaml(path)
    bases = data.pop("extends", None)
    if bases is None:
        return RawRecipe(data, origins, path, texts)
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise RecipeError(f"{origins.get('extends', path)}: extends must be a path or a list of paths")
    merged: dict[str, Any] = {}
    merged_origins: dict[str, Origin] = {}
    merged_texts: dict[str, tuple[str, Any]] = {}
    for base in bases:
        base_path = Path(base) if Path(base).is_absolute() else path.parent / base
        if not base_path.is_file():
            raise RecipeError(f"{origins.get('extends', path)}: extends: base recipe {base_path} not found")
        raw = _load_with_extends(base_path, (*chain, path))
        merged = deep_merge(merged, raw.data)
        merged_origins.update(raw.origins)
        merged_texts.update(raw.texts)
    merged = deep_merge(merged, data)
    merged_origins.update(origins)
    merged_texts.update(texts)
    return RawRecipe(merged, merged_origins, path, merged_texts)


# --------------------------------------------------------------------------- --set overrides


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value parsed as YAML)."""
    if "=" not in text:
        raise RecipeError(f"--set {text}: expected KEY=VALUE with a dotted key, e.g. --set finetune.epochs=2")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set {text}: the key must be dotted names such as finetune.lr")
    if key == "extends" or key.startswith("extends."):
        raise RecipeError(
            f"--set {text}: `extends` can only be written in a recipe file (its bases are merged as the file is "
            "read, before any --set); add `extends: PATH` to the recipe, or give the keys themselves with --set"
        )
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise RecipeError(f"--set {text}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
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


def _drop_under(mapping: dict[str, Any], key: str) -> None:
    for dotted in [k for k in mapping if k == key or k.startswith(key + ".")]:
        del mapping[dotted]


def apply_overrides(raw: RawRecipe, overrides: Iterable[str]) -> RawRecipe:
    data = copy.deepcopy(raw.data)
    origins = dict(raw.origins)
    texts = dict(raw.texts)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value)
        _drop_under(origins, key)
        _drop_under(texts, key)
        origins[key] = Origin(f"--set {text}")
        if isinstance(value, (bool, int, float, datetime.date)):
            texts[key] = (text.partition("=")[2].strip(), value)
    out = RawRecipe(data, origins, raw.path, texts)
    _keep_typed_strings(out)
    return out


# --------------------------------------------------------------------------- the schema, key by key


def _model_of(annotation: Any) -> Optional[type[BaseModel]]:
    """The pydantic model in `annotation` (itself, or a member of a Union/Optional); not inside lists or dicts."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
    return None


def _item_type(annotation: Any) -> Any:
    """The element type of list[X] (also inside Optional), else None."""
    for ann in (annotation, *(typing.get_args(annotation) if typing.get_origin(annotation) is typing.Union else ())):
        if typing.get_origin(ann) in (list, tuple) and typing.get_args(ann):
            return typing.get_args(ann)[0]
    return None


def _annotation_at(parts: Iterable[Any]) -> Any:
    """The schema type of the key at `parts` (dotted parts; ints or digit strings index lists); `Any` inside free
    mappings such as backbone.kwargs; None where the path is not in the schema."""
    annotation: Any = Recipe
    for part in parts:
        if isinstance(part, int) or (isinstance(part, str) and part.isdigit()):
            annotation = _item_type(annotation)
            if annotation is None:
                return None
            continue
        model = _model_of(annotation)
        if model is None:
            return Any if _is_free_mapping(annotation) else None
        info = model.model_fields.get(str(part))
        if info is None:
            return None
        annotation = info.annotation
    return annotation


def _is_free_mapping(annotation: Any) -> bool:
    return annotation is Any or typing.get_origin(annotation) is dict or any(
        typing.get_origin(a) is dict for a in typing.get_args(annotation)
    )


def _accepts_str(annotation: Any) -> bool:
    if annotation is str:
        return True
    return typing.get_origin(annotation) is typing.Union and str in typing.get_args(annotation)


def _suggest(word: str, valid: Iterable[str], cutoff: float = 0.5) -> Optional[str]:
    valid = list(valid)
    lowered = {v.lower(): v for v in valid}
    if word.lower() in lowered:  # `Epochs`, `NAME`: the key in lower case
        return lowered[word.lower()]
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=cutoff)
    return lowered[close[0]] if close else None


def _unknown_key_message(where: str, parent: tuple[str, ...], key: str, model: Optional[type[BaseModel]]) -> str:
    prefix = ".".join(parent)
    dotted = f"{prefix}.{key}" if prefix else key
    valid = sorted(model.model_fields) if model else []
    close = _suggest(key, valid) if valid else None
    hint = f" Did you mean '{prefix + '.' if prefix else ''}{close}'?" if close else ""
    listing = f" Valid keys in {prefix or 'the recipe top level'}: {', '.join(valid)}" if valid else ""
    return f"{where}: unknown key '{dotted}'.{hint}{listing}"


# --------------------------------------------------------------------------- typed strings


def _matrix_target(dotted: str) -> Optional[tuple[list[Any], str]]:
    """For a value inside `matrix` that sets a recipe key: (its path in the data, the dotted key it sets)."""
    if dotted.startswith("matrix.axes."):
        key, _, index = dotted[len("matrix.axes."):].rpartition(".")
        if key and index.isdigit():
            return ["matrix", "axes", key, int(index)], key
        return None
    m = re.fullmatch(r"matrix\.arms\.(\d+)\.set\.(.+)", dotted)
    if m:
        return ["matrix", "arms", int(m.group(1)), "set", m.group(2)], m.group(2)
    return None


def _keep_typed_strings(raw: RawRecipe) -> None:
    """A key whose type is a string keeps the text the user wrote where YAML typed it as a number, boolean or date
    (`--set weights.sha256=000...0` is that string, not the integer 0)."""
    for dotted, (text, value) in raw.texts.items():
        target = _matrix_target(dotted)
        if target is not None:
            path, key = target
            annotation = _annotation_at(key.split("."))
        else:
            path = [int(p) if p.isdigit() else p for p in dotted.split(".")]
            annotation = _annotation_at(path)
        if not _accepts_str(annotation):
            continue
        node: Any = raw.data
        try:
            for part in path[:-1]:
                node = node[part]
            current = node[path[-1]]
        except (KeyError, IndexError, TypeError):
            continue
        if type(current) is type(value) and current == value:  # still the value that text was read as
            node[path[-1]] = text


# --------------------------------------------------------------------------- validation

_MODEL_NAMES = {name for name, obj in vars(schema).items() if isinstance(obj, type) and issubclass(obj, BaseModel)}
_SCALAR_TAGS = {"str", "int", "float", "bool", "none", "list", "dict", "tuple", "set", "bytes", "any"}


def _is_union_tag(part: Any) -> bool:
    """pydantic names the union member it tried in an error location ('LabeledSource', 'str', 'function-after[..]')."""
    return isinstance(part, str) and (
        part in _MODEL_NAMES or part in _SCALAR_TAGS or "[" in part or part.startswith("function-")
    )


def _clean_loc(loc: tuple[Any, ...], data: Any) -> tuple[tuple[Any, ...], Optional[str]]:
    """The error location as the user's keys, and the union member the error came from (if any).

    A part is the user's key when the data holds it there (so `Epochs` or `LabeledSource` written by the user stay
    keys); otherwise a union tag is dropped; a missing key is kept."""
    out: list[Any] = []
    tag: Optional[str] = None
    node: Any = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            out.append(part)
            node = node[part]
        elif isinstance(node, (list, tuple)) and isinstance(part, int) and 0 <= part < len(node):
            out.append(part)
            node = node[part]
        elif _is_union_tag(part):
            tag = part
        else:
            out.append(part)
            node = None
    return tuple(out), tag


def origin_for(origins: dict[str, Origin], dotted: str, fallback: str) -> str:
    """Where `dotted` (or the nearest enclosing key that has a position) was written: file:line:col, else `fallback`."""
    probe = dotted
    while probe:
        if probe in origins:
            return str(origins[probe])
        probe = probe.rpartition(".")[0]
    return fallback


def _value_at(data: Any, loc: tuple[Any, ...]) -> Any:
    node = data
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _format_errors(err: ValidationError, raw: RawRecipe, fallback: Optional[str] = None) -> list[str]:
    fallback = fallback or (str(raw.path) if raw.path else "recipe")
    errors = []
    for e in err.errors():
        loc, tag = _clean_loc(tuple(e["loc"]), raw.data)
        errors.append((e, loc, tag))
    lines: list[str] = []
    seen: set[str] = set()
    for e, loc, tag in errors:
        # A mapping given where a path or a section is accepted: the section's own errors say what is wrong,
        # "Input should be a valid string" for the other member of the union would only confuse.
        if tag in _SCALAR_TAGS and isinstance(_value_at(raw.data, loc), dict) and any(
            other_loc[: len(loc)] == loc and other_tag in _MODEL_NAMES for _, other_loc, other_tag in errors
        ):
            continue
        dotted = ".".join(str(p) for p in loc)
        where = origin_for(raw.origins, dotted, fallback)
        if e["type"] == "extra_forbidden":
            annotation = _annotation_at(loc[:-1])
            model = _model_of(annotation)
            parent = tuple(str(p) for p in loc[:-1])
            msg = _unknown_key_message(where, parent, str(loc[-1]), model)
        elif dotted:
            got = e.get("input")
            shown = "" if isinstance(got, dict) or repr(got) in e["msg"] else f" (got {got!r})"
            msg = f"{where}: {dotted}: {e['msg'].removeprefix('Value error, ')}{shown}"
        else:
            msg = f"{where}: {e['msg'].removeprefix('Value error, ')}"
        if msg not in seen:
            seen.add(msg)
            lines.append(msg)
    return lines


def validate(raw: RawRecipe) -> Recipe:
    try:
        recipe = Recipe.model_validate(raw.data)
    except ValidationError as e:
        raise RecipeError("\n".join(_format_errors(e, raw))) from None
    return recipe


# --------------------------------------------------------------------------- matrix


def _check_settable(key: str, where: str, what: str) -> Optional[str]:
    """Why `key` (a dotted key a matrix axis or arm sets) is not a recipe key, or None."""
    parts = key.split(".")
    if any(not p for p in parts):
        return f"{where}: {what} key '{key}' must be dotted names such as finetune.lr"
    if parts[0] in _MATRIX_FORBIDDEN:
        return (f"{where}: {what} cannot set '{key}': each cell is named after its arm and values, and `extends` "
                "is merged when the file is read")
    annotation: Any = Recipe
    for i, part in enumerate(parts):
        model = _model_of(annotation)
        if model is None:
            if _is_free_mapping(annotation):
                return None
            return f"{where}: {what} key '{key}': '{'.'.join(parts[:i])}' is a value, not a section"
        info = model.model_fields.get(part)
        if info is None:
            return _unknown_key_message(where, tuple(parts[:i]), part, model) + f" (in {what})"
        annotation = info.annotation
    return None


def _reroot(origins: dict[str, Origin], key: str, origin: Optional[Origin]) -> None:
    _drop_under(origins, key)
    if origin is not None:
        origins[key] = origin


def _check_matrix_keys(raw: RawRecipe) -> None:
    """Unknown or forbidden keys in axes and arms, empty axes, duplicate arm names, too many cells."""
    matrix = raw.data.get("matrix")
    path = str(raw.path) if raw.path else "recipe"
    problems: list[str] = []
    axes: dict[str, list[Any]] = matrix.get("axes") or {}
    arms: list[dict[str, Any]] = matrix.get("arms") or []
    for key, values in axes.items():
        where = origin_for(raw.origins, f"matrix.axes.{key}", path)
        problem = _check_settable(key, where, "matrix.axes")
        if problem is None and not values:
            problem = f"{where}: matrix.axes '{key}' has no values: give at least one, or remove the axis"
        if problem:
            problems.append(problem)
    named: dict[str, str] = {}
    for i, arm in enumerate(arms):
        where = origin_for(raw.origins, f"matrix.arms.{i}", path)
        if arm["name"] in named:
            problems.append(f"{where}: two matrix arms are named '{arm['name']}' (the other at {named[arm['name']]}); "
                            "each arm names its cells' directories: give them distinct names")
        named.setdefault(arm["name"], where)
        for key in arm.get("set") or {}:
            problem = _check_settable(key, origin_for(raw.origins, f"matrix.arms.{i}.set.{key}", where),
                                      f"matrix arm '{arm['name']}' set")
            if problem:
                problems.append(problem)
    if problems:
        raise RecipeError("\n".join(problems))
    total = math.prod(len(v) for v in axes.values()) * max(1, len(arms))
    if total > MAX_MATRIX_CELLS:
        raise RecipeError(f"{origin_for(raw.origins, 'matrix', path)}: the matrix makes {total} cells, more than "
                          f"{MAX_MATRIX_CELLS} runs; split it into several recipes or run chosen cells")


@dataclass
class Variant:
    """One matrix cell (arm x axis values) as data, with the origin of every key: a key an arm or an axis sets is
    located where the matrix sets it. `label` says which arm and values make it (for messages)."""

    label: str
    data: dict[str, Any]
    origins: dict[str, Origin]
    where: str  # the arm or first axis value that makes the cell: where a cell-wide error is reported


def matrix_variants(raw: RawRecipe) -> list[Variant]:
    """The cells of a matrix recipe (arms x the product of axes; not the fine-tuning seeds, which change only
    finetune.seed), in the order `sslrecipe.engine.matrix` runs them. [] without a matrix."""
    matrix = raw.data.get("matrix")
    if not isinstance(matrix, dict):
        return []
    path = str(raw.path) if raw.path else "recipe"
    axes: dict[str, list[Any]] = matrix.get("axes") or {}
    arms: list[Optional[dict[str, Any]]] = list(matrix.get("arms") or []) or [None]
    base = {k: v for k, v in raw.data.items() if k != "matrix"}
    base_origins = {k: v for k, v in raw.origins.items() if not k.startswith("matrix")}
    names = list(axes)
    out: list[Variant] = []
    for a, arm in enumerate(arms):
        for combo in itertools.product(*(list(enumerate(axes[k])) for k in names)):
            data = copy.deepcopy(base)
            origins = dict(base_origins)
            settings = []
            for key, value in ((arm or {}).get("set") or {}).items():
                set_dotted(data, key, copy.deepcopy(value))
                _reroot(origins, key, raw.origins.get(f"matrix.arms.{a}.set.{key}"))
            for key, (i, value) in zip(names, combo):
                set_dotted(data, key, copy.deepcopy(value))
                _reroot(origins, key, raw.origins.get(f"matrix.axes.{key}.{i}"))
                settings.append(f"{key}={value!r}")
            label = ", ".join(([f"arm '{arm['name']}'"] if arm else []) + settings)
            first = raw.origins.get(f"matrix.arms.{a}") if arm else None
            first = first or (raw.origins.get(f"matrix.axes.{names[0]}.{combo[0][0]}") if names else None)
            out.append(Variant(label, data, origins, str(first) if first else path))
    return out


def _validate_matrix(raw: RawRecipe) -> None:
    """Every axis value and arm must make a valid recipe, reported where it is written (not as a cell that fails
    after other cells ran); unknown keys, duplicate arm names and empty axes are errors."""
    if not isinstance(raw.data.get("matrix"), dict):
        return
    _check_matrix_keys(raw)
    problems: list[str] = []
    seen: set[str] = set()
    for variant in matrix_variants(raw):
        try:
            Recipe.model_validate(variant.data)
        except ValidationError as e:
            cell_raw = RawRecipe(variant.data, variant.origins, raw.path)
            for line in _format_errors(e, cell_raw, fallback=variant.where):
                if line not in seen:
                    seen.add(line)
                    problems.append(f"{line} (in the matrix cell {variant.label})")
    if problems:
        raise RecipeError("\n".join(problems))


# --------------------------------------------------------------------------- loading


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


def load_raw(path: str | Path, overrides: Iterable[str] = ()) -> RawRecipe:
    """Read, merge and override a recipe, not yet validated: the data with every key's origin."""
    raw = _load_with_extends(Path(path))
    _keep_typed_strings(raw)
    _absolutize_paths(raw.data, raw.path.parent if raw.path else Path.cwd())
    return apply_overrides(raw, overrides)


def load_recipe_and_raw(path: str | Path, overrides: Iterable[str] = ()) -> tuple[Recipe, RawRecipe]:
    """`load_recipe`, and the raw recipe it came from: where each key was written, for the messages of the checks
    that need the method registry or timm (`sslrecipe.recipe.checks`)."""
    raw = load_raw(path, overrides)
    recipe = validate(raw)
    _validate_matrix(raw)
    return recipe, raw


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Read, merge, override and validate a recipe. Raises RecipeError with a precise message."""
    return load_recipe_and_raw(path, overrides)[0]


def recipe_to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe (every default filled in) as YAML; itself a valid recipe."""
    data = recipe.model_dump(mode="json", exclude={"extends"})
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    return validate(RawRecipe(copy.deepcopy(data), {}, Path(source)))
