"""DINO pre-training throughput of sslrecipe and of LightlyTrain, side by side, in one run (issue 6).

    python benchmarks/dino_vs_lightlytrain.py [--threads 2] [--workers 2] [--steps 10] [--warmup 2] [--batch 32]
        [--lightly-python /tmp/ltvenv/bin/python] [--out benchmarks/results/dino_vs_lightlytrain.json]

LightlyTrain is never a project dependency: install it in a separate environment (``python -m venv
--system-site-packages /tmp/ltvenv && /tmp/ltvenv/bin/pip install lightly-train``; it then also sees this
project's torch and editable install) and point ``--lightly-python`` at that interpreter. ``--sides ours`` runs
our side alone when LightlyTrain is not installed.

Same work on both sides: DINO on a randomly initialised ResNet-18 (timm ``resnet18`` for us, torchvision
``resnet18`` for LightlyTrain: the same network), the same head (MLP 512-2048-2048-256, weight-normed last layer
of ``--out-dim`` prototypes, default 65536 on both sides), batch ``--batch`` (32), 2 global crops of ``--img-size``
(224) and ``--local-crops`` (6) local crops of ``--local-size`` (96), crop scales (0.14, 1) / (0.05, 0.14), SGD,
fp32, CPU, ``--threads`` torch threads (and OMP_NUM_THREADS / MKL_NUM_THREADS) in the training process and
``--workers`` DataLoader worker processes. The images: ``warmup + steps + 1`` batches of deterministic RGB PNGs
(``--image-width`` x ``--image-height``, default 640 x 512; each channel a different synthetic scene from
``sslrecipe.data.synth.render_scene``), written once to a temporary folder that both tools read, so each tool runs
exactly one epoch over them (one DataLoader start, no epoch boundary inside the timed window).

Each tool runs in its own subprocess, as a user runs it, with two timestamps per optimizer step added by a hook:

- ours: ``sslrecipe run`` (in-process CLI) of a recipe that only pre-trains (``weights.source: pretrain``,
  ``pretrain.method: dino``, ``data.unlabeled`` = the image folder, ``runtime.workers/threads``) with
  ``--until pretrain``. ``TrainLoop``'s ``loss_fn`` and ``after_step`` are wrapped: *step start* = the loss
  function is entered (the batch has been fetched from the DataLoader), *step end* = ``after_step`` returned
  (forward, backward, per-parameter clipping, optimizer and lr-scheduler step, EMA teacher update done).
  ``runtime.checkpoint_every`` is the total step count, so the only checkpoint is written after the last step
  (LightlyTrain's default checkpoint callback also saves only at the epoch end).
- LightlyTrain: ``lightly_train.pretrain(out, data=<folder>, model="torchvision/resnet18", method="dino",
  method_args={"output_dim": D}, transform_args={"image_size": (G, G), "local_view": {"num_views": L,
  "view_size": (S, S)}}, epochs=1, batch_size=B, num_workers=W, accelerator="cpu", devices=1,
  precision="32-true", seed=0)`` with its default loggers and callbacks; a Lightning callback is appended to the
  trainer's callbacks: *step start* = ``on_train_batch_start`` (batch fetched), *step end* =
  ``on_train_batch_end`` (training step, backward, gradient clipping, optimizer step and lr-scheduler step done).

From those timestamps, per tool (the first ``--warmup`` steps and the one trailing step are not timed):

- ``images_per_s`` (the headline, end to end): ``steps x batch`` / (end of the last timed step - end of the last
  warm-up step). The window holds exactly ``steps`` optimizer steps and ``steps`` batch fetches on both sides
  (Lightning prefetches one batch ahead, which the trailing untimed step balances), so it includes waiting for
  data loading and augmentation in the worker processes, logging and progress output.
- ``step_images_per_s`` (model work only): ``steps x batch`` / sum of (step end - step start).
- ``data_wait_s``: the difference of the two windows (time the training process waited for batches).
- ours also reports ``events_images_per_s``: the same steps' ``images_per_s`` read back from the run's
  ``events.jsonl`` progress events (the loop times the window between two progress events, data loading
  included), as a cross-check of the hook timing.
- ``all_steps_images_per_s``: every image of the run / (end of the last step - start of training), warm-up and
  DataLoader start included.

Also recorded: ``peak_rss_mb`` of each training process (wait4 of the subprocess: the largest single process of
its tree, normally the training process), ``peak_tree_rss_mb`` (the sum of VmRSS of the process and its
DataLoader workers, sampled every second; shared pages count once per process), torch threads seen inside the
training step, wall times, versions of both stacks, the machine's load average before and after, and the date.
Ratios are ours / LightlyTrain. With ``--repeats N`` the two tools alternate N times (ours first in odd repeats)
and the summary takes the median of each figure. The issue's target: at least 1.2 x LightlyTrain's throughput.

Known differences that remain (inherent to each tool, listed in the JSON's ``notes``): LightlyTrain augments
uint8 arrays with albumentations/OpenCV, we augment float tensors with torch; LightlyTrain clips the global
gradient norm to 3, we clip per parameter to 3 (the official DINO); ImageNet vs. our fixed normalisation;
LightlyTrain's default ``output_dim`` for fewer than 20k images would be 1024 (``--out-dim 1024`` to compare at
that size).

On a shared machine the numbers are lower bounds; compare the two tools only within one run. For a smoke test:
``--steps 2 --warmup 1 --batch 4 --img-size 64 --local-size 32 --out-dim 256 --image-width 160
--image-height 128 --out /tmp/dino_smoke.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "dino_vs_lightlytrain.json"

NOTES = [
    "Same on both sides: ResNet-18 from scratch (timm resnet18 / torchvision resnet18, the same network), DINO head "
    "512-2048-2048-256 + weight-normed last layer of out_dim prototypes (g fixed to 1), teacher on the 2 global "
    "crops, student on all crops (one backbone pass per crop size), EMA teacher, SGD, fp32, CPU, batch, crops and "
    "crop scales (global 0.14-1, local 0.05-0.14), flip/color-jitter(0.4,0.4,0.2,0.1 p0.8)/grayscale 0.2/blur "
    "1,0.1,0.5/solarize 0.2 on global 2, torch threads, DataLoader workers, one epoch over the same PNG files.",
    "LightlyTrain augments uint8 HWC arrays with albumentations/OpenCV (cv2.setNumThreads(0)); sslrecipe augments "
    "float CHW tensors with torch (bicubic antialiased resize, a true Gaussian blur). This is part of what is "
    "compared.",
    "Gradient clipping: LightlyTrain clips the global gradient norm to 3.0 (Lightning clip_gradients); sslrecipe "
    "clips every parameter's gradient norm to 3.0 (official DINO utils.clip_gradients).",
    "Last layer during the freeze: LightlyTrain keeps its gradients and steps it with lr 0 for 1250 steps (the whole "
    "benchmark); sslrecipe drops its gradients for 1% of the steps (only the first, warm-up step here).",
    "LightlyTrain resolves output_dim 'auto' to 1024 for datasets under 20k images; both sides here use --out-dim.",
    "Both tools use the DataLoader defaults: prefetch_factor 2, non-persistent workers; worker processes run "
    "torch with 1 thread. Lightning prefetches one batch ahead; the trailing untimed step keeps the number of batch "
    "fetches in the timed window equal on both sides.",
    "Logging inside the timed window: sslrecipe writes one events.jsonl progress line per step (plain console "
    "progress to a log file); LightlyTrain runs its default callbacks (TQDM bar to a log file, lr monitor, early "
    "stopping on train_loss) and loggers (jsonl, tensorboard) as a user gets them. Checkpoints and model export "
    "happen after the timed window on both sides.",
]


# --------------------------------------------------------------------------- shared helpers (stdlib only)


def _thread_env(threads: int) -> dict:
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    return env


def _summarise(starts: dict, ends: dict, t0: float, warmup: int, steps: int, batch: int) -> dict:
    """Throughput from per-step (1-based) start/end timestamps; steps warmup+1 .. warmup+steps are timed."""
    timed = list(range(warmup + 1, warmup + steps + 1))
    need_end = timed + ([warmup] if warmup > 0 else [])
    missing = sorted({s for s in need_end if s not in ends} | {s for s in timed if s not in starts})
    if missing:
        return {"error": f"no timestamps for steps {missing[:5]}"}
    window_start = ends[warmup] if warmup > 0 else t0
    window = ends[timed[-1]] - window_start
    step_s = sum(ends[s] - starts[s] for s in timed)
    last = max(ends)
    n = steps * batch
    return {
        "images_per_s": round(n / window, 4),
        "step_images_per_s": round(n / step_s, 4),
        "s_per_step": round(window / steps, 3),
        "step_s_per_step": round(step_s / steps, 3),
        "data_wait_s": round(window - step_s, 3),
        "all_steps_images_per_s": round(last * batch / (ends[last] - t0), 4),
        "warmup_s": round(window_start - t0, 2),
        "per_step_s": [round(ends[s] - (ends[s - 1] if s > 1 else t0), 3) for s in sorted(ends)],
        "per_step_compute_s": [round(ends[s] - starts[s], 3) for s in sorted(ends) if s in starts],
    }


def _versions(names: list[str]) -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# --------------------------------------------------------------------------- ours (runs in a subprocess)


def side_ours(spec: dict) -> dict:
    import torch

    import sslrecipe.engine.loop as loop_mod
    from sslrecipe.cli import main as cli_main

    torch.set_num_threads(spec["threads"])  # also set by runtime.threads; here for the import-time state
    stamps: dict = {"start": {}, "end": {}, "t0": None, "threads": None}
    orig_init, orig_run = loop_mod.TrainLoop.__init__, loop_mod.TrainLoop.run

    def init(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        if self.s.stage != "pretrain":
            return
        loss_fn, after_step = self.loss_fn, self.after_step
        counter = {"step": 0}

        def timed_loss(model, batch):
            counter["step"] += 1
            stamps["start"].setdefault(counter["step"], time.perf_counter())
            if counter["step"] == 1:
                stamps["crops"] = [list(t.shape[-3:]) for t in batch]
                stamps["batch_size"] = int(batch[0].shape[0])
            return loss_fn(model, batch)

        def timed_after(step, total):
            after_step(step, total)
            stamps["end"][step] = time.perf_counter()
            stamps["threads"] = torch.get_num_threads()

        self.loss_fn, self.after_step = timed_loss, timed_after

    def run(self):
        if self.s.stage == "pretrain":
            stamps["t0"] = time.perf_counter()
        return orig_run(self)

    loop_mod.TrainLoop.__init__, loop_mod.TrainLoop.run = init, run

    run_dir = Path(spec["work"]) / "ours-run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    recipe = _ours_recipe(spec)
    recipe_path = Path(spec["work"]) / "ours-recipe.yaml"
    recipe_path.write_text(json.dumps(recipe, indent=1))  # JSON is YAML
    t_call = time.perf_counter()
    try:
        cli_main.main(args=["run", str(recipe_path), "--run-dir", str(run_dir), "--until", "pretrain",
                            "--progress", "plain"], standalone_mode=False)
    except SystemExit as e:  # click may still exit on usage errors
        if e.code:
            raise
    call_s = time.perf_counter() - t_call
    starts = {int(k): v for k, v in stamps["start"].items()}
    ends = {int(k): v for k, v in stamps["end"].items()}
    result = _summarise(starts, ends, stamps["t0"] or t_call, spec["warmup"], spec["steps"], spec["batch"])
    result.update(_ours_events(run_dir / "events.jsonl", spec))
    result.update({
        "tool": "sslrecipe", "how": "sslrecipe run <recipe> --until pretrain (in-process CLI)", "recipe": recipe,
        "resolved": {"crops": stamps.get("crops"), "batch_size": stamps.get("batch_size")},
        "torch_threads_in_step": stamps["threads"], "run_call_s": round(call_s, 1),
        "steps_run": max(ends) if ends else 0,
        "versions": _versions(["sslrecipe", "torch", "torchvision", "timm", "numpy"]),
    })
    return result


def _ours_recipe(spec: dict) -> dict:
    total = spec["warmup"] + spec["steps"] + 1
    return {
        "name": "dino-vs-lightlytrain",
        "seed": 0,
        # a tiny labeled set only because every recipe has one; pre-training reads data.unlabeled
        "data": {"synthetic": {"images": 10, "width": 96, "height": 96}, "unlabeled": spec["images_dir"],
                 "allow_leakage": True},
        "backbone": {"name": "resnet18", "in_chans": 3},
        "weights": {"source": "pretrain"},
        "pretrain": {
            "method": "dino", "steps": total, "batch_size": spec["batch"], "img_size": spec["img_size"],
            "options": {"dino": {"local_crops_number": spec["local_crops"], "local_crop_size": spec["local_size"],
                                 "out_dim": spec["out_dim"]}},
        },
        "runtime": {"device": "cpu", "precision": "fp32", "workers": spec["workers"], "threads": spec["threads"],
                    "checkpoint_every": total, "progress": "plain"},
    }


def _ours_events(path: Path, spec: dict) -> dict:
    """The timed steps' throughput as the loop itself reports it (progress events' images_per_s)."""
    if not path.is_file():
        return {"events_error": f"{path} not found"}
    progress, stage_s = [], None
    for line in path.read_text().splitlines():
        e = json.loads(line)
        if e.get("stage") != "pretrain":
            continue
        if e["event"] == "progress":
            progress.append(e)
        elif e["event"] == "stage_end":
            stage_s = e.get("seconds")
        elif e["event"] == "error":
            return {"events_error": e.get("message")}
    lo, hi, batch = spec["warmup"], spec["warmup"] + spec["steps"], spec["batch"]
    images, seconds, covered, prev = 0, 0.0, [], 0
    for e in progress:
        step = int(e["step"])
        if prev >= lo and step <= hi and e.get("images_per_s"):
            n = (step - prev) * batch
            images += n
            seconds += n / float(e["images_per_s"])
            covered.append(step)
        prev = step
    out = {"pretrain_stage_s": stage_s, "events_steps": [covered[0], covered[-1]] if covered else None,
           "final_loss": progress[-1]["loss"] if progress else None}
    if images:
        out["events_images_per_s"] = round(images / seconds, 4)
    return out


# --------------------------------------------------------------------------- LightlyTrain (runs in its own venv)


def side_lightly(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    import lightly_train
    from lightly_train._commands import train_helpers
    from pytorch_lightning import Callback

    stamps: dict = {"start": {}, "end": {}, "t0": None, "threads": None, "resolved": {}}

    class StepTimer(Callback):
        def on_train_start(self, trainer, pl_module):
            stamps["t0"] = time.perf_counter()
            try:
                stamps["resolved"] = self._resolved(trainer, pl_module)
            except Exception as e:  # noqa: BLE001 - informational only
                stamps["resolved"] = {"error": repr(e)}

        @staticmethod
        def _resolved(trainer, pl_module) -> dict:
            loader = trainer.train_dataloader
            return {
                "precision": str(trainer.precision), "max_epochs": trainer.max_epochs,
                "estimated_stepping_batches": int(trainer.estimated_stepping_batches),
                "optimizer": type(trainer.optimizers[0]).__name__ if trainer.optimizers else None,
                "output_dim": getattr(pl_module.method_args, "output_dim", None),
                "num_workers": getattr(loader, "num_workers", None),
                "callbacks": [type(c).__name__ for c in trainer.callbacks],
                "loggers": [type(lg).__name__ for lg in trainer.loggers],
            }

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            stamps["start"][batch_idx + 1] = time.perf_counter()
            if batch_idx == 0:
                stamps["resolved"]["crops"] = [list(v.shape[-3:]) for v in batch["views"]]
                stamps["resolved"]["batch_size"] = int(batch["views"][0].shape[0])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            stamps["end"][batch_idx + 1] = time.perf_counter()
            stamps["threads"] = torch.get_num_threads()

    orig_get_trainer = train_helpers.get_trainer

    def get_trainer(**kwargs):  # train.py calls it with keywords only
        kwargs["callbacks"] = list(kwargs["callbacks"]) + [StepTimer()]
        return orig_get_trainer(**kwargs)

    train_helpers.get_trainer = get_trainer
    out = Path(spec["work"]) / "lightly-out"
    if out.exists():  # overwrite=True keeps appending to metrics.jsonl: start every repeat empty
        shutil.rmtree(out)
    args = dict(
        out=str(out), data=spec["images_dir"], model="torchvision/resnet18", method="dino",
        method_args={"output_dim": spec["out_dim"]},
        transform_args={"image_size": (spec["img_size"], spec["img_size"]),
                        "local_view": {"num_views": spec["local_crops"],
                                       "view_size": (spec["local_size"], spec["local_size"])}},
        epochs=1, batch_size=spec["batch"], num_workers=spec["workers"], accelerator="cpu", devices=1,
        precision="32-true", seed=0, overwrite=True,
    )
    t_call = time.perf_counter()
    lightly_train.pretrain(**args)
    call_s = time.perf_counter() - t_call
    starts = {int(k): v for k, v in stamps["start"].items()}
    ends = {int(k): v for k, v in stamps["end"].items()}
    result = _summarise(starts, ends, stamps["t0"] or t_call, spec["warmup"], spec["steps"], spec["batch"])
    result["own_profiling"] = _lightly_profiling(out / "metrics.jsonl")
    result.update({
        "tool": "lightly-train", "how": "lightly_train.pretrain(...) in a fresh process", "arguments": args,
        "resolved": stamps["resolved"], "torch_threads_in_step": stamps["threads"], "pretrain_call_s": round(call_s, 1),
        "steps_run": max(ends) if ends else 0,
        "versions": _versions(["lightly-train", "lightly", "pytorch-lightning", "albumentations",
                               "opencv-python-headless", "opencv-python", "torch", "torchvision", "numpy"]),
    })
    return result


def _lightly_profiling(path: Path) -> list:
    """LightlyTrain's own per-step timing (``profiling/batch_time`` / ``data_time``, logged every
    ``log_every_n_steps`` = min(50, batches per epoch) steps, i.e. only at the last step here): a cross-check of
    the callback's boundaries (``step`` is Lightning's logged step, = the 1-based step - 1)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            e = json.loads(line)
            if "profiling/batch_time" in e:
                rows.append({"step": e.get("step"), "batch_time_s": round(e["profiling/batch_time"], 3),
                             "data_time_s": round(e.get("profiling/data_time", float("nan")), 3)})
    return rows


