"""The practitioner's constraints: validation, defaults, and the derived facts the rules test.

`Constraints` holds what the user said (CLI flags, TUI form fields, or API arguments; None = not said).
`resolve()` checks every value (a clear `SSLRecipeError` for anything meaningless or contradictory),
fills defaults, takes what `--data` can tell (object size, shots, channels) where the user said nothing,
and derives the facts that the decision table in `rules.yaml` is written against.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from sslrecipe.errors import SSLRecipeError

BACKBONES = ("resnet", "vit", "any")
MODEL_SIZES = ("small", "large", "any")
OBJECT_SIZES = ("small", "medium", "large", "mixed")
LOCALIZATIONS = ("strict", "tolerant")
DOMAINS = ("rgb", "ir", "remote-sensing", "medical", "astronomy", "hyperspectral", "other")
SHIFTS = ("none", "moderate", "large")
CUSTOM = ("auto", "required", "no")

BACKBONE_ALIASES = {"cnn": "resnet", "convnet": "resnet", "resnets": "resnet", "transformer": "vit", "vits": "vit"}
DOMAIN_ALIASES = {
    "infrared": "ir", "thermal": "ir", "tir": "ir", "visible": "rgb", "natural": "rgb",
    "remote_sensing": "remote-sensing", "remotesensing": "remote-sensing", "aerial": "remote-sensing",
    "satellite": "remote-sensing", "multispectral": "hyperspectral",
}
# the shift from ImageNet that each domain implies when --domain-shift is not given
DEFAULT_SHIFT = {
    "rgb": "none", "ir": "moderate", "remote-sensing": "moderate",
    "medical": "large", "astronomy": "large", "hyperspectral": "large", "other": "moderate",
}

# shots -> the survey's measurement that speaks for it (Table VII: 25 and 50; Table IV: ~720 training images)
FEW25_MAX = 37
FEW50_MAX = 100
PLENTY_MIN = 700
SURVEY_FULL_TRAIN = 720


@dataclass
class Constraints:
    """What the user asked for; None means "not said" (a default or the dataset decides)."""

    backbone: Optional[str] = None
    model_size: Optional[str] = None
    shots: Optional[int] = None
    object_size: Optional[str] = None
    localization: Optional[str] = None
    domain: Optional[str] = None
    domain_shift: Optional[str] = None
    unlabeled: Optional[int] = None
    custom_pretrain: Optional[str] = None
    channels: Optional[int] = None
    data: Optional[str] = None
    val: Optional[str] = None  # a labeled validation set for the written recipe (default: carved from `data`)
    pool: Optional[str] = None  # a folder of unlabeled images: the recipe's pre-training pool; counts --unlabeled


@dataclass
class Resolved:
    """Constraints with every value checked and filled in, plus where each came from."""

    backbone: str
    model_size: str
    shots: Optional[int]
    object_size: str
    localization: str
    domain: str
    domain_shift: str
    unlabeled: Optional[int]
    custom_pretrain: str
    channels: Optional[int]
    data: Optional[str]
    origin: dict[str, str] = field(default_factory=dict)  # key -> given | default | data | derived | backbone | pool
    data_facts: Optional[Any] = None  # infer.DataFacts when --data was given
    val: Optional[str] = None
    pool: Optional[str] = None
    typed: dict[str, str] = field(default_factory=dict)  # key -> what the user typed, where an alias was read

    # ------------------------------------------------------------------ derived facts

    @property
    def regime(self) -> str:
        """few25 | few50 | limited | plenty: which of the survey's measurements speaks for `shots`."""
        if self.shots is None or self.shots >= PLENTY_MIN:
            return "plenty"
        if self.shots <= FEW25_MAX:
            return "few25"
        if self.shots <= FEW50_MAX:
            return "few50"
        return "limited"

    @property
    def frugal(self) -> bool:
        return self.regime in ("few25", "few50")

    @property
    def custom(self) -> bool:
        """Is pre-training on the user's own images part of the advice?"""
        if self.custom_pretrain == "required":
            return True
        if self.custom_pretrain == "no":
            return False
        return self.domain_shift == "large" and self.unlabeled != 0

    def facts(self) -> dict[str, Any]:
        """What the rules' `when:` conditions are tested against."""
        return {
            "family": self.backbone,
            "model_size": self.model_size,
            "shots": self.shots,
            "regime": self.regime,
            "frugal": self.frugal,
            "object_size": self.object_size,
            "localization": self.localization,
            "domain": self.domain,
            "shift": self.domain_shift,
            "unlabeled": self.unlabeled,
            "custom_pretrain": self.custom_pretrain,
            "custom": self.custom,
            "channels": self.channels,
        }

    def as_json(self) -> dict[str, Any]:
        out = {
            "backbone": self.backbone,
            "model_size": self.model_size,
            "shots": self.shots,
            "object_size": self.object_size,
            "localization": self.localization,
            "domain": self.domain,
            "domain_shift": self.domain_shift,
            "unlabeled": self.unlabeled,
            "custom_pretrain": self.custom_pretrain,
            "channels": self.channels,
            "data": self.data,
            "val": self.val,
            "pool": self.pool,
            "typed": dict(self.typed),
            "regime": self.regime,
            "custom_pretraining": self.custom,
            "origin": dict(self.origin),
        }
        return out


