"""The advisor screen: constraints as a form, the ranked options with the survey's numbers, a recipe."""

from __future__ import annotations

import re
from typing import Any, Optional

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import events, on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Button, Footer, Header, Input, Label, Select, Static

from sslrecipe.guide import Advice, Constraints, Option, advise
from sslrecipe.guide.advisor import INIT_PHRASES
from sslrecipe.guide.constraints import BACKBONES, CUSTOM, DOMAINS, LOCALIZATIONS, MODEL_SIZES, OBJECT_SIZES, SHIFTS
from sslrecipe.guide.evidence import fmt
from sslrecipe.tui.common import error_message, guarded, size_classes

AUTO = "__default__"  # the Select value meaning "not said" (the advisor's default applies)

# (key, label, choices, what the default means)
SELECTS = (
    ("backbone", "backbone", BACKBONES, "any"),
    ("model_size", "model size", MODEL_SIZES, "any"),
    ("object_size", "objects", OBJECT_SIZES, "mixed"),
    ("localization", "localization", LOCALIZATIONS, "strict"),
    ("domain", "domain", DOMAINS, "rgb"),
    ("domain_shift", "domain shift", SHIFTS, "from domain"),
    ("custom_pretrain", "own pretrain", CUSTOM, "auto"),
)
# (key, label, placeholder)
NUMBERS = (
    ("shots", "labeled", "plenty (images)"),
    ("unlabeled", "unlabeled", "unknown (images)"),
    ("channels", "channels", "3 / from data"),
)
LEVEL_STYLE = {"high": "bold green", "medium": "bold yellow", "low": "bold red"}
# the advisor's messages name `sslrecipe advise` flags; the form names its fields
FLAG_FIELDS = {f"--{key.replace('_', '-')}": (key, label) for key, label, *_ in SELECTS + NUMBERS}
FLAG_FIELDS["--data"] = ("data", "dataset")
_FLAG = re.compile(r"(omit |drop )?(--[a-z][a-z-]*)")


def field_message(message: str) -> tuple[str, Optional[str]]:
    """An advisor error in the form's words: `--shots 0: ... (omit --shots for plenty)` ->
    `labeled 0: ... (leave labeled empty for plenty)`; and the key of the first field it names."""
    first: list[str] = []

    def name(m: re.Match) -> str:
        verb, flag = m.group(1), m.group(2)
        if flag not in FLAG_FIELDS:
            return m.group(0)
        key, label = FLAG_FIELDS[flag]
        first.append(key)
        if verb == "omit ":
            return f"leave {label} empty"
        if verb == "drop ":
            return f"set {label} back to its default"
        return label

    out = _FLAG.sub(name, message)
    return out, (first[0] if first else None)


class NumberInput(Input):
    """A whole-number field that takes what people paste: `2,500`, ` 25 ` or `1 000` (a plain integer Input
    refuses such a paste whole, silently)."""

    def _on_paste(self, event: events.Paste) -> None:
        line = (event.text.splitlines() or [""])[0] if event.text else ""
        cleaned = re.sub(r"[\s,_']", "", line)
        if cleaned != line and re.fullmatch(r"-?\d+", cleaned):
            event.stop()
            event.prevent_default()  # not Input's handler too: it would refuse the original text
            if self.selection.is_empty:
                self.insert_text_at_cursor(cleaned)
            else:
                self.replace(cleaned, *self.selection)
        # else Input's own handler runs next (Textual calls each class's handler, base classes last)


def _options(choices: tuple[str, ...], default: str) -> list[tuple[str, str]]:
    out = [(f"({default})", AUTO)]
    out += [(c, c) for c in choices if c != default]
    return out


def ranked_table(advice: Advice, wide: bool) -> Table:
    """The ranked options: the number that decided (the deciding column's value), confidence; with `wide`
    also the weights and the licence (the cards below have them at 80 columns)."""
    decided = advice.decided_by
    table = Table(box=None, show_header=True, header_style="bold", padding=(0, 1, 0, 0), expand=False)
    table.add_column("#", justify="right")
    table.add_column("option", no_wrap=True)
    if wide:
        table.add_column("weights", overflow="fold")
    table.add_column(decided.column if decided is not None else "value", justify="right", no_wrap=True)
    table.add_column("confidence" if wide else "conf.", no_wrap=True)  # 80 columns: the # column keeps its room
    if wide:
        table.add_column("licence", overflow="fold")
    for i, o in enumerate(advice.recommendations, 1):
        v = o.decided.value if o.decided is not None else None
        value = "-" if v is None else fmt(v.rows[0].value, v.rows[0].metric) + ("*" if v.borrowed else "")
        cells: list[Any] = [str(i), Text(o.label, "bold cyan" if i == 1 else "")]
        cells += [o.weights_label] if wide else []
        cells += [value, Text(o.level, LEVEL_STYLE.get(o.level, ""))]
        cells += [o.licence or "yours"] if wide else []
        table.add_row(*cells)
    b = advice.baseline
    base = fmt(b.decided.value, b.decided.metric) if b.decided is not None else "-"
    table.add_row("", b.label, *(["baseline to beat"] if wide else []), base, "", *([""] if wide else []), style="dim")
    return table


