"""Hybrid (issue 6): SparK + CMAE-style instance discrimination on CNNs. Views, loss, EMA target, the training
loop, strict export, errors. (Its learning probe shares SparK's random baseline: tests/test_ssl_spark.py.)"""

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from sslrecipe.errors import RecipeError, SSLRecipeError
from sslrecipe.ssl import sparse as S
from sslrecipe.ssl.hybrid import Hybrid, HybridOptions, cmae_momentum, info_nce
from sslrecipe.ssl.registry import create_method

TINY = {"decoder_width": 32, "proj_hidden_dim": 64, "proj_dim": 32}


def hybrid(in_chans=1, img_size=64, seed=0, **opts):
    torch.manual_seed(seed)
    return create_method("hybrid", "resnet18", in_chans, img_size, {**TINY, **opts}, {})


def test_defaults_follow_cmae_and_spark():
    o = HybridOptions()
    assert (o.temperature, o.contrastive_weight, o.reconstruction_weight, o.momentum, o.momentum_end) == (0.07, 1.0, 1.0, 0.996, 0.996)
    assert (o.proj_hidden_dim, o.proj_dim, o.mask_ratio, o.crop_scale) == (1536, 256, 0.6, (0.67, 1.0))
    assert round(o.max_shift_fraction * 224) == 31
    m = hybrid()
    assert isinstance(m, Hybrid) and m.encoder() is m.backbone
    assert [type(x).__name__ for x in m.projector.children()] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert m.projector.fc0.bias is not None and m.projector.fc1.bias is None and m.projector.bn0.eps == 1e-6
    assert m.projector.fc0.in_features == 512  # resnet18's last stage
    assert all(not p.requires_grad for p in list(m.teacher.parameters()) + list(m.target_projector.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(m.teacher_parameters(), m.student_parameters()))


def test_views_online_is_the_top_left_crop_and_target_a_shifted_crop_of_the_same_base():
    m = hybrid(img_size=64, target_color_augment=False)
    assert m.max_shift == round(31 / 224 * 64)
    img = torch.rand(1, 100, 130)
    for seed in range(4):
        online, target = m.views(img, np.random.default_rng(seed))
        assert online.shape == target.shape == (1, 64, 64)
        s = m.max_shift
        shifts = [(dy, dx) for dy in range(s + 1) for dx in range(s + 1)
                  if torch.allclose(online[:, dy:, dx:], target[:, : 64 - dy, : 64 - dx], atol=1e-6)]
        assert len(shifts) >= 1  # the same pixels of the base crop, shifted by at most max_shift
    a = m.views(img, np.random.default_rng(9))
    b = m.views(img, np.random.default_rng(9))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    jit = hybrid(img_size=64)  # with CMAE's colour augmentation the target differs from any shifted crop
    online, target = jit.views(img, np.random.default_rng(1))
    batch = jit.collate([jit.views(img, np.random.default_rng(i)) for i in range(3)])
    assert isinstance(batch, tuple) and batch[0].shape == batch[1].shape == (3, 1, 64, 64)


def test_loss_is_reconstruction_plus_2_tau_infonce_with_a_masked_pool():
    m = hybrid(contrastive_weight=0.5, reconstruction_weight=2.0)
    g = torch.Generator().manual_seed(0)
    online, target = torch.randn(4, 1, 64, 64, generator=g), torch.randn(4, 1, 64, 64, generator=g)
    active = m.mask(4, generator=torch.Generator().manual_seed(2))
    out = m((online, target), active)
    parts = m.forward_parts(online, active)  # training-mode BN: batch statistics, so the same values again
    q = m.online_embedding(parts["features"], active)
    k = m.target_embedding(target)
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).t() / 0.07
    ct = 2 * 0.07 * F.cross_entropy(logits, torch.arange(4))
    assert torch.allclose(out["loss_ct"], ct.detach(), atol=1e-5) and torch.allclose(info_nce(q, k, 0.07), ct, atol=1e-5)
    assert torch.allclose(out["loss"], 2.0 * out["loss_rec"] + 0.5 * out["loss_ct"], atol=1e-5)
    deep = parts["features"][-1]  # the pooled online feature: the mean over visible cells only
    vis = S.upsample_active(active, deep.shape[2], deep.shape[3])
    pooled = S.masked_global_pool(deep, active)
    assert torch.allclose(pooled, (deep * vis).sum((2, 3)) / vis.sum((2, 3)), atol=1e-5)
    assert not torch.allclose(pooled, deep.mean((2, 3)))
    # the target branch sees the unmasked view and never gets a gradient
    out["loss"].backward()
    assert all(p.grad is None for p in list(m.teacher.parameters()) + list(m.target_projector.parameters()))
    assert m.predictor.fc0.weight.grad is not None and m.backbone.conv1.weight.grad is not None


