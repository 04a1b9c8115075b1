"""`sslrecipe advise`: the SSL pre-training strategy the survey's evidence supports for your constraints."""

from __future__ import annotations

import json

import click

from sslrecipe.guide.constraints import (
    BACKBONE_ALIASES,
    BACKBONES,
    CUSTOM,
    DOMAIN_ALIASES,
    DOMAINS,
    LOCALIZATIONS,
    MODEL_SIZES,
    OBJECT_SIZES,
    SHIFTS,
    Constraints,
    alias_help,
)


def _choices(values: tuple[str, ...]) -> str:
    return "[" + "|".join(values) + "]"


@click.command()
@click.option("--backbone", metavar="NAME",
              help=f"Backbone family: {alias_help(BACKBONES, BACKBONE_ALIASES)}, or a timm name "
              "(resnet50, vit_small_patch16_224, ...; a survey backbone also sets --model-size). Default any.")
@click.option("--model-size", metavar=_choices(MODEL_SIZES),
              help="small: ~21-23M params (R50, ViT-S/16); large: >65M (R200, ViT-B/16). Default any.")
@click.option("--shots", type=int, help="Labeled training images (omit: plenty).")
@click.option("--object-size", metavar=_choices(OBJECT_SIZES),
              help="Typical object size, COCO buckets (default mixed).")
@click.option("--localization", metavar=_choices(LOCALIZATIONS),
              help="strict: AP@[.5:.95]; tolerant: counting-style low-IoU matching (default strict).")
@click.option("--domain", metavar="NAME", help=f"Image domain: {alias_help(DOMAINS, DOMAIN_ALIASES)}. Default rgb.")
@click.option("--domain-shift", metavar=_choices(SHIFTS), help="Shift from ImageNet (default: from --domain).")
@click.option("--unlabeled", type=int, help="How many unlabeled images of your own you can pre-train on.")
@click.option("--custom-pretrain", metavar=_choices(CUSTOM),
              help="required: public weights cannot be used (changed architecture or channels); no: never "
              "pre-train; auto (default): when the evidence says so.")
@click.option("--data", "data_path", metavar="FILE",
              help="Your labeled training set (COCO JSON, or any format `sslrecipe data stats` reads): object "
              "size, shots and channels are read from it (flags given explicitly win), and --write-recipe "
              "trains on it.")
@click.option("--val", "val_path", metavar="FILE",
              help="With --data: your labeled validation set for the written recipe (default: a seeded "
              "split carved from --data).")
@click.option("--pool", "pool_dir", metavar="DIR",
              help="A folder of your unlabeled images: counted for --unlabeled, and the pre-training pool of "
              "the written recipe.")
@click.option("--top", type=int, help="How many options to rank (default 3).")
@click.option("-v", "--verbose", is_flag=True, help="Also print the reasoning, the caveats and every cited number.")
@click.option("--json", "as_json", is_flag=True, help="Print the advice as JSON (everything the text shows).")
@click.option("--write-recipe", "recipe_path", metavar="PATH",
              help="Write a runnable recipe for the top option (its arm and the baseline arm).")
def advise(backbone, model_size, shots, object_size, localization, domain, domain_shift, unlabeled,
           custom_pretrain, data_path, val_path, pool_dir, top, verbose, as_json, recipe_path) -> None:
    """Recommend an SSL pre-training strategy from the survey's evidence.

    Ranks (method, backbone, initialisation) options by the survey's measured results (Tables III, IV, VI,
    VII) under your constraints. The first screen is a ranked table with the number that decided each
    option; --verbose adds the reasoning, the caveats, the confidence's extrapolations and every number
    behind them. The decision table is docs/advisor.md.

    \b
    Examples:
      sslrecipe advise --backbone resnet --shots 25
      sslrecipe advise --domain ir --object-size small --verbose
      sslrecipe advise --data train.json --pool unlabeled/ \\
          --write-recipe advised.yaml
    """
    from sslrecipe.guide.advisor import advise as run_advisor

    constraints = Constraints(
        backbone=backbone, model_size=model_size, shots=shots, object_size=object_size,
        localization=localization, domain=domain, domain_shift=domain_shift, unlabeled=unlabeled,
        custom_pretrain=custom_pretrain, data=data_path, val=val_path, pool=pool_dir,
    )
    advice = run_advisor(constraints, top=top)
    written = None
    if recipe_path:
        from sslrecipe.guide.write import write_recipe

        written = write_recipe(advice, recipe_path)
    if as_json:
        data = advice.as_json()
        data["recipe"] = str(written) if written else None
        click.echo(json.dumps(data, indent=2))
        return
    from rich.console import Console

    console = Console(highlight=False)
    with console.capture() as captured:
        _print(console, advice, written, verbose)
    # rich pads table cells and wrapped lines to the width: drop the trailing blanks
    click.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))


# --------------------------------------------------------------------------- text


def constraints_line(r) -> str:
    """What the advice is for: what the user said (and how an alias was read), then the defaults."""
    shown = {
        "backbone": r.backbone, "model_size": r.model_size,
        "shots": r.shots if r.shots is not None else "plenty", "object_size": r.object_size,
        "localization": r.localization, "domain": r.domain, "domain_shift": r.domain_shift,
        "unlabeled": r.unlabeled, "custom_pretrain": r.custom_pretrain, "channels": r.channels,
    }
    names = {"object_size": "objects", "custom_pretrain": "own pre-training", "domain_shift": "shift",
             "model_size": "model size"}
    said, defaults = [], []
    for key, value in shown.items():
        if value is None:
            continue
        origin = r.origin.get(key, "derived")
        text = f"{names.get(key, key)} {value}"
        if key in r.typed and str(r.typed[key]).lower() != str(value):
            text += f" (from {r.typed[key]!r})"
        if origin in ("data", "pool", "backbone"):
            text += f" (from the {'dataset' if origin == 'data' else origin})"
        (defaults if origin in ("default", "derived") else said).append(text)
    out = "For " + (", ".join(said) if said else "no constraints")
    return out + (f"; defaults: {', '.join(defaults)}." if defaults else ".")


