"""Modal dialogs: choose a recipe to launch, write the advised recipe, confirm a launch."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DirectoryTree, Input, Label, Select, Static

from sslrecipe.guide import Advice, write_recipe
from sslrecipe.guide.write import SHORT
from sslrecipe.tui.common import error_message
from sslrecipe.tui.control import split_overrides

RECIPE_SUFFIXES = (".yaml", ".yml")
SKIP_DIRS = {"__pycache__", "node_modules", ".git", "site-packages"}


class RecipeTree(DirectoryTree):
    """Folders and YAML files only."""

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        out = []
        for p in paths:
            if p.name.startswith(".") or p.name in SKIP_DIRS or p.name.endswith(".egg-info"):
                continue
            try:
                if p.is_dir() or p.suffix in RECIPE_SUFFIXES:
                    out.append(p)
            except OSError:
                continue
        return out


SET_PLACEHOLDER = "--set KEY=VALUE …  e.g. finetune.steps=30 seed=1"


class ConfirmDialog(ModalScreen[bool]):
    """A yes / no question (Enter or the first button: yes; Escape: no)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: Text, yes: str = "Launch"):
        super().__init__()
        self.question = question
        self.yes = yes

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-dialog", classes="dialog"):
            yield Static(self.question, id="confirm-question")
            with Horizontal(classes="buttons"):
                yield Button(self.yes, id="confirm-yes", variant="success")
                yield Button("Cancel", id="confirm-no")

    def on_mount(self) -> None:
        self.query_one("#confirm-dialog").border_title = "confirm"
        self.query_one("#confirm-yes", Button).focus()

    @on(Button.Pressed, "#confirm-yes")
    def _yes(self) -> None:
        self.dismiss(True)

    @on(Button.Pressed, "#confirm-no")
    def action_cancel(self) -> None:
        self.dismiss(False)


def launch_question(path: str, overrides: list[str], written: bool = False) -> Text:
    text = Text.assemble(("Write and launch " if written else "Launch ", "bold"), (path, "bold cyan"))
    for o in overrides:
        text.append(f" --set {o}", "cyan")
    text.append("?\nIt runs in the background (q leaves it running) and its stages can take hours.", "dim")
    return text