def test_one_step_changes_the_student_and_the_ema_target_follows_the_cmae_momentum():
    assert cmae_momentum(0.996, 0.996, 5, 10) == pytest.approx(0.996)  # CMAE: constant
    assert cmae_momentum(0.99, 1.0, 0, 10) == pytest.approx(0.99) and cmae_momentum(0.99, 1.0, 10, 10) == pytest.approx(1.0)
    assert cmae_momentum(0.99, 1.0, 5, 10) == pytest.approx(0.995)
    m = hybrid(momentum=0.9, momentum_end=1.0)
    opt = torch.optim.AdamW(m.param_groups(0.05), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(4, 1, 64, 64, generator=g), torch.randn(4, 1, 64, 64, generator=g))
    student0 = [p.detach().clone() for p in m.student_parameters()]
    teacher0 = [p.detach().clone() for p in m.teacher_parameters()]
    m(batch)["loss"].backward()
    with_grad = [p.grad is not None and bool(p.grad.abs().max() > 0) for p in m.student_parameters()]
    opt.step()
    m.after_step(3, 10)  # iteration k = 2 of 10 just finished
    mom = cmae_momentum(0.9, 1.0, 2, 10)
    student1 = list(m.student_parameters())
    changed = [not torch.equal(a, b) for a, b in zip(student0, student1)]
    # every parameter with a gradient moved (timm's zero-init last BN of each block blocks the first step's
    # gradient into that block's first conv/BN; those move only by weight decay, if at all)
    assert all(c for c, g in zip(changed, with_grad) if g) and sum(changed) > 0.7 * len(changed)
    for t0, t1, s1 in zip(teacher0, m.teacher_parameters(), student1):
        assert torch.allclose(t1, mom * t0 + (1 - mom) * s1.detach(), atol=1e-6)
    moved = sum(not torch.equal(a, b) for a, b in zip(teacher0, m.teacher_parameters()))
    assert moved == sum(changed) and int(m.iteration) == 3
    # the predictor and the decoder are not averaged into the target
    assert len(m.teacher_parameters()) == len(list(m.backbone.parameters())) + len(list(m.projector.parameters()))


def test_training_loop_and_strict_export_of_the_online_encoder(tmp_path):
    from safetensors.torch import load_file

    from sslrecipe.engine.events import EventLog
    from sslrecipe.engine.loop import LoopSettings, TrainLoop
    from sslrecipe.models.backbone import export_encoder
    from sslrecipe.recipe.schema import PretrainConfig

    m = hybrid(in_chans=1, img_size=64)

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, key):
            i, seed = key
            return m.views(torch.rand(1, 80, 90, generator=torch.Generator().manual_seed(i)), np.random.default_rng(seed))

    cfg = PretrainConfig(method="hybrid", steps=2, batch_size=2, optimizer="lamb", betas=(0.9, 0.95), lr=1e-3, weight_decay=0.04)
    settings = LoopSettings(stage="pretrain", stage_dir=tmp_path, stage_hash="h", optim=cfg, batch_size=2, total_steps=2,
                            seed=0, device=torch.device("cpu"), drop_last=True, collate_fn=m.collate)
    result = TrainLoop(settings, m, m.param_groups(cfg.weight_decay), Images(), lambda model, b: model(b),
                       EventLog(tmp_path / "e.jsonl"), after_step=m.after_step).run()
    assert result.steps == 2 and math.isfinite(result.last_loss)
    assert {"loss_rec", "loss_ct"} <= set(result.history[-1]["losses"])
    export_encoder(m.encoder(), tmp_path / "enc", "resnet18", {"in_chans": 1, "num_classes": 0})
    ref = timm.create_model("resnet18", in_chans=1, num_classes=0)
    ref.load_state_dict(load_file(str(tmp_path / "enc" / "encoder.safetensors")), strict=True)
    assert torch.equal(ref.conv1.weight, m.backbone.conv1.weight.detach())
    assert not torch.equal(ref.conv1.weight, m.teacher.conv1.weight)  # the online encoder, not the EMA target


def test_errors_name_the_hybrid_keys_and_families():
    with pytest.raises(RecipeError, match=r"pretrain\.options\.hybrid\.temprature: unknown option; did you mean 'temperature'"):
        create_method("hybrid", "resnet18", 1, 64, {"temprature": 0.1}, {})
    with pytest.raises(RecipeError, match=r"pretrain\.options\.hybrid\.momentum"):
        create_method("hybrid", "resnet18", 1, 64, {"momentum": 1.5}, {})
    with pytest.raises(RecipeError, match="multiple of 32"):
        hybrid(img_size=100)
    with pytest.raises(SSLRecipeError, match="cnn"):
        create_method("hybrid", "vit_tiny_patch16_224", 3, 64, {}, {})


def test_pretrain_init_loads_the_online_and_the_target_encoder_and_official_optimizer_defaults():
    from sslrecipe.ssl.registry import available

    m = hybrid()
    ref = timm.create_model("resnet18", in_chans=1, num_classes=0)
    m.load_encoder_weights(ref.state_dict())
    assert torch.equal(m.backbone.conv1.weight, ref.conv1.weight) and torch.equal(m.teacher.conv1.weight, ref.conv1.weight)
    for name in ("spark", "hybrid"):  # filled into the pretrain.* keys a recipe leaves unset
        d = available()[name].optim_defaults("resnet50")
        assert (d["optimizer"], tuple(d["betas"]), d["blr"], d["weight_decay"]) == ("lamb", (0.9, 0.95), 2e-4, 0.04)
