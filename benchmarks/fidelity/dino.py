"""Record what the official DINO code computes on small fixed weights and inputs, ViT and ResNet (issue 14, item 8).

    git --git-dir=<mirror of github.com/facebookresearch/dino> archive HEAD -- '*.py' | tar -x -C /tmp/official/dino
    python benchmarks/fidelity/dino.py --official /tmp/official/dino --commit 7c446df5b9f45747937fb0d72314eb9f7b66930a

It imports and runs the official code (nothing of it is copied here). The settings are the official argument
parser's (``main_dino.get_args_parser``) with the README's flags and a small size; the networks are built the way
``main_dino.train_dino`` builds them (``utils.MultiCropWrapper`` of a backbone and ``vision_transformer.DINOHead``,
DistributedDataParallel in a real one-process gloo group, teacher loaded from the student, no gradients), as are the
optimizer (``utils.get_params_groups``; AdamW, or SGD momentum 0.9) and the schedules (``utils.cosine_scheduler`` for
lr, weight decay and teacher momentum); ``main_dino.DINOLoss`` is the loss. Then two iterations of the official
``main_dino.train_one_epoch`` run at epoch 2 of 4 with 5 iterations per epoch (a loader of length 5 that yields two
batches: global iterations 10 and 11), fp16 off:

- ``vit``: ``vision_transformer.VisionTransformer`` with ``vit_tiny``'s settings (mlp 4, qkv bias, LayerNorm eps
  1e-6) at width 64, depth 2, 4 heads, patch 16, 64-px global and 32-px local crops (interpolated position
  embedding), AdamW; ``--norm_last_layer false`` (the README's ViT-S setting: ``weight_g`` trains), teacher
  temperature 0.04 -> 0.07 over 1 epoch (past the warm-up at epoch 2), last layer free (``--freeze_last_layer 1``);
- ``resnet``: a torchvision ResNet (``torchvision.models.resnet.ResNet``, ``BasicBlock``, one block per stage) with
  stage widths 8/16/32/64 after the 64-wide stem, built by its own ``_make_layer``; the README's ResNet-50 flags (SGD lr 0.03, weight decay 1e-4
  constant, its crop scales), the code's teacher temperature 0.04, last layer frozen (``--freeze_last_layer 3``:
  ``cancel_gradients_last_layer`` drops its gradients at epoch 2).

Both: 1-channel inputs, batch 2, 2 global + 2 local crops, head ``DINOHead(64, 128, hidden_dim=64,
bottleneck_dim=32)``, no stochastic depth (its draws are random), per-parameter clipping ``--clip_grad 0.3`` (below
the official 3.0 so that some of these small gradients are clipped and some are not), lr from the linear scaling
rule at the README's 8 GPUs x 64 images. Mid-training state: the center starts at a recorded vector, and the teacher
is not the student: ``teacher = float16(0.9 x student)`` for every parameter (BatchNorm buffers copied), a rule the
test applies to the stored student. It writes ``tests/data/fidelity/dino_<arch>.safetensors`` (the student before
the first step ``official/<key>`` in ``MultiCropWrapper`` keys, the crops ``input/crop<i>``, the start center
``input/center``, the centers after each iteration, whole gradients and changes of a few parameters) and
``dino_<arch>.json`` (losses, lr / weight decay / momentum / teacher temperature of each iteration, every
parameter's gradient before and after clipping, the student's and the teacher's change after each iteration as
norms and fingerprints, BatchNorm statistics, settings, commit, command).

Stand-ins: ``.cuda()`` and ``torch.cuda.synchronize`` on the CPU (``_shared``); ``torch.hub.list`` (the argument
parser's ``--arch`` help lists XCiT models from the network) -> an empty list; the progress logger's
``synchronize_between_processes`` (its averages, made on ``'cuda'``) -> nothing; SyncBatchNorm (``main_dino`` converts
BatchNorm to it) cannot run on a CPU and over one process is BatchNorm, so the ResNet keeps ``BatchNorm2d``.
The key third of each attention ``qkv.bias`` is left out of gradients and changes (``_shared.without_key_bias``).
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _shared as S  # noqa: E402

EXPECTED_COMMIT = "7c446df5b9f45747937fb0d72314eb9f7b66930a"  # the commit sslrecipe/ssl/dino.py and ssl-methods.md cite

SEED = 0
BATCH = 2
IN_CHANS = 1
GLOBAL_SIZE, LOCAL_SIZE = 64, 32
HEAD = {"hidden_dim": 64, "bottleneck_dim": 32}
VIT = {"patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 4, "qkv_bias": True}
RESNET_WIDTHS, RESNET_LAYERS, STEM_WIDTH = (8, 16, 32, 64), (1, 1, 1, 1), 64
EPOCHS, ITERATIONS_PER_EPOCH, EPOCH, STEPS = 4, 5, 2, 2  # global iterations 10 and 11 of 20
EFFECTIVE_BATCH = 512  # the README's commands: 8 GPUs x the default 64 per GPU
TEACHER_SCALE = 0.9  # teacher = float16(0.9 x student): a mid-training teacher that is not the student
SMALL = ["--out_dim", "128", "--use_fp16", "false", "--epochs", str(EPOCHS), "--warmup_epochs", "1",
         "--local_crops_number", "2", "--batch_size_per_gpu", str(BATCH), "--drop_path_rate", "0", "--clip_grad", "0.3"]
FLAGS = {
    "vit": ["--arch", "vit_tiny", "--patch_size", "16", "--norm_last_layer", "false", "--warmup_teacher_temp", "0.04",
            "--teacher_temp", "0.07", "--warmup_teacher_temp_epochs", "1", "--freeze_last_layer", "1"] + SMALL,
    "resnet": ["--arch", "resnet18", "--optimizer", "sgd", "--lr", "0.03", "--weight_decay", "1e-4",
               "--weight_decay_end", "1e-4", "--global_crops_scale", "0.14", "1", "--local_crops_scale", "0.05", "0.14",
               "--freeze_last_layer", "3"] + SMALL,
}
DELTA_KEYS = {
    "vit": ("backbone.cls_token", "backbone.pos_embed", "backbone.blocks.1.attn.qkv.bias", "backbone.norm.weight",
            "head.mlp.4.bias", "head.last_layer.weight_g"),
    "resnet": ("backbone.bn1.weight", "backbone.layer2.0.downsample.1.bias", "backbone.layer4.0.bn2.weight",
               "head.mlp.0.bias", "head.mlp.4.bias"),
}


def load_official(official: Path) -> types.SimpleNamespace:
    if not (official / "main_dino.py").is_file():
        raise SystemExit(f"{official} is not a DINO checkout: {official / 'main_dino.py'} is missing")
    sys.path.insert(0, str(official))
    import main_dino
    import utils
    import vision_transformer

    return types.SimpleNamespace(main=main_dino, utils=utils, vits=vision_transformer)


def torchvision_resnet(in_chans: int) -> nn.Module:
    """A torchvision ResNet (its class, ``BasicBlock`` and ``_make_layer``; forward unchanged) at small widths.

    ``torchvision_models.resnet18()`` has stage widths 64..512; this is the same network with stages 8..64 and one
    block per stage after the usual 64-wide stem (so layer1 gets a projection shortcut, as it does in timm with the
    same widths), initialised as torchvision does (kaiming-normal fan-out convs, BatchNorm 1/0)."""
    from torchvision.models.resnet import BasicBlock, ResNet

    m = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    w = RESNET_WIDTHS
    m.inplanes = STEM_WIDTH
    m.conv1 = nn.Conv2d(in_chans, STEM_WIDTH, kernel_size=7, stride=2, padding=3, bias=False)
    m.bn1 = nn.BatchNorm2d(STEM_WIDTH)
    m.layer1 = m._make_layer(BasicBlock, w[0], RESNET_LAYERS[0])
    m.layer2 = m._make_layer(BasicBlock, w[1], RESNET_LAYERS[1], stride=2)
    m.layer3 = m._make_layer(BasicBlock, w[2], RESNET_LAYERS[2], stride=2)
    m.layer4 = m._make_layer(BasicBlock, w[3], RESNET_LAYERS[3], stride=2)
    m.fc = nn.Linear(w[3], 10)
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(mod, nn.BatchNorm2d):
            nn.init.constant_(mod.weight, 1)
            nn.init.constant_(mod.bias, 0)
    return m


def build_networks(off, arch: str, args):
    """``main_dino.train_dino``'s "building student and teacher networks" at this small size."""
    if arch == "vit":
        from functools import partial

        def backbone(drop_path_rate=0.0):
            return off.vits.VisionTransformer(img_size=[GLOBAL_SIZE], in_chans=IN_CHANS, drop_path_rate=drop_path_rate,
                                              norm_layer=partial(nn.LayerNorm, eps=1e-6), **VIT)

        student, teacher = backbone(args.drop_path_rate), backbone()
        embed_dim = student.embed_dim
    else:
        student, teacher = torchvision_resnet(IN_CHANS), torchvision_resnet(IN_CHANS)
        embed_dim = student.fc.weight.shape[1]
    student = off.utils.MultiCropWrapper(student, off.vits.DINOHead(
        embed_dim, args.out_dim, use_bn=args.use_bn_in_head, norm_last_layer=args.norm_last_layer, **HEAD))
    teacher = off.utils.MultiCropWrapper(teacher, off.vits.DINOHead(embed_dim, args.out_dim, args.use_bn_in_head, **HEAD))
    return student, teacher


