"""Record what the official MAE code computes on small fixed weights and inputs (issue 14, item 8).

    git --git-dir=<mirror of github.com/facebookresearch/mae> archive HEAD -- '*.py' | tar -x -C /tmp/official/mae
    python -m venv --system-site-packages /tmp/fid-mae && /tmp/fid-mae/bin/pip install --no-deps timm==0.3.2
    /tmp/fid-mae/bin/python benchmarks/fidelity/mae.py --official /tmp/official/mae \
        --commit efb2a8062c206524e35e47d04501ed4f544c0ae8

It imports and runs the official code (nothing of it is copied here): ``models_mae.MaskedAutoencoderViT`` built
with the settings of its ``mae_vit_*`` factories (mlp ratio 4, LayerNorm eps 1e-6) at a small size (64-px images,
patch 16, width 64, depth 2, heads 4; decoder 32 wide, 1 block, 4 heads) with its own ``initialize_weights``;
the optimizer exactly as ``main_pretrain.main`` builds it (timm 0.3.2 ``optim_factory.add_weight_decay``, AdamW
betas (0.9, 0.95)) from ``main_pretrain.get_args_parser`` with the PRETRAIN.md flags (``--norm_pix_loss
--mask_ratio 0.75 --epochs 800 --warmup_epochs 40 --blr 1.5e-4 --weight_decay 0.05``) and its linear scaling rule
at the paper's effective batch 4096; then two iterations of the official ``engine_pretrain.train_one_epoch`` at
epoch 100 (a loader of length 2: the official per-iteration lr at epochs 100 and 100.5). It writes

- ``tests/data/fidelity/mae.safetensors``: the official weights before the first step (``official/<key>``), the
  fixed sin-cos position embeddings (float32, compared, not loaded), the images and the masking noise of the two
  iterations (``input/imgs``, ``input/noise0``, ``input/noise1``), the gradients of the first iteration and the
  changes after each step for a few parameters (``grad/<key>``, ``delta1/<key>``, ``delta2/<key>``);
- ``tests/data/fidelity/mae.json``: both iterations' losses, the lr of each, every parameter's gradient norm and fingerprint
  (first iteration; ``_shared.fingerprint``) and change norm and fingerprint after each step, the settings, the commit and the command.
  The key third of each attention ``qkv.bias`` is left out of the gradients and changes (``_shared.without_key_bias``:
  its gradient is zero up to rounding noise).

The masking noise is torch's global RNG, as officially: the script seeds it before each official forward and checks
that the official mask is the one the recorded noise gives (``argsort``, the first ``int(L * 0.25)`` kept).

Old-dependency shims (``models_mae.py`` needs timm 0.3.2, whose ``Block`` takes ``qk_scale``; run it in a venv with
``timm==0.3.2``, see above): ``torch._six`` (removed from torch, imported by timm 0.3.2 and ``util/misc.py``) -> a
module with ``container_abcs``, ``inf``, ``string_classes``, ``int_classes``; ``np.float`` (removed from numpy,
used by ``util/pos_embed.py``) -> ``float``; ``torch.utils.tensorboard`` (logger, unused) -> a stand-in when missing;
``torch.cuda.synchronize`` -> nothing to wait for on the CPU (``_shared.cuda_calls_on_cpu``). ``autocast`` and
``GradScaler`` disable themselves without CUDA (float32 throughout).
"""

from __future__ import annotations

import argparse
import collections.abc
import copy
import math
import sys
import types
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _shared as S  # noqa: E402

EXPECTED_COMMIT = "efb2a8062c206524e35e47d04501ed4f544c0ae8"  # the commit sslrecipe/ssl/mae.py and ssl-methods.md cite

