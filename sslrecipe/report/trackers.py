"""Experiment trackers (`report.loggers`): mirror a run's `progress` and `metric` events to TensorBoard and MLflow.

Each tracker is an event listener (see `sslrecipe.engine.events`). It opens its writer on the first event, so
nothing is written before the run directory is held. A tracker that fails mid-run leaves one `warning` event and
stops; the run goes on (RUN/events.jsonl stays the record)."""

from __future__ import annotations

import importlib
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Optional

from sslrecipe.errors import RecipeError

# report.loggers entry -> (the module it needs, the extra that installs it)
EXTRAS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}
_PARAM_MAX = 500  # the shortest value length MLflow's stores accept


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def progress_scalars(record: dict) -> dict[str, float]:
    """A progress event's scalars, tagged `STAGE/loss`, `STAGE/losses/PART` (not under `loss/`: MLflow's file store keeps a metric as a file), `STAGE/lr`, `STAGE/images_per_s`."""
    stage = record.get("stage") or "run"
    scalars = {f"{stage}/{key}": record.get(key) for key in ("loss", "lr", "images_per_s")}
    for part, value in (record.get("losses") or {}).items():
        scalars[f"{stage}/losses/{part}"] = value
    return {k: v for k, v in ((k, _number(v)) for k, v in scalars.items()) if v is not None}


def metric_scalar(record: dict) -> Optional[tuple[str, float]]:
    """A metric event as (`STAGE/NAME`, value); None for the non-numeric ones (split sizes, sources)."""
    value = _number(record.get("value"))
    name = str(record.get("name"))
    if value is None:
        return None
    stage = record.get("stage")
    return (name if not stage or name.startswith(f"{stage}/") else f"{stage}/{name}"), value


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """A nested recipe dump as `a.b.c` -> value strings (MLflow params)."""
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: str(data)[:_PARAM_MAX]}


def mlflow_key(tag: str) -> str:
    """A tag as an MLflow metric key (letters, digits, `_-. /`): `evaluate/bbox/AP@0.05` -> `evaluate/bbox/AP_0.05`."""
    return re.sub(r"[^\w\-. /]", "_", tag)


class Tracker:
    """Base listener: routes events to `start`/`scalars`/`close`; disables itself on the first failure."""

    name = ""

    def __init__(self, run_dir: Path, recipe):
        self.run_dir = Path(run_dir)
        self.recipe = recipe
        self.events = None  # the EventLog, for the one warning (set by EventLog.subscribe)
        self.disabled = False
        self.started = False

    def attach(self, events) -> None:
        self.events = events

    def __call__(self, record: dict) -> None:
        if self.disabled:
            return
        try:
            if not self.started:
                self.started = True
                self.start()
            event = record.get("event")
            if event == "progress":
                step = int(record.get("step") or 0)
                self.scalars(progress_scalars(record), step)
            elif event == "metric":
                found = metric_scalar(record)
                if found:
                    self.scalars(dict([found]), 0)
            elif event == "run_end":
                self.close(record.get("status") or "finished")
        except Exception as e:  # a tracker is a mirror: its failure must not end the run
            self.disabled = True
            if self.events is not None:
                self.events.emit("warning", record.get("stage"),
                                 message=f"report.loggers: {self.name} failed ({type(e).__name__}: {e}); "
                                         f"it is off for the rest of this run (RUN/events.jsonl has everything)")

    def start(self) -> None:
        raise NotImplementedError

    def scalars(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self, status: str = "finished") -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    """Event files under RUN/tensorboard/ (`tensorboard --logdir RUN/tensorboard`)."""

    name = "tensorboard"

    def start(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self, status: str = "finished") -> None:
        if self.started and not self.disabled and hasattr(self, "writer"):
            self.writer.close()
            self.disabled = True  # closed: later events (none) are ignored


class MLflowTracker(Tracker):
    """One MLflow run per sslrecipe run, in the experiment named after the recipe; the store is
    MLFLOW_TRACKING_URI when set, else a local file store in RUN/mlruns/
    (`MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri RUN/mlruns`)."""

    name = "mlflow"
    _STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}

    def tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or (self.run_dir / "mlruns").resolve().as_uri()

    def start(self) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = self.tracking_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store (what needs no server or database) only on this opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(self.recipe.name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(self.recipe.name)
        run = self.client.create_run(experiment_id, run_name=self.run_dir.name,
                                     tags={"sslrecipe.run_dir": str(self.run_dir.resolve())})
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in flatten(self.recipe.model_dump(mode="json")).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(tag), value, now, step) for tag, value in values.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: str = "finished") -> None:
        if self.started and not self.disabled and hasattr(self, "run_id"):
            self.client.set_terminated(self.run_id, self._STATUS.get(status, "FINISHED"))
            self.disabled = True


TRACKERS = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker}


def check_trackers(recipe) -> None:
    """Before any stage: every logger's library imports, else one error naming the extra to install."""
    for name in recipe.report.loggers:
        module, extra = EXTRAS[name]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise RecipeError(f"report.loggers lists {name}, but its library is not installed ({e}): "
                              f"pip install 'sslrecipe[{extra}]', or remove {name} from report.loggers") from e


def build_trackers(recipe, run_dir: Path) -> list[Tracker]:
    """The listeners for `recipe.report.loggers` (none by default); `check_trackers` first."""
    check_trackers(recipe)
    return [TRACKERS[name](run_dir, recipe) for name in recipe.report.loggers]
