"""Learning probe for one SSL method: does a pre-training make the encoder better than its random init, and better
than the same pre-training on images without the structure the probe asks about (a control)?

    python benchmarks/ssl_probe.py --method dino --model resnet18 --timm-kwargs '{"channels": [16, 32, 64, 128], "stem_width": 16}' \
        --steps 300 --options '{"out_dim": 1024, "hidden_dim": 256, "bottleneck_dim": 64, "local_crops_number": 4}'
    python benchmarks/ssl_probe.py --method mae --model vit_tiny_patch16_224 --steps 2000 --device cuda

The learning tests of MAE, SparK and the hybrid call this module's functions at a size that fits the test suite.
DINO needs about 1000 steps on this task (8 minutes on 2 CPU cores) and Leopart was not seen to gain at 300: for
them this harness is the place to measure, with more compute (see docs/results.md, "Learning probes").

The proxy task: 64-px single-channel images of stripes labelled by orientation (horizontal, vertical, diagonal; the
two diagonals are one class because every method's views flip horizontally). Brightness, contrast, period and
phase are random and carry no label, so a feature that ignores them and keeps the orientation was learned from the
images' structure. The control pre-trains on Gaussian noise images with the same brightness and contrast
statistics and no stripes, same seed, same steps: a gain that the control matches is not learned from the data.

Each pre-training runs through ``TrainLoop`` exactly as ``sslrecipe run`` drives it (the method's views, collate,
``after_step``, AdamW with the loop's warm-up and cosine schedule). The probe is a cosine k-NN (k = 10, majority vote)
on frozen, eval-mode encoder features standardised with the probe's training set (which gives a random encoder its
best chance), 300 labelled training and 300 test images; BatchNorm statistics of every encoder are first
re-estimated on the training images, so a random init is not judged with its 0/1 statistics. Features: timm's pooled pre-logits (CLS token for ViTs,
average pool for CNNs); ``--pool avg`` averages a ViT's patch tokens instead (the default for MAE, whose CLS token is
not trained by its loss). Writes JSON (``--out``) with the three accuracies and the loss trajectory.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ORIENTATIONS = ((0.0,), (90.0,), (45.0, 135.0))  # class -> angles (degrees) of the stripes' normal


def stripe_images(n: int, size: int = 64, seed: int = 0, control: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (n, 1, size, size) in [0, 1] and their orientation labels; ``control=True``: noise, no stripes."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images, labels = [], []
    for i in range(n):
        label = i % len(ORIENTATIONS)
        theta = math.radians(float(g.choice(ORIENTATIONS[label])))
        period, phase = g.uniform(6.0, 14.0), g.uniform(0, 2 * math.pi)
        base, contrast = g.uniform(0.25, 0.75), g.uniform(0.08, 0.25)
        if control:
            pattern = g.standard_normal((size, size)) * 0.7  # about the stripes' standard deviation
        else:
            pattern = np.cos(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period + phase)
        img = base + contrast * pattern + g.normal(0, 0.03, (size, size))
        images.append(np.clip(img, 0, 1).astype(np.float32))
        labels.append(label)
    return torch.from_numpy(np.stack(images))[:, None], torch.tensor(labels)


def pretrain(args, images: torch.Tensor, run_dir: Path):
    """``args.steps`` steps of the method through the training loop; returns (random-init state, method, losses)."""
    from sslrecipe.engine.events import EventLog
    from sslrecipe.engine.loop import LoopSettings, TrainLoop
    from sslrecipe.recipe.schema import PretrainConfig
    from sslrecipe.ssl.registry import create_method

    torch.manual_seed(args.seed)
    method = create_method(args.method, args.model, 1, args.img_size, json.loads(args.options), json.loads(args.timm_kwargs))
    init = copy.deepcopy(method.encoder().state_dict())

    class Pool(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, key):
            index, seed = key  # the loop's sampler yields (index, per-item seed)
            return method.views(images[index], np.random.default_rng(seed))

    cfg = PretrainConfig(method=args.method, steps=args.steps, batch_size=args.batch, optimizer="adamw",
                         betas=(0.9, 0.95), lr=args.lr, weight_decay=args.weight_decay)
    run_dir.mkdir(parents=True)
    settings = LoopSettings(stage="pretrain", stage_dir=run_dir, stage_hash=args.method, optim=cfg, batch_size=args.batch,
                            total_steps=args.steps, seed=args.seed, device=torch.device(args.device), drop_last=True,
                            collate_fn=method.collate, checkpoint_every=10**9)
    TrainLoop(settings, method, method.param_groups(cfg.weight_decay), Pool(), lambda model, batch: model(batch),
              EventLog(run_dir / "events.jsonl"), after_step=method.after_step).run()
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    losses = [(e["step"], round(e["loss"], 4)) for e in events if e.get("loss") is not None and e.get("step")]
    return init, method, losses


@torch.no_grad()
def reestimate_batchnorm(encoder, x: torch.Tensor, device: str) -> None:
    """Every encoder's BatchNorm statistics re-estimated on the probe's training images (a cumulative average): a
    random init's 0/1 statistics would otherwise lose to any trained encoder's, whatever it learned."""
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    encoder.train()
    for chunk in x.split(100):
        encoder(chunk.to(device))


@torch.no_grad()
def knn_accuracy(encoder, pool: str, device: str, train, test, k: int = 10) -> float:
    from sslrecipe.ssl import views as V

    encoder = encoder.to(device)
    (train_x, train_y), (test_x, test_y) = train, test
    reestimate_batchnorm(encoder, V.normalize(train_x), device)
    encoder.eval()

    def features(x):
        out = []
        for chunk in V.normalize(x).split(100):
            tokens = encoder.forward_features(chunk.to(device))
            if pool == "avg" and tokens.ndim == 3:
                out.append(tokens[:, encoder.num_prefix_tokens :].mean(1))
            else:
                out.append(encoder.forward_head(tokens, pre_logits=True))
        return torch.cat(out).float().cpu()

    f_train, f_test = features(train_x), features(test_x)
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    f_train, f_test = F.normalize((f_train - mu) / sd, dim=1), F.normalize((f_test - mu) / sd, dim=1)
    nearest = (f_test @ f_train.T).topk(k, dim=1).indices
    votes = F.one_hot(train_y[nearest], len(ORIENTATIONS)).sum(1)
    return float((votes.argmax(1) == test_y).float().mean())


def probe_run(args, pool: str, train, test, run_dir: Path, control: bool = False) -> dict:
    """One pre-training on ``args.images`` stripe (or control) images, then the k-NN of its random init and of the
    pre-trained encoder: ``{"random": ..., "trained": ..., "losses": [(step, loss), ...]}``."""
    images, _ = stripe_images(args.images, args.img_size, seed=0, control=control)
    init, method, losses = pretrain(args, images, run_dir)
    random_encoder = copy.deepcopy(method.encoder()).cpu()
    random_encoder.load_state_dict(init)
    return {"random": knn_accuracy(random_encoder, pool, args.device, train, test),
            "trained": knn_accuracy(method.encoder(), pool, args.device, train, test), "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", required=True)
    ap.add_argument("--model", required=True, help="timm name")
    ap.add_argument("--timm-kwargs", default="{}", help="JSON, e.g. a narrow ResNet's channels")
    ap.add_argument("--options", default="{}", help="JSON: pretrain.options.<method>")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--weight-decay", type=float, default=0.04)
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--pool", choices=("timm", "avg"), default=None, help="ViT features; default: avg for mae, else timm")
    ap.add_argument("--images", type=int, default=256, help="unlabelled pre-training images")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-control", action="store_true", help="skip the noise-control pre-training (half the time)")
    ap.add_argument("--control-only", action="store_true", help="only the noise-control pre-training")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/ssl_probe-<method>-<model>.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pool = args.pool or ("avg" if args.method == "mae" else "timm")
    train = stripe_images(300, args.img_size, seed=1)
    test = stripe_images(300, args.img_size, seed=2)
    tmp = Path(tempfile.mkdtemp(prefix="ssl_probe-"))
    rows, t0 = {}, time.perf_counter()
    runs = (("stripes", False), ("control", True))
    runs = runs[:1] if args.no_control else runs[1:] if args.control_only else runs
    for name, control in runs:
        run = probe_run(args, pool, train, test, tmp / name, control)
        rows.setdefault("random", {"knn": run["random"]})  # the same seed: the same random init for every run
        rows[name] = {"knn": run["trained"], "losses": run["losses"][:: max(1, len(run["losses"]) // 20)]}
        print(name, json.dumps({k: v["knn"] for k, v in rows.items()}), flush=True)
    result = {
        "benchmark": "SSL learning probe: orientation k-NN on synthetic stripes, pre-trained vs random init vs noise control",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "device": args.device, "threads": torch.get_num_threads()},
        "args": vars(args) | {"pool": pool},
        "chance": round(1 / len(ORIENTATIONS), 3),
        "wall_s": round(time.perf_counter() - t0, 1),
        "results": rows,
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"ssl_probe-{args.method}-{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
