"""`sslrecipe tui`: the Textual app.

Screens: runs (start), run monitor, advisor, compare; dialogs to launch a recipe and to write the
advised one. The app reads run directories (`sslrecipe.tui.runs`), starts and signals run processes
(`sslrecipe.tui.control`) and asks `sslrecipe.guide` for advice; it never imports the CLI.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from textual import work
from textual.app import App
from textual.binding import Binding

from sslrecipe.errors import SSLRecipeError
from sslrecipe.tui import control
from sslrecipe.tui.advisor import AdvisorScreen
from sslrecipe.tui.common import guarded, notify_error
from sslrecipe.tui.compare import CompareScreen
from sslrecipe.tui.dialogs import LaunchDialog
from sslrecipe.tui.monitor import MonitorScreen
from sslrecipe.tui.runs import RunIndex, RunWatcher
from sslrecipe.tui.runs_screen import RunsScreen


class SSLRecipeApp(App):
    """Choose a strategy with the advisor, launch recipes, watch and compare runs."""

    CSS_PATH = "app.tcss"
    TITLE = "sslrecipe"
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("a", "advisor", "Advisor"),
        Binding("l", "launch", "Launch"),
    ]

    def __init__(
        self,
        runs_dir: str | Path = "runs",
        *,
        poll_interval: float = 1.0,
        monitor_interval: float = 0.5,
        plot_interval: float = 1.0,
        env: Optional[dict[str, str]] = None,
    ):
        super().__init__()
        self.runs_dir = Path(runs_dir)
        self.poll_interval = poll_interval
        self.monitor_interval = monitor_interval
        self.plot_interval = plot_interval
        self.env = env
        self.index = RunIndex(self.runs_dir)
        self.launcher = control.Launcher()
        self.stopping: set[tuple[int, Optional[float]]] = set()

    def get_default_screen(self) -> RunsScreen:
        return RunsScreen()

    def on_mount(self) -> None:
        self.sub_title = str(self.runs_dir)

    # ------------------------------------------------------------------ navigation

    def open_run(self, path: Path, label: Optional[str] = None) -> MonitorScreen:
        screen = MonitorScreen(path, label, launched_pid=self.index.launched.get(Path(path)))
        self.push_screen(screen)
        return screen

    def push_compare(self, runs: list[tuple[Path, str]]) -> None:
        self.push_screen(CompareScreen(runs))

    def action_advisor(self) -> None:
        if isinstance(self.screen, AdvisorScreen):
            return
        if not self.is_screen_installed("advisor"):
            self.install_screen(AdvisorScreen(), "advisor")  # kept: the form remembers its values
        if self.get_screen("advisor") in self.screen_stack:
            while not isinstance(self.screen, AdvisorScreen):
                self.pop_screen()
            return
        self.push_screen("advisor")

    def action_launch(self) -> None:
        if isinstance(self.screen, LaunchDialog):
            return
        quickstart = Path("recipes") / "quickstart.yaml"
        suggestion = str(quickstart) if quickstart.is_file() else ""
        self.push_screen(LaunchDialog(Path.cwd(), suggestion), self._launch_chosen)

    @guarded
    def _launch_chosen(self, chosen: Optional[tuple[str, list[str]]]) -> None:
        if chosen:
            self.launch_recipe(*chosen)

    # ------------------------------------------------------------------ runs

    def launch_recipe(self, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> None:
        """Validate and start a recipe (with `--set` overrides) in a worker thread (loading the engine takes
        seconds)."""
        shown = " ".join(["--set " + o for o in overrides])
        self.notify(f"starting {path}{' ' + shown if shown else ''}…", title="launch", markup=False, timeout=3)
        self._launch(str(path), list(overrides))

    @work(thread=True, group="launch", exit_on_error=False)
    def _launch(self, path: str, overrides: list[str]) -> None:
        try:
            launched = control.launch(path, self.runs_dir, env=self._env(), overrides=overrides)
        except Exception as e:  # noqa: BLE001 - a bad recipe is a notification, not a crash
            self._from_thread(notify_error, self, e, "launch")
            return
        self._from_thread(self._launched, launched)

    def _from_thread(self, callback, *args) -> None:
        try:
            self.call_from_thread(callback, *args)
        except RuntimeError:  # the app is shutting down
            pass

    def _launched(self, launched: control.Launched) -> None:
        self.launcher.add(launched)
        self.index.note_launch(launched.run_dir, launched.pid)
        self.notify(f"{launched.run_dir.name} started (pid {launched.pid}); its output goes to "
                    f"{launched.run_dir / 'run.log'}", title="launch", markup=False)
        while len(self.screen_stack) > 1:
            self.pop_screen()
        if launched.matrix:
            self.notify("A matrix recipe: each cell appears in the runs list as it starts.", markup=False)
        else:
            self.open_run(launched.run_dir)

    def _watcher(self, path: Path) -> RunWatcher:
        w = RunWatcher(path)
        w.launched_pid = self.index.launched.get(Path(path))
        w.poll()
        return w

    def stop_run(self, path: Path, label: str, watcher: Optional[RunWatcher] = None) -> None:
        w = watcher or self._watcher(path)
        status, _ = w.status()
        pid = w.state.pid if w.state.pid and w.state.end_status is None else w.launched_pid
        if status not in ("running", "starting") or pid is None:
            raise SSLRecipeError(f"{label} is {status}: only a running run can be stopped")
        key = (pid, w.state.attempt_started)
        control.stop(pid, w.state.attempt_started if pid == w.state.pid else None)
        if key in self.stopping:
            self.notify(f"{label}: stop requested again: aborting now (the last periodic checkpoint is kept)",
                        title="stop", severity="warning", markup=False)
        else:
            self.stopping.add(key)
            self.notify(f"{label}: stopping at the next step with a checkpoint (r resumes it; s again aborts)",
                        title="stop", markup=False)

    def resume_run(self, path: Path, label: str, status: str) -> Optional[control.Launched]:
        if status == "finished":
            raise SSLRecipeError(f"{label} has finished: nothing to resume")
        if status in ("running", "starting"):
            raise SSLRecipeError(f"{label} is {status}: stop it first (s)")
        launched = self.launcher.add(control.resume(path, running=False, env=self._env()))
        self.index.note_launch(launched.run_dir, launched.pid)
        self.notify(f"{label}: resuming (pid {launched.pid})", title="resume", markup=False)
        return launched

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        return env


def run_app(runs_dir: str | Path = "runs") -> None:
    SSLRecipeApp(runs_dir).run()
