"""The advisor: constraints -> ranked options, each with the survey's numbers behind it.

All the judgement lives in `rules.yaml` (the decision table) and `evidence.yaml` (the survey's numbers).
This module is the small scorer that applies them:

    score(option) = sum over active criteria of  weight x normalized value x discount  + adjustments

where a criterion is active when its `when` holds (and its `unless` does not) for the resolved constraints, the
value is the option's row in the criterion's evidence column (min-max normalized over the column's pre-trained
rows, or within the option's family for `scope: family`), and the discount is 1 for the option's own row and
`proxy_discount` for a borrowed one (see `_value`).

The ranking explains itself: the heaviest active column is the deciding one (`Advice.decided_by`, each option's
number in it is `Option.decided`), `Advice.headline` says in one sentence why the best option leads, and
`Option.departures` why an option ranks above a more confident one, one with a higher number in the deciding
column, or (the best) one that a caveat of its own favours.
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
    caveat_titles: list[str] = field(default_factory=list)  # the caveats' short forms, in the same order
    favoured: list[tuple[str, Any]] = field(default_factory=list)  # (caveat title, the options it favours)
    licence: Optional[str] = None  # of the weights the option starts from; None: pre-trained on your images
    departures: list[str] = field(default_factory=list)  # why it ranks above a more confident/higher option

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
    def weights(self) -> Optional[str]:
        """The catalogue id the option starts from (None: pre-trained from scratch on your images)."""
        if self.init == "public":
            return self.candidate.weights
        if self.init == "public+custom-pretrain":
            return self.candidate.continue_from or self.candidate.weights
        return None

    @property
    def weights_label(self) -> str:
        if self.init == "public":
            return str(self.candidate.weights)
        if self.init == "public+custom-pretrain":
            return f"{self.weights} + your images"
        return "pre-train on your images"

    @property
    def decided(self) -> Optional[Contribution]:
        """The option's value in the deciding column (the heaviest active one)."""
        return self.contributions[0] if self.contributions else None

    @property
    def all_caveats(self) -> list[tuple[str, str]]:
        """(short title, full text) of every caveat, the small-object resolution advice last."""
        out = list(zip(self.caveat_titles, self.caveats))
        if self.resolution is not None:
            out.append(("small objects: native resolution, upscale or tile (see the recipe)", self.resolution.text))
        return out

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
        caveats = self.all_caveats
        return {
            "label": self.label,
            "method": self.method,
            "backbone": self.backbone,
            "init": self.init,
            "weights": self.weights,
            "licence": self.licence,
            "score": round(self.score, 3),
            "decided_by": decided_json(self.decided),
            "evidence": [r.as_json() for r in self.evidence],
            "rationale": self.rationale,
            "departures": list(self.departures),
            "caveats": [text for _, text in caveats],
            "caveat_titles": [title for title, _ in caveats],
            "confidence": {"score": round(self.confidence, 2), "level": self.level, "extrapolated": list(self.extrapolated)},
        }


def decided_json(c: Optional[Contribution]) -> Optional[dict[str, Any]]:
    """An option's number in the deciding column: the row's value, whose row it is, and why it is borrowed."""
    if c is None:
        return None
    out: dict[str, Any] = {"table": f"Table {c.table}", "metric": c.column, "weight": c.weight, "value": None,
                           "row": None, "borrowed": None}
    if c.value is not None:
        row = c.value.rows[0]
        out.update(value=row.value, row=row.label, borrowed=c.value.borrowed)
    return out


