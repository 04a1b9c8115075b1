"""`sslrecipe compare`: runs side by side, laid out like the survey's tables."""

from __future__ import annotations

from pathlib import Path

import click

from sslrecipe.report.compare import LAYOUTS


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--layout", type=click.Choice(LAYOUTS), default="flat", show_default=True,
              help="flat: one row per run (a matrix: per cell), the differing keys as columns. table3/table4/table6/"
                   "table7: rows = method and backbone, columns = that survey table's metrics.")
@click.option("--metric", "metrics", multiple=True, metavar="NAME",
              help="Show these metrics instead of the layout's (repeatable), e.g. --metric bbox/AP50 --metric F1@0.05.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write the table as CSV to this file.")
def compare(run_dirs: tuple[str, ...], layout: str, metrics: tuple[str, ...], csv_path: str | None) -> None:
    """Compare RUN_DIRS: runs, or folders of runs (a matrix run's folder compares its cells).

    Seeds are averaged (mean ± std), the best value of each column is bold, and a matrix's arms show their
    difference to its baseline arm. The same table as the TUI's compare screen and a matrix's comparison.md.

    \b
    Examples:
      sslrecipe compare runs/study-20250101-120000
      sslrecipe compare runs/a runs/b runs/c --layout table7 --csv table7.csv
    """
    from sslrecipe.errors import DataError
    from sslrecipe.report.compare import build_table, load_runs, matrix_of

    skipped: list[str] = []
    records = load_runs(run_dirs, skipped)
    for note in skipped:  # runs of a newer layout: left out, said so
        click.echo(f"skipped: {note}", err=True)
    have = sorted({k for r in records for k, v in r.metrics.items() if not isinstance(v, dict)})
    unknown = [m for m in metrics if m not in have]
    if unknown:
        raise DataError(f"--metric {', '.join(unknown)}: in none of these runs' metrics; they have: "
                        f"{', '.join(have) or '(none yet: are the runs evaluated?)'}")
    table = build_table(records, layout, metrics or None, matrix=matrix_of(records) if layout == "flat" else None)
    click.echo(table.to_markdown())
    if csv_path:
        Path(csv_path).write_text(table.to_csv(), encoding="utf-8")
        click.echo(f"\nwrote {csv_path}", err=True)