# --------------------------------------------------------------------------- orchestration


def write_images(folder: Path, count: int, width: int, height: int) -> None:
    import numpy as np
    from PIL import Image

    from sslrecipe.data.synth import render_scene

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        # three different scenes as R, G, B: a colour image (seed 7, unlike the recipe's synthetic labeled set)
        chans = [render_scene(7, 3 * i + c, width, height)[0] for c in range(3)]
        rgb = (np.clip(np.stack(chans, axis=-1), 0, 1) * 255).round().astype(np.uint8)
        Image.fromarray(rgb, "RGB").save(folder / f"img_{i:05d}.png")


def _tree_rss_kb(pid: int) -> int:
    """VmRSS of `pid` and all its descendants (kB)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        stack.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def run_side(side: str, python: str, spec: dict, log: Path) -> dict:
    spec_path = Path(spec["work"]) / f"spec-{side}.json"
    result_path = Path(spec["work"]) / f"result-{side}.json"
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps(dict(spec, result=str(result_path))))
    env = _thread_env(spec["threads"])
    env["LIGHTLY_TRAIN_EVENTS_DISABLED"] = "1"  # no telemetry from the timed process
    env["LIGHTLY_TRAIN_CACHE_DIR"] = str(Path(spec["work"]) / "lightly-cache")
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [python, str(Path(__file__).resolve()), "--side", side, "--spec", str(spec_path)]
    peak_tree = [0]
    t0 = time.perf_counter()
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, cwd=spec["work"])
        done = threading.Event()

        def sample():
            while not done.wait(1.0):
                peak_tree[0] = max(peak_tree[0], _tree_rss_kb(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result_path.is_file():
        tail = log.read_text(errors="replace").splitlines()[-25:]
        return {"tool": side, "error": f"exit code {proc.returncode}", "log_tail": tail, "wall_s": round(wall, 1)}
    result = json.loads(result_path.read_text())
    result["wall_s"] = round(wall, 1)
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
    result["peak_tree_rss_mb"] = round(peak_tree[0] / 1024, 1)
    return result


def _median(rows: list[dict], key: str):
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return round(statistics.median(vals), 4) if vals else None


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return (head + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per tool (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps before them (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads / OMP_NUM_THREADS of both training processes")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes of both tools")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--img-size", type=int, default=224, help="global crop size")
    ap.add_argument("--local-crops", type=int, default=6, help="number of local crops")
    ap.add_argument("--local-size", type=int, default=96, help="local crop size")
    ap.add_argument("--out-dim", type=int, default=65536, help="DINO head prototypes on both sides (LightlyTrain's "
                    "own default below 20k images is 1024)")
    ap.add_argument("--image-width", type=int, default=640, help="width of the generated source images")
    ap.add_argument("--image-height", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=1, help="alternate the two tools this many times")
    ap.add_argument("--sides", default="ours,lightly", help="comma-separated: ours, lightly")
    ap.add_argument("--lightly-python", default="/tmp/ltvenv/bin/python",
                    help="interpreter with lightly-train installed")
    ap.add_argument("--work-dir", default=None,
                    help="keep images, run dirs and logs here (default: a temp dir, removed)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--side", choices=["ours", "lightly"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.side:  # a child process: one tool, one run
        spec = json.loads(Path(args.spec).read_text())
        result = side_ours(spec) if args.side == "ours" else side_lightly(spec)
        Path(spec["result"]).write_text(json.dumps(result))
        return

    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = set(sides) - {"ours", "lightly"}
    if unknown or not sides:
        sys.exit(f"--sides: unknown {sorted(unknown)}; use ours and/or lightly")
    if "lightly" in sides and not Path(args.lightly_python).exists():
        sys.exit(f"--lightly-python {args.lightly_python} not found (pip install lightly-train in a separate venv, "
                 "or run --sides ours)")
    python_for = {"ours": sys.executable, "lightly": args.lightly_python}
    keep = args.work_dir is not None
    work = Path(args.work_dir) if keep else Path(tempfile.mkdtemp(prefix="dino-vs-lt-"))
    work.mkdir(parents=True, exist_ok=True)
    n_images = args.batch * (args.warmup + args.steps + 1)
    spec = {
        "work": str(work.resolve()), "images_dir": str((work / "images").resolve()), "steps": args.steps,
        "warmup": args.warmup, "threads": args.threads, "workers": args.workers, "batch": args.batch,
        "img_size": args.img_size, "local_crops": args.local_crops, "local_size": args.local_size,
        "out_dim": args.out_dim,
    }
    try:
        t0 = time.perf_counter()
        write_images(work / "images", n_images, args.image_width, args.image_height)
        images_s = time.perf_counter() - t0
        load_before = os.getloadavg()
        runs = []
        for r in range(args.repeats):
            order = sides if r % 2 == 0 else sides[::-1]
            for side in order:
                print(f"[repeat {r + 1}/{args.repeats}] {side} ...", flush=True)
                row = run_side(side, python_for[side], spec, work / f"{side}-{r + 1}.log")
                row.update(side=side, repeat=r + 1, loadavg_after=[round(x, 2) for x in os.getloadavg()])
                keys = ("images_per_s", "step_images_per_s", "events_images_per_s", "peak_rss_mb", "wall_s", "error")
                print(json.dumps({k: row[k] for k in ("side",) + keys if k in row}), flush=True)
                runs.append(row)
        load_after = os.getloadavg()
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)

    summary: dict = {}
    for side in sides:
        ok = [r for r in runs if r["side"] == side and "error" not in r]
        keys = ("images_per_s", "step_images_per_s", "events_images_per_s", "all_steps_images_per_s", "data_wait_s",
                "peak_rss_mb", "peak_tree_rss_mb")
        summary[side] = {k: v for k in keys if (v := _median(ok, k)) is not None}
        summary[side]["runs_ok"] = len(ok)
    if set(sides) == {"ours", "lightly"}:
        o, t = summary["ours"], summary["lightly"]
        for key, name in (("images_per_s", "ratio_end_to_end"), ("step_images_per_s", "ratio_step_only"),
                          ("all_steps_images_per_s", "ratio_all_steps")):
            summary[name] = round(o[key] / t[key], 3) if o.get(key) and t.get(key) else None
        summary["target_ratio"] = 1.2
        summary["meets_target"] = None if summary["ratio_end_to_end"] is None else summary["ratio_end_to_end"] >= 1.2

    result = {
        "benchmark": "DINO resnet18 pre-training throughput: sslrecipe vs LightlyTrain, same images, model, batch, "
                     "crops, threads and workers",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "commit": _git_commit(),
        "settings": {
            "model": "resnet18 (random init)", "batch_size": args.batch,
            "crops": [args.img_size] * 2 + [args.local_size] * args.local_crops, "out_dim": args.out_dim,
            "steps_timed": args.steps, "warmup_steps_excluded": args.warmup, "trailing_steps_excluded": 1,
            "images": n_images, "image_size": [args.image_width, args.image_height], "channels": 3,
            "threads": args.threads, "workers": args.workers, "precision": "fp32", "device": "cpu",
            "repeats": args.repeats, "images_written_s": round(images_s, 1),
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in load_after],
                    "note": "loadavg counts this benchmark's own processes too; on a shared machine the numbers are "
                            "lower bounds, and only the two tools within one run compare"},
        "summary": summary,
        "runs": runs,
        "notes": NOTES,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
