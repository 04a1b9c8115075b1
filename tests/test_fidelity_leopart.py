"""Leopart against the official code (issue 14, item 8): crop-intersection boxes, the attention foreground mask, the
loss with a full queue, gradients, two AdamW steps of the student, the EMA teacher and the queue.

The numbers were recorded by ``benchmarks/fidelity/leopart.py`` from MkuuWaUjinga/leopart (the commit is in
``tests/data/fidelity/leopart.json``): two iterations (global steps 10 and 11 of 20) of the official Lightning module
with ``train_coco_config.yml``'s settings at a small size; this test needs only the recorded files. Tolerances:
``fidelity_common``. Our method gets the same state: ``iteration`` 10 of ``total_steps`` 20, the recorded full
queue, the teacher backbone ``float16(0.9 x student backbone)`` (the recorder's rule) and the official teacher head;
torch's global RNG is seeded as the recorder seeded it and advanced as the official blur advances it (the queue's
``randperm``). The lr of each iteration is the
official one (the schedule is the training loop's); weight decay and teacher momentum come from our method.
The EMA update runs where the official ``training_step`` runs it: after the loss, before the optimizer step
(issue 14, item 5); the teacher's change and everything after the first step pin that order.
"""

import pytest
import torch

from fidelity_common import (assert_loss, assert_stats, assert_tensors, load_exact, load_record, section, set_lr)
from sslrecipe.engine.schedules import build_optimizer
from sslrecipe.recipe.schema import OptimConfig
from sslrecipe.ssl.leopart import crop_intersection_boxes, foreground_mask
from sslrecipe.ssl.registry import available, create_method
from sslrecipe.weights.convert import convert_state

REC, T = load_record("leopart")
OFFICIAL = section(T, "official")
KW = REC["official_settings"]["leopart_kwargs"]
TIMM_NAME = "vit_tiny_patch16_224"
HEAD = ("projection_head.", "prototypes.")


def timm_kwargs() -> dict:
    v = REC["model"]["vit"]
    return {"depth": v["depth"], "embed_dim": v["embed_dim"], "num_heads": v["num_heads"], "mlp_ratio": v["mlp_ratio"]}


def options() -> dict:
    """``train_coco_config.yml`` (as passed to the official ``Leopart``) as our ``pretrain.options.leopart``."""
    sizes, counts = REC["model"]["size_crops"], REC["model"]["nmb_crops"]
    return {"num_prototypes": KW["nmb_prototypes"], "projection_dim": KW["projection_feat_dim"],
            "projection_hidden_dim": KW["projection_hidden_dim"], "projection_layers": KW["n_layers_projection_head"],
            "temperature": KW["temperature"], "epsilon": KW["epsilon"], "sinkhorn_iterations": KW["sinkhorn_iterations"],
            "roi_align_size": KW["roi_align_kernel_size"], "loss_mask": KW["loss_mask"], "queue_length": KW["queue_length"],
            "momentum_teacher": KW["momentum_teacher"], "momentum_teacher_end": KW["momentum_teacher_end"],
            "weight_decay_end": KW["weight_decay_end"], "head_lr_scale": KW["lr_heads"] / KW["lr_backbone"],
            "drop_path_rate": 0.0, "local_crops_number": counts[1], "local_crop_size": sizes[1]}