class LaunchDialog(ModalScreen[Optional[tuple[str, list[str]]]]):
    """Pick a recipe file (tree or typed path) and optional `--set` overrides; dismisses with
    (path, overrides), or None."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, start: Path, suggestion: str = ""):
        super().__init__()
        self.start = Path(start)
        self.suggestion = suggestion

    def compose(self) -> ComposeResult:
        with Vertical(id="launch-dialog", classes="dialog"):
            yield Label(Text.assemble(("Launch a recipe", "bold"), ("  runs in the background; q leaves it running",
                                                                  "dim")))
            yield RecipeTree(self.start, id="recipe-tree")
            yield Input(value=self.suggestion, placeholder="path/to/recipe.yaml", id="recipe-path")
            yield Input(placeholder=SET_PLACEHOLDER, id="launch-set")
            yield Static(id="launch-error", classes="dialog-error")
            with Horizontal(classes="buttons"):
                yield Button("Launch", id="launch", variant="primary")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#launch-dialog").border_title = "launch"
        self.query_one("#launch-error").display = False
        self.query_one("#recipe-path", Input).focus()

    @on(DirectoryTree.FileSelected)
    def _file(self, event: DirectoryTree.FileSelected) -> None:
        path = event.path
        try:
            shown = path.relative_to(Path.cwd())
        except ValueError:
            shown = path
        field = self.query_one("#recipe-path", Input)
        field.value = str(shown)
        field.focus()

    @on(Input.Submitted, "#recipe-path, #launch-set")
    @on(Button.Pressed, "#launch")
    def _launch(self) -> None:
        value = self.query_one("#recipe-path", Input).value.strip()
        if not value:
            self.notify("Choose a recipe file in the tree or type its path.", severity="warning")
            return
        try:
            overrides = split_overrides(self.query_one("#launch-set", Input).value)
        except Exception as e:  # noqa: BLE001 - shown in the dialog
            show_error(self, "#launch-error", e)
            return
        self.dismiss((value, overrides))

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


def show_error(dialog: ModalScreen, box_id: str, e: BaseException) -> None:
    message = error_message(e)
    box = dialog.query_one(box_id, Static)
    box.display = True
    box.update(Text.assemble(("✗ ", "bold red"), message))  # in the dialog: a notification would cover its buttons


class WriteRecipeDialog(ModalScreen[Optional[tuple[str, bool, list[str]]]]):
    """Write the recipe of one of the recommendations; "Write & launch" asks first and takes `--set` overrides.
    Dismisses with (path, launch?, overrides) or None."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, advice: Advice):
        super().__init__()
        self.advice = advice

    def _default_path(self, index: int) -> str:
        o = self.advice.recommendations[index]
        name = f"advised-{o.method}-{SHORT.get(o.backbone, o.backbone)}.yaml"
        folder = Path("recipes")
        return str(folder / name) if folder.is_dir() else name

    def compose(self) -> ComposeResult:
        choices = [(f"{i}. {o.label} ({o.init})", i - 1) for i, o in enumerate(self.advice.recommendations, 1)]
        with Vertical(id="write-dialog", classes="dialog"):
            yield Label(Text.assemble(("Write the advised recipe", "bold"),
                                      ("  advised arm + scratch baseline, runs as written", "dim")))
            yield Select(choices, value=0, allow_blank=False, id="write-option")
            yield Input(value=self._default_path(0), placeholder="path/to/recipe.yaml", id="write-path")
            yield Input(placeholder="--set KEY=VALUE … for Write & launch, e.g. finetune.steps=30", id="write-set")
            yield Static(id="write-error", classes="dialog-error")
            with Horizontal(classes="buttons"):
                yield Button("Write", id="write-only", variant="primary")
                yield Button("Write & launch", id="write-launch", variant="success")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#write-dialog").border_title = "write recipe"
        self.query_one("#write-error").display = False
        self.query_one("#write-path", Input).focus()

    @on(Select.Changed, "#write-option")
    def _option(self, event: Select.Changed) -> None:
        if isinstance(event.value, int):
            self.query_one("#write-path", Input).value = self._default_path(event.value)

    @on(Input.Submitted, "#write-path")
    @on(Button.Pressed, "#write-only")
    def _write_only(self) -> None:
        self._write(False)

    @on(Input.Submitted, "#write-set")
    @on(Button.Pressed, "#write-launch")
    def _write_launch(self) -> None:
        """Launching starts hours of work: ask first (nothing is written when the answer is no)."""
        path = self.query_one("#write-path", Input).value.strip()
        try:
            if not path:
                raise ValueError("file: give the recipe a file name")
            overrides = split_overrides(self.query_one("#write-set", Input).value)
        except Exception as e:  # noqa: BLE001 - shown in the dialog
            show_error(self, "#write-error", e)
            return

        def answered(yes: Optional[bool]) -> None:
            if yes:
                self._write(True, overrides)

        self.app.push_screen(ConfirmDialog(launch_question(path, overrides, written=True)), answered)

    def _write(self, launch: bool, overrides: Optional[list[str]] = None) -> None:
        path = self.query_one("#write-path", Input).value.strip()
        index = self.query_one("#write-option", Select).value
        option = self.advice.recommendations[index if isinstance(index, int) else 0]
        try:
            if not path:
                raise ValueError("file: give the recipe a file name")
            written = write_recipe(self.advice, path, option)
        except Exception as e:  # noqa: BLE001 - shown in the dialog and as a notification
            show_error(self, "#write-error", e)
            return
        self.notify(f"wrote {written}" + ("" if launch else f": run it with `sslrecipe run {written}` or press l"),
                    title="recipe", markup=False)
        self.dismiss((str(written), launch, list(overrides or [])))

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
