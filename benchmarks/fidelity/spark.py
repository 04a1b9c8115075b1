"""Record what the official SparK code computes on small fixed weights and inputs (issue 14, item 8).

    git --git-dir=<mirror of github.com/keyu-tian/SparK> archive HEAD | tar -x -C /tmp/official/spark
    pip install --target /tmp/official/_deps typed-argument-parser pytz   # the official argument parser's needs
    PYTHONPATH=/tmp/official/_deps python benchmarks/fidelity/spark.py --official /tmp/official/spark \
        --commit a63e386f8e5186bc07ad7fce86e06b08f48a61ea

It imports and runs the official ``pretrain/`` code (nothing of it is copied here): the official settings come
from the official ``arg_util.init_dist_and_get_args`` (ResNet: LAMB betas (0.9, 0.95), base lr 2e-4 x batch / 256 at
the default batch 4096, weight decay 0.04 -> 0.2, 40 warm-up of 1600 epochs, sparse BN in one process) and from
``main.py``'s optimizer construction (the no-weight-decay keys and LAMB's ``max_grad_norm``, read from its syntax
tree). On a small timm ResNet (ResNet-18 layout, one block per stage, widths 8/16/24/40) built by the official
``build_sparse_encoder``, a 32-wide ``LightDecoder`` and ``SparK`` with a fixed mask drawn by the official ``mask``,
on two 96-px images, it computes the official loss, then one official training step at iteration 400 of 1600
(``lr_wd_annealing``, ``loss.backward()``, ``TheSameAsTimmLAMB.step``: gradient clip at 5 inside LAMB), and writes

- ``tests/data/fidelity/spark.safetensors``: the official state dict before the step (``official/<key>``; weights,
  images and all rounded to float16 values before use, so float16 storage is exact), the inputs (``input/x``,
  ``input/active``) and the whole gradient and change of a few parameters (``grad/<key>``, ``delta/<key>``);
- ``tests/data/fidelity/spark.json``: the loss, the global gradient norm LAMB clips with, the norm and fingerprint
  (``_shared.fingerprint``) of every parameter's gradient and change and of the BatchNorm running statistics after
  the step, the lr and weight decay of the step, the settings used, the commit and the command.

``tests/test_fidelity_spark.py`` loads these into the project's SparK and compares, without the official code.

Shims and stand-ins: timm 1.x has no ``timm.models.layers.drop`` (the official code imports it for a repr tweak) ->
the module ``timm.layers.drop``; ``torch.utils.tensorboard`` (the official logger, unused here) -> a stand-in when
tensorboard is not installed (``_shared.no_tensorboard_shim``); ``init_dist_and_get_args`` redirects ``print`` /
stdout / stderr into its experiment directory (a temporary one) -> restored right after. No distributed call is
reached: the official ``dist.initialize()`` falls back to one CPU process by itself. The global gradient norm is
0.09 here, under LAMB's clip at 5, so this step does not exercise the clip (tests/test_ssl_spark.py checks that LAMB
gets max_grad_norm 5).
"""

from __future__ import annotations

import argparse
import ast
import builtins
import contextlib
import sys
import tempfile
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _shared as S  # noqa: E402

EXPECTED_COMMIT = "a63e386f8e5186bc07ad7fce86e06b08f48a61ea"  # the commit docs/methods.md and spark.py cite

# the small model and inputs (the test builds the same model from these)
TIMM_NAME = "resnet18"
TIMM_KWARGS = {"layers": [1, 1, 1, 1], "channels": [8, 16, 24, 40]}
DECODER_WIDTH = 32
IMG_SIZE = 96
BATCH = 2
SEED = 0
# the optimizer step: one iteration per "epoch", so the official warm-up (wp_ep) and length (ep) are iterations
ITERATION = 400
# parameters whose whole gradient and change are stored (the others: norms and fingerprints)
DELTA_KEYS = ("mask_tokens.0", "sparse_encoder.sp_cnn.layer1.0.conv2.weight", "sparse_encoder.sp_cnn.layer2.0.bn1.weight",
              "densify_projs.0.weight", "dense_decoder.dec.4.conv.3.weight", "dense_decoder.proj.weight")
# the official SparK's deprecated buffers (``torch.empty``: undefined values, never used)
UNUSED_BUFFERS = ("imn_m", "imn_s", "norm_black")


# --------------------------------------------------------------------------- loading the official code


