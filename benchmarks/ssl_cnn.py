"""Pre-training throughput (images/s) and peak memory of every CNN SSL method on resnet18 and resnet50 at 224 px.

    python benchmarks/ssl_cnn.py [--threads N] [--steps 2] [--methods resim,dino] [--models resnet18,resnet50]

Every (method, model) pair runs in its own subprocess so its peak RSS is its own. A pair builds the method exactly as
the pipeline does (``create_method`` with the method's default options, 1-channel input), makes its views from
synthetic thermal scenes (``sslrecipe.data.synth.render_scene``, 320x256) with ``method.views``, collates them with
``method.collate`` and runs optimizer steps as the training loop does (forward, backward, the optimizer built from
``method.param_groups`` and the method's ``OPTIM_DEFAULTS``, ``after_step``), one untimed warm-up step first.

Reported per pair: ``step_images_per_s`` (model work only: forward + backward + step + after_step),
``views_images_per_s`` (augmentation of one image, single process), ``images_per_s`` (both, as with
``runtime.workers: 0``), ``peak_rss_mb`` (the subprocess's maximum resident set), the batch size and the crops.
Batches: 32 on resnet18 (DINO: 2 x 224 + 6 x 96 crops, the setting of the LightlyTrain comparison in issue 6),
8 on resnet50 (32 would take minutes per step on 2 cores). Writes benchmarks/results/ssl_cnn.json.

The machine's load average is recorded before and after: on a shared machine the numbers are lower bounds.
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
BATCH = {"resnet18": 32, "resnet50": 8}
OPTIONS = {"dino": {"local_crops_number": 6}}  # the comparison setting (official default: 8)


def _one(method_name: str, model: str, steps: int, img_size: int) -> dict:
    import importlib

    import numpy as np
    import torch

    from sslrecipe.data.synth import render_scene
    from sslrecipe.engine.schedules import build_optimizer
    from sslrecipe.recipe.schema import PretrainConfig
    from sslrecipe.ssl.registry import available, create_method

    torch.manual_seed(0)
    spec = available()[method_name]
    method = create_method(method_name, model, 1, img_size, OPTIONS.get(method_name, {}), {})
    module = importlib.import_module(type(method).__module__)
    defaults = dict(getattr(method, "optim_defaults", None) or getattr(module, "OPTIM_DEFAULTS", {}) or {})
    batch_size = BATCH.get(model, 8)
    cfg = PretrainConfig(method=method_name, steps=steps + 1, batch_size=batch_size, **defaults)
    optimizer = build_optimizer(method.param_groups(cfg.weight_decay), cfg, cfg.peak_lr(batch_size))
    images = [torch.from_numpy(render_scene(0, i, 320, 256)[0])[None] for i in range(min(batch_size, 16))]
    method.train()

    def make_batch(step: int):
        t0 = time.perf_counter()
        items = [method.views(images[i % len(images)], np.random.default_rng([step, i])) for i in range(batch_size)]
        batch = method.collate(items)
        return batch, time.perf_counter() - t0

    def run_step(batch, step: int) -> float:
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = method(batch)["loss"]
        loss.backward()
        optimizer.step()
        method.after_step(step, steps + 1)
        return time.perf_counter() - t0

    batch, _ = make_batch(0)
    run_step(batch, 1)  # warm-up (allocations, oneDNN kernels)
    view_s, step_s = 0.0, 0.0
    for s in range(steps):
        batch, dv = make_batch(s + 1)
        view_s += dv
        step_s += run_step(batch, s + 2)
    n = steps * batch_size
    crops = [tuple(t.shape[-2:]) for t in batch] if isinstance(batch, (list, tuple)) and all(
        hasattr(t, "shape") and t.ndim == 4 for t in batch) else None
    return {
        "method": method_name, "model": model, "families": list(spec.families), "img_size": img_size,
        "batch_size": batch_size, "steps_timed": steps, "options": OPTIONS.get(method_name, {}),
        "optimizer": type(optimizer).__name__, "crops": crops if method_name == "dino" else None,
        "threads": torch.get_num_threads(),
        "step_images_per_s": round(n / step_s, 3), "views_images_per_s": round(n / view_s, 2),
        "images_per_s": round(n / (step_s + view_s), 3), "step_s": round(step_s / steps, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS / torch threads (default: torch's choice)")
    ap.add_argument("--steps", type=int, default=2, help="timed optimizer steps per pair (after one warm-up step)")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--methods", default=None, help="comma-separated (default: every method supporting cnn)")
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ssl_cnn.json"))
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(_one(args.one[0], args.one[1], args.steps, args.img_size)))
        return

    from sslrecipe.ssl.registry import available

    methods = args.methods.split(",") if args.methods else sorted(n for n, s in available().items() if "cnn" in s.families)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    load_before = os.getloadavg()
    rows = []
    for model in args.models.split(","):
        for name in methods:
            cmd = [sys.executable, __file__, "--one", name, model, "--steps", str(args.steps), "--img-size", str(args.img_size)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                row = {"method": name, "model": model, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
            else:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {
        "benchmark": "SSL pre-training throughput and peak memory, CNN methods, 1-channel input",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "omp_num_threads": env.get("OMP_NUM_THREADS"), "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                    "note": "shared machine: other workers were running; treat the numbers as lower bounds"},
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
