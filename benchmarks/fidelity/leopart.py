"""Record what the official Leopart code computes on small fixed weights and inputs (issue 14, item 8).

    git --git-dir=<mirror of github.com/MkuuWaUjinga/leopart> archive HEAD -- '*.py' '*.yml' | tar -x -C /tmp/official/leopart
    python -m venv --system-site-packages /tmp/fid-leopart
    /tmp/fid-leopart/bin/pip install pytorch-lightning torchmetrics scikit-image scikit-learn
    /tmp/fid-leopart/bin/python benchmarks/fidelity/leopart.py --official /tmp/official/leopart \
        --commit 7835701338d477c70d581c0a10e594257dcac198

It imports and runs the official code (nothing of it is copied here): ``src.leopart.Leopart`` built from the
official ``experiments/configs/train_coco_config.yml`` exactly as ``experiments/finetune_with_leopart.py`` passes it
(foreground loss mask, queue, teacher momentum 0.9995 -> 1, AdamW with lr_backbone 1e-5 / lr_heads 1e-4, weight
decay 0.04 -> 0.5, eps 0.05, 3 Sinkhorn iterations, temperature 0.1, RoI-align 7) at a small size (one GPU, batch 2,
2 global 64-px + 2 local 32-px crops, 20 prototypes, projection head 64 -> 64 -> 32, queue of 8, 10 samples x 4
epochs = 20 iterations); the ViT is ``src.vit.VisionTransformer`` with ``vit_small``'s settings at width 64, depth 2,
4 heads, patch 16, 1 channel. The crop boxes come from the official ``LeopartTransforms.calculate_bboxes``. Then two
training iterations at global steps 10 and 11 run the way Lightning's automatic optimization runs them: the official
``optimizer_step`` (weight decay from ``wd_schedule``) steps the optimizer with a closure that calls the official
``training_step`` (prototype normalisation, ``shared_step`` with ``process_attentions``, Sinkhorn and the queue,
``spatial_loss``, then the EMA teacher update) and ``backward``; then the ``CosineAnnealingLR`` of
``configure_optimizers`` steps. Mid-training state: the queue is full (recorded unit vectors), the teacher backbone
is ``float16(0.9 x student backbone)`` (a rule the test applies) and the teacher head has its own initialisation
(as officially). It writes ``tests/data/fidelity/leopart.safetensors`` (the official ``model.*`` / ``teacher.*``
weights before the first step except the teacher backbone, the crops, boxes, queue, the official foreground masks,
the queues after each iteration, whole gradients and changes of a few parameters) and ``leopart.json`` (losses,
lr / weight decay / momentum of each iteration, every parameter's gradient, the student's and the teacher's change
after each iteration as norms and fingerprints, settings, commit, command).

Old-dependency shim: ``process_attentions`` indexes an (h, w) attention map with the (1, h, w) numpy mask of
``skimage.measure.label``; torch <= 2.8 (the official environment: 1.10) read such a short non-tuple sequence as the
tuple ``(mask[0],)``, torch 2.9+ raises: ``label`` hands back its labels without the leading 1 (the same pixels).

Stand-ins (each named where it is installed): ``faiss`` (imported by ``experiments/utils.py`` for the k-means of the
validation metric) -> an empty module; ``PredsmIoUKmeans`` (that validation metric; its torchmetrics 0.5 keyword
``compute_on_step`` is gone) -> an empty module; ``vit_small`` -> the same ``VisionTransformer`` settings at the small
size, with stochastic depth 0 (``init_model`` gives the student 0.1; its draws are random and cannot be matched);
Lightning's Trainer (which needs a data module, loggers and GPUs) -> the closure, ``optimizer_step`` call and scheduler
step above, a ``trainer`` object with ``global_step``, ``log`` recording the values, ``optimizers()`` returning the
optimizer, and a ``LightningOptimizer`` whose strategy calls ``optimizer.step(closure=...)`` as Lightning's precision
plugin does; ``.cuda()`` (``gpus=1`` is needed for the queue) -> the identity on the CPU.
The key third of each attention ``qkv.bias`` is left out of gradients and changes (``_shared.without_key_bias``).
"""

from __future__ import annotations