def option_renderable(rank: int, o: Option) -> Group:
    """One recommendation: what to do, the survey's numbers behind it, why, and its caveats."""
    weights = INIT_PHRASES[o.init]
    if o.init == "public":
        weights += f" ({o.candidate.weights})"
    elif o.init == "public+custom-pretrain" and o.candidate.continue_from:
        weights += f" (from {o.candidate.continue_from})"
    head = Text.assemble(
        ("method ", "dim"), (o.method, "bold"), ("  backbone ", "dim"), (o.backbone, "bold"),
        ("\n", ""), ("init ", "dim"), weights, ("  licence ", "dim"), o.licence or "yours",
    )
    parts: list[Any] = [head]  # its departures (why it outranks a more confident one) are the head's notes
    if o.evidence:
        table = Table(box=None, show_header=True, header_style="dim", padding=(0, 1), expand=False)
        table.add_column("evidence")
        table.add_column("value", justify="right", style="bold cyan", no_wrap=True)
        for row in o.evidence[:6]:
            table.add_row(Text.assemble(f"Table {row.table}", (" · ", "dim"), row.label, (" · ", "dim"), row.column),
                          fmt(row.value, row.metric))
        parts.append(table)
    else:
        parts.append(Text("evidence: none (not measured by the survey)", "magenta"))
    parts.append(Text.assemble(("why ", "bold"), (o.rationale, "")))
    for c in list(o.caveats) + ([o.resolution.text] if o.resolution else []):
        parts.append(Text.assemble(("caveat ", "bold yellow"), c))
    for x in o.extrapolated:
        parts.append(Text.assemble(("extrapolated ", "bold magenta"), x))
    return Group(*parts)


