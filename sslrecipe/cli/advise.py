"""`sslrecipe advise`: the SSL pre-training strategy the survey's evidence supports for your constraints."""

from __future__ import annotations

import json

import click

from sslrecipe.guide.constraints import (
    BACKBONES, CUSTOM, DOMAINS, LOCALIZATIONS, MODEL_SIZES, OBJECT_SIZES, SHIFTS, Constraints,
)


def _choices(values: tuple[str, ...]) -> str:
    return "{" + ",".join(values) + "}"


@click.command()
@click.option("--backbone", metavar=_choices(BACKBONES), help="Backbone family (default any).")
@click.option("--model-size", metavar=_choices(MODEL_SIZES),
              help="small: ~21-23M params (R50, ViT-S/16); large: >65M (R200, ViT-B/16). Default any.")
@click.option("--shots", type=int, help="Labeled training images (omit: plenty).")
@click.option("--object-size", metavar=_choices(OBJECT_SIZES), help="Typical object size (COCO buckets; default mixed).")
@click.option("--localization", metavar=_choices(LOCALIZATIONS),
              help="strict: AP@[.5:.95]; tolerant: counting-style low-IoU matching (default strict).")
@click.option("--domain", metavar=_choices(DOMAINS), help="Image domain (default rgb).")
@click.option("--domain-shift", metavar=_choices(SHIFTS), help="Shift from ImageNet (default: derived from --domain).")
@click.option("--unlabeled", type=int, help="Your own unlabeled images available for pre-training.")
@click.option("--custom-pretrain", metavar=_choices(CUSTOM),
              help="required: public weights cannot be used (changed architecture or channels); no: never "
              "pre-train; auto (default): when the evidence says so.")
@click.option("--data", "data_path", metavar="ANNOTATIONS",
              help="A labeled dataset (COCO JSON, or any format `sslrecipe data stats` reads): object size, "
              "shots and channels are inferred from it (flags given explicitly win).")
@click.option("--top", type=int, help="How many options to show (default 3).")
@click.option("--json", "as_json", is_flag=True, help="Print the advice as JSON.")
@click.option("--write-recipe", "recipe_path", metavar="PATH", help="Write a runnable recipe for the top option.")
def advise(backbone, model_size, shots, object_size, localization, domain, domain_shift, unlabeled,
           custom_pretrain, data_path, top, as_json, recipe_path) -> None:
    """Recommend an SSL pre-training strategy from the survey's evidence.

    \b
    Ranks (method, backbone, initialisation) options by the survey's measured results (Tables III, IV,
    VI, VII) under your constraints, with the numbers behind each, the caveats that apply, a confidence
    that drops outside the measured regime, and the baseline to beat. The decision table is
    docs/advisor.md.

    \b
    Examples:
      sslrecipe advise --backbone resnet --shots 25
      sslrecipe advise --domain ir --object-size small --json
      sslrecipe advise --data train.json --write-recipe advised.yaml
    """
    from sslrecipe.guide.advisor import advise as run_advisor

    constraints = Constraints(
        backbone=backbone, model_size=model_size, shots=shots, object_size=object_size,
        localization=localization, domain=domain, domain_shift=domain_shift, unlabeled=unlabeled,
        custom_pretrain=custom_pretrain, data=data_path,
    )
    advice = run_advisor(constraints, top=top)
    written = None
    if recipe_path:
        from sslrecipe.guide.write import write_recipe

        written = write_recipe(advice, recipe_path)
    if as_json:
        click.echo(json.dumps(advice.as_json(), indent=2))
        if written:
            click.echo(f"wrote {written}", err=True)
        return
    _print(advice, written)


def _print(advice, written) -> None:
    from rich.console import Console
    from rich.padding import Padding
    from rich.text import Text

    from sslrecipe.guide.advisor import INIT_PHRASES

    console = Console(highlight=False)

    def line(label: str, text: str, indent: int = 3, style: str = "bold") -> None:
        console.print(Padding(Text.assemble((f"{label}: ", style), text), (0, 0, 0, indent)))

    r = advice.constraints
    said = ", ".join(
        f"{k.replace('_', ' ')} {v if v is not None else 'plenty' if k == 'shots' else 'unknown'}"
        + ("" if r.origin.get(k) == "given" else f" ({r.origin.get(k, 'derived')})")
        for k, v in (
            ("backbone", r.backbone), ("model_size", r.model_size), ("shots", r.shots),
            ("object_size", r.object_size), ("localization", r.localization), ("domain", r.domain),
            ("domain_shift", r.domain_shift), ("unlabeled", r.unlabeled), ("custom_pretrain", r.custom_pretrain),
            ("channels", r.channels),
        )
        if not (k in ("unlabeled", "channels") and v is None)
    )
    line("Constraints", said, 0)
    if r.data_facts is not None:
        line("Data", r.data_facts.summary(), 0)
    line("Evidence weighed", ", ".join(f"Table {c.table} {c.column} x{c.weight:g}" for c in advice.active), 0)
    console.print()
    colours = {"high": "green", "medium": "yellow", "low": "red"}
    for i, o in enumerate(advice.recommendations, 1):
        init = INIT_PHRASES[o.init]
        if o.init == "public":
            init += f" ({o.candidate.weights})"
        elif o.init == "public+custom-pretrain":
            init += f" (from {o.candidate.continue_from})"
        console.print(Text.assemble(
            (f"{i}. {o.label}", "bold cyan"), "  method ", (o.method, "bold"), ", backbone ", (o.backbone, "bold"),
            ", init ", (o.init, "bold"), "  confidence ", (f"{o.level} ({o.confidence:.2f})", colours[o.level]),
        ))
        line("weights", init)
        if o.evidence:
            line("evidence", "; ".join(row.cite() for row in o.evidence))
        line("why", o.rationale)
        for c in list(o.caveats) + ([o.resolution.text] if o.resolution else []):
            line("caveat", c, style="bold yellow")
        for x in o.extrapolated:
            line("extrapolated", x, style="bold magenta")
        console.print()
    b = advice.baseline
    line("Baseline to beat", f"{b.backbone} from scratch (weights.source: scratch). {b.rationale}", 0)
    if written:
        line("Recipe", f"wrote {written} (advised arm + baseline arm); run it with `sslrecipe run {written}`", 0)
    else:
        console.print("\nWrite a runnable recipe for option 1 with --write-recipe PATH.")