import argparse
import sys
import types
import warnings
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _shared as S  # noqa: E402

EXPECTED_COMMIT = "7835701338d477c70d581c0a10e594257dcac198"  # the commit sslrecipe/ssl/leopart.py and ssl-methods.md cite

SEED = 0
RNG_SEED = 321  # torch's global RNG before the first iteration (the queue's randperm draws from it)
IN_CHANS = 1
IMAGE = 96  # source image side; crops 64 (global) and 32 (local)
VIT = {"patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 4, "qkv_bias": True}
SMALL = {"gpus": 1, "batch_size": 2, "num_samples": 10, "max_epochs": 4, "projection_feat_dim": 32,
         "projection_hidden_dim": 64, "nmb_prototypes": 20, "queue_length": 8}
SIZE_CROPS, NMB_CROPS = [64, 32], [2, 2]
START, STEPS = 10, 2  # global steps 10 and 11 of 20
TEACHER_SCALE = 0.9
DELTA_KEYS = ("cls_token", "pos_embed", "blocks.1.attn.qkv.bias", "norm.weight", "projection_head.4.bias",
              "prototypes.weight")


def load_official(official: Path) -> types.SimpleNamespace:
    if not (official / "src" / "leopart.py").is_file():
        raise SystemExit(f"{official} is not a Leopart checkout: {official / 'src' / 'leopart.py'} is missing")
    try:
        import pytorch_lightning  # noqa: F401
        import skimage  # noqa: F401
        import sklearn  # noqa: F401
        import torchmetrics  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"the official code needs {e.name}: python -m venv --system-site-packages /tmp/fid-leopart && "
                         "/tmp/fid-leopart/bin/pip install pytorch-lightning torchmetrics scikit-image scikit-learn, "
                         "then run with /tmp/fid-leopart/bin/python") from None
    sys.modules.setdefault("faiss", types.ModuleType("faiss"))  # stand-in: k-means of the validation metric only
    sys.path.insert(0, str(official))
    import experiments.utils as experiment_utils
    import src.leopart as leopart
    import src.leopart_transforms as transforms
    import src.vit as vit
    import yaml

    label = experiment_utils.label

    def label_without_leading_one(image, *args, **kwargs):
        """Shim: torch <= 2.8 (the official environment has 1.10) read the (1, h, w) numpy mask that
        ``process_attentions`` indexes an (h, w) map with as the tuple ``(mask[0],)`` (NumPy's legacy rule for short
        sequences); torch 2.9+ refuses it. The same labels without the leading 1 zero the same pixels."""
        out = label(image, *args, **kwargs)
        return out[0] if out.ndim == 3 and out.shape[0] == 1 else out

    experiment_utils.label = label_without_leading_one

    config = yaml.safe_load((official / "experiments" / "configs" / "train_coco_config.yml").read_text())
    return types.SimpleNamespace(leopart=leopart, vit=vit, transforms=transforms, config=config)


def small_vit(off, patch_size: int = 16, drop_path_rate: float = 0.0, **kwargs) -> nn.Module:
    """Stand-in for ``vit_small``: its settings at width 64, depth 2, 4 heads, 1 channel, 64-px grid; no stochastic
    depth (random draws)."""
    return off.vit.VisionTransformer(img_size=[SIZE_CROPS[0]], in_chans=IN_CHANS, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                     drop_path_rate=0.0, **{**VIT, "patch_size": patch_size}, **kwargs)


def leopart_kwargs(off) -> dict:
    """``finetune_with_leopart.py``'s ``Leopart(...)`` call on train_coco_config.yml, with the small sizes."""
    train, data = off.config["train"], off.config["data"]
    kwargs = {k: train[k] for k in (
        "use_teacher", "loss_mask", "queue_length", "momentum_teacher", "momentum_teacher_end", "weight_decay_end",
        "roi_align_kernel_size", "val_downsample_masks", "arch", "patch_size", "lr_heads", "batch_size",
        "projection_feat_dim", "projection_hidden_dim", "n_layers_projection_head", "max_epochs", "val_iters",
        "nmb_prototypes", "temperature", "sinkhorn_iterations", "crops_for_assign", "optimizer", "exclude_norm_bias",
        "lr_backbone", "final_lr", "weight_decay", "epsilon")}
    kwargs.update(num_clusters_kmeans=train["num_clusters_kmeans_miou"], gpus=off.config["gpus"],
                  num_classes=data["num_classes_val"], nmb_crops=data["nmb_samples"])
    kwargs.update(SMALL, nmb_crops=NMB_CROPS)
    return kwargs