def _install_shims() -> None:
    import timm.layers
    import timm.models.layers

    if not hasattr(timm.models.layers, "drop"):  # shim: timm 0.5.4's module path, used by models/__init__.py
        timm.models.layers.drop = timm.layers.drop
        sys.modules.setdefault("timm.models.layers.drop", timm.layers.drop)
    S.no_tensorboard_shim()  # utils/misc.py imports the official logger


def load_official(official: Path) -> types.SimpleNamespace:
    pretrain = official / "pretrain"
    if not (pretrain / "spark.py").is_file():
        raise SystemExit(f"{official} is not a SparK checkout: {pretrain / 'spark.py'} is missing")
    try:
        import pytz  # noqa: F401
        import tap  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"the official argument parser needs {e.name}: pip install --target DIR typed-argument-parser "
                         "pytz, then run with PYTHONPATH=DIR") from None
    _install_shims()
    sys.path.insert(0, str(pretrain))
    import decoder
    import encoder
    import models  # patches timm's ResNet (models/resnet.py: hierarchical forward, feature widths)
    import spark
    from utils import arg_util, lamb, lr_control

    return types.SimpleNamespace(encoder=encoder, decoder=decoder, models=models, spark=spark, arg_util=arg_util,
                                 lamb=lamb, lr_control=lr_control, main_py=pretrain / "main.py")


@contextlib.contextmanager
def _restored_io():
    saved = builtins.print, sys.stdout, sys.stderr
    try:
        yield
    finally:  # stand-in: init_distributed_environ redirects these into its experiment directory
        builtins.print, sys.stdout, sys.stderr = saved


def official_args(off: types.SimpleNamespace):
    """``arg_util.init_dist_and_get_args()`` with the defaults (a ResNet, input 96 px) and a temporary directory."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = [f"--exp_dir={tmp}/exp", f"--data_path={tmp}", f"--model={TIMM_NAME}", f"--input_size={IMG_SIZE}"]
        saved_argv = sys.argv
        sys.argv = ["main.py"] + argv
        try:
            with _restored_io():
                args = off.arg_util.init_dist_and_get_args()
        finally:
            sys.argv = saved_argv
        return args, [v.replace(tmp, "<tmp>") for v in argv]


def _value(node: ast.AST, args):
    """A literal, ``args.<name>``, or a tuple/set/list of those (main.py's optimizer settings)."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args":
        return getattr(args, node.attr)
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_value(e, args) for e in node.elts)
    if isinstance(node, ast.Set):
        return {_value(e, args) for e in node.elts}
    return ast.literal_eval(node)


def main_py_settings(main_py: Path, args) -> dict:
    """``get_param_groups(..., nowd_keys=...)`` and ``partial(lamb.TheSameAsTimmLAMB, ...)`` of ``main_pt``."""
    found: dict = {}
    for node in ast.walk(ast.parse(main_py.read_text())):
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Name) and node.func.id == "get_param_groups":
            found["nowd_keys"] = next(_value(k.value, args) for k in node.keywords if k.arg == "nowd_keys")
        if (isinstance(node.func, ast.Name) and node.func.id == "partial" and node.args
                and isinstance(node.args[0], ast.Attribute) and node.args[0].attr == "TheSameAsTimmLAMB"):
            found["lamb_kwargs"] = {k.arg: _value(k.value, args) for k in node.keywords}
    if set(found) != {"nowd_keys", "lamb_kwargs"}:
        raise SystemExit(f"{main_py}: did not find get_param_groups(nowd_keys=...) and partial(TheSameAsTimmLAMB, ...); "
                         "the official code changed: update this script")
    return found


