"""Faster R-CNN fine-tuning speed and peak memory on this machine: sslrecipe's detector configurations
beside torchvision's default Faster R-CNN configuration on the same backbone and the same data.

    python benchmarks/finetune.py                      # resnet18, resnet50, vit_small at 256 and 512 px
    python benchmarks/finetune.py --backbones resnet18 --sizes 256 --steps 3 --out benchmarks/results/finetune.json

Configurations (same timm encoder instance type, same images and boxes, same batch, AdamW, train mode):

- ``torchvision``: torchvision's defaults for a custom backbone — FrozenBatchNorm (BN statistics and affine
  frozen), the stem and first stage frozen (``trainable_layers=3``), anchors 32..512, RPN 2000/2000
  proposals in training, 512 sampled RoIs per image, FPN width 256, box head 1024.
- ``sslrecipe``: the recipe's defaults — every stage and BatchNorm trainable (the SSL-transfer protocol),
  small anchors, otherwise the same head sizes as torchvision.
- ``sslrecipe-cpu``: the CPU settings of recipes/quickstart.yaml — FPN 128, 128 RoIs per image, RPN
  1000/500 proposals.

Each configuration runs in its own process (clean peak RSS); the first step is a warm-up and is not timed.
With ``--profile``, the top operators of one timed step are recorded (where the time goes).
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
from pathlib import Path

CONFIGS = ("torchvision", "sslrecipe", "sslrecipe-cpu")
TIMM = {"resnet18": "resnet18", "resnet50": "resnet50", "vit_small": "vit_small_patch16_224"}


def _batch(size: int, batch: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, size, size, generator=g))
        n = 12
        xy = torch.rand(n, 2, generator=g) * (size - 40)
        wh = 6 + torch.rand(n, 2, generator=g) * 30  # small objects, as in thermal UAV data
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, 4, (n,), generator=g)})
    return images, targets


def build(config: str, backbone: str, size: int):
    import torch

    from sslrecipe.detect.faster_rcnn import build_faster_rcnn
    from sslrecipe.models.backbone import create_backbone

    torch.manual_seed(0)
    enc = create_backbone(TIMM[backbone], in_chans=3)
    common = dict(num_classes=3, img_size=size, in_chans=3)
    if config == "torchvision":
        # FrozenBatchNorm equivalent + trainable_layers=3 (stem and first stage frozen) + default anchors/sizes
        return build_faster_rcnn(enc, anchor_sizes=(32, 64, 128, 256, 512), norm="frozen_bn",
                                 trainable_stages=None if backbone == "vit_small" else 3,
                                 rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=2000, **common)
    if config == "sslrecipe":
        return build_faster_rcnn(enc, anchor_sizes=(8, 16, 32, 64, 128), **common)
    if config == "sslrecipe-cpu":
        return build_faster_rcnn(enc, anchor_sizes=(8, 16, 32, 64, 128), fpn_channels=128, box_batch_size_per_image=128,
                                 rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500, **common)
    raise ValueError(config)


def run_one(config: str, backbone: str, size: int, batch: int, steps: int, threads: int, profile: bool) -> dict:
    import torch

    torch.set_num_threads(threads)
    model = build(config, backbone, size)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    images, targets = _batch(size, batch)

    def step():
        losses = model(images, targets)
        sum(losses.values()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - t0
    out = {"config": config, "backbone": backbone, "img_size": size, "batch": batch, "steps": steps,
           "images_per_s": round(batch * steps / seconds, 4), "s_per_step": round(seconds / steps, 3),
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "trainable_params_m": round(sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, 2)}
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in rows) or 1
        out["top_ops"] = [{"op": e.key, "self_share": round(e.self_cpu_time_total / total, 3)} for e in rows[:8]]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=list(TIMM), choices=list(TIMM))
    ap.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="record the top operators of one step")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "finetune.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    args = ap.parse_args(argv)
    if args.one:
        config, backbone, size = args.one.split(":")
        print(json.dumps(run_one(config, backbone, int(size), args.batch, args.steps, args.threads, args.profile)))
        return 0
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for backbone in args.backbones:
        for size in args.sizes:
            for config in args.configs:
                cmd = [sys.executable, __file__, "--one", f"{config}:{backbone}:{size}", "--batch", str(args.batch),
                       "--steps", str(args.steps), "--threads", str(args.threads)] + (["--profile"] if args.profile else [])
                res = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if res.returncode:
                    rows.append({"config": config, "backbone": backbone, "img_size": size, "error": res.stderr[-500:]})
                else:
                    rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    for r in rows:  # speed relative to torchvision's default on the same backbone and size
        base = next((b for b in rows if b.get("config") == "torchvision" and b["backbone"] == r["backbone"]
                     and b["img_size"] == r["img_size"] and "images_per_s" in b), None)
        if base and "images_per_s" in r:
            r["speed_vs_torchvision"] = round(r["images_per_s"] / base["images_per_s"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "threads": args.threads, "load_avg_at_end": os.getloadavg()},
           "batch": args.batch, "timed_steps": args.steps, "results": rows}
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
