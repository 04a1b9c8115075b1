"""The one training loop, used by SSL pre-training and detector fine-tuning alike.

What it owns: device placement, autocast precision, gradient accumulation, clipping, the lr
schedule, deterministic data order, periodic atomic checkpoints, resume from the last checkpoint
on the same trajectory, a non-finite-loss guard, graceful Ctrl-C, and `progress` events.

What the caller provides: the model, its parameter groups, a `loss_fn(model, batch) -> dict`
(with the total under "loss"), a dataset whose items are addressed by `(index, sample_seed)` so
augmentation never depends on worker processes or the global RNG, and optional `after_step`
(EMA teachers, temperature schedules, queues live there).

Resume is exact: the data order is a function of (seed, epoch), each sample's augmentation a
function of its sample seed, and the global RNG (used by the model, e.g. random masking or the
RPN's sampler) is restored from the checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from sslrecipe.engine.checkpoint import (
    check_checkpoint, load_checkpoint, non_finite_tensors, quarantine, rng_state, save_checkpoint, set_rng_state,
    unreadable_reason,
)
from sslrecipe.engine.events import EventLog
from sslrecipe.engine.schedules import build_optimizer, build_scheduler
from sslrecipe.errors import StageError
from sslrecipe.recipe.schema import OptimConfig
from sslrecipe.signals import DeferredInterrupt, Interrupted, stop_requested

CHECKPOINT_NAME = "checkpoint.pt"


class EpochBatchSampler(Sampler):
    """Batches of `(index, sample_seed)`: a seeded permutation per epoch, optionally starting mid-epoch."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start_batch: int = 0, drop_last: bool = False):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.start_batch, self.drop_last = start_batch, drop_last

    def batches(self) -> list[list[tuple[int, int]]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n)
        seeds = rng.integers(0, 2**31 - 1, size=self.n)
        out = []
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            out.append([(int(i), int(seeds[b * self.batch_size + j])) for j, i in enumerate(idx)])
        return out[self.start_batch :]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)


def batches_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    return len(EpochBatchSampler(n, batch_size, 0, 0, drop_last=drop_last))


@dataclass
class LoopSettings:
    stage: str
    stage_dir: Path
    stage_hash: str
    optim: OptimConfig
    batch_size: int
    total_steps: int
    seed: int
    device: torch.device
    precision: str = "fp32"  # fp32 | bf16 | fp16
    workers: int = 0
    checkpoint_every: int = 50
    drop_last: bool = False
    collate_fn: Optional[Callable] = None
    peak_lr: Optional[float] = None  # default: optim.peak_lr(batch_size)
    # the stages that run after this one, for the whole-run ETA: (name, planned training images or None when not
    # known in advance); `planned_later` in stages.py builds it
    later: tuple[tuple[str, Optional[int]], ...] = ()


