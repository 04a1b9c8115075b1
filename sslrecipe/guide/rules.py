"""Load `rules.yaml` (the decision table) and test its conditions.

A condition (`when` or `applies_to`) is a mapping of names to tests, all of which must hold, or a list of
such mappings, any of which may hold. A test is a value (equality), a list (membership), `{min, max}`
(a number range; a missing number never matches) or `{not: [values]}`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, Optional

import yaml

from sslrecipe.errors import SSLRecipeError

Condition = Any  # dict | list[dict] | None


def _test(expected: Any, actual: Any) -> bool:
    if isinstance(expected, dict):
        if "not" in expected:
            bad = expected["not"] if isinstance(expected["not"], list) else [expected["not"]]
            return actual not in bad
        if actual is None or isinstance(actual, bool) or not isinstance(actual, (int, float)):
            return False
        lo, hi = expected.get("min"), expected.get("max")
        return (lo is None or actual >= lo) and (hi is None or actual <= hi)
    if isinstance(expected, list):
        return actual in expected
    return actual == expected


def matches(condition: Condition, facts: dict[str, Any]) -> bool:
    """Does `condition` hold for `facts`? An empty or missing condition always holds."""
    if not condition:
        return True
    if isinstance(condition, list):
        return any(matches(c, facts) for c in condition)
    for key, expected in condition.items():
        if key not in facts:
            raise SSLRecipeError(f"rules.yaml: condition on unknown fact {key!r} (known: {', '.join(sorted(facts))})")
        if not _test(expected, facts[key]):
            return False
    return True


def describe(condition: Condition) -> str:
    """A condition as a short readable text (docs and the decision-table printout)."""
    if not condition:
        return "always"
    if isinstance(condition, list):
        return " OR ".join(f"({describe(c)})" for c in condition)
    parts = []
    for key, expected in condition.items():
        if isinstance(expected, dict) and "not" in expected:
            bad = expected["not"] if isinstance(expected["not"], list) else [expected["not"]]
            parts.append(f"{key} not in {{{', '.join(map(str, bad))}}}")
        elif isinstance(expected, dict):
            lo, hi = expected.get("min"), expected.get("max")
            if lo is not None and hi is not None:
                parts.append(f"{lo} <= {key} <= {hi}")
            elif lo is not None:
                parts.append(f"{key} >= {lo}")
            else:
                parts.append(f"{key} <= {hi}")
        elif isinstance(expected, list):
            parts.append(f"{key} in {{{', '.join(map(str, expected))}}}")
        else:
            shown = "unknown" if expected is None else str(expected).lower() if isinstance(expected, bool) else expected
            parts.append(f"{key} = {shown}")
    return ", ".join(parts)


@dataclass(frozen=True)
class Candidate:
    method: str
    backbone: str
    weights: Optional[str]
    continue_from: Optional[str] = None
    licence: Optional[str] = None
    unavailable: Optional[str] = None
    unavailable_title: Optional[str] = None
    parents: tuple[str, ...] = ()
    only_when: Condition = None
    confidence_penalty: float = 0.0
    headline: Optional[str] = None

    @property
    def public(self) -> bool:
        return self.weights is not None


@dataclass(frozen=True)
class Criterion:
    id: str
    conclusions: tuple[int, ...]
    when: Condition
    table: str
    column: str
    weight: float
    why: str
    decides: str = ""
    unless: Condition = None
    scope: str = "all"  # all: normalized over every pre-trained row; family: within the option's backbone family

    def holds(self, facts: dict[str, Any]) -> bool:
        return matches(self.when, facts) and not (self.unless and matches(self.unless, facts))


@dataclass
class Rules:
    scorer: dict[str, Any]
    candidates: list[Candidate]
    criteria: list[Criterion]
    adjustments: list[dict]
    exclusions: list[dict]
    init: list[dict]
    notes: list[dict]
    confidence: list[dict]
    resolution: dict[str, Any]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)


def _criterion(raw: dict) -> Criterion:
    table, _, column = raw["column"].partition("/")
    return Criterion(
        id=raw["id"],
        conclusions=tuple(raw.get("conclusions") or ()),
        when=raw.get("when"),
        table=table,
        column=column,
        weight=float(raw["weight"]),
        why=" ".join(str(raw["why"]).split()),
        decides=" ".join(str(raw.get("decides") or "").split()),
        unless=raw.get("unless"),
        scope=str(raw.get("scope") or "all"),
    )


def parse_rules(data: dict) -> Rules:
    try:
        candidates = []
        for c in data["candidates"]:
            c = dict(c)
            c["parents"] = tuple(c.get("parents") or ())
            candidates.append(Candidate(**c))
        return Rules(
            scorer=data["scorer"],
            candidates=candidates,
            criteria=[_criterion(c) for c in data["criteria"]],
            adjustments=list(data.get("adjustments") or []),
            exclusions=list(data.get("exclusions") or []),
            init=list(data["init"]),
            notes=list(data.get("notes") or []),
            confidence=list(data.get("confidence") or []),
            resolution=dict(data.get("resolution") or {}),
            raw=data,
        )
    except (KeyError, TypeError) as e:
        raise SSLRecipeError(f"rules.yaml is malformed: {e}") from None


@lru_cache(maxsize=1)
def load_rules() -> Rules:
    """The packaged decision table (cached)."""
    text = resources.files("sslrecipe.guide").joinpath("rules.yaml").read_text(encoding="utf-8")
    return parse_rules(yaml.safe_load(text))


# --------------------------------------------------------------------------- the table as markdown


def _md(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def decision_table_markdown(rules: Optional[Rules] = None) -> str:
    """The decision table as markdown (embedded in docs/advisor.md; a test keeps the two identical)."""
    from sslrecipe.guide.evidence import BACKBONES, load_evidence

    rules = rules or load_rules()
    ev = load_evidence()

    def conc(items: Any) -> str:
        return ", ".join(str(c) for c in items) if items else "-"

    def text(t: str) -> str:
        return _md(ev.render(" ".join(t.split())))

    out = ["### Evidence criteria (what ranks the options)", "",
           "| id | conclusion | when | evidence column | weight | why |", "|---|---|---|---|---|---|"]
    for c in rules.criteria:
        when = describe(c.when) + (f"; unless {describe(c.unless)}" if c.unless else "")
        scope = " (ranked within each backbone family)" if c.scope == "family" else ""
        out.append(f"| {c.id} | {conc(c.conclusions)} | {_md(when)} | Table {c.table} {_md(c.column)}{scope} "
                   f"| {c.weight:g} | {_md(c.why)} |")
    out += ["", "### Options", "",
            "| method | backbone | survey label | public weights | continue pre-training from | only when |",
            "|---|---|---|---|---|---|"]
    for c in rules.candidates:
        out.append(f"| {c.method} | {c.backbone} | {BACKBONES[c.backbone][0]} | {c.weights or 'none'} | "
                   f"{c.continue_from or '-'} | {_md(describe(c.only_when)) if c.only_when else '-'} |")
    out += ["", "### Adjustments and exclusions", "", "| id | when | applies to | effect | why |", "|---|---|---|---|---|"]
    for a in rules.adjustments:
        out.append(f"| {a['id']} | {_md(describe(a.get('when')))} | {_md(describe(a.get('applies_to')))} | "
                   f"score {a['delta']:+g} | {_md(a['why'])} |")
    for x in rules.exclusions:
        out.append(f"| {x['id']} | {_md(describe(x.get('when')))} | {_md(describe(x.get('applies_to')))} | "
                   f"removed | {_md(x['why'])} |")
    out += ["", "### Initialisation (first row that holds)", "",
            "| id | conclusion | when | applies to | init | why |", "|---|---|---|---|---|---|"]
    for i in rules.init:
        out.append(f"| {i['id']} | {conc(i.get('conclusions'))} | {_md(describe(i.get('when')))} | "
                   f"{_md(describe(i.get('applies_to')))} | {i['init']} | {_md(i['why'])} |")
    out += ["", "### Notes and caveats attached to options", "",
            "| id | conclusion | kind | when | applies to | text |", "|---|---|---|---|---|---|"]
    for n in rules.notes:
        out.append(f"| {n['id']} | {conc(n.get('conclusions'))} | {n['kind']} | {_md(describe(n.get('when')))} | "
                   f"{_md(describe(n.get('applies_to')))} | {text(n['text'])} |")
    out += ["", "### Confidence (starts at 1)", "", "| id | when | penalty | says |", "|---|---|---|---|"]
    s = rules.scorer
    for c in rules.confidence:
        out.append(f"| {c['id']} | {_md(describe(c.get('when')))} | -{c['penalty']:g} | {_md(c['text'])} |")
    out.append(f"| P | the option rests on borrowed rows | -{s['proxy_penalty']:g} x borrowed share of the weight "
               "| which row stands in for which |")
    for c in rules.candidates:
        if c.confidence_penalty:
            out.append(f"| H | option {c.method} {c.backbone} | -{c.confidence_penalty:g} | not measured by the survey |")
    out.append(f"\nLevels: high >= {s['levels']['high']:g}, medium >= {s['levels']['medium']:g}, else low; "
               f"floor {s['floor']:g}. Borrowed rows count x{s['proxy_discount']:g} in the score "
               f"(hybrid's parents x{s['parents_discount']:g}).")
    return "\n".join(out) + "\n"