def build_official(off: types.SimpleNamespace, args) -> torch.nn.Module:
    # build_sparse_encoder knows the full-size models only: register the small one the way it lists them
    kwargs = dict(off.models.pretrain_default_model_kwargs["resnet50"])
    kwargs.pop("drop_path_rate")  # stochastic depth is random: off here (args.dp = 0 is passed below)
    off.models.pretrain_default_model_kwargs[TIMM_NAME] = {**kwargs, **TIMM_KWARGS}
    enc = off.models.build_sparse_encoder(TIMM_NAME, input_size=args.input_size, sbn=args.sbn, drop_path_rate=args.dp)
    dec = off.decoder.LightDecoder(enc.downsample_raito, width=DECODER_WIDTH, sbn=args.sbn)
    return off.spark.SparK(sparse_encoder=enc, dense_decoder=dec, mask_ratio=args.mask,
                           densify_norm=args.densify_norm, sbn=args.sbn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", type=Path, required=True, help="root of a keyu-tian/SparK checkout or archive")
    ap.add_argument("--commit", help="its commit (read with git when DIR is a checkout)")
    ap.add_argument("--out", type=Path, default=S.OUT, help="output directory")
    a = ap.parse_args()
    torch.set_num_threads(1)
    commit = S.official_commit(a.official, a.commit)
    S.check_commit(commit, EXPECTED_COMMIT, "SparK")
    off = load_official(a.official.resolve())
    args, args_argv = official_args(off)
    settings = main_py_settings(off.main_py, args)

    torch.manual_seed(SEED)
    with S.quiet():
        model = build_official(off, args)
    gen = torch.Generator().manual_seed(SEED + 1)
    S.perturb_1d(model.named_parameters(), gen)  # BN scales near 1, biases near 0 (and no zero-init last BN)
    S.round_to_half(v for k, v in model.state_dict().items() if k not in UNUSED_BUFFERS)
    model.train()
    x = S.half_exact(torch.randn(BATCH, 3, IMG_SIZE, IMG_SIZE, generator=gen) * 0.8 + 0.1)
    active = model.mask(BATCH, "cpu", generator=gen)  # the official mask (its own draw, from this generator)
    state = S.snapshot((k, v) for k, v in model.state_dict().items() if k not in UNUSED_BUFFERS)

    # the official training step (main.py pre_train_one_ep), at iteration ITERATION with one iteration per epoch
    with S.quiet():
        param_groups = off.lr_control.get_param_groups(model, nowd_keys=settings["nowd_keys"])
        optimizer = off.lamb.TheSameAsTimmLAMB(params=param_groups, lr=args.lr, weight_decay=0.0,
                                               **settings["lamb_kwargs"])
    wp_it, max_it = args.wp_ep * 1, args.ep * 1
    _min_lr, max_lr, _min_wd, max_wd = off.lr_control.lr_wd_annealing(optimizer, args.lr, args.wd, args.wde, ITERATION,
                                                                       wp_it, max_it)
    loss = model(x, active_b1ff=active, vis=False)
    optimizer.zero_grad()
    loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()  # LAMB scales the gradients in place (the clip): they were copied before
    delta = S.changes({n: state[n] for n in trainable}, dict(model.named_parameters()))
    buffers = {k: v for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}

    tensors = {f"official/{k}": (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    tensors["input/x"] = x.half()
    tensors["input/active"] = active
    for k in DELTA_KEYS:
        tensors[f"grad/{k}"] = grads[k].float()
        tensors[f"delta/{k}"] = delta[k].float()
    record = {
        "method": "spark",
        "official_repo": "https://github.com/keyu-tian/SparK",
        "official_commit": commit,
        "versions": {"timm": __import__("timm").__version__},
        "model": {"timm_name": TIMM_NAME, "timm_kwargs": TIMM_KWARGS, "decoder_width": DECODER_WIDTH,
                  "img_size": IMG_SIZE, "in_chans": 3, "batch": BATCH, "seed": SEED},
        "official_settings": {
            "argv": args_argv, "mask_ratio": args.mask, "densify_norm": args.densify_norm, "sbn": args.sbn,
            "drop_path_rate": args.dp, "opt": args.opt, "betas": list(settings["lamb_kwargs"]["betas"]),
            "max_grad_norm": settings["lamb_kwargs"]["max_grad_norm"], "nowd_keys": sorted(settings["nowd_keys"]),
            "glb_batch_size": args.glb_batch_size, "base_lr": args.base_lr, "peak_lr": args.lr, "wd": args.wd,
            "wde": args.wde, "wp_ep": args.wp_ep, "ep": args.ep,
            "param_groups": [{"weight_decay_scale": g["weight_decay_scale"],
                              "params": [n for n, p in model.named_parameters() if any(p is q for q in g["params"])]}
                             for g in optimizer.param_groups],
        },
        "step": {"iteration": ITERATION, "warmup_iterations": wp_it, "iterations": max_it, "lr": max_lr,
                 "weight_decay": max_wd},
        "loss": float(loss.item()),
        "global_grad_norm": float(optimizer.global_grad_norm),
        "grad_norm": S.norms(grads),
        "grad_fingerprint": S.fingerprints(grads),
        "delta_norm": S.norms(delta),
        "delta_fingerprint": S.fingerprints(delta),
        "buffer_norm": S.norms(buffers),
        "buffer_fingerprint": S.fingerprints(buffers),
        "delta_keys": list(DELTA_KEYS),
    }
    S.write("spark", tensors, record, a.out)
    print(f"official SparK loss {record['loss']:.8f}, grad norm {record['global_grad_norm']:.6f}, lr {max_lr:.4e}, "
          f"wd {max_wd:.4f}")


if __name__ == "__main__":
    main()
