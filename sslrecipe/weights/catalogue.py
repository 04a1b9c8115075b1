"""The catalogue of public SSL checkpoints (`catalogue.yaml` beside this file), read into typed entries."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote, urlparse

import yaml

from sslrecipe.errors import SSLRecipeError
from sslrecipe.models.normalization import IMAGENET_MEAN, IMAGENET_STD, Normalization

CATALOGUE_FILE = Path(__file__).with_name("catalogue.yaml")

LAYOUTS = ("dino", "moco", "resim", "mae", "spark", "leopart", "timm", "torchvision", "detectron2")
_HEX = re.compile(r"^[0-9a-f]+$")


@dataclass(frozen=True)
class Source:
    """Where a file comes from: a URL, or a file in a Hugging Face hub repository at a revision."""

    url: Optional[str] = None
    hub_repo: Optional[str] = None
    hub_file: Optional[str] = None
    revision: str = "main"

    @property
    def is_hub(self) -> bool:
        return self.hub_repo is not None

    @property
    def key(self) -> str:
        """A stable identity for the checksum registry: the same file named two ways shares one key."""
        if self.is_hub:
            return f"hf://{self.hub_repo}/{self.hub_file}@{self.revision}"
        return str(self.url)

    @property
    def filename(self) -> str:
        if self.is_hub:
            return Path(str(self.hub_file)).name
        path = unquote(urlparse(str(self.url)).path)
        return Path(path).name or "download"

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True)
class Entry:
    name: str
    method: str
    backbone: str
    source: Source
    layout: str
    in_chans: int
    licence: str
    paper: str
    non_commercial: bool = False
    sha256: Optional[str] = None
    sha256_prefix: Optional[str] = None
    filename: Optional[str] = None
    page: Optional[str] = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # the input normalisation of the weights' training, on [0, 1] inputs (ImageNet's unless the source says otherwise)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @property
    def normalization(self) -> Normalization:
        return Normalization(self.mean, self.std)

    @property
    def cache_filename(self) -> str:
        return self.filename or self.source.filename

    def licence_warning(self) -> Optional[str]:
        if not self.non_commercial:
            return None
        return (
            f"licence: {self.name} ({self.method}) weights are {self.licence}, i.e. NON-COMMERCIAL use only; "
            "models fine-tuned from them inherit that restriction"
        )

    def row(self) -> dict[str, Any]:
        """The flat record `sslrecipe weights list --json` prints."""
        return {
            "name": self.name,
            "method": self.method,
            "backbone": self.backbone,
            "source": self.source.key,
            "licence": self.licence,
            "non_commercial": self.non_commercial,
            "in_chans": self.in_chans,
            "layout": self.layout,
            "sha256": self.sha256,
            "sha256_prefix": self.sha256_prefix,
            "page": self.page,
            "paper": self.paper,
            "mean": list(self.mean),
            "std": list(self.std),
            "notes": self.notes,
        }


def _check_hex(value: Any, what: str, length: Optional[int] = None) -> Optional[str]:
    if value is None:
        return None
    v = str(value).strip().lower()
    if not _HEX.match(v) or (length is not None and len(v) != length):
        want = f"{length} hex digits" if length else "hex digits"
        raise SSLRecipeError(f"catalogue: {what} must be {want}, got {value!r}")
    return v


def _parse_source(raw: Any, name: str) -> Source:
    if not isinstance(raw, dict):
        raise SSLRecipeError(f"catalogue entry {name!r}: source must be {{url: ...}} or {{hub: ..., file: ...}}")
    if "url" in raw:
        return Source(url=str(raw["url"]))
    if "hub" in raw and "file" in raw:
        return Source(hub_repo=str(raw["hub"]), hub_file=str(raw["file"]), revision=str(raw.get("revision", "main")))
    raise SSLRecipeError(f"catalogue entry {name!r}: source needs `url`, or `hub` and `file`")


def parse_entry(raw: dict[str, Any]) -> Entry:
    known = {
        "name", "method", "backbone", "source", "layout", "in_chans", "licence", "paper", "non_commercial",
        "sha256", "sha256_prefix", "filename", "page", "notes", "mean", "std",
    }
    name = str(raw.get("name", "?"))
    for req in ("name", "method", "backbone", "source", "layout", "in_chans", "licence", "paper"):
        if req not in raw:
            raise SSLRecipeError(f"catalogue entry {name!r} lacks `{req}`")
    layout = str(raw["layout"])
    if layout not in LAYOUTS:
        raise SSLRecipeError(f"catalogue entry {name!r}: unknown layout {layout!r} (one of {', '.join(LAYOUTS)})")
    in_chans = int(raw["in_chans"])
    if "mean" in raw or "std" in raw:
        norm = Normalization.from_meta(raw, in_chans, f"catalogue entry {name!r}")
    elif in_chans == 3:
        norm = Normalization.imagenet()
    else:
        raise SSLRecipeError(f"catalogue entry {name!r}: in_chans {in_chans} needs its `mean` and `std` "
                             "(ImageNet's are assumed only for 3-channel RGB weights)")
    return Entry(
        name=name,
        method=str(raw["method"]),
        backbone=str(raw["backbone"]),
        source=_parse_source(raw["source"], name),
        layout=layout,
        in_chans=in_chans,
        licence=str(raw["licence"]),
        paper=str(raw["paper"]),
        non_commercial=bool(raw.get("non_commercial", False)),
        sha256=_check_hex(raw.get("sha256"), f"{name}: sha256", 64),
        sha256_prefix=_check_hex(raw.get("sha256_prefix"), f"{name}: sha256_prefix"),
        filename=raw.get("filename"),
        page=raw.get("page"),
        notes=str(raw.get("notes", "")),
        extra={k: v for k, v in raw.items() if k not in known},
        mean=norm.mean,
        std=norm.std,
    )


@lru_cache(maxsize=4)
def _load(path: str) -> tuple[Entry, ...]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise SSLRecipeError(f"cannot read the weights catalogue {path}: {e}") from None
    entries = tuple(parse_entry(e) for e in (data or {}).get("entries", []))
    seen: set[str] = set()
    for e in entries:
        if e.name in seen:
            raise SSLRecipeError(f"catalogue: duplicate entry name {e.name!r}")
        seen.add(e.name)
    return entries


def load_catalogue(path: Optional[Path] = None) -> list[Entry]:
    """All catalogue entries, in file order."""
    return list(_load(str(path or CATALOGUE_FILE)))


def find_entry(name: str, path: Optional[Path] = None) -> Optional[Entry]:
    for e in load_catalogue(path):
        if e.name == name:
            return e
    return None


def get_entry(name: str, path: Optional[Path] = None) -> Entry:
    """The entry called ``name``, or an error that suggests the closest names."""
    entry = find_entry(name, path)
    if entry is not None:
        return entry
    names = [e.name for e in load_catalogue(path)]
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise SSLRecipeError(
        f"{name!r} is not in the weights catalogue.{hint} `sslrecipe weights list` shows the names; "
        "a URL (https://...) or hf://REPO/FILE[@REV] also works, and a local file is `weights.source: file`."
    )
