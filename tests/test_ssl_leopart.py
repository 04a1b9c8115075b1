"""Leopart (issue 7): Sinkhorn, crop intersections and RoI-aligned targets, foreground mask, queue, training step."""

import math
import warnings

import numpy as np
import pytest
import timm
import torch

from sslrecipe.ssl.leopart import (
    RANDOM_INIT_WARNING,
    align_to_boxes,
    crop_intersection_boxes,
    foreground_mask,
    keep_attention_mass,
    remove_small_components,
    sinkhorn,
)
from sslrecipe.ssl.registry import create_method

SMALL = {"num_prototypes": 20, "projection_dim": 16, "projection_hidden_dim": 32, "local_crops_number": 2, "queue_length": 0}


def tiny_leopart(img_size=64, **opts):
    torch.manual_seed(0)
    return create_method("leopart", "vit_tiny_patch16_224", 1, img_size, {**SMALL, **opts}, {"depth": 2})


def batch_for(m, n=2, seed=0):
    img = torch.rand(1, 90, 120, generator=torch.Generator().manual_seed(seed))
    return m.collate([m.views(img, np.random.default_rng(seed * 100 + i)) for i in range(n)])


def test_sinkhorn_rows_and_columns():
    torch.manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(48, 6), dim=1)  # cosine-like scores, B=48, K=6
    q = sinkhorn(scores, epsilon=0.05, iterations=3)
    assert q.shape == (48, 6) and (q >= 0).all()
    assert torch.allclose(q.sum(1), torch.ones(48), atol=1e-5)  # every sample is a distribution over prototypes
    # the prototypes' total mass converges to B/K = 8 each (equipartition) as the iterations grow
    assert torch.allclose(sinkhorn(scores, 0.05, 200).sum(0), torch.full((6,), 8.0), atol=1e-3)
    # the official loop, written out: Q = exp(s/eps)^T / sum; (rows to 1/K, columns to 1/B) x 3; columns to 1
    Q = torch.exp(scores / 0.05).t()
    Q /= Q.sum()
    for _ in range(3):
        Q *= ((torch.ones(6) / 6) / Q.sum(1)).unsqueeze(1)
        Q *= ((torch.ones(48) / 48) / Q.sum(0)).unsqueeze(0)
    assert torch.allclose(q, (Q / Q.sum(0, keepdim=True)).t(), atol=1e-6)


def test_intersection_boxes_in_each_crops_coordinates():
    boxes = np.array([[0, 0, 100, 100], [50, 20, 150, 120], [60, 30, 80, 50]], dtype=float)  # x1 y1 x2 y2
    gc, allb = crop_intersection_boxes(boxes, [200, 200, 40], n_global=2)
    assert gc.shape == (2, 3, 4) and allb.shape == (3, 2, 4)
    # crops 0 and 1 intersect in [50, 20, 100, 100]: in crop 0 (x2 scale) and crop 1 (x2 scale, offset 50, 20)
    assert torch.allclose(gc[0, 1], torch.tensor([100.0, 40, 200, 200]))
    assert torch.allclose(allb[1, 0], torch.tensor([0.0, 0, 100, 160]))
    assert torch.allclose(gc[1, 0], allb[1, 0]) and torch.allclose(allb[0, 1], gc[0, 1])
    # the local crop lies inside both globals: in its own coordinates it is the whole 40x40 crop
    assert torch.allclose(allb[2, 0], torch.tensor([0.0, 0, 40, 40])) and torch.allclose(allb[2, 1], allb[2, 0])
    assert torch.allclose(gc[1, 2], torch.tensor([20.0, 20, 60, 60]))
    assert torch.allclose(gc[0, 0], torch.tensor([0.0, 0, 200, 200]))  # a crop with itself: the whole crop


def test_roi_aligned_targets_of_identical_crops_are_the_crops_own_assignment():
    torch.manual_seed(0)
    patch, size = 16, 112  # a 7x7 patch grid, aligned to 7x7 cells
    q = torch.softmax(torch.randn(2, 7 * 7, 5), dim=-1).reshape(2, 7, 7, 5).permute(0, 3, 1, 2)
    boxes = np.array([[10, 10, 60, 60], [10, 10, 60, 60], [30, 30, 50, 50]], dtype=float)
    gc, _allb = crop_intersection_boxes(boxes, [size, size, 32], n_global=2)
    aligned = align_to_boxes(q, gc[0].unsqueeze(0).expand(2, -1, -1), patch, 7)  # crop 0's boxes to every crop
    assert aligned.shape == (2, 3, 5, 7, 7)
    assert torch.allclose(aligned[:, 1], q, atol=1e-6)  # crop 1 == crop 0: the targets are crop 0's own q
    assert torch.allclose(aligned[:, 1].sum(1), torch.ones(2, 7, 7), atol=1e-5)  # still distributions
    assert not torch.allclose(aligned[:, 2], q, atol=1e-3)  # a sub-box is a zoomed-in resampling


