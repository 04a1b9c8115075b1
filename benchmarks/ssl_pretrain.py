"""Pre-training throughput (images/s) and peak memory of every SSL method of a backbone family at 224 px.

    python benchmarks/ssl_pretrain.py --family cnn [--threads 2] [--steps 2]   # resnet18, resnet50 -> results/ssl_cnn.json
    python benchmarks/ssl_pretrain.py --family vit [--threads 2] [--steps 2]   # vit_tiny, vit_small -> results/ssl_vit.json
    python benchmarks/ssl_pretrain.py --family cnn --methods resim,dino --models resnet18

Every (method, model) pair runs in its own subprocess so its peak RSS is its own. A pair builds the method exactly as
the pipeline does (``create_method`` with the method's default options, 1-channel input), makes its views from
synthetic thermal scenes (``sslrecipe.data.synth.render_scene``, 320x256) with ``method.views``, collates them with
``method.collate`` and runs optimizer steps as the training loop does (forward, backward, the optimizer built from
``method.param_groups`` and the method's official optimizer keys, ``after_step``), one untimed warm-up step first.

A ``dense`` row per model times the plain timm encoder's forward + backward + AdamW step on full 224-px images at
the same batch: the cost of one dense pass. ``vs_dense`` = the method's step time / the dense step time (MAE's
encoder sees a quarter of the tokens, so its step should cost well under a dense pass). MAE rows add ``encoder_s``
(forward + backward of the encoder alone on the visible tokens), ``forward_backward_s`` (the whole model, no optimizer
step) and ``encoder_vs_dense``: the split shows where the rest goes (the decoder runs on every token).

Reported per pair: ``step_images_per_s`` (model work only: forward + backward + step + after_step),
``views_images_per_s`` (augmentation of one image, single process), ``images_per_s`` (both, as with
``runtime.workers: 0``), ``peak_rss_mb`` (the subprocess's maximum resident set), the batch size and the crops.
Batches: 32 on resnet18 and vit_tiny, 16 on vit_small, 8 on resnet50 (32 would take minutes per step on 2
cores). DINO on CNNs uses 2 x 224 + 6 x 96 crops (the setting of the LightlyTrain comparison in issue 6), on
ViTs the official 2 x 224 + 8 x 96. The machine's load average is recorded before and after: on a shared
machine the numbers are lower bounds.
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
BATCH = {"resnet18": 32, "resnet50": 8, "vit_tiny_patch16_224": 32, "vit_small_patch16_224": 16}
MODELS = {"cnn": "resnet18,resnet50", "vit": "vit_tiny_patch16_224,vit_small_patch16_224"}
OPTIONS = {("dino", "cnn"): {"local_crops_number": 6}}  # the comparison setting (official default: 8)


def _options(method_name: str, model: str) -> dict:
    from sslrecipe.ssl.registry import backbone_family

    return OPTIONS.get((method_name, backbone_family(model)), {})


def _dense(model: str, steps: int, img_size: int) -> dict:
    """The plain encoder: forward + backward + AdamW step on full images (the cost of one dense pass)."""
    import torch

    from sslrecipe.models.backbone import create_backbone

    torch.manual_seed(0)
    net = create_backbone(model, in_chans=1, **({"img_size": img_size} if model.startswith("vit") else {}))
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    batch_size = BATCH.get(model, 8)
    x = torch.randn(batch_size, 1, img_size, img_size)

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = net.forward_features(x)
        out.float().pow(2).mean().backward()
        opt.step()
        return time.perf_counter() - t0

    step()
    total = sum(step() for _ in range(steps))
    return {"method": "dense", "model": model, "img_size": img_size, "batch_size": batch_size, "steps_timed": steps,
            "threads": torch.get_num_threads(), "step_images_per_s": round(steps * batch_size / total, 3),
            "step_s": round(total / steps, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


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
    method = create_method(method_name, model, 1, img_size, _options(method_name, model), {})
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
    split = _mae_encoder_split(method, batch, steps) if hasattr(method, "forward_encoder") else {}
    crops = [tuple(t.shape[-2:]) for t in batch if getattr(t, "ndim", 0) == 4] if isinstance(batch, (list, tuple)) else None
    return {
        "method": method_name, "model": model, "families": list(spec.families), "img_size": img_size,
        "batch_size": batch_size, "steps_timed": steps, "options": _options(method_name, model),
        "optimizer": type(optimizer).__name__, "crops": crops if method_name in ("dino", "leopart") else None,
        "threads": torch.get_num_threads(),
        "step_images_per_s": round(n / step_s, 3), "views_images_per_s": round(n / view_s, 2),
        "images_per_s": round(n / (step_s + view_s), 3), "step_s": round(step_s / steps, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        **split,
    }


def _mae_encoder_split(method, batch, steps: int) -> dict:
    """MAE's step split: forward + backward of the encoder alone on the visible tokens (``encoder_s``) and of the whole
    model (``forward_backward_s``); the difference is the decoder on every token plus the loss."""

    def timed(fn) -> float:
        fn()  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        return (time.perf_counter() - t0) / steps

    def encoder_only():
        latent = method.forward_encoder(batch)[0]
        latent.float().pow(2).mean().backward()

    def whole():
        method(batch)["loss"].backward()

    enc, full = timed(encoder_only), timed(whole)
    method.zero_grad(set_to_none=True)
    return {"encoder_s": round(enc, 2), "forward_backward_s": round(full, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS / torch threads (default: torch's choice)")
    ap.add_argument("--steps", type=int, default=2, help="timed optimizer steps per pair (after one warm-up step)")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--family", choices=("cnn", "vit"), default="cnn")
    ap.add_argument("--methods", default=None, help="comma-separated (default: every method supporting the family)")
    ap.add_argument("--models", default=None, help="comma-separated timm names (default: the family's two)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense forward-backward reference row")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/ssl_<family>.json")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.one:
        if args.one[0] == "dense":
            print(json.dumps(_dense(args.one[1], args.steps, args.img_size)))
        else:
            print(json.dumps(_one(args.one[0], args.one[1], args.steps, args.img_size)))
        return

    from sslrecipe.ssl.registry import available

    methods = args.methods.split(",") if args.methods else sorted(n for n, s in available().items() if args.family in s.families)
    if not args.no_dense:
        methods = ["dense"] + methods
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    load_before = os.getloadavg()
    rows = []
    for model in (args.models or MODELS[args.family]).split(","):
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
    for row in rows:
        dense = next((r for r in rows if r["method"] == "dense" and r["model"] == row["model"] and "step_s" in r), None)
        if dense and row["method"] != "dense" and "step_s" in row:
            row["vs_dense"] = round(row["step_s"] / dense["step_s"], 2)
            if "encoder_s" in row:
                row["encoder_vs_dense"] = round(row["encoder_s"] / dense["step_s"], 2)
    result = {
        "benchmark": f"SSL pre-training throughput and peak memory, {args.family.upper()} methods, 1-channel input",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "omp_num_threads": env.get("OMP_NUM_THREADS"), "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                    "note": "a load average above the thread count means other work ran: treat the numbers as lower bounds"},
        "results": rows,
    }
    out = Path(args.out or REPO / "benchmarks" / "results" / f"ssl_{args.family}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
