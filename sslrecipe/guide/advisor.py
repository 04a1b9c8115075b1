"""The advisor: constraints -> ranked options, each with the survey's numbers behind it.

All the judgement lives in `rules.yaml` (the decision table) and `evidence.yaml` (the survey's numbers).
This module is the small scorer that applies them:

    score(option) = sum over active criteria of  weight x normalized value x discount  + adjustments

where a criterion is active when its `when` holds for the resolved constraints, the value is the option's
row in the criterion's evidence column (min-max normalized over the column's pre-trained rows), and the
discount is 1 for the option's own row and `proxy_discount` for a borrowed one (see `_value`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from sslrecipe.errors import SSLRecipeError
from sslrecipe.guide.constraints import Constraints, Resolved, resolve
from sslrecipe.guide.evidence import BACKBONES, Evidence, Row, family_of, fmt, load_evidence
from sslrecipe.guide.rules import Candidate, Criterion, Rules, load_rules, matches

METHOD_LABELS = {
    "dino": "DINO", "resim": "ReSim", "leopart": "Leopart", "spark": "SparK", "mae": "MAE",
    "hybrid": "Hybrid", "none": "none", "scratch": "Scratch",
}
INIT_PHRASES = {
    "public": "public SSL weights",
    "custom-pretrain": "pre-training on your own images",
    "public+custom-pretrain": "public weights and pre-training continued on your own images",
}


def label(method: str, backbone: str) -> str:
    bl = BACKBONES.get(backbone, (backbone,))[0]
    return f"{METHOD_LABELS.get(method, method)} {bl}"


@dataclass
class Value:
    """An option's value in one evidence column."""

    norm: float  # 0..1 within the column's pre-trained rows
    discount: float  # 1 for the option's own row
    rows: list[Row]
    borrowed: Optional[str] = None  # why another row stands in (None: the option's own row)


@dataclass
class Contribution:
    table: str
    column: str
    weight: float
    criteria: list[Criterion]
    value: Optional[Value]

    @property
    def points(self) -> float:
        return 0.0 if self.value is None else self.weight * self.value.norm * self.value.discount


@dataclass
class Resolution:
    """Resolution and tiling advice for small objects."""

    pretrain_img_size: int
    finetune_img_size: Optional[int]
    upscale: Optional[int]
    tile: Optional[bool]
    tile_size: int
    tile_overlap: float
    max_dets: Optional[int]
    text: str


@dataclass
class Option:
    candidate: Candidate
    init: str
    init_why: str
    contributions: list[Contribution]
    adjustments: list[tuple[str, float, str]]
    notes: list[str]
    caveats: list[str]
    confidence: float
    level: str
    extrapolated: list[str]
    rationale: str = ""
    resolution: Optional[Resolution] = None

    @property
    def method(self) -> str:
        return self.candidate.method

    @property
    def backbone(self) -> str:
        return self.candidate.backbone

    @property
    def family(self) -> str:
        return family_of(self.backbone)

    @property
    def score(self) -> float:
        return sum(c.points for c in self.contributions) + sum(d for _, d, _ in self.adjustments)

    @property
    def label(self) -> str:
        return label(self.method, self.backbone)

    @property
    def evidence(self) -> list[Row]:
        """The rows behind the option, heaviest criterion first; F1 beside each AP of the VEDAI tables."""
        ev = load_evidence()
        out: list[Row] = []
        for c in sorted(self.contributions, key=lambda c: -c.weight):
            if c.value is None:
                continue
            for row in c.value.rows:
                if row not in out:
                    out.append(row)
                if c.value.borrowed is None and row.metric == "AP" and row.table in ("IV", "VI", "VII"):
                    f1 = ev.get(row.table, row.method, row.backbone, row.column.replace("AP", "F1"))
                    if f1 is not None and f1 not in out:
                        out.append(f1)
        return out

    def as_json(self) -> dict[str, Any]:
        caveats = list(self.caveats)
        if self.resolution is not None:
            caveats.append(self.resolution.text)
        return {
            "method": self.method,
            "backbone": self.backbone,
            "init": self.init,
            "evidence": [r.as_json() for r in self.evidence],
            "rationale": self.rationale,
            "caveats": caveats,
            "confidence": {"score": round(self.confidence, 2), "level": self.level, "extrapolated": list(self.extrapolated)},
        }


