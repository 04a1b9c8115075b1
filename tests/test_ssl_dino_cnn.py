"""DINO on ResNets (issue 6): centering, temperature schedule, teacher without gradients, one optimizer step with
per-parameter clipping and the last-layer freeze, the EMA teacher, torchvision init, the ResNet recipe, export."""

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from sslrecipe.ssl.dino import DINO
from sslrecipe.ssl.dino_cnn import OPTIM_DEFAULTS, DINOCNN, build_dino_cnn
from sslrecipe.ssl.registry import create_method

SMALL = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "local_crops_number": 2}


def tiny(img_size=64, in_chans=1, **opts):
    torch.manual_seed(0)
    return build_dino_cnn("resnet18", in_chans, img_size, {**SMALL, **opts}, {})


def batch_of(m, n=3, in_chans=1):
    imgs = [torch.rand(in_chans, 90, 110, generator=torch.Generator().manual_seed(i)) for i in range(n)]
    return m.collate([m.views(img, np.random.default_rng(i)) for i, img in enumerate(imgs)])


def test_resnet_recipe_defaults_views_and_torchvision_init():
    m = tiny(64)
    assert isinstance(m, DINO) and m.optim_defaults == OPTIM_DEFAULTS
    assert (OPTIM_DEFAULTS["optimizer"], OPTIM_DEFAULTS["blr"], OPTIM_DEFAULTS["weight_decay"]) == ("sgd", 0.03, 1e-4)
    assert (m.global_scale, m.local_scale, m.wd_end, m.local_size) == ((0.14, 1.0), (0.05, 0.14), None, 27)
    assert build_dino_cnn("resnet18", 1, 224, {**SMALL}, {}).local_size == 96
    # torchvision's zero_init_residual=False: no residual branch starts at zero; teacher = student
    assert all(float(blk.bn2.weight.detach().min()) == 1.0 for stage in (m.student_backbone.layer1, m.student_backbone.layer4) for blk in stage)
    assert all(torch.equal(a, b) for a, b in zip(m.student_backbone.state_dict().values(), m.teacher_backbone.state_dict().values()))
    crops = batch_of(m, 2)
    assert [tuple(c.shape) for c in crops] == [(2, 1, 64, 64)] * 2 + [(2, 1, 27, 27)] * 2
    with pytest.raises(Exception, match="ViT"):
        DINOCNN("vit_tiny_patch16_224", 1, 64, m.opts, {})
    assert isinstance(create_method("dino", "resnet18", 1, 64, SMALL, {}), DINO)  # `dino` on a CNN is available


def test_loss_centering_and_teacher_temperature_schedule():
    m = tiny(64, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_fraction=0.5)
    assert [round(m.teacher_temp_at(i, 6), 4) for i in range(6)] == [0.04, 0.055, 0.07, 0.07, 0.07, 0.07]
    m.after_step(1, 6)  # schedule position: iteration 1 of 6 -> 0.055
    crops = batch_of(m, 3)
    m.loss_fn.center.normal_()
    c0 = m.loss_fn.center.clone()
    with torch.no_grad():  # BN in training mode: batch statistics, so these equal what forward computes
        t = m.multicrop(m.teacher_backbone, m.teacher_head, crops[:2])
        s = m.multicrop(m.student_backbone, m.student_head, crops)
    out = m(crops)
    B, terms = 3, []
    for iq in range(2):
        p = F.softmax((t[iq * B:(iq + 1) * B] - c0) / 0.055, dim=-1)
        for v in range(4):
            if v != iq:
                terms.append(-(p * F.log_softmax(s[v * B:(v + 1) * B] / 0.1, dim=-1)).sum(-1).mean())
    assert len(terms) == 6 and torch.allclose(out["loss"], torch.stack(terms).mean(), atol=1e-4)
    assert torch.allclose(m.loss_fn.center, 0.9 * c0 + 0.1 * t.mean(0, keepdim=True), atol=1e-5)