def _value(contribution) -> tuple[str, bool]:
    """An option's number in the deciding column as the table shows it, and whether it is borrowed."""
    from sslrecipe.guide.evidence import fmt

    v = contribution.value if contribution is not None else None
    if v is None:
        return "-", False
    row = v.rows[0]
    return fmt(row.value, row.metric) + ("*" if v.borrowed else ""), bool(v.borrowed)


def _table():
    """A borderless table with one space between columns: the ranked options fit 80 columns."""
    from rich import box
    from rich.table import Table

    return Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0), header_style="bold")


def _print(console, advice, written, verbose: bool) -> None:
    from rich.text import Text

    from sslrecipe.guide.evidence import fmt

    colours = {"high": "green", "medium": "yellow", "low": "red"}
    decided = advice.decided_by
    r = advice.constraints

    console.print(constraints_line(r))
    if r.data_facts is not None:
        console.print(f"Data: {r.data_facts.summary()}")
    others = [f"Table {c.table} {c.column} x{c.weight:g}" for c in advice.active[1:]]
    console.print(Text.assemble(
        "Decided by ", (f"Table {decided.table} {decided.column}", "bold"), f" x{decided.weight:g}",
        (f"; also weighed: {', '.join(others)}" if others else ""), ".",
    ))

    table = _table()
    table.add_column("#", justify="right")
    table.add_column("option", no_wrap=True)
    table.add_column("weights", overflow="fold")
    table.add_column(decided.column, justify="right")
    table.add_column("confidence")
    table.add_column("licence", overflow="fold")
    borrowed = []
    for i, o in enumerate(advice.recommendations, 1):
        value, is_borrowed = _value(o.decided)
        if is_borrowed:
            borrowed.append(f"* {o.label}: {o.decided.value.rows[0].label}'s row (it has none of its own)")
        table.add_row(str(i), Text(o.label, "bold cyan" if i == 1 else ""), o.weights_label, value,
                      Text(o.level, colours[o.level]), o.licence or "yours")
    b = advice.baseline
    table.add_row("", b.label, "baseline to beat", fmt(b.decided.value, b.decided.metric) if b.decided else "-",
                  "", "", style="dim")
    console.print(table)
    for line in borrowed:
        console.print(line, style="dim")

    best = advice.best
    console.print(Text.assemble(("Why 1: ", "bold"), advice.headline))
    for o in advice.recommendations:
        for d in o.departures:
            console.print(Text.assemble(("Note: ", "bold"), d))
    titles = [t for t, _ in best.all_caveats]
    if titles:
        console.print(Text.assemble(("Caveats of 1: ", "bold yellow"), "; ".join(titles), "."))
    if verbose:
        _print_details(console, advice)
    if written:
        console.print(Text.assemble(("Recipe: ", "bold"), f"wrote {written} (the advised arm and the baseline); "
                                    f"run it with `sslrecipe run {written}`"))
    elif not verbose:
        console.print("More: --verbose (reasoning, caveats, every number), --json, --write-recipe PATH.",
                      style="dim")
    else:
        console.print("Write a runnable recipe for option 1 with --write-recipe PATH.", style="dim")


def _print_details(console, advice) -> None:
    """--verbose: every weighed number once (a table), then each option's reasoning, caveats and extrapolations."""
    from rich.padding import Padding
    from rich.text import Text

    from sslrecipe.guide.advisor import INIT_PHRASES
    from sslrecipe.guide.evidence import fmt, load_evidence

    ev = load_evidence()
    console.print()
    console.print(Text("The survey's numbers behind the ranking (* borrowed: see extrapolated)", "bold"))
    table = _table()
    table.add_column("option", no_wrap=True)
    for c in advice.active:
        table.add_column(f"{c.table} {c.column} x{c.weight:g}", justify="right")
    table.add_column("score", justify="right")
    for o in advice.recommendations:
        table.add_row(o.label, *[_value(c)[0] for c in o.contributions], f"{o.score:.2f}")
    b = advice.baseline
    cells = []
    for c in advice.active:
        row = ev.get(c.table, "scratch", b.backbone, c.column)
        cells.append(fmt(row.value, row.metric) if row else "-")
    table.add_row(b.label, *cells, "", style="dim")
    console.print(table)

    def line(label: str, text: str, style: str = "bold") -> None:
        console.print(Padding(Text.assemble((f"{label}: ", style), text), (0, 0, 0, 3), expand=False))

    weighed = {(c.table, c.column) for c in advice.active}
    for i, o in enumerate(advice.recommendations, 1):
        console.print()
        console.print(Text.assemble(
            (f"{i}. {o.label}", "bold cyan"), f"  {INIT_PHRASES[o.init]}", f" ({o.weights})" if o.weights else "",
            "  confidence ", (f"{o.level} {o.confidence:.2f}", {"high": "green", "medium": "yellow"}.get(o.level, "red")),
        ))
        line("why", o.rationale)
        also = [r.cite() for r in o.evidence if (r.table, r.column) not in weighed]
        if also:
            line("also measured", "; ".join(also))
        for title, text in o.all_caveats:
            line("caveat", text, "bold yellow")
        for x in o.extrapolated:
            line("extrapolated", x, "bold magenta")
    console.print()
    console.print(Text.assemble(("Baseline to beat: ", "bold"), f"{b.label}, weights.source: scratch. ", b.rationale))