def _choice(name: str, value: Optional[str], choices: tuple[str, ...], aliases: dict[str, str] | None = None,
            typed: Optional[dict[str, str]] = None) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str):
        raise SSLRecipeError(f"--{name.replace('_', '-')}: expected one of {', '.join(choices)}, got {value!r}")
    v = value.strip().lower()
    if aliases and v in aliases:
        if typed is not None:
            typed[name] = value
        v = aliases[v]
    if v in choices:
        return v
    close = difflib.get_close_matches(v, list(choices) + list(aliases or {}), n=1, cutoff=0.6)
    hint = f" Did you mean {aliases.get(close[0], close[0]) if aliases else close[0]}?" if close else ""
    also = ""
    if aliases:
        also = " (also: " + "; ".join(
            f"{', '.join(a for a, t in aliases.items() if t == c)} = {c}" for c in choices if c in aliases.values()
        ) + ")"
    raise SSLRecipeError(
        f"--{name.replace('_', '-')} {value!r} is not known: use one of {', '.join(choices)}{also}.{hint}"
    )


def alias_help(choices: tuple[str, ...], aliases: dict[str, str]) -> str:
    """ "rgb, ir (infrared, thermal), ..." for --help: every accepted value, with the aliases of each."""
    out = []
    for c in choices:
        names = [a for a, t in aliases.items() if t == c]
        out.append(f"{c} ({', '.join(names)})" if names else c)
    return ", ".join(out)


# the survey's backbones by timm name: (family, size); another timm name of a family names only the family
SURVEY_BACKBONES = {
    "resnet50": ("resnet", "small"), "resnet200": ("resnet", "large"),
    "vit_small_patch16_224": ("vit", "small"), "vit_base_patch16_224": ("vit", "large"),
}


def _backbone(value: Optional[str], typed: dict[str, str]) -> tuple[Optional[str], Optional[str]]:
    """(family, size): a family name, an alias, or a timm name (a survey backbone also gives its size)."""
    if value is None:
        return None, None
    if isinstance(value, str):
        v = value.strip().lower()
        if v in SURVEY_BACKBONES:
            typed["backbone"] = value
            return SURVEY_BACKBONES[v]
        if (v.startswith("resnet") and v[6:].isdigit()) or v.startswith("vit_"):
            typed["backbone"] = value
            return ("resnet" if v.startswith("resnet") else "vit"), None
    try:
        return _choice("backbone", value, BACKBONES, BACKBONE_ALIASES, typed), None
    except SSLRecipeError:
        close = difflib.get_close_matches(str(value).strip().lower(), [*BACKBONES, *BACKBONE_ALIASES], n=1, cutoff=0.6)
        raise SSLRecipeError(
            f"--backbone {value!r} is not a backbone family the survey measured: use resnet (ResNet-50/200), "
            f"vit (ViT-S/16, ViT-B/16) or any; also {alias_help(('resnet', 'vit'), BACKBONE_ALIASES)} or a timm "
            "name (resnet50, vit_small_patch16_224, ...)."
            + (f" Did you mean {BACKBONE_ALIASES.get(close[0], close[0])}?" if close else "")
        ) from None


def _count(name: str, value: Any, minimum: int) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                value = int(value)
            else:
                raise ValueError
        except ValueError:
            raise SSLRecipeError(f"--{name}: expected a whole number, got {value!r}") from None
    if value < minimum:
        what = {
            "shots": "the number of labeled training images must be at least 1 (omit --shots for plenty)",
            "unlabeled": "the number of unlabeled images cannot be negative",
            "channels": "images have at least 1 channel",
        }[name]
        raise SSLRecipeError(f"--{name} {value}: {what}")
    return value