def rename(name: str) -> str:
    """Our name (student or teacher) -> the official name inside ``model`` / ``teacher``."""
    for prefix in ("student_backbone.", "teacher_backbone.", "student_head.", "teacher_head."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def build():
    v = REC["model"]
    m = create_method("leopart", TIMM_NAME, v["in_chans"], v["vit"]["img_size"], options(), timm_kwargs())
    student = {k[len("model."):]: t for k, t in OFFICIAL.items() if k.startswith("model.")}
    backbone = {k: t for k, t in student.items() if not k.startswith(HEAD)}
    conv = convert_state({f"model.{k}": t for k, t in backbone.items()}, TIMM_NAME, v["in_chans"], "leopart",
                         {**timm_kwargs(), "img_size": v["vit"]["img_size"]})
    assert conv.prefix == "model." and not conv.missing and not conv.unexpected, conv.summary()
    scale = REC["official_settings"]["teacher_scale"]
    state = {f"student_backbone.{k}": t for k, t in conv.state_dict.items()}
    state.update({f"teacher_backbone.{k}": (t * scale).half().float() for k, t in conv.state_dict.items()})  # the rule
    state.update({f"student_head.{k}": t for k, t in student.items() if k.startswith(HEAD)})
    state.update({f"teacher_head.{k[len('teacher.'):]}": t for k, t in OFFICIAL.items() if k.startswith("teacher.")})
    state["queue"] = T["input/queue"]
    load_exact(m, state, "Leopart", keep=lambda k: k not in ("iteration", "total_steps"))
    m.iteration.fill_(REC["iterations"][0]["global_step"])
    m.total_steps.fill_(REC["official_settings"]["total_iterations"])
    m.train()
    return m


def batch() -> list[torch.Tensor]:
    n = sum(REC["model"]["nmb_crops"])
    return [T[f"input/crop{i}"] for i in range(n)] + [T["input/gc_boxes"], T["input/all_boxes"]]


def official_blur_draw() -> None:
    """The official foreground mask blurs with torchvision's ``GaussianBlur`` transform, which draws its sigma from
    U(0.6, 0.6) with torch's global RNG once per step; ours calls the blur function (no draw). Making the same draw
    keeps the queue's ``randperm`` on the official random stream (the values are unaffected)."""
    torch.empty(1).uniform_(0.6, 0.6)


def test_crop_intersection_boxes_are_the_official_ones():
    sizes = [s for s, n in zip(REC["model"]["size_crops"], REC["model"]["nmb_crops"]) for _ in range(n)]
    for b, boxes in enumerate(T["input/crop_boxes"]):
        gc, all_ = crop_intersection_boxes(boxes.double().numpy(), sizes, REC["model"]["nmb_crops"][0])
        torch.testing.assert_close(gc, T["input/gc_boxes"][b], rtol=0, atol=1e-4)
        torch.testing.assert_close(all_, T["input/all_boxes"][b], rtol=0, atol=1e-4)


def test_foreground_mask_is_the_official_one():
    m = build()
    crops = batch()[: REC["model"]["nmb_crops"][0]]
    with torch.no_grad():
        _tokens, attn = m._spatial(m.teacher_backbone, crops, with_attention=True)
    res = crops[0].shape[-1] // m.patch
    mask = foreground_mask(attn, (res, res), m.opts.fg_threshold, m.opts.fg_blur_sigma)
    official = T["mask1/attn_hard"].float()
    assert 0 < int(official.sum()) < official.numel()  # a mask that keeps some cells and drops others
    assert torch.equal(mask, official)


def test_optimizer_defaults_and_groups_are_the_official_ones():
    m = build()
    cfg = OptimConfig(**available()["leopart"].optim_defaults(TIMM_NAME))  # what the pipeline fills into pretrain.*
    s = REC["official_settings"]
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay) == (KW["optimizer"], KW["lr_backbone"], KW["weight_decay"])
    assert tuple(cfg.betas) == tuple(s["optimizer_defaults"]["betas"])
    assert m.opts.head_lr_scale == pytest.approx(KW["lr_heads"] / KW["lr_backbone"])
    optimizer = build_optimizer(m.param_groups(cfg.weight_decay), cfg, lr=cfg.lr)
    assert optimizer.defaults["eps"] == s["optimizer_defaults"]["eps"]
    names = {id(p): rename(n) for n, p in m.named_parameters()}
    assert [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups] == s["param_groups"]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([KW["lr_backbone"]] * 2 + [KW["lr_heads"]] * 2)


