"""DINO (issues 6/7): loss, centering, schedules, EMA teacher, head, multi-crop, ViT local crops, timm export."""

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from sslrecipe.errors import RecipeError
from sslrecipe.ssl.dino import DINOHead, DINOLoss, cosine_value
from sslrecipe.ssl.registry import create_method
from sslrecipe.ssl.vit_utils import vit_forward, vit_tokens

SMALL_HEAD = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}


def tiny_dino(img_size=64, in_chans=1, name="vit_tiny_patch16_224", depth=2, **opts):
    torch.manual_seed(0)
    kwargs = {"depth": depth} if name.startswith("vit") else {}
    return create_method("dino", name, in_chans, img_size, {**SMALL_HEAD, "local_crops_number": 2, **opts}, kwargs)


def crops_for(m, n=3, seed=0):
    img = torch.rand(m.student_backbone.patch_embed.proj.in_channels if m.family == "vit" else 1, 90, 120,
                     generator=torch.Generator().manual_seed(seed))
    return m.collate([m.views(img, np.random.default_rng(seed * 100 + i)) for i in range(n)])


def test_loss_matches_the_definition_and_updates_the_center():
    torch.manual_seed(0)
    loss_fn = DINOLoss(5, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(torch.randn(1, 5))
    center0 = loss_fn.center.clone()
    B, ncrops = 3, 4
    s = torch.randn(ncrops * B, 5)
    t = torch.randn(2 * B, 5)
    got = loss_fn(s, t, teacher_temp=0.04, ncrops=ncrops)
    terms = []
    for iq in range(2):
        q = F.softmax((t[iq * B : (iq + 1) * B] - center0) / 0.04, dim=-1)
        for v in range(ncrops):
            if v != iq:
                logp = F.log_softmax(s[v * B : (v + 1) * B] / 0.1, dim=-1)
                terms.append((-(q * logp).sum(-1)).mean())
    assert len(terms) == 2 * ncrops - 2
    assert torch.allclose(got, torch.stack(terms).mean(), atol=1e-5)
    assert torch.allclose(loss_fn.center, 0.9 * center0 + 0.1 * t.mean(0, keepdim=True), atol=1e-6)


def test_head_weight_normed_last_layer_and_norm_last_layer():
    head = DINOHead(12, 40, hidden_dim=16, bottleneck_dim=8)
    assert not head.last_layer.weight_g.requires_grad and torch.equal(head.last_layer.weight_g, torch.ones(40, 1))
    x = torch.randn(5, 12)
    out = head(x)
    z = F.normalize(head.mlp(x), dim=-1)
    w = head.last_layer.weight_v / head.last_layer.weight_v.norm(dim=1, keepdim=True)
    assert torch.allclose(out, z @ w.t(), atol=1e-6) and out.shape == (5, 40)
    assert out.abs().max() <= 1.0 + 1e-5  # unit vectors times unit rows
    free = DINOHead(12, 40, norm_last_layer=False, hidden_dim=16, bottleneck_dim=8)
    assert free.last_layer.weight_g.requires_grad
    assert [type(l).__name__ for l in DINOHead(12, 40, use_bn=True, hidden_dim=16, bottleneck_dim=8).mlp] == [
        "Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]


def test_multicrop_views_and_student_drop_path():
    m = tiny_dino(64)
    assert (m.local_size, m.global_scale, m.local_scale, m.wd_end) == (32, (0.4, 1.0), (0.05, 0.4), 0.4)
    batch = crops_for(m)
    assert [tuple(b.shape) for b in batch] == [(3, 1, 64, 64)] * 2 + [(3, 1, 32, 32)] * 2
    again = crops_for(m)
    assert all(torch.equal(a, b) for a, b in zip(batch, again))
    assert m.student_backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert all(type(b.drop_path1).__name__ == "Identity" for b in m.teacher_backbone.blocks)
    rgb = tiny_dino(64, in_chans=3)
    assert [tuple(b.shape[1:]) for b in crops_for(rgb)] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 2
    assert create_method("dino", "vit_tiny_patch16_224", 1, 224, SMALL_HEAD, {"depth": 1}).local_size == 96


def _official_interpolate_pos_encoding(pos_embed, npatch_new_side, n_old_side):
    """DINO's ``interpolate_pos_encoding`` for a square crop, written out from the official code."""
    cls, patch = pos_embed[:, :1], pos_embed[:, 1:]
    w0 = npatch_new_side + 0.1
    patch = F.interpolate(patch.reshape(1, n_old_side, n_old_side, -1).permute(0, 3, 1, 2),
                          scale_factor=(w0 / n_old_side, w0 / n_old_side), mode="bicubic")
    return torch.cat([cls, patch.permute(0, 2, 3, 1).reshape(1, -1, pos_embed.shape[-1])], dim=1)


def test_local_crops_run_through_the_interpolated_position_embedding():
    m = tiny_dino(64).eval()
    vit = m.student_backbone
    local = torch.randn(2, 1, 32, 32)
    tokens, grid = vit_tokens(vit, local)
    assert grid == (2, 2) and tokens.shape == (2, 5, 192)
    patches = vit.patch_embed.proj(local).flatten(2).transpose(1, 2)
    want_pos = _official_interpolate_pos_encoding(vit.pos_embed, 2, 4)
    want = torch.cat([vit.cls_token.expand(2, -1, -1), patches], 1) + want_pos
    assert torch.allclose(tokens, want, atol=1e-5)
    # the same forward on a global crop is timm's own forward (no interpolation)
    glob = torch.randn(2, 1, 64, 64)
    assert torch.allclose(vit_forward(vit, glob), vit.forward_features(glob), atol=1e-5)
    # and the position embedding really reaches the local-crop features
    before = m.backbone_features(vit, local)
    with torch.no_grad():
        vit.pos_embed.add_(torch.randn_like(vit.pos_embed))
    assert not torch.allclose(m.backbone_features(vit, local), before, atol=1e-4)


def test_schedules_ema_weight_decay_clipping_and_last_layer_freeze():
    m = tiny_dino(32, momentum_teacher=0.996, warmup_teacher_temp=0.04, teacher_temp=0.07,
                  warmup_teacher_temp_fraction=0.5, freeze_last_layer_fraction=0.5, clip_grad=1e-3)
    total = 4
    assert [round(m.teacher_temp_at(i, total), 4) for i in range(4)] == [0.04, 0.07, 0.07, 0.07]
    assert m.momentum_at(0, total) == pytest.approx(0.996) and m.momentum_at(total, total) == pytest.approx(1.0)
    groups = m.param_groups(0.04)
    opt = torch.optim.AdamW(groups, lr=1e-2)
    batch = crops_for(m, n=2)
    last_v0 = m.student_head.last_layer.weight_v.detach().clone()
    for step in range(1, total + 1):
        teacher0 = [p.detach().clone() for p in m.teacher_parameters()]
        student_before = [p.detach().clone() for p in m.student_parameters()]
        loss = m(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        it = step - 1
        assert opt.param_groups[0]["weight_decay"] == pytest.approx(cosine_value(0.04, 0.4, it, total) if it else 0.04)
        assert opt.param_groups[1]["weight_decay"] == 0.0
        for p in m.student_parameters():  # per-parameter clipping to 1e-3 happened before the step
            if p.grad is not None:
                assert p.grad.norm() <= 1e-3 * (1 + 1e-4)
        if step <= 2:  # first half: last layer frozen (grads dropped)
            assert m.student_head.last_layer.weight_v.grad is None
            assert torch.equal(m.student_head.last_layer.weight_v, last_v0)
        m.after_step(step, total)
        mom = m.momentum_at(it, total)
        for t0, s1, t1 in zip(teacher0, m.student_parameters(), m.teacher_parameters()):
            assert torch.allclose(t1, mom * t0 + (1 - mom) * s1, atol=1e-6)
        assert any(not torch.equal(a, b) for a, b in zip(student_before, m.student_parameters()))
    assert m.student_head.last_layer.weight_v.grad is not None  # unfrozen later
    assert int(m.iteration) == total and int(m.total_steps) == total
    # a checkpoint round trip keeps the schedule position (buffers in the state dict)
    fresh = tiny_dino(32)
    fresh.load_state_dict(m.state_dict())
    assert int(fresh.iteration) == total and torch.equal(fresh.loss_fn.center, m.loss_fn.center)


def test_in_the_training_loop_and_strict_export(tmp_path):
    from sslrecipe.engine.events import EventLog
    from sslrecipe.engine.loop import LoopSettings, TrainLoop
    from sslrecipe.models.backbone import export_encoder, load_encoder
    from sslrecipe.recipe.schema import PretrainConfig

    m = tiny_dino(32)

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, key):
            i, seed = key
            return m.views(torch.rand(1, 40, 48, generator=torch.Generator().manual_seed(i)), np.random.default_rng(seed))

    cfg = PretrainConfig(method="dino", steps=2, batch_size=2, lr=1e-4, weight_decay=0.04)
    settings = LoopSettings(stage="pretrain", stage_dir=tmp_path, stage_hash="h", optim=cfg, batch_size=2, total_steps=2,
                            seed=0, device=torch.device("cpu"), drop_last=True, collate_fn=m.collate)
    loop = TrainLoop(settings, m, m.param_groups(0.04), Images(), lambda model, b: model(b), EventLog(tmp_path / "e.jsonl"),
                     after_step=m.after_step)
    result = loop.run()
    assert result.steps == 2 and math.isfinite(result.last_loss)
    assert loop.optimizer.param_groups[0]["weight_decay"] == pytest.approx(cosine_value(0.04, 0.4, 1, 2))
    kwargs = {"in_chans": 1, "num_classes": 0, "depth": 2, **m.export_timm_kwargs}
    export_encoder(m.encoder(), tmp_path / "enc", "vit_tiny_patch16_224", kwargs)
    enc, _meta = load_encoder(tmp_path / "enc")
    assert torch.equal(enc.pos_embed, m.teacher_backbone.pos_embed)
    timm.create_model("vit_tiny_patch16_224", **kwargs).load_state_dict(m.encoder().state_dict(), strict=True)


def test_cnn_variant_uses_pooled_features_and_the_resnet_defaults():
    m = tiny_dino(32, name="resnet18")
    assert (m.family, m.local_size, m.global_scale, m.local_scale, m.wd_end, m.export_timm_kwargs) == (
        "cnn", 14, (0.14, 1.0), (0.05, 0.14), None, {})
    batch = crops_for(m, n=2)
    assert [tuple(b.shape[-2:]) for b in batch] == [(32, 32)] * 2 + [(14, 14)] * 2
    out = m(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and m.student_backbone.conv1.weight.grad is not None
    assert m.teacher_backbone.conv1.weight.grad is None
    timm.create_model("resnet18", in_chans=1, num_classes=0).load_state_dict(m.encoder().state_dict(), strict=True)


def test_option_errors_name_the_recipe_key():
    with pytest.raises(RecipeError, match=r"pretrain\.options\.dino\.teacher_tmp: unknown option; did you mean 'teacher_temp'"):
        create_method("dino", "vit_tiny_patch16_224", 1, 32, {"teacher_tmp": 0.07}, {"depth": 1})
    with pytest.raises(RecipeError, match=r"pretrain\.options\.dino\.local_crop_size \(24\) must be a multiple"):
        create_method("dino", "vit_tiny_patch16_224", 1, 32, {"local_crop_size": 24, **SMALL_HEAD}, {"depth": 1})
    with pytest.raises(RecipeError, match=r"pretrain\.options\.dino\.global_crops_scale"):
        create_method("dino", "vit_tiny_patch16_224", 1, 32, {"global_crops_scale": [0.5, 0.2]}, {"depth": 1})