def crop_boxes(gen: torch.Generator, off) -> torch.Tensor:
    """Crop boxes (x1, y1, x2, y2) of one image with the official scales, each crop meeting every global crop in more
    than the official minimum intersection (2 % between the global crops, 1 % otherwise)."""
    data = off.config["data"]
    scales = [(data["min_scale_crops"][i], data["max_scale_crops"][i]) for i in range(2)]
    min_inter = data["min_intersection_crops"] * IMAGE * IMAGE
    boxes = []
    for i in range(sum(NMB_CROPS)):
        lo, hi = scales[0 if i < NMB_CROPS[0] else 1]
        while True:
            area = IMAGE * IMAGE * (lo + (hi - lo) * float(torch.rand((), generator=gen)))
            ratio = float(torch.exp(torch.log(torch.tensor(3 / 4)) + torch.rand((), generator=gen) * torch.log(torch.tensor(16 / 9))))
            w, h = round((area * ratio) ** 0.5), round((area / ratio) ** 0.5)
            if not (0 < w <= IMAGE and 0 < h <= IMAGE):
                continue
            x1, y1 = int(torch.randint(0, IMAGE - w + 1, (), generator=gen)), int(torch.randint(0, IMAGE - h + 1, (), generator=gen))
            box = torch.tensor([x1, y1, x1 + w, y1 + h], dtype=torch.float32)
            need = min_inter * (2 if i < NMB_CROPS[0] else 1)
            inter = [(min(box[2], g[2]) - max(box[0], g[0])).clamp(min=0) * (min(box[3], g[3]) - max(box[1], g[1])).clamp(min=0)
                     for g in boxes[: min(i, NMB_CROPS[0])]]
            if all(float(v) > need for v in inter):
                boxes.append(box)
                break
    return torch.stack(boxes)


def make_batch(off, gen: torch.Generator):
    """Crops of smooth random images at the boxes (bilinear), rounded to float16 values, and the official boxes."""
    import torchvision.transforms.functional as TF

    bs = SMALL["batch_size"]
    transform = off.transforms.LeopartTransforms(size_crops=SIZE_CROPS, nmb_crops=NMB_CROPS,
                                                 min_scale_crops=off.config["data"]["min_scale_crops"],
                                                 max_scale_crops=off.config["data"]["max_scale_crops"])
    crops = [[] for _ in range(sum(NMB_CROPS))]
    raw, gcs, alls = [], [], []
    for _ in range(bs):
        image = nn.functional.interpolate(torch.randn(1, IN_CHANS, 12, 12, generator=gen), size=(IMAGE, IMAGE),
                                          mode="bicubic", align_corners=False)[0]
        boxes = crop_boxes(gen, off)
        for i, b in enumerate(boxes.tolist()):
            x1, y1, x2, y2 = (int(v) for v in b)
            size = SIZE_CROPS[0 if i < NMB_CROPS[0] else 1]
            crops[i].append(TF.resized_crop(image, y1, x1, y2 - y1, x2 - x1, [size, size], antialias=True))
        gc, all_ = transform.calculate_bboxes(boxes)  # official
        raw.append(boxes)
        gcs.append(gc)
        alls.append(all_)
    crops = [S.half_exact(torch.stack(c)) for c in crops]
    return crops, {"gc": torch.stack(gcs), "all": torch.stack(alls)}, torch.stack(raw)


class _Trainer:
    """Stand-in for the Lightning Trainer fields the official module reads."""

    def __init__(self):
        self.global_step = 0


