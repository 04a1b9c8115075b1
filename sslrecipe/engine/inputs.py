"""Before a run does any work: every input path the recipe names must exist.

A recipe copied from `recipes/` (e.g. `ir_custom.yaml`) names placeholder paths; running it unedited must say
which keys to set, all at once, and stop before a run directory is created (exit 2), not fail in the data stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

from sslrecipe.errors import DataError
from sslrecipe.recipe import Recipe
from sslrecipe.recipe.schema import LabeledSource, WeightsConfig

_WHAT = {
    "train": "your labeled training set (a COCO JSON, a YOLO dataset YAML, a VOC folder or a HIT-UAV JSON)",
    "val": "your labeled validation set (or null for val and test: data.train is then split 60/20/20)",
    "test": "your labeled test set (or null for val and test: data.train is then split 60/20/20)",
}


def _labeled(key: str, value: Any) -> list[tuple[str, str, str]]:
    split = key.rsplit(".", 1)[-1]
    if isinstance(value, str):
        return [(key, value, _WHAT[split])]
    if isinstance(value, LabeledSource):
        out = [(f"{key}.annotations", value.annotations, _WHAT[split])]
        if value.images:
            out.append((f"{key}.images", value.images, f"the folder of the images of data.{split}"))
        return out
    return []


def _weights(key: str, w: Optional[WeightsConfig]) -> list[tuple[str, str, str]]:
    if w is not None and w.source == "file" and w.path:
        return [(f"{key}.path", w.path, "a local checkpoint (safetensors, or a weights-only torch file)")]
    return []


def input_paths(recipe: Recipe) -> list[tuple[str, str, str]]:
    """(dotted key, path, what it should be) for every local input the recipe reads."""
    d = recipe.data
    out: list[tuple[str, str, str]] = []
    for split in ("train", "val", "test"):
        out += _labeled(f"data.{split}", getattr(d, split))
    if d.images:
        out.append(("data.images", d.images, "the default image folder of the labeled sets"))
    if isinstance(d.unlabeled, str) and recipe.weights.source == "pretrain":
        what = ("the folder of your unlabeled images or videos, or a video file, to pre-train on (or null: pre-train on "
                "the training images)")
        out.append(("data.unlabeled", d.unlabeled, what))
    out += _weights("weights", recipe.weights)
    if recipe.weights.source == "pretrain":
        out += _weights("pretrain.init", recipe.pretrain.init)
        if recipe.pretrain.first is not None:
            out += _weights("pretrain.first.init", recipe.pretrain.first.init)
    return out


def _line_of(source: Optional[Path], dotted: str) -> Optional[int]:
    """The line of `dotted` in the recipe file, when the file itself writes it (not through extends or --set)."""
    if source is None or not Path(source).is_file():
        return None
    try:
        node = yaml.compose(Path(source).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    for part in dotted.split("."):
        if not isinstance(node, yaml.MappingNode):
            return None
        found = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part), None)
        if found is None:
            return None
        key_node, node = found
    return key_node.start_mark.line + 1


def check_inputs(recipe: Recipe, source: Optional[Path] = None, what: str = "recipe") -> None:
    """Raise one DataError naming every missing input path, its key (and line in `source`) and what to set it to."""
    missing = [(k, p, w) for k, p, w in input_paths(recipe) if "://" not in p and not Path(p).exists()]
    if not missing:
        return
    where = str(source) if source is not None else what
    lines = []
    for key, path, wanted in missing:
        line = _line_of(source, key) or (_line_of(source, key.rsplit(".", 1)[0]) if key.endswith((".annotations", ".images")) else None)
        lines.append(f"  {key}{f' (line {line})' if line else ''}: {path} does not exist — set it to {wanted}")
    n = len(missing)
    raise DataError(
        f"{where}: {n} input path{'s' * (n != 1)} {'do' if n != 1 else 'does'} not exist; set "
        f"{'them' if n != 1 else 'it'} in the recipe or with --set KEY=PATH (relative paths are relative to the "
        "recipe file):\n" + "\n".join(lines)
    )
