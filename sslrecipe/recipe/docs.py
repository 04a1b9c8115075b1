"""Render the recipe schema as Markdown (`python -m sslrecipe.recipe.docs > docs/recipe.md`).

The schema is the single source of truth; a test checks that docs/recipe.md matches this output.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from sslrecipe.recipe.schema import Recipe


def _type_name(annotation: Any) -> str:
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    for junk in ("typing.", "sslrecipe.recipe.schema.", "NoneType"):
        text = text.replace(junk, "null" if junk == "NoneType" else "")
    return text.replace("|", "\\|")


def _default(info) -> str:
    if info.default is PydanticUndefined and info.default_factory is None:
        return "required"
    value = info.default_factory() if info.default_factory is not None else info.default
    if isinstance(value, BaseModel):
        return "(section)"
    return "`" + json.dumps(value, default=str) + "`"


def _models(model: type[BaseModel], prefix: str, out: list[tuple[str, type[BaseModel]]]) -> None:
    out.append((prefix, model))
    for name, info in model.model_fields.items():
        for sub in _submodels(info.annotation):
            if sub is model:  # a recursive section (pretrain.first): documented once, by its parent
                continue
            _models(sub, f"{prefix}.{name}" if prefix else name, out)


def _submodels(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in getattr(annotation, "__args__", ()) or ():
        found.extend(_submodels(arg))
    return found


def schema_markdown() -> str:
    lines = [
        "# Recipe reference",
        "",
        "Generated from `sslrecipe/recipe/schema.py` by `python -m sslrecipe.recipe.docs > docs/recipe.md`.",
        "Unknown keys are errors. Override any key from the command line with `--set dotted.key=value`",
        "(the value is parsed as YAML).",
        "",
    ]
    sections: list[tuple[str, type[BaseModel]]] = []
    _models(Recipe, "", sections)
    seen = set()
    for prefix, model in sections:
        if prefix in seen:
            continue
        seen.add(prefix)
        lines += [f"## `{prefix or '(top level)'}`", "", ((model.__doc__ or "").strip().splitlines() or [""])[0], ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for name, info in model.model_fields.items():
            key = f"{prefix}.{name}" if prefix else name
            desc = (info.description or "").replace("|", "\\|")
            lines.append(f"| `{key}` | {_type_name(info.annotation)} | {_default(info)} | {desc} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(schema_markdown())