def resolve(c: Constraints) -> Resolved:
    """Validate, fill defaults and dataset-inferred values, derive facts. Raises SSLRecipeError."""
    origin: dict[str, str] = {}

    def pick(key: str, given: Any, inferred: Any, default: Any) -> Any:
        if given is not None:
            origin[key] = "given"
            return given
        if inferred is not None:
            origin[key] = "data"
            return inferred
        origin[key] = "default"
        return default

    typed: dict[str, str] = {}
    backbone, backbone_size = _backbone(c.backbone, typed)
    model_size = _choice("model_size", c.model_size, MODEL_SIZES)
    if backbone_size and model_size not in (None, "any", backbone_size):
        raise SSLRecipeError(
            f"--backbone {c.backbone} is a {backbone_size} model, but --model-size is {model_size}: drop one of them "
            f"(or name a {model_size} {backbone} such as "
            f"{next(n for n, (f, z) in SURVEY_BACKBONES.items() if f == backbone and z == model_size)})"
        )
    shots = _count("shots", c.shots, 1)
    object_size = _choice("object_size", c.object_size, OBJECT_SIZES)
    localization = _choice("localization", c.localization, LOCALIZATIONS)
    domain = _choice("domain", c.domain, DOMAINS, DOMAIN_ALIASES, typed)
    shift = _choice("domain_shift", c.domain_shift, SHIFTS)
    unlabeled = _count("unlabeled", c.unlabeled, 0)
    custom = _choice("custom_pretrain", c.custom_pretrain, CUSTOM)
    channels = _count("channels", c.channels, 1)

    facts = None
    if c.data is not None:
        from sslrecipe.guide.infer import infer_from_data

        facts = infer_from_data(c.data)
        if shots is not None and shots > facts.images:
            raise SSLRecipeError(
                f"--shots {shots} but --data {c.data} has only {facts.images} labeled images: give at most "
                f"{facts.images}, or omit --shots to use them all"
            )
    if c.val is not None and c.data is None:
        raise SSLRecipeError(f"--val {c.val}: a validation set goes with a training set; give --data too")
    if c.val is not None and not Path(c.val).expanduser().exists():
        raise SSLRecipeError(f"--val {c.val}: not found")
    pool_size = None
    if c.pool is not None:
        from sslrecipe.data.images import list_images

        pool_size = len(list_images(c.pool))  # DataError names the folder when it is missing
        if unlabeled is not None and unlabeled != pool_size:
            raise SSLRecipeError(
                f"--unlabeled {unlabeled} but --pool {c.pool} holds {pool_size} images: drop --unlabeled "
                "(the pool's count is used)"
            )

    r = Resolved(
        backbone=pick("backbone", backbone, None, "any"),
        model_size=pick("model_size", None if backbone_size else model_size, backbone_size, "any"),
        shots=pick("shots", shots, facts.images if facts else None, None),
        object_size=pick("object_size", object_size, facts.object_size if facts else None, "mixed"),
        localization=pick("localization", localization, None, "strict"),
        domain=pick("domain", domain, None, "rgb"),
        domain_shift="none",
        unlabeled=pick("unlabeled", unlabeled, pool_size, None),
        custom_pretrain=pick("custom_pretrain", custom, None, "auto"),
        channels=pick("channels", channels, facts.channels if facts else None, None),
        data=c.data,
        origin=origin,
        data_facts=facts,
        val=c.val,
        pool=c.pool,
        typed=typed,
    )
    if backbone_size:  # a survey backbone's timm name fixes the size too
        origin["model_size"] = "backbone"
    if pool_size is not None and unlabeled is None:
        origin["unlabeled"] = "pool"
    if shift is not None:
        r.domain_shift = shift
        origin["domain_shift"] = "given"
    else:
        r.domain_shift = DEFAULT_SHIFT[r.domain]
        if r.channels is not None and r.channels > 3:
            # public weights are RGB: more bands is a large shift whatever the domain is called
            r.domain_shift = "large"
        origin["domain_shift"] = "derived"

    # contradictions
    if r.custom_pretrain == "required" and r.unlabeled == 0:
        raise SSLRecipeError(
            "--custom-pretrain required with --unlabeled 0: custom pre-training needs unlabeled images "
            "(give their number with --unlabeled, or drop --custom-pretrain required)"
        )
    return r


def constraints_from_json(data: dict[str, Any]) -> Constraints:
    """A Constraints from a mapping (e.g. the TUI's form); unknown keys are an error."""
    known = set(asdict(Constraints()))
    unknown = [k for k in data if k not in known]
    if unknown:
        raise SSLRecipeError(f"unknown constraint(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return Constraints(**data)