@dataclass
class LoopResult:
    steps: int
    resumed_from: Optional[int]
    last_loss: float
    history: list[dict[str, Any]] = field(default_factory=list)


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def _count_images(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    if isinstance(first, torch.Tensor):
        return int(first.shape[0])
    if isinstance(first, (list, tuple)):
        inner = first[0] if first and isinstance(first[0], (list, tuple)) else first
        return len(inner)
    return 1


class TrainLoop:
    def __init__(
        self,
        settings: LoopSettings,
        model: nn.Module,
        param_groups: Sequence[dict],
        dataset,
        loss_fn: Callable[[nn.Module, Any], dict[str, torch.Tensor]],
        events: EventLog,
        after_step: Optional[Callable[[int, int], None]] = None,
    ):
        self.s = settings
        self.model = model.to(settings.device)
        self.dataset = dataset
        self.loss_fn = loss_fn
        self.events = events
        self.after_step = after_step
        lr = settings.peak_lr if settings.peak_lr is not None else settings.optim.peak_lr(settings.batch_size)
        self.optimizer = build_optimizer(param_groups, settings.optim, lr)
        self.scheduler = build_scheduler(self.optimizer, settings.total_steps, settings.optim)
        use_scaler = settings.precision == "fp16" and settings.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.checkpoint_path = Path(settings.stage_dir) / CHECKPOINT_NAME
        self.saved_step: Optional[int] = None  # the step of the checkpoint on disk (always one with finite weights)
        self.batches_per_epoch = batches_per_epoch(len(dataset), settings.batch_size, settings.drop_last)
        if self.batches_per_epoch == 0:
            raise StageError(
                f"{settings.stage}: {len(dataset)} images is fewer than one batch of {settings.batch_size}; "
                f"lower {settings.stage}.batch_size or add images"
            )

    # ------------------------------------------------------------------ data
    def _batches_from(self, batch_index: int) -> Iterator[tuple[int, Any]]:
        """Yield (global batch index, batch) starting at `batch_index`, across epochs, forever."""
        while True:
            epoch, start = divmod(batch_index, self.batches_per_epoch)
            sampler = EpochBatchSampler(len(self.dataset), self.s.batch_size, self.s.seed, epoch, start, self.s.drop_last)
            loader = DataLoader(
                self.dataset,
                batch_sampler=sampler,
                num_workers=self.s.workers,
                collate_fn=self.s.collate_fn,
                # a private generator: creating loader iterators must not consume the global RNG
                generator=torch.Generator().manual_seed(self.s.seed + epoch),
                persistent_workers=False,
                pin_memory=self.s.device.type == "cuda",
            )
            for batch in loader:
                yield batch_index, batch
                batch_index += 1

    def _autocast(self):
        if self.s.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.s.precision == "bf16" else torch.float16
            return torch.autocast(self.s.device.type, dtype=dtype)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ checkpoints
    def _save(self, step: int) -> None:
        # a step can leave NaN weights behind a finite loss (the loss shows it one step later): such weights are
        # never written, so the checkpoint kept on disk is always one that can be resumed
        bad = non_finite_tensors(self.model.state_dict())
        if bad:
            self._stop_non_finite(step, f"non-finite weights after step {step} ({len(bad)} tensors, e.g. {bad[0]})")
        try:
            save_checkpoint(
                self.checkpoint_path,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                scaler=self.scaler,
                step=step,
                stage_hash=self.s.stage_hash,
            )
        except DeferredInterrupt:  # a second Ctrl-C waited for this write, which completed
            self.saved_step = step
            raise
        self.saved_step = step

    def _resume(self) -> int:
        if not self.checkpoint_path.is_file():
            return 0
        try:
            state = load_checkpoint(self.checkpoint_path)
        except Exception as e:  # torn, truncated, not a checkpoint at all, or a pickle that is not weights-only
            return self._set_aside(unreadable_reason(e))
        if isinstance(state, dict) and "stage_hash" in state and state["stage_hash"] != self.s.stage_hash:
            self.events.emit("warning", self.s.stage, message=f"ignoring {self.checkpoint_path}: it belongs to another configuration")
            return 0
        # resuming is all or nothing: a checkpoint that fails half-way leaves the stage exactly as a fresh start
        before = self._snapshot()
        try:
            check_checkpoint(state)
            bad = non_finite_tensors(state["model"])
            if bad:
                raise ValueError(f"its weights are not finite ({bad[0]})")
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
        except Exception as e:
            self._restore(before)
            if not isinstance(e, ValueError):  # e.g. load_state_dict's "Error(s) in loading ...: size mismatch for ..."
                lines = [line.strip() for line in str(e).splitlines() if line.strip()]
                e = f"it does not fit this stage ({' '.join(lines[:2])[:300]})"
            return self._set_aside(str(e))
        step = int(state["step"])
        self.saved_step = step
        self.events.emit("resume", self.s.stage, step=step, checkpoint=str(self.checkpoint_path),
                         message=f"resuming {self.s.stage} from step {step}")
        return step

    def _snapshot(self) -> dict[str, Any]:
        return {
            "model": {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scheduler": copy.deepcopy(self.scheduler.state_dict()),
            "scaler": copy.deepcopy(self.scaler.state_dict()) if self.scaler is not None else None,
            "rng": rng_state(),
        }

    def _restore(self, snap: dict[str, Any]) -> None:
        self.model.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        self.scheduler.load_state_dict(snap["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(snap["scaler"])
        set_rng_state(snap["rng"])

    def _set_aside(self, reason: str) -> int:
        """An unusable checkpoint: keep it as `checkpoint.pt.corrupt`, say so, and start the stage from step 0."""
        dest = quarantine(self.checkpoint_path)
        self.events.emit("warning", self.s.stage, message=(
            f"{self.checkpoint_path} could not be resumed ({reason}); moved it aside to {dest} and restarting "
            f"{self.s.stage} from step 0"))
        return 0

    # ------------------------------------------------------------------ the loop
    def run(self) -> LoopResult:
        s = self.s
        step = self._resume()
        resumed_from = step if step > 0 else None
        accumulate = s.optim.accumulate
        self.model.train()
        last_loss = float("nan")
        window_images, window_start = 0, time.perf_counter()
        started, steps_at_start, images_since_start = time.perf_counter(), step, 0
        epochs = math.ceil(s.total_steps * accumulate / self.batches_per_epoch)
        batches = self._batches_from(step * accumulate)
        history: list[dict[str, Any]] = []
        try:
            while step < s.total_steps:
                self.optimizer.zero_grad(set_to_none=True)
                parts_sum: dict[str, float] = {}
                images = 0
                for _ in range(accumulate):
                    batch_index, batch = next(batches)
                    images += _count_images(batch)
                    batch = to_device(batch, s.device)
                    with self._autocast():
                        losses = self.loss_fn(self.model, batch)
                    loss = losses["loss"]
                    if not torch.isfinite(loss.detach()).all():
                        self._non_finite(step, losses)
                    loss = loss / accumulate
                    if self.scaler is not None:
                        self.scaler.scale(loss).backward()
                    else:
                        loss.backward()
                    for k, v in losses.items():
                        parts_sum[k] = parts_sum.get(k, 0.0) + float(v.detach()) / accumulate
                if s.optim.clip_grad is not None:
                    if self.scaler is not None:
                        self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.optim.clip_grad)
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                # read after the step: a method's optimizer pre-step hook (SparK's official lr) may have set it
                lr = self.optimizer.param_groups[0]["lr"]
                self.scheduler.step()
                step += 1
                if self.after_step is not None:
                    self.after_step(step, s.total_steps)
                last_loss = parts_sum["loss"]
                window_images += images
                images_since_start += images
                now = time.perf_counter()
                if step == s.total_steps or step % max(1, min(10, s.total_steps // 50 or 1)) == 0 or now - window_start > 5:
                    ips = window_images / max(now - window_start, 1e-9)
                    rate = (step - steps_at_start) / max(now - started, 1e-9)
                    eta = (s.total_steps - step) / max(rate, 1e-9)
                    record = self.events.emit(
                        "progress", s.stage, step=step, total=s.total_steps, epoch=(step * accumulate - 1) // self.batches_per_epoch,
                        epochs=epochs, loss=last_loss, losses={k: v for k, v in parts_sum.items() if k != "loss"}, lr=lr,
                        images_per_s=round(ips, 2), eta_s=round(eta, 1),
                        **run_eta(eta, (now - started) / max(images_since_start, 1), s.later),
                    )
                    history.append(record)
                    window_images, window_start = 0, now
                stopping = stop_requested() and step < s.total_steps
                if stopping or step % s.checkpoint_every == 0 or step == s.total_steps:
                    self._save(step)
                if stopping:
                    raise Interrupted(s.stage, step)
        except KeyboardInterrupt:
            # a second Ctrl-C: abort now; the last checkpoint written stays the resume point
            # (when the abort waited for the checkpoint of this very step, nothing was lost: a plain interruption)
            raise Interrupted(s.stage, step, self.saved_step, aborted=self.saved_step != step) from None
        return LoopResult(step, resumed_from, last_loss, history)

    def _non_finite(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        parts = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
        self._stop_non_finite(step, f"non-finite loss at step {step + 1} ({parts})")

    def _stop_non_finite(self, step: int, what: str) -> None:
        kept = (f"the last good checkpoint ({self.checkpoint_path}, step {self.saved_step}, finite weights) is kept"
                if self.saved_step is not None else "no checkpoint had been written yet")
        message = (
            f"{self.s.stage}: {what}; stopping. {kept}. "
            f"Lower {self.s.stage}.lr / blr, set {self.s.stage}.clip_grad, or use precision fp32."
        )
        raise StageError(message)  # the pipeline records it as an `error` event


def run_eta(stage_eta: float, seconds_per_image: float, later: Sequence[tuple[str, Optional[int]]]) -> dict[str, Any]:
    """The whole-run ETA fields of a progress event: this stage's ETA plus, for each later training stage whose
    planned images are known, those images at this stage's measured seconds per image (a rough figure: a detector
    and a pre-training method differ in cost per image; the later stage's own ETA replaces it once it starts).
    Later stages with no planned images (evaluate, YOLO, tiled fine-tuning) are named in `run_eta_excludes` and
    not counted; `weights` and `report` take seconds and are left out. `run_eta_s` is null when nothing is measured."""
    covers, excludes, total = [], [], stage_eta
    for name, images in later:
        if name in ("weights", "report"):
            continue
        if images is None:
            excludes.append(name)
        else:
            covers.append(name)
            total += images * seconds_per_image
    finite = math.isfinite(total)
    return {"run_eta_s": round(total, 1) if finite else None, "run_eta_covers": covers if finite else [],
            "run_eta_excludes": excludes}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise StageError("runtime.device is 'cuda' but no CUDA device is available; use runtime.device: auto or cpu")
    if name == "mps" and not _mps_available():
        raise StageError("runtime.device is 'mps' but this torch has no usable Apple GPU (MPS); use runtime.device: auto or cpu")
    return torch.device(name)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        if name in ("bf16", "fp16") and device.type == "cpu" and name == "fp16":
            raise StageError("runtime.precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"