@dataclass
class Baseline:
    method: str
    backbone: str
    init: str
    evidence: list[Row]
    rationale: str

    def as_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "backbone": self.backbone,
            "init": self.init,
            "evidence": [r.as_json() for r in self.evidence],
            "rationale": self.rationale,
        }


@dataclass
class Advice:
    constraints: Resolved
    options: list[Option]  # every admissible option, best first
    baseline: Baseline
    active: list[Contribution] = field(default_factory=list)  # the active evidence columns (no values)
    top: int = 3

    @property
    def recommendations(self) -> list[Option]:
        return self.options[: self.top]

    @property
    def best(self) -> Option:
        return self.options[0]

    def as_json(self) -> dict[str, Any]:
        constraints = self.constraints.as_json()
        facts = self.constraints.data_facts
        if facts is not None:
            constraints["data_summary"] = facts.summary()
        return {
            "constraints": constraints,
            "recommendations": [o.as_json() for o in self.recommendations],
            "baseline": self.baseline.as_json(),
        }


# --------------------------------------------------------------------------- the scorer


class _Scorer:
    def __init__(self, resolved: Resolved, rules: Rules, ev: Evidence):
        self.r = resolved
        self.rules = rules
        self.ev = ev
        self.facts = resolved.facts()
        s = rules.scorer
        self.proxy_discount = float(s["proxy_discount"])
        self.parents_discount = float(s["parents_discount"])
        self.proxy_penalty = float(s["proxy_penalty"])
        self.levels = s["levels"]
        self.floor = float(s["floor"])

    # ---------------------------------------------------------------- text

    def render(self, text: str) -> str:
        text = self.ev.render(" ".join(text.split()))

        def fact(m: re.Match) -> str:
            v = self.facts.get(m.group(1), m.group(0))
            return "unknown" if v is None else str(v)

        return re.sub(r"\{(\w+)\}", fact, text)

    # ---------------------------------------------------------------- values

    def _bounds(self, table: str, column: str) -> tuple[float, float]:
        values = [r.value for r in self.ev.column(table, column) if r.method != "scratch"]
        if not values:
            raise SSLRecipeError(f"rules.yaml: no evidence column Table {table} / {column!r}")
        return min(values), max(values)

    def _norm(self, table: str, column: str, value: float) -> float:
        lo, hi = self._bounds(table, column)
        return 1.0 if hi == lo else (value - lo) / (hi - lo)

    def _value(self, cand: Candidate, table: str, column: str, method: Optional[str] = None) -> Optional[Value]:
        """The option's value in a column: its own row, else a borrowed one (discounted and explained)."""
        method = method or cand.method
        backbone = cand.backbone
        own = label(method, backbone)
        row = self.ev.get(table, method, backbone, column)
        if row is not None:
            return Value(self._norm(table, column, row.value), 1.0, [row])
        if method == cand.method and cand.parents:
            best: Optional[Value] = None
            for parent in cand.parents:
                v = self._value(cand, table, column, parent)
                if v is not None and (best is None or v.norm * v.discount > best.norm * best.discount):
                    best = v
            if best is None:
                return None
            why = (f"{own} is not measured: in Table {table} {column} the better of its parents "
                   f"({', '.join(METHOD_LABELS[p] for p in cand.parents)}) stands in: {best.rows[0].label}"
                   + (f" ({best.borrowed})" if best.borrowed else ""))
            return Value(best.norm, best.discount * self.parents_discount, best.rows, why)
        family = family_of(backbone)
        for other, (_, fam, _) in BACKBONES.items():
            if other == backbone or fam != family:
                continue
            row = self.ev.get(table, method, other, column)
            if row is not None:
                why = f"Table {table} has no {own} row: {row.label}'s {column} is used at {self.proxy_discount:g} weight"
                return Value(self._norm(table, column, row.value), self.proxy_discount, [row], why)
        rows = [r for r in self.ev.column(table, column) if r.backbone == backbone and r.method != "scratch"]
        if rows:  # unmeasured: counts as the weakest measured method on its backbone, never better
            worst = min(rows, key=lambda r: r.value)
            why = (f"Table {table} has no {own} row: the weakest measured {BACKBONES[backbone][0]} row "
                   f"({worst.label} {fmt(worst.value, worst.metric)}) is used at {self.proxy_discount:g} weight")
            return Value(self._norm(table, column, worst.value), self.proxy_discount, [worst], why)
        return None

    # ---------------------------------------------------------------- options

    def candidate_facts(self, cand: Candidate, init: Optional[str] = None) -> dict[str, Any]:
        return {
            "method": cand.method,
            "backbone": cand.backbone,
            "family": family_of(cand.backbone),
            "size": BACKBONES[cand.backbone][2],
            "public": cand.public,
            "licence": cand.licence,
            "init": init,
        }

    def admissible(self) -> list[Candidate]:
        out = []
        for cand in self.rules.candidates:
            fam, size = family_of(cand.backbone), BACKBONES[cand.backbone][2]
            if self.r.backbone != "any" and fam != self.r.backbone:
                continue
            if self.r.model_size != "any" and size != self.r.model_size:
                continue
            if cand.only_when is not None and not matches(cand.only_when, self.facts):
                continue
            cf = self.candidate_facts(cand)
            if any(matches(x.get("when"), self.facts) and matches(x.get("applies_to"), cf) for x in self.rules.exclusions):
                continue
            out.append(cand)
        if not out:
            raise SSLRecipeError(
                f"no option fits --backbone {self.r.backbone} --model-size {self.r.model_size} "
                f"--custom-pretrain {self.r.custom_pretrain}: relax one of them"
            )
        return out

    def active_columns(self) -> list[Contribution]:
        groups: dict[tuple[str, str], Contribution] = {}
        for c in self.rules.criteria:
            if not matches(c.when, self.facts):
                continue
            key = (c.table, c.column)
            if key not in groups:
                groups[key] = Contribution(c.table, c.column, 0.0, [], None)
            groups[key].weight += c.weight
            groups[key].criteria.append(c)
        return sorted(groups.values(), key=lambda g: -g.weight)

    def init_of(self, cand: Candidate) -> tuple[str, str]:
        cf = self.candidate_facts(cand)
        for row in self.rules.init:
            if matches(row.get("when"), self.facts) and matches(row.get("applies_to"), cf):
                return row["init"], self.render(row["why"])
        raise SSLRecipeError("rules.yaml: the init table has no row for this option (its last row must always hold)")

    def option(self, cand: Candidate, active: list[Contribution]) -> Option:
        init, init_why = self.init_of(cand)
        contributions = [
            Contribution(a.table, a.column, a.weight, a.criteria, self._value(cand, a.table, a.column)) for a in active
        ]
        cf = self.candidate_facts(cand, init)
        adjustments = [
            (a["id"], float(a["delta"]), self.render(a["why"]))
            for a in self.rules.adjustments
            if matches(a.get("when"), self.facts) and matches(a.get("applies_to"), cf)
        ]
        notes, caveats = [], []
        for n in self.rules.notes:
            if matches(n.get("when"), self.facts) and matches(n.get("applies_to"), cf):
                (notes if n["kind"] == "note" else caveats).append(self.render(n["text"]))
        if cand.unavailable and init != "public":
            caveats.insert(0, self.render(cand.unavailable))

        # confidence: borrowed evidence, unmeasured options, and the regime
        total = sum(c.weight for c in contributions) or 1.0
        borrowed = sum(c.weight for c in contributions if c.value is None or c.value.borrowed)
        if cand.parents:
            extrapolated = [f"{label(cand.method, cand.backbone)} has no rows: in every column the better of its parents "
                            f"({', '.join(METHOD_LABELS[p] for p in cand.parents)}) stands in"]
        else:
            extrapolated = [c.value.borrowed for c in contributions if c.value is not None and c.value.borrowed]
        extrapolated += [f"Table {c.table} {c.column}: no row for {label(cand.method, cand.backbone)} or a stand-in"
                         for c in contributions if c.value is None]
        conf = 1.0 - self.proxy_penalty * borrowed / total - cand.confidence_penalty
        if cand.confidence_penalty:
            extrapolated.insert(0, f"{label(cand.method, cand.backbone)}: not measured by the survey (conclusion 8 suggests it)")
        regime = []
        for c in self.rules.confidence:
            if matches(c.get("when"), self.facts):
                conf -= float(c["penalty"])
                regime.append(self.render(c["text"]))
        extrapolated = regime + extrapolated
        conf = max(self.floor, conf)
        level = "high" if conf >= self.levels["high"] else "medium" if conf >= self.levels["medium"] else "low"
        opt = Option(cand, init, init_why, contributions, adjustments, notes, caveats, conf, level, extrapolated)
        opt.resolution = self.resolution(opt)
        return opt

    # ---------------------------------------------------------------- texts

    def comparison(self, contribution: Contribution, admissible: list[Candidate], exclude: list[Row] = ()) -> str:
        """"ReSim R50 50.4, DINO R50 38.2, ..." in one column, over the admissible options and scratch."""
        pairs = {(c.method, c.backbone) for c in admissible} | {(p, c.backbone) for c in admissible for p in c.parents}
        backbones = {c.backbone for c in admissible}
        rows = [
            r for r in self.ev.column(contribution.table, contribution.column)
            if r not in exclude and ((r.method, r.backbone) in pairs or (r.method == "scratch" and r.backbone in backbones))
        ]
        rows.sort(key=lambda r: -r.value)
        return ", ".join(f"{r.label} {fmt(r.value, r.metric)}" for r in rows[:7])

    def rationale(self, opt: Option, admissible: list[Candidate]) -> str:
        parts = [f"{opt.label} with {INIT_PHRASES[opt.init]}."]
        for i, c in enumerate(opt.contributions):
            v = c.value
            if i == 0:
                others = self.comparison(c, admissible, exclude=v.rows if v and not v.borrowed else [])
                if v is not None and v.borrowed is None:
                    parts.append(f"{v.rows[0].cite()}" + (f" (others: {others})." if others else "."))
                else:
                    parts.append((f"{v.borrowed}." if v else f"Table {c.table} has no row for it.")
                                 + (f" Measured: {others}." if others else ""))
                parts.append(f"Why this column counts most (x{c.weight:g}): {c.criteria[0].why}.")
            else:
                if v is None:
                    shown = "no row"
                elif v.borrowed:
                    shown = f"{v.rows[0].label} {fmt(v.rows[0].value, v.rows[0].metric)}, borrowed" if len(v.rows) == 1 \
                        else "mean of the measured rows, borrowed"
                else:
                    shown = fmt(v.rows[0].value, v.rows[0].metric)
                parts.append(f"Also weighed: Table {c.table} {c.column} x{c.weight:g} ({shown}).")
        parts.extend(opt.notes)
        parts.append(f"Initialisation: {opt.init_why}.")
        return " ".join(parts)

    def resolution(self, opt: Option) -> Optional[Resolution]:
        res = self.rules.resolution
        if not res or not matches(res.get("when"), self.facts):
            return None
        facts = self.r.data_facts
        crop = int(res["pretrain_crop"])
        target = float(res["min_object_px"][opt.family])
        limit = int(res["detector_max_side"])
        tile_size, overlap = int(res["tile_size"]), float(res["tile_overlap"])
        sentences = []
        if opt.init == "public":
            sentences.append(
                f"the public weights were pre-trained on {crop}-px ImageNet crops; what you control is the fine-tuning "
                "resolution"
            )
        else:
            sentences.append(
                f"pre-train on {crop}-px crops taken from your images at native resolution (pretrain.img_size {crop}); "
                "never shrink whole images to the crop size, or small objects vanish"
            )
        upscale = tile = img_size = max_dets = None
        small_side = facts.median_small_side if facts else None
        max_side = facts.max_side if facts else None
        if small_side:
            upscale = 1
            if small_side < target:
                upscale = int(min(float(res["max_upscale"]), 2 ** math.ceil(math.log2(target / small_side))))
            if max_side:
                tile = max_side * upscale > limit
                side = tile_size * upscale if tile else max_side * upscale
                img_size = int(math.ceil(side / 32) * 32)
        if img_size is not None:
            how = (f"fine-tune {tile_size}-px tiles at finetune.img_size {img_size}" if tile
                   else f"fine-tune at finetune.img_size {img_size}")
            if upscale and upscale > 1:
                how += (f" ({upscale}x upscaled: the median small object is {small_side:.0f} px, under the "
                        f"{target:g} px a {'ViT patch' if opt.family == 'vit' else 'ResNet FPN level'} needs)")
            else:
                how += " (native resolution, no downscaling)"
            sentences.append(how)
            if tile:
                sentences.append(
                    f"tile the {max_side}-px images into {tile_size}-px tiles with {overlap:.0%} overlap (for training "
                    "and inference, merging tile detections by NMS), since the detector would otherwise shrink them "
                    f"to {limit} px"
                )
            else:
                sentences.append("no tiling needed at this size")
        else:
            sentences.append(
                "fine-tune at the images' native resolution (finetune.img_size = their longest side, never smaller), "
                f"upscaled 2x if the objects are under {target:g} px; tile images whose side exceeds {limit} px into "
                f"{tile_size}-px tiles with {overlap:.0%} overlap instead of shrinking them"
            )
        dense = int(res["dense_scene_boxes"])
        if facts and facts.max_boxes_per_image > dense:
            max_dets = int(math.ceil(facts.max_boxes_per_image * 1.5 / 100) * 100)
            sentences.append(
                f"scenes hold up to {facts.max_boxes_per_image} boxes: raise evaluate.max_dets and "
                f"finetune.max_detections to {max_dets}"
            )
        text = "Small objects: " + "; ".join(sentences) + "."
        return Resolution(crop, img_size, upscale, tile, tile_size, overlap, max_dets, text)

    def baseline(self, best: Option, active: list[Contribution]) -> Baseline:
        rows: list[Row] = []
        for c in active:
            r = self.ev.get(c.table, "scratch", best.backbone, c.column)
            if r is not None and r not in rows:
                rows.append(r)
        if not rows:  # the survey's scratch rows for this backbone on VEDAI RGB
            rows = [r for r in self.ev.find(method="scratch", backbone=best.backbone, table="IV", column="RGB AP")]
        parts = [
            f"Fine-tune the same detector on {best.backbone} from random initialisation (weights.source: scratch) "
            "on your own data: the advised option has to beat it there."
        ]
        for r in rows[:2]:
            mine = self.ev.get(r.table, best.method, best.backbone, r.column)
            if mine is not None:
                parts.append(f"In the survey: {r.cite()} vs {mine.label} {fmt(mine.value, mine.metric)}.")
            else:
                parts.append(f"In the survey: {r.cite()}.")
        if not rows:
            parts.append(f"The survey has no scratch row for {BACKBONES[best.backbone][0]}.")
        parts.append(
            "Also worth an arm: ImageNet-supervised weights for the same backbone (not measured by the survey; "
            "practitioners often find them hard to beat)."
        )
        return Baseline("none", best.backbone, "scratch", rows, " ".join(parts))