# the small model and inputs (the test builds the same model from these)
MODEL = {"img_size": 64, "patch_size": 16, "in_chans": 3, "embed_dim": 64, "depth": 2, "num_heads": 4,
         "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 4, "mlp_ratio": 4.0}
BATCH = 2
SEED = 0
NOISE_SEED = 1234
# PRETRAIN.md's ViT recipe (flags of main_pretrain.py) and the paper's effective batch for the linear scaling rule
PRETRAIN_FLAGS = ["--norm_pix_loss", "--mask_ratio", "0.75", "--epochs", "800", "--warmup_epochs", "40",
                  "--blr", "1.5e-4", "--weight_decay", "0.05"]
EFFECTIVE_BATCH = 4096
EPOCH = 100  # after the 40 warm-up epochs, on the cosine
ITERATIONS_PER_EPOCH = 2  # the loader's length: iterations at epochs 100 and 100.5
# parameters whose whole gradient and changes are stored (the others: norms and fingerprints)
DELTA_KEYS = ("cls_token", "mask_token", "patch_embed.proj.bias", "blocks.1.attn.qkv.bias", "blocks.0.norm1.weight",
              "norm.bias", "decoder_embed.bias", "decoder_blocks.0.mlp.fc2.bias", "decoder_norm.weight")
FIXED = ("pos_embed", "decoder_pos_embed")  # fixed sin-cos embeddings (requires_grad=False)


def install_shims() -> None:
    six = types.ModuleType("torch._six")  # shim: removed from torch 1.13+, imported by timm 0.3.2 and util/misc.py
    six.container_abcs, six.inf, six.string_classes, six.int_classes = collections.abc, math.inf, (str, bytes), int
    sys.modules.setdefault("torch._six", six)
    if not hasattr(np, "float"):  # shim: removed from numpy 1.24+, used by util/pos_embed.py
        np.float = float
    S.no_tensorboard_shim()


def load_official(official: Path) -> types.SimpleNamespace:
    if not (official / "models_mae.py").is_file():
        raise SystemExit(f"{official} is not an MAE checkout: {official / 'models_mae.py'} is missing")
    install_shims()
    import timm

    if timm.__version__ != "0.3.2":
        raise SystemExit(f"models_mae.py needs timm 0.3.2 (Block(qk_scale=...)); this python has timm {timm.__version__}: "
                         "python -m venv --system-site-packages /tmp/fid-mae && /tmp/fid-mae/bin/pip install --no-deps "
                         "timm==0.3.2, then run with /tmp/fid-mae/bin/python")
    sys.path.insert(0, str(official))
    import engine_pretrain
    import main_pretrain
    import models_mae
    from timm.optim import optim_factory

    return types.SimpleNamespace(models_mae=models_mae, main_pretrain=main_pretrain, engine=engine_pretrain,
                                 optim_factory=optim_factory, timm_version=timm.__version__)


def mask_from_noise(noise: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """The mask ``random_masking`` makes from this noise (1 = removed), to check the recorded noise is the one used."""
    n, length = noise.shape
    keep = int(length * (1 - mask_ratio))
    ids_restore = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    return (ids_restore >= keep).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", type=Path, required=True, help="root of a facebookresearch/mae checkout or archive")
    ap.add_argument("--commit", help="its commit (read with git when DIR is a checkout)")
    ap.add_argument("--out", type=Path, default=S.OUT, help="output directory")
    a = ap.parse_args()
    torch.set_num_threads(1)
    commit = S.official_commit(a.official, a.commit)
    S.check_commit(commit, EXPECTED_COMMIT, "MAE")
    off = load_official(a.official.resolve())

    args = off.main_pretrain.get_args_parser().parse_args(PRETRAIN_FLAGS + ["--input_size", str(MODEL["img_size"]),
                                                                            "--device", "cpu"])
    if args.lr is None:  # main_pretrain.main's linear scaling rule, at the paper's effective batch
        args.lr = args.blr * EFFECTIVE_BATCH / 256

    torch.manual_seed(SEED)
    model = off.models_mae.MaskedAutoencoderViT(**MODEL, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                                                norm_pix_loss=args.norm_pix_loss)
    gen = torch.Generator().manual_seed(SEED + 1)
    S.perturb_1d(model.named_parameters(), gen)
    S.round_to_half(p for p in model.parameters() if p.requires_grad)
    imgs = S.half_exact(torch.randn(BATCH, 3, MODEL["img_size"], MODEL["img_size"], generator=gen) * 0.8 + 0.1)
    state0 = S.snapshot(model.state_dict().items())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]

    # the masking noise of the two iterations: torch's global RNG, as the official random_masking draws it
    n_patches = model.patch_embed.num_patches
    torch.manual_seed(NOISE_SEED)
    noise = [torch.rand(BATCH, n_patches) for _ in range(ITERATIONS_PER_EPOCH)]

    # 1. loss and gradients of the first iteration, on a copy (train_one_epoch zeroes the gradients after the step)
    probe = copy.deepcopy(model)
    torch.manual_seed(NOISE_SEED)
    loss0, _pred, mask0 = probe(imgs, mask_ratio=args.mask_ratio)
    loss0.backward()
    assert torch.equal(mask0, mask_from_noise(noise[0], args.mask_ratio)), "the official mask is not the recorded noise's"
    grads = S.without_key_bias({n: p.grad.detach().clone() for n, p in probe.named_parameters() if p.requires_grad})

    # 2. the official training: main_pretrain.main's optimizer, engine_pretrain.train_one_epoch over two iterations
    param_groups = off.optim_factory.add_weight_decay(model, args.weight_decay)
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95))
    from util.misc import NativeScalerWithGradNormCount as NativeScaler

    loss_scaler = NativeScaler()
    seen: list[tuple[float, torch.Tensor]] = []
    def after_forward(mod, inp, out):  # (loss, pred, mask); returns None: it observes only
        seen.append((float(out[0].item()), out[2].detach().clone()))

    model.register_forward_hook(after_forward)
    after_step: list[dict[str, torch.Tensor]] = []
    lrs: list[list[float]] = []
    def after(opt, *_):  # a hook returns None: it observes only
        after_step.append(S.snapshot(model.named_parameters()))
        lrs.append([g["lr"] for g in opt.param_groups])

    optimizer.register_step_post_hook(after)
    loader = S.FixedBatches([(imgs, torch.zeros(BATCH))] * ITERATIONS_PER_EPOCH, ITERATIONS_PER_EPOCH)
    torch.manual_seed(NOISE_SEED)
    with S.cuda_calls_on_cpu(), S.quiet():
        off.engine.train_one_epoch(model, loader, optimizer, torch.device("cpu"), EPOCH, loss_scaler, args=args)
    assert len(seen) == len(after_step) == ITERATIONS_PER_EPOCH
    for (loss_i, mask_i), noise_i in zip(seen, noise):
        assert torch.equal(mask_i, mask_from_noise(noise_i, args.mask_ratio)), "the official mask is not the recorded noise's"
    assert seen[0][0] == float(loss0.item())
    params0 = {n: state0[n] for n in trainable}
    delta1 = S.without_key_bias(S.changes(params0, {n: after_step[0][n] for n in trainable}))
    delta2 = S.without_key_bias(S.changes(params0, {n: after_step[1][n] for n in trainable}))

    tensors = {f"official/{k}": (v if k in FIXED else v.half()) for k, v in state0.items()}
    tensors["input/imgs"] = imgs.half()
    for i, nz in enumerate(noise):
        tensors[f"input/noise{i}"] = nz
    for k in DELTA_KEYS:
        tensors[f"grad/{k}"] = grads[k].float()
        tensors[f"delta1/{k}"] = delta1[k].float()
        tensors[f"delta2/{k}"] = delta2[k].float()
    groups = [{"weight_decay": g["weight_decay"], "params": [n for n, p in model.named_parameters()
                                                             if any(p is q for q in g["params"])]}
              for g in optimizer.param_groups]
    record = {
        "method": "mae",
        "official_repo": "https://github.com/facebookresearch/mae",
        "official_commit": commit,
        "versions": {"timm": off.timm_version},
        "model": {**MODEL, "norm_layer": "LayerNorm(eps=1e-6)", "norm_pix_loss": args.norm_pix_loss, "batch": BATCH,
                  "seed": SEED},
        "official_settings": {"pretrain_flags": PRETRAIN_FLAGS, "effective_batch": EFFECTIVE_BATCH, "blr": args.blr,
                              "lr": args.lr, "min_lr": args.min_lr, "epochs": args.epochs,
                              "warmup_epochs": args.warmup_epochs, "weight_decay": args.weight_decay,
                              "mask_ratio": args.mask_ratio, "betas": list(optimizer.defaults["betas"]),
                              "eps": optimizer.defaults["eps"], "param_groups": groups},
        "iterations": [{"epoch": EPOCH + i / ITERATIONS_PER_EPOCH, "lr": lrs[i][0], "loss": seen[i][0],
                        "noise": f"input/noise{i}"} for i in range(ITERATIONS_PER_EPOCH)],
        "loss": seen[0][0],
        "grad_norm": S.norms(grads),
        "grad_fingerprint": S.fingerprints(grads),
        "delta1_norm": S.norms(delta1),
        "delta1_fingerprint": S.fingerprints(delta1),
        "delta2_norm": S.norms(delta2),
        "delta2_fingerprint": S.fingerprints(delta2),
        "delta_keys": list(DELTA_KEYS),
    }
    S.write("mae", tensors, record, a.out)
    print(f"official MAE losses {[round(s[0], 8) for s in seen]}, lrs {[l[0] for l in lrs]}")


if __name__ == "__main__":
    main()