class AdvisorScreen(Screen):
    """The advisor's constraints as a form; the ranking follows every change."""

    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("w", "write", "Write recipe"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.advice: Optional[Advice] = None
        self.error: Optional[str] = None
        self.computations = 0
        self._debounce: Optional[Timer] = None
        self._data: Optional[str] = None
        self._last_error_notified: Optional[str] = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="advisor"):
            with VerticalScroll(id="form"):
                for key, label, choices, default in SELECTS:
                    with Horizontal(classes="field", id=f"f-{key}"):
                        yield Label(label, classes="field-label")
                        yield Select(_options(choices, default), value=AUTO, allow_blank=False, compact=True,
                                     id=f"c-{key}")
                for key, label, placeholder in NUMBERS:
                    with Horizontal(classes="field", id=f"f-{key}"):
                        yield Label(label, classes="field-label")
                        yield NumberInput(placeholder=placeholder, type="integer", compact=True, id=f"c-{key}")
                with Horizontal(classes="field", id="f-data"):
                    yield Label("dataset", classes="field-label")
                    yield Input(placeholder="train.json (Enter)", compact=True, id="c-data")
                yield Static(
                    "(…) = the default. dataset: COCO JSON or any format `sslrecipe data stats` reads, applied "
                    "with Enter; it fills objects, labeled and channels.", id="form-help",
                )
                yield Button("Write recipe", id="write", variant="primary")
            with VerticalScroll(id="advice"):
                yield Static(id="advice-head")
                yield Static(id="advice-error")
                yield Static(id="advice-cards")
        yield Footer(show_command_palette=False)

    def on_resize(self, event) -> None:
        size_classes(self, event.size.width, event.size.height, narrow_below=100, short_below=34)

    def on_mount(self) -> None:
        self.sub_title = "advisor: which SSL pre-training the survey's evidence supports"
        self.query_one("#form").border_title = "your problem"
        self.query_one("#advice").border_title = "recommendations"
        self.query_one("#advice-error").display = False
        self.recompute()

    # ------------------------------------------------------------------ the form

    def constraints(self) -> Constraints:
        values: dict[str, Any] = {}
        for key, *_ in SELECTS:
            v = self.query_one(f"#c-{key}", Select).value
            values[key] = None if v in (AUTO, Select.BLANK) else v
        for key, label, _ in NUMBERS:
            text = self.query_one(f"#c-{key}", Input).value.strip()
            if not text:
                values[key] = None
                continue
            try:
                values[key] = int(text)
            except ValueError:
                from sslrecipe.errors import SSLRecipeError

                raise SSLRecipeError(f"{label}: {text!r} is not a whole number") from None
        values["data"] = self._data
        return Constraints(**values)

    @on(Select.Changed)
    @on(Input.Changed, "#c-shots, #c-unlabeled, #c-channels")
    def _changed(self) -> None:
        if self._debounce is not None:
            self._debounce.stop()
        self._debounce = self.set_timer(0.25, self.recompute)

    @on(Input.Submitted, "#c-data")
    def _data_submitted(self, event: Input.Submitted) -> None:
        self._data = event.value.strip().strip("'\"") or None  # a path dragged from a file manager comes quoted
        self.recompute()

    @on(Button.Pressed, "#write")
    def _write_pressed(self) -> None:
        self.action_write()

    def recompute(self) -> None:
        try:
            constraints = self.constraints()
        except Exception as e:  # noqa: BLE001 - shown in the pane and as a notification
            self._show(None, error_message(e))
            return
        self._advise(constraints)

    @work(thread=True, exclusive=True, group="advise", exit_on_error=False)
    def _advise(self, constraints: Constraints) -> None:
        advice, error = None, None
        try:
            advice = advise(constraints)
        except Exception as e:  # noqa: BLE001 - SSLRecipeError for a meaningless combination
            error = error_message(e)
        try:
            self.app.call_from_thread(self._show, advice, error)
        except RuntimeError:
            pass

    # ------------------------------------------------------------------ the advice

    @guarded
    def _show(self, advice: Optional[Advice], error: Optional[str]) -> None:
        self.computations += 1
        err = self.query_one("#advice-error", Static)
        err.display = error is not None
        field = None
        if error is not None:
            error, field = field_message(error)
        for row in self.query(".field"):
            row.set_class(row.id == f"f-{field}", "invalid")
        if error is not None:
            self.error = error
            err.update(Text.assemble(("✗ ", "bold red"), error))
            # the ranking shown was for the form before this change: not an answer to it
            self.advice = None
            self.query_one("#advice-head", Static).update(
                Text("Fix the form to see the recommendations.", "dim"))
            self.query_one("#advice-cards", Static).update("")
            if error != self._last_error_notified:
                self.notify(error, title="advisor", severity="error", markup=False)
            self._last_error_notified = error
            return
        self.error = None
        self._last_error_notified = None
        self.advice = advice
        r = advice.constraints
        said = []
        for key, value in (("backbone", r.backbone), ("size", r.model_size),
                           ("shots", r.shots if r.shots is not None else "plenty"), ("objects", r.object_size),
                           ("localization", r.localization), ("domain", r.domain), ("shift", r.domain_shift),
                           ("unlabeled", r.unlabeled), ("own pre-train", r.custom_pretrain), ("channels", r.channels)):
            if value is None:
                continue
            said.append(f"{key} {value}")
        # the answer first, as `sslrecipe advise` prints it: the ranked options with the number that decided,
        # why the first leads, why any option outranks a more confident one; then what it was asked
        head: list[Any] = [ranked_table(advice, wide=self.size.width >= 100)]
        why = Text.assemble(("Why 1: ", "bold"), advice.headline)
        for o in advice.recommendations:
            for d in o.departures:
                why.append("\nNote: ", "bold")
                why.append(d)
        head.append(why)
        asked = Text.assemble(("For ", "dim"), ", ".join(said), "\n", ("Evidence weighed: ", "dim"),
                              ", ".join(f"Table {c.table} {c.column} ×{c.weight:g}" for c in advice.active))
        if r.data_facts is not None:
            asked.append("\nData: ", "dim")
            asked.append(r.data_facts.summary())
        head.append(asked)
        self.query_one("#advice-head", Static).update(Group(*head))
        cards = []
        for i, o in enumerate(advice.recommendations, 1):
            cards.append(Text.assemble((f"{i}. {o.label}", "bold cyan" if i == 1 else "bold"), "   confidence ",
                                       (f"{o.level} {o.confidence:.2f}", LEVEL_STYLE.get(o.level, "")),
                                       (f"   score {o.score:.2f}", "dim")))
            cards.append(option_renderable(i, o))
            cards.append(Text(""))
        b = advice.baseline
        cards.append(Text.assemble(("Baseline to beat  ", "bold"), (f"{b.backbone} from scratch", "bold"), "\n",
                                   (b.rationale, "dim")))
        self.query_one("#advice-cards", Static).update(Group(*cards))

    # ------------------------------------------------------------------ actions

    def action_back(self) -> None:
        self.app.pop_screen()

    @guarded
    def action_write(self) -> None:
        if self.advice is None:
            self.notify(self.error or "No advice yet: the form has an error.", severity="warning", markup=False)
            return
        from sslrecipe.tui.dialogs import WriteRecipeDialog

        self.app.push_screen(WriteRecipeDialog(self.advice), self._written)

    @guarded
    def _written(self, result: Optional[tuple[str, bool, list[str]]]) -> None:
        if result is None:
            return
        path, launch, overrides = result
        if launch:
            self.app.launch_recipe(path, overrides)