def test_one_step_teacher_has_no_gradient_clipping_freeze_and_ema():
    m = tiny(64, momentum_teacher=0.9, clip_grad=1e-3, freeze_last_layer_fraction=0.5)
    total = 4
    opt = torch.optim.SGD(m.param_groups(1e-4), lr=0.5, momentum=0.9)  # the method's pre-step hook finds it
    crops = batch_of(m, 2)
    s0 = [p.detach().clone() for p in m.student_parameters()]
    t0 = [p.detach().clone() for p in m.teacher_parameters()]
    v0 = m.student_head.last_layer.weight_v.detach().clone()
    out = m(crops)
    opt.zero_grad()
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in m.teacher_parameters())
    opt.step()
    for p in m.student_parameters():  # clipped per parameter before the step
        if p.grad is not None:
            assert p.grad.norm() <= 1e-3 * (1 + 1e-4)
    assert m.student_head.last_layer.weight_v.grad is None and torch.equal(m.student_head.last_layer.weight_v, v0)
    assert opt.param_groups[0]["weight_decay"] == 1e-4 and opt.param_groups[1]["weight_decay"] == 0.0  # constant
    assert not torch.equal(m.student_backbone.conv1.weight, s0[0])
    m.after_step(1, total)
    mom = m.momentum_at(0, total)
    assert mom == pytest.approx(0.9)
    for before, s_now, t_now in zip(t0, m.student_parameters(), m.teacher_parameters()):
        assert torch.allclose(t_now, mom * before + (1 - mom) * s_now, atol=1e-6)
    assert m.momentum_at(2, total) == pytest.approx(1 - 0.1 * 0.5 * (1 + math.cos(math.pi * 2 / 4)))
    # past the frozen fraction the last layer trains
    m.after_step(3, total)
    m(crops)["loss"].backward()
    opt.step()
    assert m.student_head.last_layer.weight_v.grad is not None and not torch.equal(m.student_head.last_layer.weight_v, v0)


def test_resnet_recipe_in_the_training_loop_channels_sizes_and_strict_export(tmp_path):
    from sslrecipe.engine.events import EventLog
    from sslrecipe.engine.loop import LoopSettings, TrainLoop
    from sslrecipe.models.backbone import export_encoder, load_encoder
    from sslrecipe.recipe.schema import PretrainConfig

    rgb = tiny(96, 3)  # 3 channels and another multiple of 32
    crops = batch_of(rgb, 2, in_chans=3)
    assert [tuple(c.shape[1:]) for c in crops] == [(3, 96, 96)] * 2 + [(3, 41, 41)] * 2
    assert torch.isfinite(rgb(crops)["loss"])
    for in_chans, size in ((1, 64),):
        m = tiny(size, in_chans)

        class Images(torch.utils.data.Dataset):
            def __len__(self):
                return 4

            def __getitem__(self, key):
                i, seed = key
                img = torch.rand(in_chans, 100, 120, generator=torch.Generator().manual_seed(i))
                return m.views(img, np.random.default_rng(seed))

        cfg = PretrainConfig(method="dino", steps=2, batch_size=2, **OPTIM_DEFAULTS)
        run = tmp_path / f"run{in_chans}"
        run.mkdir()
        settings = LoopSettings(stage="pretrain", stage_dir=run, stage_hash="h", optim=cfg, batch_size=2, total_steps=2,
                                seed=0, device=torch.device("cpu"), drop_last=True, collate_fn=m.collate)
        loop = TrainLoop(settings, m, m.param_groups(cfg.weight_decay), Images(), lambda model, b: model(b),
                         EventLog(run / "e.jsonl"), after_step=m.after_step)
        result = loop.run()
        assert result.steps == 2 and math.isfinite(result.last_loss) and type(loop.optimizer).__name__ == "SGD"
        assert result.history[0]["lr"] == pytest.approx(0.03 * 2 / 256)  # blr 0.03 x batch / 256, cosine from the peak
        kwargs = {"in_chans": in_chans, "num_classes": 0, **m.export_timm_kwargs}
        export_encoder(m.encoder(), run / "enc", "resnet18", kwargs)
        enc, _ = load_encoder(run / "enc")
        assert torch.equal(enc.conv1.weight, m.teacher_backbone.conv1.weight)
        timm.create_model("resnet18", **kwargs).load_state_dict(m.encoder().state_dict(), strict=True)
