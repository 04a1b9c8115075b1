"""Widgets of the run monitor: the stage pipeline and the throttled loss / lr plot."""

from __future__ import annotations

from typing import Optional

from rich.text import Text
from textual.widgets import Static
from textual_plotext import PlotextPlot

from sslrecipe.tui.common import guarded
from sslrecipe.tui.runs import CACHED, DONE, FAILED, INTERRUPTED, PENDING, RUNNING, StageInfo, format_seconds

Points = tuple[list[float], list[float]]

STAGE_LOOK = {
    PENDING: ("○", "dim"),
    RUNNING: ("▶", "bold yellow"),
    CACHED: ("≡", "cyan"),
    DONE: ("✓", "green"),
    FAILED: ("✗", "bold red"),
    INTERRUPTED: ("■", "yellow"),
}


def stage_text(infos: list[StageInfo], compact: bool = False) -> Text:
    """`✓ data 0.4s › ≡ weights cached › ▶ finetune 3/6 › ○ evaluate › ○ report` (compact: no times)."""
    out = Text(no_wrap=False, overflow="fold")
    for i, info in enumerate(infos):
        if i:
            out.append(" › ", "dim")
        glyph, style = STAGE_LOOK.get(info.state, ("?", ""))
        out.append(f"{glyph} ", style)
        out.append(info.name, style if info.state != PENDING else "dim")
        if info.state == DONE:
            detail = "" if compact else format_seconds(info.seconds)
        elif info.state == CACHED:
            detail = "" if compact else "cached"
        elif info.state == RUNNING:
            detail = f"{info.step}/{info.total}" if info.step is not None and info.total else "running"
        elif info.state == INTERRUPTED:
            detail = f"stopped at {info.step}/{info.total}" if info.step is not None and info.total else "stopped"
        elif info.state == FAILED:
            detail = "failed"
        else:
            detail = ""
        if detail:
            out.append(f" {detail}", "dim" if info.state in (DONE, CACHED) else style)
    return out


class StagePipeline(Static):
    """The stages of a run in order, each with its state."""

    infos: list[StageInfo] = []

    def show(self, infos: list[StageInfo]) -> None:
        self.infos = infos
        self._fit()

    def on_resize(self) -> None:
        self._fit()

    def _fit(self) -> None:
        text = stage_text(self.infos)
        if text.cell_len > self.content_size.width > 0:
            text = stage_text(self.infos, compact=True)
        self.update(text)


class LossPlot(PlotextPlot):
    """Loss (left axis) and learning rate (right axis) of one stage.

    Plotext rebuilds the whole chart on every render, which flickers and costs CPU on long runs, so
    new data only marks the plot stale and a timer redraws it at most once per `redraw_every`
    seconds; at most `max_points` points per curve are drawn (the `Series` already caps memory).
    """

    def __init__(self, redraw_every: float = 1.0, max_points: int = 300, **kwargs) -> None:
        super().__init__(**kwargs)
        self.redraw_every = redraw_every
        self.max_points = max_points
        self.stage: Optional[str] = None
        self._loss: Points = ([], [])
        self._lr: Points = ([], [])
        self._version = 0
        self._drawn = -1
        self.draws = 0  # how many times the chart was rebuilt (tests check the throttle)

    def on_mount(self) -> None:
        self._draw()
        self.set_interval(self.redraw_every, self._redraw_if_stale)

    def show(self, stage: Optional[str], loss: Points, lr: Points) -> None:
        """New data (copies of `Series.points()`); drawn on the next tick of the redraw timer."""
        self.stage, self._loss, self._lr = stage, loss, lr
        self._version += 1

    @guarded
    def _redraw_if_stale(self) -> None:
        if self._drawn != self._version:
            self._draw()

    def _thin(self, xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
        if len(xs) <= self.max_points:
            return xs, ys
        step = len(xs) / self.max_points
        idx = sorted({int(i * step) for i in range(self.max_points)} | {len(xs) - 1})
        return [xs[i] for i in idx], [ys[i] for i in idx]

    def _draw(self) -> None:
        self._drawn = self._version
        self.draws += 1
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        xs, ys = self._loss
        if not xs:
            plt.title("loss: waiting for the first training step" if self.stage is None else f"{self.stage}: no steps yet")
            plt.frame(False)
            plt.xticks([])
            plt.yticks([])
            self.refresh()
            return
        xs, ys = self._thin(xs, ys)
        marker = "braille" if len(xs) > 1 else "hd"  # one braille dot is too small to see
        plt.plot(xs, ys, label="loss", color="cyan", marker=marker)
        lx, ly = self._lr
        if lx and max(ly) > 0:
            lx, ly = self._thin(lx, ly)
            plt.plot(lx, ly, label="lr", color="orange", yside="right", marker=marker)
        plt.title(f"{self.stage}: loss {ys[-1]:.4f} at step {xs[-1]:g}")
        plt.xlabel("step")
        self.refresh()