def test_foreground_mask_keeps_the_stated_attention_mass():
    torch.manual_seed(0)
    attn = torch.rand(5, 64) ** 4
    keep = keep_attention_mass(attn, 0.6)
    frac = attn / attn.sum(1, keepdim=True)
    for i in range(5):
        kept = frac[i][keep[i]]
        assert kept.sum() >= 0.6 - 1e-6  # at least the stated mass ...
        assert kept.sum() - kept.min() < 0.6  # ... by the fewest (largest) tokens
        assert frac[i][~keep[i]].max() <= kept.min()
    # on a map with a blob and a stray spike: the blob is foreground, the isolated pixel is removed
    grid = torch.full((8, 8), 0.01)
    grid[2:5, 2:6] = 1.0
    grid[7, 0] = 3.0
    mask = foreground_mask(grid.view(1, 64), (8, 8), threshold=0.6, blur_sigma=0.6)
    assert mask.shape == (1, 1, 8, 8) and mask[0, 0, 7, 0] == 0 and mask[0, 0, 3, 3] == 1


def test_small_components_are_removed_with_8_connectivity():
    m = torch.zeros(1, 6, 6, dtype=torch.bool)
    m[0, 0, 0] = True  # single pixel
    m[0, 2, 1] = m[0, 3, 0] = True  # diagonal pair: one 8-connected component of 2
    m[0, 0, 4] = m[0, 1, 4] = m[0, 1, 5] = True  # L of 3: kept
    m[0, 5, 0] = m[0, 5, 1] = m[0, 5, 2] = m[0, 4, 2] = True  # 4: kept
    out = remove_small_components(m)
    want = torch.zeros_like(m)
    want[0, 0, 4] = want[0, 1, 4] = want[0, 1, 5] = True
    want[0, 5, 0] = want[0, 5, 1] = want[0, 5, 2] = want[0, 4, 2] = True
    assert torch.equal(out, want)


def test_views_multi_crop_boxes_no_flip():
    m = tiny_leopart(64)
    img = torch.rand(1, 90, 120)
    views = m.views(img, np.random.default_rng(3))
    crops, gc, allb = views[:-2], views[-2], views[-1]
    assert [tuple(c.shape) for c in crops] == [(1, 64, 64)] * 2 + [(1, 32, 32)] * 2
    assert gc.shape == (2, 4, 4) and allb.shape == (4, 2, 4)
    assert (gc[..., 2:] > gc[..., :2]).all() and (allb[..., 2:] > allb[..., :2]).all()
    assert (gc >= -1e-4).all() and (gc <= 64 + 1e-4).all() and (allb[2:] <= 32 + 1e-4).all()
    again = m.views(img, np.random.default_rng(3))
    assert all(torch.equal(a, b) for a, b in zip(views, again))