def advise(constraints: Optional[Constraints] = None, *, top: Optional[int] = None, **kwargs: Any) -> Advice:
    """Rank the options the survey's evidence supports for these constraints.

    Pass a `Constraints` or its fields as keyword arguments (`advise(backbone="resnet", shots=25)`).
    Raises `SSLRecipeError` for meaningless or contradictory constraints.
    """
    if constraints is None:
        try:
            constraints = Constraints(**kwargs)
        except TypeError as e:
            raise SSLRecipeError(f"advise: {e}") from None
    elif kwargs:
        raise SSLRecipeError("advise: pass either a Constraints or keyword constraints, not both")
    resolved = resolve(constraints)
    rules, ev = load_rules(), load_evidence()
    scorer = _Scorer(resolved, rules, ev)
    admissible = scorer.admissible()
    active = scorer.active_columns()
    order = {id(c): i for i, c in enumerate(rules.candidates)}
    options = [scorer.option(c, active) for c in admissible]
    options.sort(key=lambda o: (-round(o.score, 9), order[id(o.candidate)]))
    for o in options:
        o.rationale = scorer.rationale(o, admissible)
    n = int(top if top is not None else rules.scorer.get("top", 3))
    if n < 1:
        raise SSLRecipeError(f"--top {n}: show at least 1 option")
    return Advice(resolved, options, scorer.baseline(options[0], active), active, n)
