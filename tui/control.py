"""Starting, stopping and resuming runs from the TUI.

A run is started as its own process (`python -m sslrecipe.cli run ...`) in a new session, so it
keeps running when the TUI quits and never sees the TUI's keyboard; its stdout and stderr go to
`RUN/run.log`. Stopping sends SIGINT, which the pipeline turns into a checkpoint at the next step
boundary; resuming runs `sslrecipe run RUN` again, which continues from that checkpoint.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from sslrecipe.errors import SSLRecipeError

from sslrecipe.tui.runs import LOG_NAME, pid_alive


@dataclass
class Launched:
    run_dir: Path
    process: subprocess.Popen
    matrix: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid


def run_command(target: Path, run_dir: Optional[Path] = None, overrides: Iterable[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "sslrecipe.cli", "run", str(target)]
    if run_dir is not None:
        cmd += ["--run-dir", str(run_dir)]
    for o in overrides:
        cmd += ["--set", o]
    return cmd + ["--progress", "plain"]


def split_overrides(text: str) -> list[str]:
    """`finetune.steps=30 seed=1` (quotes as in a shell) -> ["finetune.steps=30", "seed=1"], each checked as
    `--set` checks it; the message names the form's `--set` field."""
    from sslrecipe.recipe.loader import parse_override

    try:
        items = shlex.split(text)
    except ValueError as e:
        raise SSLRecipeError(f"--set overrides: {e} in {text!r}") from None
    for item in items:
        parse_override(item)  # RecipeError: `--set ITEM: expected KEY=VALUE ...`
    return items


def _start(cmd: list[str], run_dir: Path, env: Optional[dict[str, str]] = None) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / LOG_NAME
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        try:
            return subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=env, cwd=os.getcwd(),
            )
        except OSError as e:
            raise SSLRecipeError(f"could not start `{' '.join(cmd)}`: {e}") from None


def _unique(path: Path) -> Path:
    if not path.exists():
        return path
    for i in range(2, 1000):
        candidate = path.with_name(f"{path.name}-{i}")
        if not candidate.exists():
            return candidate
    raise SSLRecipeError(f"too many run directories named {path.name}-N")


def launch(recipe_path: str | Path, runs_root: str | Path, env: Optional[dict[str, str]] = None,
           overrides: Iterable[str] = ()) -> Launched:
    """Validate a recipe (with its `--set` overrides), then run it in the background in a new
    `RUNS/<name>-<timestamp>` directory."""
    path = Path(str(recipe_path).strip()).expanduser()
    if not str(recipe_path).strip():
        raise SSLRecipeError("choose a recipe file to launch")
    if path.is_dir():
        raise SSLRecipeError(f"{path} is a directory: choose a recipe file (.yaml), or resume a run with r")
    if not path.is_file():
        raise SSLRecipeError(f"recipe {path} does not exist")
    from sslrecipe.engine.rundir import default_run_dir
    from sslrecipe.recipe import load_recipe

    overrides = list(overrides)
    recipe = load_recipe(path, overrides)  # a RecipeError names the file, line and key
    run_dir = _unique(default_run_dir(recipe, Path(runs_root)))
    process = _start(run_command(path, run_dir, overrides), run_dir, env)
    return Launched(run_dir, process, recipe.matrix is not None)


def resume(run_dir: str | Path, running: bool, env: Optional[dict[str, str]] = None) -> Launched:
    """Run an interrupted (or failed) run again in its own directory: finished stages are skipped and
    the interrupted one continues from its checkpoint."""
    run_dir = Path(run_dir)
    if running:
        raise SSLRecipeError(f"{run_dir.name} is still running: stop it first (s)")
    if not (run_dir / "resolved.yaml").is_file():
        raise SSLRecipeError(f"{run_dir} has no resolved.yaml: it cannot be resumed")
    process = _start(run_command(run_dir), run_dir, env)
    return Launched(run_dir, process)


def stop(pid: Optional[int], started_at: Optional[float] = None) -> None:
    """Ask a run to stop gracefully (SIGINT: checkpoint at the next step boundary, then exit)."""
    if pid is None or not pid_alive(pid, started_at):
        raise SSLRecipeError("this run is not running")
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        raise SSLRecipeError("this run's process has already ended") from None
    except PermissionError:
        raise SSLRecipeError(f"not allowed to signal process {pid} (another user's run?)") from None


class Launcher:
    """The processes this TUI started: reaped as they end so they never linger as zombies."""

    def __init__(self) -> None:
        self.processes: list[Launched] = []

    def add(self, launched: Launched) -> Launched:
        self.processes.append(launched)
        return launched

    def reap(self) -> None:
        for item in list(self.processes):
            if item.process.poll() is not None:
                self.processes.remove(item)
