"""`sslrecipe runs`: housekeeping of run directories."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def runs() -> None:
    """Run directories: remove the stages their latest recipe no longer uses."""


@runs.command("clean", short_help="delete the stage directories the latest recipe no longer uses")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--yes", is_flag=True, help="Delete them (default: only list them, with their sizes).")
def clean(run_dir: Path, yes: bool) -> None:
    """List the stage directories of RUN_DIR that its latest resolved.yaml no longer uses, and with --yes delete
    them.

    A recipe change leaves the old stage directories behind (a run reuses a stage only while its part of the
    recipe is unchanged). The ones kept are those the latest resolved.yaml hashes to, as `sslrecipe run` computes
    them: rerunning RUN_DIR after a clean redoes nothing. For a matrix, each cell's latest recipe counts.
    """
    from rich.console import Console
    from rich.table import Table

    from sslrecipe.engine.clean import delete_unused, human, plan_clean

    plan = plan_clean(run_dir)
    for note in plan.notes:
        click.echo(f"note: {note}")
    if not plan.unused:
        click.echo(f"{run_dir}: nothing to clean ({len(plan.kept)} stage directories, all in use)")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("unused stage directory", overflow="fold")
    table.add_column("state")
    table.add_column("size", justify="right")
    for s in plan.unused:
        table.add_row(str(s.path.relative_to(run_dir)), "finished" if s.finished else "unfinished", human(s.bytes))
    Console(highlight=False).print(table)
    kept = sum(s.bytes for s in plan.kept)
    n = len(plan.unused)
    if not yes:
        click.echo(f"{n} unused stage director{'y' if n == 1 else 'ies'}, {human(plan.bytes)}; the "
                   f"{len(plan.kept)} in use ({human(kept)}) are kept.\nDelete them: sslrecipe runs clean {run_dir} --yes")
        return
    freed = delete_unused(plan)
    click.echo(f"deleted {n} unused stage director{'y' if n == 1 else 'ies'}, {human(freed)} freed; the "
               f"{len(plan.kept)} in use are kept")
