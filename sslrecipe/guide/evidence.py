"""The survey's measured results as data: load `evidence.yaml`, look rows up, cite them.

A row is one printed number of Tables III, IV, VI or VII. The advisor never types a number itself: the
rationale and caveat texts in `rules.yaml` refer to rows with `{ev:TABLE/method/backbone/column}` and are
filled in from this file, so a citation can never disagree with the data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Iterable, Optional

import yaml

from sslrecipe.errors import SSLRecipeError
from sslrecipe.models.family import backbone_family

TABLES = ("III", "IV", "VI", "VII")
ROW_KEYS = (
    "table", "method", "method_label", "backbone", "backbone_label", "size",
    "pretrain_data", "metric", "setting", "column", "value",
)
METHODS = ("dino", "resim", "leopart", "spark", "mae", "scratch")
BACKBONES = {
    "resnet50": ("R50", "resnet", "small"),
    "resnet200": ("R200", "resnet", "large"),
    "vit_small_patch16_224": ("ViT/S-16", "vit", "small"),
    "vit_base_patch16_224": ("ViT/B-16", "vit", "large"),
}


def family_of(backbone: str) -> str:
    """The survey's family of a backbone: `resnet` or `vit` (the advisor's words for `cnn` / `vit`)."""
    return BACKBONES[backbone][1] if backbone in BACKBONES else ("vit" if backbone_family(backbone) == "vit" else "resnet")


@dataclass(frozen=True)
class Row:
    table: str
    method: str
    method_label: str
    backbone: str
    backbone_label: str
    size: str
    pretrain_data: str
    metric: str
    setting: str
    column: str
    value: float
    note: Optional[str] = None

    @property
    def label(self) -> str:
        """The survey's row label, e.g. "ReSim R50" or "MAE-IR ViT/S-16"."""
        return f"{self.method_label} {self.backbone_label}"

    @property
    def family(self) -> str:
        return family_of(self.backbone)

    def cite(self) -> str:
        """"Table VII, ReSim R50, 25-shot AP 50.4"."""
        return f"Table {self.table}, {self.label}, {self.column} {fmt(self.value, self.metric)}"

    def as_json(self) -> dict:
        """The advisor's JSON evidence item: {table, row, metric, value}."""
        return {"table": f"Table {self.table}", "row": self.label, "metric": self.column, "value": self.value}


def fmt(value: float, metric: str = "") -> str:
    if metric.startswith("delta"):
        return f"{value:+.1f}"
    return f"{value:.1f}"


class Evidence:
    """All rows, indexed by (table, method, backbone, column)."""

    def __init__(self, rows: Iterable[Row], tables: dict):
        self.rows: list[Row] = list(rows)
        self.tables = tables
        self._index: dict[tuple[str, str, str, str], Row] = {}
        for r in self.rows:
            key = (r.table, r.method, r.backbone, r.column)
            if key in self._index:
                raise SSLRecipeError(f"evidence.yaml: duplicate row {key}")
            self._index[key] = r

    def get(self, table: str, method: str, backbone: str, column: str) -> Optional[Row]:
        return self._index.get((table, method, backbone, column))

    def require(self, table: str, method: str, backbone: str, column: str) -> Row:
        row = self.get(table, method, backbone, column)
        if row is None:
            raise SSLRecipeError(f"evidence: no row Table {table} / {method} / {backbone} / {column!r}")
        return row

    def column(self, table: str, column: str) -> list[Row]:
        return [r for r in self.rows if r.table == table and r.column == column]

    def columns(self, table: str) -> list[str]:
        seen: list[str] = []
        for r in self.rows:
            if r.table == table and r.column not in seen:
                seen.append(r.column)
        return seen

    def find(self, **match) -> list[Row]:
        return [r for r in self.rows if all(getattr(r, k) == v for k, v in match.items())]

    # ------------------------------------------------------------------ templates

    _REF = re.compile(r"\{ev:([^}]+)\}")

    def ref(self, spec: str) -> Row:
        """`VII/resim/resnet50/25-shot AP` -> the row."""
        parts = spec.split("/")
        if len(parts) != 4:
            raise SSLRecipeError(f"evidence reference {spec!r}: expected TABLE/method/backbone/column")
        return self.require(*parts)

    def render(self, text: str) -> str:
        """Replace `{ev:TABLE/method/backbone/column}` with the row's value and `{cite:...}` with its citation."""

        def value(m: re.Match) -> str:
            row = self.ref(m.group(1))
            return fmt(row.value, row.metric)

        def cite(m: re.Match) -> str:
            return self.ref(m.group(1)).cite()

        text = re.sub(r"\{cite:([^}]+)\}", cite, text)
        return self._REF.sub(value, text)

    def references(self, text: str) -> list[Row]:
        return [self.ref(m.group(1)) for m in re.finditer(r"\{(?:ev|cite):([^}]+)\}", text)]


def _parse(data: dict, source: str) -> Evidence:
    if not isinstance(data, dict) or "rows" not in data or "tables" not in data:
        raise SSLRecipeError(f"{source}: expected keys 'tables' and 'rows'")
    rows = []
    for i, raw in enumerate(data["rows"]):
        missing = [k for k in ROW_KEYS if k not in raw]
        unknown = [k for k in raw if k not in ROW_KEYS and k != "note"]
        if missing or unknown:
            raise SSLRecipeError(f"{source}: row {i}: missing {missing} unknown {unknown}")
        raw = dict(raw)
        raw["table"] = str(raw["table"])
        raw["value"] = float(raw["value"])
        rows.append(Row(**raw))
    return Evidence(rows, data["tables"])


@lru_cache(maxsize=1)
def load_evidence() -> Evidence:
    """The packaged evidence file (cached)."""
    text = resources.files("sslrecipe.guide").joinpath("evidence.yaml").read_text(encoding="utf-8")
    return _parse(yaml.safe_load(text), "evidence.yaml")
