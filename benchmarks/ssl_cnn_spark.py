"""SparK (and hybrid) pre-training throughput and peak memory on the CPU: resnet18 and resnet50 at 224 px, batch 8.

    python benchmarks/ssl_cnn_spark.py [--threads 2] [--steps 3] [--models resnet18 resnet50] [--methods spark hybrid]

Each measurement runs in its own subprocess (so peak RSS belongs to one configuration): the method is built
with its defaults (mask 0.6, 768-wide decoder, sparse encoder), one warm-up step, then ``--steps`` timed
optimizer steps (forward, backward, LAMB step with SparK's per-iteration schedules, the EMA-free
``after_step``). For context the same backbone is also timed densely (forward + backward of the plain timm
model, no decoder), which is the floor any masked-modeling method pays. Writes
benchmarks/results/ssl_spark.json. The load average is recorded: on a shared machine the numbers are
lower bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(kind: str, model: str, batch: int, size: int, steps: int, threads: int, in_chans: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(batch, in_chans, size, size)
    if kind in ("spark", "hybrid"):
        from timm.optim import Lamb

        from sslrecipe.ssl.registry import create_method

        method = create_method(kind, model, in_chans, size, {}, {})
        method.train()
        opt = Lamb(method.param_groups(0.04), lr=2e-4 * batch / 256, betas=(0.9, 0.95))
        inp = x if kind == "spark" else (x, torch.randn_like(x))  # hybrid: (online view, target view)

        def step(i: int) -> float:
            loss = method(inp)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            method.after_step(i + 1, steps + 1)
            return float(loss.detach())
    else:
        import timm

        net = timm.create_model(model, in_chans=in_chans, num_classes=0)
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)

        def step(i: int) -> float:
            loss = net.forward_features(x).float().pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return float(loss.detach())

    rss_built = _rss_mb()
    load0 = os.getloadavg()[0]
    step(0)  # warm-up
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        loss = step(i)
    seconds = time.perf_counter() - t0
    return {
        "kind": kind, "model": model, "batch": batch, "img_size": size, "in_chans": in_chans, "threads": threads,
        "timed_steps": steps, "s_per_step": round(seconds / steps, 3), "images_per_s": round(batch * steps / seconds, 3),
        "rss_after_build_mb": round(rss_built, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "loadavg_1min_start_end": [round(load0, 2), round(os.getloadavg()[0], 2)], "last_loss": round(loss, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--in-chans", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--methods", nargs="+", default=["spark", "hybrid"], choices=["spark", "hybrid"])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ssl_spark.json"))
    ap.add_argument("--child", nargs=2, metavar=("KIND", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.batch, args.size, args.steps, args.threads, args.in_chans)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO))
    runs = []
    for model in args.models:
        for kind in (*args.methods, "dense_encoder"):
            cmd = [sys.executable, __file__, "--child", kind, model, "--threads", str(args.threads), "--steps", str(args.steps),
                   "--batch", str(args.batch), "--size", str(args.size), "--in-chans", str(args.in_chans)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{kind} {model} failed:\n{proc.stderr[-3000:]}")
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    result = {
        "benchmark": "SparK and hybrid pre-training images/s and peak memory (CPU), defaults: mask 0.6, decoder width 768, "
                     "LAMB; hybrid adds the EMA target encoder and the 1536-256 projector/predictor",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "torch_threads": args.threads},
        "note": "Measured on a shared 2-core machine while other workers were running (see loadavg_1min_start_end per "
                "run): the numbers are lower bounds and vary run to run. 'dense_encoder' is the plain timm backbone, "
                "forward + backward, no decoder: the floor of any masked-modeling method on this backbone.",
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