@dataclass
class Baseline:
    method: str
    backbone: str
    init: str
    evidence: list[Row]
    rationale: str
    decided: Optional[Row] = None  # the scratch row in the deciding column, where the survey has one

    @property
    def label(self) -> str:
        return f"Scratch {BACKBONES.get(self.backbone, (self.backbone,))[0]}"

    def as_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "method": self.method,
            "backbone": self.backbone,
            "init": self.init,
            "decided_by": None if self.decided is None else self.decided.as_json(),
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
    headline: str = ""  # one sentence: why the best option ranks first

    @property
    def decided_by(self) -> Optional[Contribution]:
        """The deciding column: the heaviest active one (its values are in each option's `decided`)."""
        return self.active[0] if self.active else None

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
        d = self.decided_by
        return {
            "constraints": constraints,
            "decided_by": None if d is None else {"table": f"Table {d.table}", "metric": d.column, "weight": d.weight,
                                                  "criteria": [c.id for c in d.criteria]},
            "evidence_weighed": [{"table": f"Table {c.table}", "metric": c.column, "weight": c.weight,
                                  "criteria": [x.id for x in c.criteria]} for c in self.active],
            "headline": self.headline,
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

    def _bounds(self, table: str, column: str, family: Optional[str] = None) -> tuple[float, float]:
        values = [r.value for r in self.ev.column(table, column)
                  if r.method != "scratch" and (family is None or r.family == family)]
        if not values:
            raise SSLRecipeError(f"rules.yaml: no evidence column Table {table} / {column!r}")
        return min(values), max(values)

    def _norm(self, table: str, column: str, row: Row, scoped: bool) -> float:
        """0..1 over the column's pre-trained rows; `scoped`: over the rows of the row's own backbone family."""
        lo, hi = self._bounds(table, column, row.family if scoped else None)
        return 1.0 if hi == lo else (row.value - lo) / (hi - lo)

    def _value(self, cand: Candidate, table: str, column: str, method: Optional[str] = None,
               scoped: bool = False) -> Optional[Value]:
        """The option's value in a column: its own row, else a borrowed one (discounted and explained)."""
        method = method or cand.method
        backbone = cand.backbone
        own = label(method, backbone)
        row = self.ev.get(table, method, backbone, column)
        if row is not None:
            return Value(self._norm(table, column, row, scoped), 1.0, [row])
        if method == cand.method and cand.parents:
            best: Optional[Value] = None
            for parent in cand.parents:
                v = self._value(cand, table, column, parent, scoped)
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
                return Value(self._norm(table, column, row, scoped), self.proxy_discount, [row], why)
        rows = [r for r in self.ev.column(table, column) if r.backbone == backbone and r.method != "scratch"]
        if rows:  # unmeasured: counts as the weakest measured method on its backbone, never better
            worst = min(rows, key=lambda r: r.value)
            why = (f"Table {table} has no {own} row: the weakest measured {BACKBONES[backbone][0]} row "
                   f"({worst.label} {fmt(worst.value, worst.metric)}) is used at {self.proxy_discount:g} weight")
            return Value(self._norm(table, column, worst, scoped), self.proxy_discount, [worst], why)
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
        last: dict[tuple[str, str], int] = {}
        for i, c in enumerate(self.rules.criteria):
            if not c.holds(self.facts):
                continue
            key = (c.table, c.column)
            if key not in groups:
                groups[key] = Contribution(c.table, c.column, 0.0, [], None)
            groups[key].weight += c.weight
            groups[key].criteria.append(c)
            last[key] = i
        # the heaviest column first; of equal weights, the one with the later (more specific) criteria
        return sorted(groups.values(), key=lambda g: (-g.weight, -last[(g.table, g.column)]))

    def init_of(self, cand: Candidate) -> tuple[str, str]:
        cf = self.candidate_facts(cand)
        for row in self.rules.init:
            if matches(row.get("when"), self.facts) and matches(row.get("applies_to"), cf):
                return row["init"], self.render(row["why"])
        raise SSLRecipeError("rules.yaml: the init table has no row for this option (its last row must always hold)")

    def option(self, cand: Candidate, active: list[Contribution]) -> Option:
        init, init_why = self.init_of(cand)
        contributions = [
            Contribution(a.table, a.column, a.weight, a.criteria,
                         self._value(cand, a.table, a.column, scoped=any(c.scope == "family" for c in a.criteria)))
            for a in active
        ]
        cf = self.candidate_facts(cand, init)
        adjustments = [
            (a["id"], float(a["delta"]), self.render(a["why"]))
            for a in self.rules.adjustments
            if matches(a.get("when"), self.facts) and matches(a.get("applies_to"), cf)
        ]
        notes, caveats, titles, favoured = [], [], [], []
        for n in self.rules.notes:
            if matches(n.get("when"), self.facts) and matches(n.get("applies_to"), cf):
                if n["kind"] == "note":
                    notes.append(self.render(n["text"]))
                    continue
                caveats.append(self.render(n["text"]))
                titles.append(self.render(n.get("title") or n["text"]))
                if n.get("favours"):
                    favoured.append((titles[-1], n["favours"]))
        if cand.unavailable and init != "public":
            caveats.insert(0, self.render(cand.unavailable))
            titles.insert(0, self.render(cand.unavailable_title or cand.unavailable))

        # confidence: borrowed evidence, unmeasured options, and the regime
        total = sum(c.weight for c in contributions) or 1.0
        borrowed = sum(c.weight for c in contributions if c.value is None or c.value.borrowed)
        if cand.parents:
            extrapolated = [(f"{label(cand.method, cand.backbone)} has no rows: in every column the better of its "
                             f"parents ({', '.join(METHOD_LABELS[p] for p in cand.parents)}) stands in")]
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
        opt = Option(cand, init, init_why, contributions, adjustments, notes, caveats, conf, level, extrapolated,
                     caveat_titles=titles, favoured=favoured)
        opt.licence = self.licence(opt)
        opt.resolution = self.resolution(opt)
        return opt

    @staticmethod
    def licence(opt: Option) -> Optional[str]:
        """The licence of the weights the option starts from, as the catalogue states it."""
        if opt.weights is None:
            return None
        from sslrecipe.weights.catalogue import find_entry

        entry = find_entry(opt.weights)
        return entry.licence if entry is not None else opt.candidate.licence

    # ---------------------------------------------------------------- texts

    @staticmethod
    def shown(v: Optional[Value]) -> str:
        """An option's number in a column as printed: "50.4", "34.4 (SparK R50)" for a borrowed row, "no row"."""
        if v is None:
            return "no row"
        row = v.rows[0]
        if not v.borrowed:
            return fmt(row.value, row.metric)
        return f"{fmt(row.value, row.metric)} (borrowed from {row.label}" + (f" at x{v.discount:g})" if v.discount != 1 else ")")

    def rationale(self, opt: Option) -> str:
        """The reasoning in prose; the numbers behind the option are in its evidence, not repeated here."""
        parts = [f"{opt.label} with {INIT_PHRASES[opt.init]}."]
        c = opt.decided
        if c is not None:
            parts.append(f"Deciding column, Table {c.table} {c.column} (x{c.weight:g}): {c.criteria[0].why}.")
        parts.extend(opt.notes)
        parts.append(f"Initialisation: {opt.init_why}.")
        return " ".join(parts)

    def reasons(self, i: Option, j: Option, limit: int = 2) -> str:
        """Where option i gains its lead over option j: the columns and adjustments worth the most points."""
        gains: list[tuple[float, str]] = []
        for ci, cj in zip(i.contributions, j.contributions):
            d = ci.points - cj.points
            if d > 1e-9:
                gains.append((d, f"Table {ci.table} {ci.column} {self.shown(ci.value)} vs {self.shown(cj.value)}"))
        mine = {a for a, _, _ in i.adjustments}
        for aid, delta, why in j.adjustments:
            if delta < 0 and aid not in mine:
                gains.append((-delta, f"{j.label} has {why}"))
        gains.sort(key=lambda g: -g[0])
        if not gains:
            return "their scores tie and the order of the options table decides"
        return "; ".join(text for _, text in gains[:limit])

    def headline(self, best: Option, options: list[Option]) -> str:
        """One sentence: why the best option ranks first."""
        if best.candidate.headline:
            return _sentence(self.render(best.candidate.headline.replace("{label}", best.label)))
        c = best.decided
        if c is None:
            return f"{best.label} ranks first."
        col = f"Table {c.table} {c.column}"
        crit = c.criteria[0]
        why = crit.decides or crit.why
        rivals = [o for o in options if o is not best and o.decided.value is not None and o.decided.value.borrowed is None]
        rival = max(rivals, key=lambda o: o.decided.value.rows[0].value, default=None)
        mine = c.value
        top = rival is None or (mine is not None and mine.rows[0].value >= rival.decided.value.rows[0].value)
        if mine is not None and top and mine.borrowed is None:
            return f"{best.label} has the highest {col} of the options; {why}."
        if mine is not None and top:
            return f"{best.label} has no {col} row of its own and ranks first on {mine.rows[0].label}'s; {why}."
        assert rival is not None
        return (f"{best.label} ranks first although {rival.label} has the higher {col}: "
                f"{self.reasons(best, rival)}.")

    def departures(self, options: list[Option], shown: int) -> None:
        """Say why an option ranks above a shown one with a higher confidence level or a higher own number in the
        deciding column. For the top pick (whose headline already answers the deciding column), also above the
        first more confident option anywhere in the list, and above an option one of its own caveats favours."""
        levels = {"low": 0, "medium": 1, "high": 2}

        def number(o: Option, own: bool = False) -> float:
            v = o.decided.value if o.decided else None
            return -math.inf if v is None or (own and v.borrowed) else v.rows[0].value

        for k, i in enumerate(options[:shown]):
            pool = options[k + 1:] if k == 0 else options[k + 1: shown]
            found: dict[int, tuple[Option, list[str], list[str]]] = {}  # option below -> (it, its attributes, caveats)

            j = next((o for o in pool if levels[o.level] > levels[i.level]), None)
            if j is not None:
                found.setdefault(id(j), (j, [], []))[1].append(f"{j.level} confidence")
            if k > 0:
                j = next((o for o in pool if number(o, own=True) > number(i)), None)
                if j is not None and i.decided is not None:
                    found.setdefault(id(j), (j, [], []))[1].append(f"the higher {i.decided.column}")
            else:
                for caveat, favours in i.favoured:
                    j = next((o for o in pool if matches(favours, self.candidate_facts(o.candidate, o.init))), None)
                    if j is not None:
                        found.setdefault(id(j), (j, [], []))[2].append(caveat)
            for j, attrs, caveats in found.values():
                title = caveats[0] if caveats else None
                parts = [f"{j.label} has " + " and ".join(attrs)] if attrs else []
                if title:
                    parts.append(f"its own caveat ({title}) favours " + ("it" if attrs else j.label))
                i.departures.append(f"{i.label} ranks above {j.label} although {' and '.join(parts)}: "
                                    f"{self.reasons(i, j)}.")

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
            (f"Fine-tune the same detector on {best.backbone} from random initialisation (weights.source: scratch) "
             "on your own data: the advised option has to beat it there.")
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
        decided = self.ev.get(active[0].table, "scratch", best.backbone, active[0].column) if active else None
        return Baseline("none", best.backbone, "scratch", rows, " ".join(parts), decided)


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
        o.rationale = scorer.rationale(o)
    n = int(top if top is not None else rules.scorer.get("top", 3))
    if n < 1:
        raise SSLRecipeError(f"--top {n}: show at least 1 option")
    scorer.departures(options, n)
    return Advice(resolved, options, scorer.baseline(options[0], active), active, n,
                  headline=scorer.headline(options[0], options))


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return (text[:1].upper() + text[1:]).rstrip(".") + "."

