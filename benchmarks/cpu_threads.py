"""Seconds per training step on this CPU by OpenMP wait policy, torch threads and DataLoader workers, quiet and
loaded.

    OMP_WAIT_POLICY=... is set per cell by this script; run it on an otherwise quiet machine:
    python benchmarks/cpu_threads.py [--steps 6] [--out benchmarks/results/cpu_threads.json]

Each cell runs the quickstart recipe's pre-training (ReSim, ResNet-18, batch 16 at 96 px) and fine-tuning
(Faster R-CNN, batch 4 at 320 px) for `--steps` steps each in a fresh process, through the library (not the
CLI, which would choose the wait policy itself), and times the steps after the first from the `progress`
events (data loading included, as a user waits for it). "loaded" runs one other 2-thread training job beside
it (a timm ResNet-18 forward + backward loop, batch 8 at 128 px) with the same wait policy, as when two runs
share the machine. The data stage is prepared once and copied into each cell's run directory.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "quickstart.yaml"

CELL = """
import sys, json
from sslrecipe.engine.runner import run_recipe
run_recipe(sys.argv[1], json.loads(sys.argv[2]), run_dir=sys.argv[3], until="finetune", progress="off")
"""

LOAD = """
import torch, timm
torch.manual_seed(0)
m = timm.create_model("resnet18", num_classes=10)
opt = torch.optim.SGD(m.parameters(), lr=0.01)
x, y = torch.randn(8, 3, 128, 128), torch.randint(0, 10, (8,))
while True:
    opt.zero_grad(); torch.nn.functional.cross_entropy(m(x), y).backward(); opt.step()
"""


def env_for(policy: str, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env["OMP_NUM_THREADS"] = str(threads)
    if policy != "unset":
        env["OMP_WAIT_POLICY"] = policy
    return env


def step_seconds(events: Path) -> dict[str, float]:
    """Mean seconds per step after the first, per stage, from the progress events' timestamps."""
    ts: dict[str, list[float]] = {}
    for line in events.read_text().splitlines():
        e = json.loads(line)
        if e["event"] == "progress":
            ts.setdefault(e["stage"], []).append(e["ts"])
    return {stage: round((t[-1] - t[0]) / (len(t) - 1), 3) for stage, t in ts.items() if len(t) > 1}


def prepare(tmp: Path, steps: int) -> tuple[Path, list[str]]:
    overrides = [f"pretrain.steps={steps}", f"finetune.steps={steps}", "finetune.epochs=null",
                 "runtime.checkpoint_every=1000", "finetune.warmup_steps=0"]
    base = tmp / "base"
    subprocess.run([sys.executable, "-c", CELL, str(RECIPE), json.dumps(overrides + ["runtime.threads=2"]), str(base)],
                   check=True, env=env_for("PASSIVE", 2))
    return base, overrides


def run_cell(base: Path, overrides: list[str], tmp: Path, policy: str, threads: int, workers: int, loaded: bool) -> dict:
    cell = tmp / f"{policy}-{threads}-{workers}-{int(loaded)}"
    cell.mkdir()
    for data_dir in base.glob("data-*"):
        shutil.copytree(data_dir, cell / data_dir.name)
    load = subprocess.Popen([sys.executable, "-c", LOAD], env=env_for(policy, 2)) if loaded else None
    try:
        if load:
            time.sleep(3)  # let the other job reach its loop
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", CELL, str(RECIPE),
                        json.dumps(overrides + [f"runtime.threads={threads}", f"runtime.workers={workers}"]), str(cell)],
                       check=True, env=env_for(policy, threads), capture_output=True)
        wall = time.perf_counter() - t0
    finally:
        if load:
            load.kill()
            load.wait()
    return {"policy": policy, "threads": threads, "workers": workers, "loaded": loaded,
            "step_s": step_seconds(cell / "events.jsonl"), "cell_wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--policies", default="unset,PASSIVE")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--workers", default="0,1")
    ap.add_argument("--loads", default="quiet,loaded")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cpu_threads.json"))
    args = ap.parse_args()
    cells = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base, overrides = prepare(tmp, args.steps)
        grid = itertools.product(args.loads.split(","), args.policies.split(","),
                                 [int(t) for t in args.threads.split(",")], [int(w) for w in args.workers.split(",")])
        for load, policy, threads, workers in grid:
            result = run_cell(base, overrides, tmp, policy, threads, workers, load == "loaded")
            print(json.dumps(result), flush=True)
            cells.append(result)
    out = {
        "benchmark": "seconds per step: quickstart ReSim pre-training and Faster R-CNN fine-tuning steps",
        "command": "python benchmarks/cpu_threads.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "platform": platform.platform()},
        "steps": args.steps,
        "cells": cells,
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