def test_loss_gradients_and_two_steps_equal_the_official_training():
    m = build()
    cfg = OptimConfig(**available()["leopart"].optim_defaults(TIMM_NAME))
    optimizer = build_optimizer(m.param_groups(cfg.weight_decay), cfg, lr=cfg.lr)
    total = int(m.total_steps)
    start = {n: p.detach().clone() for n, p in m.named_parameters()}
    torch.manual_seed(REC["model"]["rng_seed"])  # the queue's randperm, as the recorder seeded it
    for i, it in enumerate(REC["iterations"]):  # as TrainLoop.run does one step
        step = it["global_step"]
        assert int(m.iteration) == step
        assert m.momentum_at(step, total) == pytest.approx(it["momentum"], rel=1e-12)
        optimizer.zero_grad(set_to_none=True)
        set_lr(optimizer, it["lr_backbone"])
        official_blur_draw()
        loss = m(batch())["loss"]  # the EMA teacher update runs here, as in the official training_step
        assert_loss(float(loss.detach()), it["loss"], f"Leopart loss of iteration {i}")
        loss.backward()
        if i == 0:
            grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
            assert_stats(grads, REC["grad_norm"], REC["grad_fingerprint"], "Leopart gradients", rename)
            assert_tensors(grads, section(T, "grad"), "Leopart gradients (stored whole)", rename)
        optimizer.step()  # our pre-step hook: the scheduled weight decay
        assert [v for g in optimizer.param_groups for v in (g["lr"], g["weight_decay"])] == pytest.approx(
            [v for g in it["optimizer_groups"] for v in (g["lr"], g["weight_decay"])], rel=1e-12)
        m.after_step(step + 1, total)
        k = f"delta{i + 1}"
        student = {n: p.detach().double() - start[n].double() for n, p in m.named_parameters()
                   if n.startswith("student_") and p.requires_grad}
        teacher = {n: p.detach().double() - start[n].double() for n, p in m.named_parameters() if n.startswith("teacher_")}
        assert_stats(student, REC[f"{k}_norm"], REC[f"{k}_fingerprint"], f"Leopart student change after step {i + 1}",
                     rename)
        assert_tensors(student, section(T, k), f"Leopart student change after step {i + 1} (stored whole)", rename)
        assert_stats(teacher, REC[f"teacher_{k}_norm"], REC[f"teacher_{k}_fingerprint"],
                     f"Leopart teacher (EMA) change after step {i + 1}", rename)
        assert_tensors({"queue": m.queue}, section(T, f"queue{i + 1}"), f"Leopart queue after iteration {i}")


def test_the_comparison_notices_the_ema_after_the_optimizer_step():
    """Control: the order this project used before issue 14 item 5 (EMA from the stepped student) misses the
    recorded teacher."""
    m = build()
    cfg = OptimConfig(**available()["leopart"].optim_defaults(TIMM_NAME))
    optimizer = build_optimizer(m.param_groups(cfg.weight_decay), cfg, lr=cfg.lr)
    start = {n: p.detach().clone() for n, p in m.named_parameters() if n.startswith("teacher_")}
    torch.manual_seed(REC["model"]["rng_seed"])
    set_lr(optimizer, REC["iterations"][0]["lr_backbone"])
    m.eval()  # forward without its EMA ...
    loss = m(batch())["loss"]
    loss.backward()
    optimizer.step()
    from sslrecipe.ssl.ema import ema_update

    ema_update(m.teacher_parameters(), m.student_parameters(),  # ... and the EMA after the step instead
               m.momentum_at(int(m.iteration), int(m.total_steps)))
    teacher = {n: p.detach().double() - start[n].double() for n, p in m.named_parameters() if n.startswith("teacher_")}
    with pytest.raises(AssertionError, match="differs from the official code"):
        assert_stats(teacher, REC["teacher_delta1_norm"], REC["teacher_delta1_fingerprint"], "Leopart teacher", rename)