def official_args(off, arch: str) -> argparse.Namespace:
    hub_list = torch.hub.list
    torch.hub.list = lambda *a, **k: []  # stand-in: the --arch help text lists XCiT models from the network
    try:
        return off.main.get_args_parser().parse_args(FLAGS[arch])
    finally:
        torch.hub.list = hub_list


def record(off, arch: str, commit: str, out: Path) -> None:
    args = official_args(off, arch)
    torch.manual_seed(SEED)
    student, teacher = build_networks(off, arch, args)
    gen = torch.Generator().manual_seed(SEED + 1)
    S.perturb_1d(student.named_parameters(), gen)
    S.round_to_half(student.state_dict().values())
    n_crops = 2 + args.local_crops_number
    crops = [S.half_exact(torch.randn(BATCH, IN_CHANS, s, s, generator=gen) * 0.8 + 0.1)
             for s in [GLOBAL_SIZE] * 2 + [LOCAL_SIZE] * args.local_crops_number]
    center0 = S.half_exact(torch.randn(1, args.out_dim, generator=gen) * 0.05)
    state0 = S.snapshot(student.state_dict().items())

    S.single_process_group()
    if off.utils.has_batchnorms(student):  # main_dino: SyncBatchNorm (a stand-in keeps BatchNorm2d) and a DDP teacher
        teacher = nn.parallel.DistributedDataParallel(teacher)
        teacher_without_ddp = teacher.module
    else:
        teacher_without_ddp = teacher
    student = nn.parallel.DistributedDataParallel(student)
    teacher_without_ddp.load_state_dict(student.module.state_dict())  # main_dino: same weights at the start
    for p in teacher.parameters():
        p.requires_grad = False
    with torch.no_grad():  # mid-training: the teacher is not the student (the test applies the same rule)
        for p in teacher_without_ddp.parameters():
            p.copy_((p * TEACHER_SCALE).half().float())
    teacher0 = S.snapshot(teacher_without_ddp.named_parameters())

    dino_loss = off.main.DINOLoss(args.out_dim, n_crops, args.warmup_teacher_temp, args.teacher_temp,
                                  args.warmup_teacher_temp_epochs, args.epochs)
    dino_loss.center = center0.clone()
    params_groups = off.utils.get_params_groups(student)
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params_groups)
    elif args.optimizer == "sgd":
        optimizer = torch.optim.SGD(params_groups, lr=0, momentum=0.9)
    else:
        raise SystemExit(f"optimizer {args.optimizer} is not recorded here")
    lr_schedule = off.utils.cosine_scheduler(args.lr * EFFECTIVE_BATCH / 256., args.min_lr, args.epochs,
                                             ITERATIONS_PER_EPOCH, warmup_epochs=args.warmup_epochs)
    wd_schedule = off.utils.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, ITERATIONS_PER_EPOCH)
    momentum_schedule = off.utils.cosine_scheduler(args.momentum_teacher, 1, args.epochs, ITERATIONS_PER_EPOCH)

    # observers (nothing here changes what the official code computes)
    names = {id(p): n for n, p in student.module.named_parameters()}
    raw_grads, step_grads, after_step, step_groups, teachers, centers, losses = [], [], [], [], [], [], []
    clip_gradients = off.utils.clip_gradients

    def observed_clip(model, clip):
        raw_grads.append({n: p.grad.detach().clone() for n, p in model.module.named_parameters() if p.grad is not None})
        return clip_gradients(model, clip)

    off.utils.clip_gradients = observed_clip
    sync_logger = off.utils.MetricLogger.synchronize_between_processes
    off.utils.MetricLogger.synchronize_between_processes = lambda self: None  # stand-in: logger stats on 'cuda'
    def before_step(opt, *_):
        step_grads.append({names[id(p)]: p.grad.detach().clone() for g in opt.param_groups for p in g["params"]
                           if p.grad is not None})
        step_groups.append([{"lr": g["lr"], "weight_decay": g["weight_decay"]} for g in opt.param_groups])

    def after_loss(mod, inp, out):
        losses.append(float(out.item()))
        centers.append(mod.center.detach().clone())

    optimizer.register_step_pre_hook(before_step)
    optimizer.register_step_post_hook(lambda opt, *_: after_step.append(S.snapshot(student.module.named_parameters())))
    teacher_without_ddp.register_forward_pre_hook(lambda mod, inp: teachers.append(S.snapshot(mod.named_parameters())))
    dino_loss.register_forward_hook(after_loss)

    loader = S.FixedBatches([(crops, torch.zeros(BATCH))] * STEPS, ITERATIONS_PER_EPOCH)
    try:
        with S.cuda_calls_on_cpu(), S.quiet():
            off.main.train_one_epoch(student, teacher, teacher_without_ddp, dino_loss, loader, optimizer, lr_schedule,
                                     wd_schedule, momentum_schedule, EPOCH, None, args)
    finally:
        off.utils.clip_gradients = clip_gradients
        off.utils.MetricLogger.synchronize_between_processes = sync_logger
    teachers.append(S.snapshot(teacher_without_ddp.named_parameters()))
    assert len(losses) == len(after_step) == STEPS and len(teachers) == STEPS + 1

    trainable = [n for n, p in student.module.named_parameters() if p.requires_grad]
    params0 = {n: state0[n] for n in trainable}
    deltas = [S.without_key_bias(S.changes(params0, {n: a[n] for n in trainable})) for a in after_step]
    t_deltas = [S.without_key_bias(S.changes(teacher0, t)) for t in teachers[1:]]
    raw = S.without_key_bias(raw_grads[0])
    clipped = S.without_key_bias(step_grads[0])
    its = [EPOCH * ITERATIONS_PER_EPOCH + i for i in range(STEPS)]

    tensors = {f"official/{k}": (v.half() if v.is_floating_point() else v) for k, v in state0.items()}
    for i, c in enumerate(crops):
        tensors[f"input/crop{i}"] = c.half()
    tensors["input/center"] = center0.half()
    for i, c in enumerate(centers):
        tensors[f"center{i + 1}/center"] = c.float()
    for k in DELTA_KEYS[arch]:
        if k in raw:
            tensors[f"grad/{k}"] = raw[k].float()
        for i in range(STEPS):
            tensors[f"delta{i + 1}/{k}"] = deltas[i][k].float()
    buffers = {k: v for k, v in student.module.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    t_buffers = {k: v for k, v in teacher_without_ddp.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    group_names = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    rec = {
        "method": "dino",
        "arch": arch,
        "official_repo": "https://github.com/facebookresearch/dino",
        "official_commit": commit,
        "model": {"backbone": ({**VIT, "img_size": GLOBAL_SIZE, "norm_layer": "LayerNorm(eps=1e-6)"} if arch == "vit" else
                               {"torchvision": "ResNet(BasicBlock)", "widths": list(RESNET_WIDTHS),
                                "layers": list(RESNET_LAYERS), "stem_width": STEM_WIDTH}),
                  "in_chans": IN_CHANS, "head": {"in_dim": int(student.module.head.mlp[0].in_features),
                                                 "out_dim": args.out_dim, **HEAD, "nlayers": 3},
                  "crops": [list(c.shape) for c in crops], "batch": BATCH, "seed": SEED},
        "official_settings": {"flags": FLAGS[arch], "effective_batch": EFFECTIVE_BATCH,
                              **{k: getattr(args, k) for k in (
                                  "optimizer", "lr", "min_lr", "epochs", "warmup_epochs", "weight_decay",
                                  "weight_decay_end", "momentum_teacher", "warmup_teacher_temp", "teacher_temp",
                                  "warmup_teacher_temp_epochs", "clip_grad", "freeze_last_layer", "norm_last_layer",
                                  "use_bn_in_head", "drop_path_rate", "out_dim", "local_crops_number")},
                              "optimizer_defaults": {k: v for k, v in optimizer.defaults.items()
                                                     if isinstance(v, (int, float, tuple, bool))},
                              "param_groups": group_names, "iterations_per_epoch": ITERATIONS_PER_EPOCH,
                              "teacher_scale": TEACHER_SCALE},
        "iterations": [{"it": it, "epoch": EPOCH, "lr": float(lr_schedule[it]), "weight_decay": float(wd_schedule[it]),
                        "momentum": float(momentum_schedule[it]),
                        "teacher_temp": float(dino_loss.teacher_temp_schedule[EPOCH]), "loss": losses[i],
                        "optimizer_groups": step_groups[i]} for i, it in enumerate(its)],
        "loss": losses[0],
        "last_layer_cancelled": sorted(n for n in trainable if n not in step_grads[0]),
        "grad_norm": S.norms(raw), "grad_fingerprint": S.fingerprints(raw),
        "clipped_grad_norm": S.norms(clipped), "clipped_grad_fingerprint": S.fingerprints(clipped),
        "delta_keys": list(DELTA_KEYS[arch]),
    }
    for i in range(STEPS):
        rec[f"delta{i + 1}_norm"], rec[f"delta{i + 1}_fingerprint"] = S.norms(deltas[i]), S.fingerprints(deltas[i])
        rec[f"teacher_delta{i + 1}_norm"] = S.norms(t_deltas[i])
        rec[f"teacher_delta{i + 1}_fingerprint"] = S.fingerprints(t_deltas[i])
    if buffers:
        rec["bn_after_norm"], rec["bn_after_fingerprint"] = S.norms(buffers), S.fingerprints(buffers)
        rec["teacher_bn_after_norm"], rec["teacher_bn_after_fingerprint"] = S.norms(t_buffers), S.fingerprints(t_buffers)
    S.write(f"dino_{arch}", tensors, rec, out)
    clipped_n = sum(1 for n in raw if rec["grad_norm"][n] > args.clip_grad)
    print(f"official DINO ({arch}) losses {[round(x, 8) for x in losses]}, lr {rec['iterations'][0]['lr']:.3e}, "
          f"{clipped_n} of {len(raw)} gradients clipped, cancelled: {rec['last_layer_cancelled']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", type=Path, required=True, help="root of a facebookresearch/dino checkout or archive")
    ap.add_argument("--commit", help="its commit (read with git when DIR is a checkout)")
    ap.add_argument("--arch", choices=["vit", "resnet", "all"], default="all")
    ap.add_argument("--out", type=Path, default=S.OUT, help="output directory")
    a = ap.parse_args()
    torch.set_num_threads(1)
    commit = S.official_commit(a.official, a.commit)
    S.check_commit(commit, EXPECTED_COMMIT, "DINO")
    off = load_official(a.official.resolve())
    for arch in (["vit", "resnet"] if a.arch == "all" else [a.arch]):
        record(off, arch, commit, a.out)


if __name__ == "__main__":
    main()