def test_training_step_teacher_start_schedules_and_export(tmp_path):
    from sslrecipe.models.backbone import export_encoder, load_encoder

    m = tiny_leopart(64, queue_length=32)
    batch = batch_for(m)
    groups = m.param_groups(0.04)
    assert [g["lr_scale"] for g in groups] == [1.0, 1.0, 10.0, 10.0]
    opt = torch.optim.AdamW(groups, lr=1e-3)
    # pretrain.init loads DINO weights into encoder() (the student) before training
    donor = timm.create_model("vit_tiny_patch16_224", in_chans=1, num_classes=0, img_size=64, depth=2)
    m.encoder().load_state_dict(donor.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no random-init warning when weights were loaded
        out = m(batch)
    for a, b in zip(m.teacher_backbone.parameters(), donor.parameters()):
        assert torch.allclose(a, b, atol=1e-6)  # the teacher starts from the same weights (+ the EMA of equals)
    assert torch.allclose(m.student_head.prototypes.weight.norm(dim=1), torch.ones(20), atol=1e-5)
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    m.after_step(1, 3)
    assert int((m.queue[0].abs().sum(-1) > 0).sum()) > 0  # foreground teacher embeddings were queued
    out = m(batch)
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    m.after_step(2, 3)
    want_wd = 0.5 + 0.5 * (0.04 - 0.5) * (1 + math.cos(math.pi / 3))
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(want_wd)
    assert opt.param_groups[2]["weight_decay"] == pytest.approx(want_wd) and opt.param_groups[1]["weight_decay"] == 0
    kwargs = {"in_chans": 1, "num_classes": 0, "depth": 2, **m.export_timm_kwargs}
    export_encoder(m.encoder(), tmp_path, "vit_tiny_patch16_224", kwargs)
    load_encoder(tmp_path)


def test_random_init_warns_and_masks_all_bg_run():
    m = tiny_leopart(64, loss_mask="all")
    with pytest.warns(UserWarning, match="randomly initialised"):
        out = m(batch_for(m))
    assert RANDOM_INIT_WARNING.startswith("Leopart") and torch.isfinite(out["loss"])
    bg = tiny_leopart(64, loss_mask="bg")
    with pytest.warns(UserWarning):
        assert torch.isfinite(bg(batch_for(bg))["loss"])


def test_queue_is_used_once_full_and_scored_with_the_student_prototypes():
    m = tiny_leopart(64, queue_length=8)
    out = torch.randn(5, 20)
    emb = torch.nn.functional.normalize(torch.randn(5, 16), dim=1)
    first = m._queue_step(0, out, emb, None, bs=1)
    assert first.shape == (5, 20)  # not full yet: unused
    # min(10 * batch, 5) embeddings pushed in front (in a random order), the rest still empty
    assert (torch.cdist(m.queue[0, :5], emb).min(1).values < 1e-6).all() and not m.queue[0, 5:].any()
    m._queue_step(0, out, emb, None, bs=1)  # 5 more pushed: the 8 rows are filled
    queued = m.queue[0].clone()
    third = m._queue_step(0, out, emb, None, bs=1)
    assert third.shape == (13, 20)  # its 8 embeddings were scored and prepended to the batch's scores
    assert torch.allclose(third[:8], queued @ m.student_head.prototypes.weight.t(), atol=1e-5)
    assert torch.equal(third[8:], out)


def test_small_grids_and_bad_options_are_clear_errors():
    from sslrecipe.errors import RecipeError

    with pytest.raises(RecipeError, match="at least 4x4"):
        create_method("leopart", "vit_tiny_patch16_224", 1, 32, SMALL, {"depth": 1})
    with pytest.raises(RecipeError, match=r"pretrain\.options\.leopart\.loss_mask"):
        create_method("leopart", "vit_tiny_patch16_224", 1, 64, {"loss_mask": "foreground"}, {"depth": 1})


def test_teacher_ema_uses_the_pre_step_student_as_the_official_training_step():
    """Officially the EMA runs inside training_step, before Lightning's backward and optimizer step:
    teacher_{k+1} = m teacher_k + (1 - m) student_k with student_k the weights *before* step k."""
    m = tiny_leopart(64, loss_mask="all", momentum_teacher=0.9, momentum_teacher_end=0.9)
    donor = timm.create_model("vit_tiny_patch16_224", in_chans=1, num_classes=0, img_size=64, depth=2)
    m.encoder().load_state_dict(donor.state_dict())
    opt = torch.optim.SGD(m.param_groups(0.0), lr=0.5)

    def pairs():  # (teacher, student) parameters; prototypes are left out (re-normalised in place every step)
        t = dict(m.teacher_backbone.named_parameters()) | {f"h.{k}": v for k, v in m.teacher_head.named_parameters()}
        s = dict(m.student_backbone.named_parameters()) | {f"h.{k}": v for k, v in m.student_head.named_parameters()}
        return [(t[k], s[k]) for k in t if "prototypes" not in k]

    # the teacher backbone starts as the student (synced in the first forward); the head is its own init
    teacher = [s.detach().clone() if i < len(list(m.student_backbone.parameters())) else t.detach().clone()
               for i, (t, s) in enumerate(pairs())]
    old_order = [t.clone() for t in teacher]  # what an EMA after the optimizer step would give
    for step in range(2):
        out = m(batch_for(m, seed=step))
        student_before = [s.detach().clone() for _t, s in pairs()]
        teacher = [t * 0.9 + s * 0.1 for t, s in zip(teacher, student_before)]
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        m.after_step(step + 1, 2)
        old_order = [t * 0.9 + s.detach() * 0.1 for t, (_t, s) in zip(old_order, pairs())]
        for want, (got, _s) in zip(teacher, pairs()):
            assert torch.allclose(got, want, atol=1e-6)
    assert max((a - b).abs().max().item() for a, b in zip(teacher, old_order)) > 1e-3  # the orders differ here
    m.eval()
    before = [t.detach().clone() for t, _s in pairs()]
    m(batch_for(m, seed=5))  # an evaluation forward leaves the teacher alone
    assert all(torch.equal(a, t) for a, (t, _s) in zip(before, pairs()))