def record(off, commit: str, out: Path) -> None:
    off.leopart.vit_small = partial(small_vit, off)  # stand-in: the small ViT (see the module docstring)
    off.leopart.PredsmIoUKmeans = lambda *a, **k: nn.Module()  # stand-in: the validation metric
    kwargs = leopart_kwargs(off)
    torch.manual_seed(SEED)
    with S.quiet():
        module = off.leopart.Leopart(**kwargs)
    gen = torch.Generator().manual_seed(SEED + 1)
    student, teacher = module.model, module.teacher
    S.perturb_1d(student.named_parameters(), gen)
    S.perturb_1d(teacher.named_parameters(), gen)
    S.round_to_half(student.state_dict().values())
    S.round_to_half(teacher.state_dict().values())
    with torch.no_grad():  # mid-training: the teacher backbone is not the student's (the test applies the same rule)
        for (n, p), q in zip(teacher.named_parameters(), student.parameters()):
            if not n.startswith(("projection_head", "prototypes")):
                p.copy_((q * TEACHER_SCALE).half().float())
    crops, bboxes, raw_boxes = make_batch(off, gen)
    queue0 = torch.nn.functional.normalize(torch.randn(len(kwargs["crops_for_assign"]), SMALL["queue_length"],
                                                       SMALL["projection_feat_dim"], generator=gen), dim=-1)
    queue0 = S.half_exact(queue0)

    with S.cuda_calls_on_cpu():
        module.on_train_epoch_start()  # official: creates the (empty) queue
        module.queue = queue0.clone()  # mid-training: a full queue
        state0 = {**{f"model.{k}": v.clone() for k, v in student.state_dict().items()},
                  **{f"teacher.{k}": v.clone() for k, v in teacher.state_dict().items()}}
        teacher0 = S.snapshot(teacher.named_parameters())
        [optimizer], [scheduler] = module.configure_optimizers()
        scheduler = scheduler["scheduler"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": positioning it at START
            for _ in range(START):
                scheduler.step()

        # Lightning stand-ins
        from pytorch_lightning.core.optimizer import LightningOptimizer

        trainer = _Trainer()
        module.trainer = trainer
        logged: list[dict] = []
        module.log = lambda name, value, **kw: logged[-1].__setitem__(name, float(value))
        module.optimizers = lambda: optimizer
        lightning_optimizer = LightningOptimizer(optimizer)
        lightning_optimizer._strategy = types.SimpleNamespace(
            optimizer_step=lambda opt, closure, model=None, **kw: opt.step(closure=closure))

        # observers (nothing here changes what the official code computes)
        names = {id(p): n for n, p in student.named_parameters()}
        masks, losses, grads, groups, after_step, teachers, queues = [], [], [], [], [], [], []
        process_attentions = off.leopart.process_attentions

        def observed_process_attentions(*a, **k):
            out = process_attentions(*a, **k)
            masks.append(out.detach().clone())
            return out

        off.leopart.process_attentions = observed_process_attentions

        def before_step(opt, *_):
            groups.append([{"lr": g["lr"], "weight_decay": g["weight_decay"]} for g in opt.param_groups])

        optimizer.register_step_pre_hook(before_step)
        optimizer.register_step_post_hook(lambda opt, *_: after_step.append(S.snapshot(student.named_parameters())))

        batch = (crops, bboxes)
        torch.manual_seed(RNG_SEED)
        for i in range(STEPS):
            trainer.global_step = START + i
            logged.append({})

            def closure():  # Lightning's automatic optimization: training_step, then backward
                optimizer.zero_grad()
                loss = module.training_step(batch, 0)
                loss.backward()
                losses.append(float(loss.item()))
                grads.append({names[id(p)]: p.grad.detach().clone() for p in student.parameters() if p.grad is not None})
                return loss

            module.optimizer_step(0, 0, lightning_optimizer, 0, closure)  # official
            scheduler.step()
            teachers.append(S.snapshot(teacher.named_parameters()))
            queues.append(module.queue.detach().clone())
        off.leopart.process_attentions = process_attentions
    assert len(losses) == len(after_step) == len(masks) == STEPS

    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    params0 = {n: state0[f"model.{n}"] for n in trainable}
    deltas = [S.without_key_bias(S.changes(params0, {n: a[n] for n in trainable})) for a in after_step]
    t_deltas = [S.without_key_bias(S.changes(teacher0, t)) for t in teachers]
    raw = S.without_key_bias(grads[0])
    heads = ("teacher.projection_head", "teacher.prototypes")
    stored = {k: v for k, v in state0.items() if k.startswith("model.") or k.startswith(heads)}
    tensors = {f"official/{k}": v.half() for k, v in stored.items()}
    for i, c in enumerate(crops):
        tensors[f"input/crop{i}"] = c.half()
    tensors["input/gc_boxes"], tensors["input/all_boxes"] = bboxes["gc"], bboxes["all"]
    tensors["input/crop_boxes"] = raw_boxes
    tensors["input/queue"] = queue0.half()
    for i in range(STEPS):
        tensors[f"mask{i + 1}/attn_hard"] = masks[i].to(torch.uint8)
        tensors[f"queue{i + 1}/queue"] = queues[i]
        for k in DELTA_KEYS:
            tensors[f"delta{i + 1}/{k}"] = deltas[i][k].float()
    for k in DELTA_KEYS:
        tensors[f"grad/{k}"] = raw[k].float()
    train = off.config["train"]
    rec = {
        "method": "leopart",
        "official_repo": "https://github.com/MkuuWaUjinga/leopart",
        "official_commit": commit,
        "versions": {"pytorch_lightning": __import__("pytorch_lightning").__version__,
                     "scikit_image": __import__("skimage").__version__},
        "model": {"vit": {**VIT, "img_size": SIZE_CROPS[0], "norm_layer": "LayerNorm(eps=1e-6)"}, "in_chans": IN_CHANS,
                  "size_crops": SIZE_CROPS, "nmb_crops": NMB_CROPS, "image": IMAGE, "seed": SEED, "rng_seed": RNG_SEED},
        "official_settings": {"config": "experiments/configs/train_coco_config.yml", "leopart_kwargs": kwargs,
                              "config_train": {k: v for k, v in train.items() if isinstance(v, (int, float, str, bool, list))
                                               and k not in ("data_dir", "checkpoint_dir", "voc_data_path")},
                              "optimizer_defaults": {k: v for k, v in optimizer.defaults.items()
                                                     if isinstance(v, (int, float, tuple, bool))},
                              "param_groups": [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups],
                              "total_iterations": len(module.wd_schedule), "teacher_scale": TEACHER_SCALE},
        "iterations": [{"global_step": START + i, "lr_backbone": groups[i][0]["lr"], "lr_heads": groups[i][2]["lr"],
                        "weight_decay": groups[i][0]["weight_decay"],
                        "momentum": float(module.momentum_schedule[START + i]), "loss": losses[i],
                        "logged": logged[i], "optimizer_groups": groups[i],
                        "foreground_cells": int(masks[i].sum())} for i in range(STEPS)],
        "loss": losses[0],
        "grad_norm": S.norms(raw), "grad_fingerprint": S.fingerprints(raw),
        "delta_keys": list(DELTA_KEYS),
    }
    for i in range(STEPS):
        rec[f"delta{i + 1}_norm"], rec[f"delta{i + 1}_fingerprint"] = S.norms(deltas[i]), S.fingerprints(deltas[i])
        rec[f"teacher_delta{i + 1}_norm"] = S.norms(t_deltas[i])
        rec[f"teacher_delta{i + 1}_fingerprint"] = S.fingerprints(t_deltas[i])
    S.write("leopart", tensors, rec, out)
    print(f"official Leopart losses {[round(x, 8) for x in losses]}, lr {rec['iterations'][0]['lr_backbone']:.3e} / "
          f"{rec['iterations'][0]['lr_heads']:.3e}, wd {rec['iterations'][0]['weight_decay']:.4f}, "
          f"foreground cells {[it['foreground_cells'] for it in rec['iterations']]} of {masks[0].numel()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", type=Path, required=True, help="root of a MkuuWaUjinga/leopart checkout or archive")
    ap.add_argument("--commit", help="its commit (read with git when DIR is a checkout)")
    ap.add_argument("--out", type=Path, default=S.OUT, help="output directory")
    a = ap.parse_args()
    torch.set_num_threads(1)
    commit = S.official_commit(a.official, a.commit)
    S.check_commit(commit, EXPECTED_COMMIT, "Leopart")
    record(load_official(a.official.resolve()), commit, a.out)


if __name__ == "__main__":
    main()
