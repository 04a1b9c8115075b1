"""ReSim (issue 6): window geometry, region InfoNCE, MoCo queue, momentum encoder, export with the FPN, learning."""

import math
from collections import OrderedDict

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from sslrecipe.errors import RecipeError, SSLRecipeError
from sslrecipe.ssl.registry import create_method
from sslrecipe.ssl.resim import (
    FPN_FILE,
    OPTIM_DEFAULTS,
    fpn_state_for_torchvision,
    load_fpn,
    map_windows,
    prroi_pool,
    window_grid,
)


def tiny_resim(img_size=64, in_chans=1, **opts):
    torch.manual_seed(0)
    return create_method("resim", "resnet18", in_chans, img_size, {"queue_size": 16, "fpn_dim": 32, "mlp_hidden": 64,
                                                                    "dim": 16, **opts}, {})


def smooth_image(c, h, w, seed):
    coarse = torch.rand(1, c, 7, 9, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0].clamp(0, 1)


def box_means(img, boxes):
    rois = torch.cat([torch.zeros(len(boxes), 1), torch.as_tensor(boxes, dtype=torch.float32)], 1)
    return roi_align(img[None].float(), rois, 1, spatial_scale=1.0, sampling_ratio=16, aligned=True).flatten(1)


def prroi_reference(maps, box, scale, samples=600):
    """PrRoIPool (1x1) by numerical quadrature, written independently of the code: the mean over a fine midpoint
    grid of the bilinear interpolant with cell j at coordinate j and 0 outside the map (the CUDA GetData)."""
    x0, y0, x1, y1 = (float(v) * scale for v in box)
    h, w = maps.shape[-2:]

    def hat_means(lo, hi, n):  # mean over the samples of max(0, 1 - |s - j|), per cell j
        s = lo + (torch.arange(samples, dtype=torch.float64) + 0.5) * (hi - lo) / samples
        return (1 - (s[:, None] - torch.arange(n, dtype=torch.float64)).abs()).clamp_min(0).mean(0)

    return torch.einsum("h,chw,w->c", hat_means(y0, y1, h), maps.double(), hat_means(x0, x1, w))


def test_region_pooling_is_prroipool_not_roi_align():
    """The official ReSim pools with PrRoIPool (exact box integral, no half-cell offset); ours must match it."""
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 16, 14, 14, generator=g)
    boxes = torch.tensor([[[0.0, 0, 48, 48], [32, 64, 80, 112], [150.5, 170.25, 224, 224], [5, 7, 19, 21]],
                          [[200, 3, 224, 51], [17.3, 41.9, 90.2, 77.7], [100, 100, 110, 104], [0, 0, 224, 224]]])
    got = prroi_pool(maps, boxes, 1 / 16)  # (B, n, C)
    ref = torch.stack([torch.stack([prroi_reference(maps[b], boxes[b, i], 1 / 16) for i in range(4)]) for b in range(2)])
    assert (got.double() - ref).abs().max() < 1e-4  # includes boxes reaching the far edge and narrower than a cell
    rois = torch.cat([torch.arange(2.0).repeat_interleave(4)[:, None], boxes.reshape(-1, 4)], 1)
    ours = got.reshape(8, -1).double()
    shifted = roi_align(maps, rois, 1, 1 / 16, 8, aligned=True).flatten(1).double()  # the half-cell offset
    assert (shifted - ref.reshape(8, -1)).abs().max() > 0.1 and (shifted - ours).abs().max() > 0.1
    sampled = roi_align(maps, rois, 1, 1 / 16, 8, aligned=False).flatten(1).double()  # sampled, clamped at the edge
    assert (sampled - ref.reshape(8, -1)).abs().max() > 1e-2
    # gradients reach exactly the cells under the box (and their hats)
    m = maps[:1].clone().requires_grad_(True)
    prroi_pool(m, torch.tensor([[[16.0, 16, 48, 48]]]), 1 / 16).sum().backward()
    touched = m.grad[0, 0].nonzero()
    assert touched.min().item() == 1 and touched.max().item() == 3
    assert prroi_pool(maps, torch.tensor([[[5.0, 5, 5, 9]]] * 2), 1 / 16).abs().max() == 0  # empty box -> 0
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the loop's autocast does not drop it to bf16
        assert torch.equal(prroi_pool(maps, boxes, 1 / 16), got)


def test_window_grid_is_the_official_one():
    p4, p3 = window_grid(224, 48, 32), window_grid(224, 32, 24)
    assert len(p4) == 36 and len(p3) == 64  # 6x6 and 8x8 at 224 px
    assert p4[0].tolist() == [0, 0, 48, 48] and p4[1].tolist() == [32, 0, 80, 48]  # row-major, x fastest
    assert p4[-1].tolist() == [160, 160, 208, 208] and p3[-1].tolist() == [168, 168, 200, 200]
    assert len(window_grid(64, 48, 32)) == 1 and len(window_grid(96, 32, 24)) == 9
    assert (window_grid(96, 32, 24)[:, 2:] < 96).all()


def test_windows_cover_the_same_source_pixels_in_both_views():
    """A window laid in the query view and mapped into the key view shows the same source pixels in both."""
    m = tiny_resim(96)
    H, W = 150, 190
    flips, n_valid, n_invalid, shifted_errs = set(), 0, 0, []
    for seed in range(12):
        img = smooth_image(2, H, W, seed)
        q, k, (b4, v4, b3, v3) = m.crops(img, np.random.default_rng(seed))
        flip, (tq, lq, hq, wq), (tk, lk, hk, wk) = m.geometry(H, W, np.random.default_rng(seed))  # the same draws
        flips.add(flip)
        for grid, boxes_k, valid in ((m.windows_p4, b4, v4), (m.windows_p3, b3, v3)):
            g = grid.numpy().astype(np.float64)
            # the window in source pixels of the *original* (unflipped) image
            x0, x1 = lq + g[:, 0] * wq / 96, lq + g[:, 2] * wq / 96
            y0, y1 = tq + g[:, 1] * hq / 96, tq + g[:, 3] * hq / 96
            if flip:
                x0, x1 = W - x1, W - x0
            src = box_means(img, np.stack([x0, y0, x1, y1], 1))
            in_q, in_k = box_means(q, grid), box_means(k, boxes_k)
            valid = valid.numpy()
            # inside the key view <=> the window's source box lies inside the key crop (flip-independent test)
            xs0, xs1 = (W - x1, W - x0) if flip else (x0, x1)
            inside = (xs0 >= lk) & (y0 >= tk) & ((xs1 - lk) * 96 / wk < 96) & ((y1 - tk) * 96 / hk < 96)
            assert (valid == inside).all()
            n_valid += int(valid.sum())
            n_invalid += int((~valid).sum())
            if valid.any():
                assert (in_q - src).abs().max() < 0.02
                assert (in_k[valid] - src[valid]).abs().max() < 0.02
                # control: the same windows 8 key-view pixels off do not match
                off = boxes_k[valid].clone()
                off[:, [0, 2]] += torch.where(off[:, 0:1] > 40, -8.0, 8.0)
                shifted_errs.append((box_means(k, off) - src[valid]).abs().max(1).values)
            assert torch.equal(boxes_k[~torch.from_numpy(valid)], torch.tensor([[0.0, 0, 1, 1]]).expand(int((~valid).sum()), 4))
    assert flips == {True, False} and n_valid > 50 and n_invalid > 20
    assert torch.cat(shifted_errs).median() > 0.02


def test_map_windows_identity_and_zoom():
    grid = window_grid(224, 48, 32)
    same, valid = map_windows(grid, (10, 20, 100, 100), (10, 20, 100, 100), 224)
    assert np.allclose(same, grid, atol=1e-4) and valid.all()
    # key crop = the right half of the query crop: windows in the left half are outside, the others shift and zoom x2
    boxes, valid = map_windows(grid, (0, 0, 224, 224), (0, 112, 224, 112), 224)
    assert not valid[grid[:, 0] < 112].any()
    right = (grid[:, 0] >= 112) & (grid[:, 2] < 224)
    assert valid[right].all() and np.allclose(boxes[right][:, 0], (grid[right][:, 0] - 112) * 2)


def test_region_loss_uses_every_pooled_key_cell_as_negative_and_ignores_invalid_windows():
    m = tiny_resim(64, temperature=0.2)
    g = torch.Generator().manual_seed(0)
    fq, fk = torch.randn(2, 8, 6, 6, generator=g), torch.randn(2, 8, 6, 6, generator=g)
    boxes_q = torch.tensor([[0.0, 0, 3, 3], [2, 1, 5, 4]])
    boxes_k = torch.tensor([[[1.0, 1, 4, 4], [0, 0, 1, 1]], [[3, 2, 6, 5], [0.5, 0.5, 3.5, 3.5]]])
    valid = torch.tensor([[True, False], [True, True]])
    got = m.region_loss(fq, fk, boxes_q, boxes_k, valid, scale=1.0)
    negs = [F.normalize(fk[b, :, y:y + 3, x:x + 3].mean((1, 2)), dim=0) for b in range(2) for y in range(4) for x in range(4)]
    negs = torch.stack(negs)  # 2 images x 4 x 4 cells, the positive's own cell included
    terms = []
    for b in range(2):
        for w in range(2):
            if not valid[b, w]:
                continue
            q = F.normalize(prroi_reference(fq[b], boxes_q[w], 1.0).float(), dim=0)
            k = F.normalize(prroi_reference(fk[b], boxes_k[b, w], 1.0).float(), dim=0)
            logits = torch.cat([(q @ k)[None], negs @ q]) / 0.2
            terms.append(-F.log_softmax(logits, 0)[0])
    assert torch.allclose(got, torch.stack(terms).mean(), atol=1e-5)
    assert m.region_loss(fq, fk, boxes_q, boxes_k, torch.zeros_like(valid), 1.0).item() == 0.0


def test_moco_loss_queue_shuffle_bn_and_no_gradient_to_the_key_encoder():
    m = tiny_resim(64, shuffle_bn_splits=1, queue_size=6)
    batch = m.collate([m.views(smooth_image(1, 80, 100, i), np.random.default_rng(i)) for i in range(4)])
    queue0 = m.queue.clone()
    q = F.normalize(m.query(batch[0])[0], dim=1)
    k = F.normalize(m.key(batch[1])[0], dim=1)
    out = m(batch)
    expected = F.cross_entropy(torch.cat([(q * k).sum(1, keepdim=True), q @ queue0], 1) / 0.2, torch.zeros(4, dtype=torch.long))
    assert torch.allclose(out["moco"], expected, atol=1e-5)
    assert torch.allclose(out["loss"], out["moco"] + out["region_p4"] + out["region_p3"])
    assert torch.allclose(m.queue[:, :4], k.detach().T, atol=1e-5) and torch.equal(m.queue[:, 4:], queue0[:, 4:])
    assert int(m.queue_ptr) == 4
    m(batch)  # wraps around: columns 4, 5, 0, 1
    assert int(m.queue_ptr) == 2
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in m.key.parameters())
    assert m.query.backbone.conv1.weight.grad is not None and m.query.fpn.fpn_output3.weight.grad is not None
    assert m.query.fc[0].weight.grad is not None and m.query.fpn.fpn_lateral5.weight.grad is not None
    # shuffle-BN emulation: keys computed on a random permutation in 2 BatchNorm groups, then un-permuted
    m2 = tiny_resim(64, shuffle_bn_splits=2)
    x = batch[1]
    torch.manual_seed(5)
    got = m2._encode_key(x)[0]
    torch.manual_seed(5)
    perm = torch.randperm(4)
    with torch.no_grad():
        want = torch.cat([m2.key(x[perm][:2])[0], m2.key(x[perm][2:])[0]])[torch.argsort(perm)]
        whole = m2.key(x)[0]
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, whole, atol=1e-3)


def test_one_step_moves_the_query_and_the_key_follows_with_momentum():
    m = tiny_resim(64, momentum=0.9)
    assert all(torch.equal(a, b) for a, b in zip(m.query.parameters(), m.key.parameters()))  # a copy at start
    groups = m.param_groups(1e-4)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 1e-4  # biases and BN decayed too, as officially
    assert len(groups[0]["params"]) == len(list(m.query.parameters()))
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=1e-4)
    batch = m.collate([m.views(smooth_image(1, 80, 100, i), np.random.default_rng(i)) for i in range(4)])
    q0 = [p.detach().clone() for p in m.query.parameters()]
    k0 = [p.detach().clone() for p in m.key.parameters()]
    m(batch)["loss"].backward()
    opt.step()
    m.after_step(1, 10)
    assert any(not torch.equal(a, b) for a, b in zip(q0, m.query.parameters()))
    for k_before, q_now, k_now in zip(k0, m.query.parameters(), m.key.parameters()):
        assert torch.allclose(k_now, 0.9 * k_before + 0.1 * q_now, atol=1e-6)


def test_training_loop_export_and_fpn_transfer(tmp_path):
    from sslrecipe.engine.events import EventLog
    from sslrecipe.engine.loop import LoopSettings, TrainLoop
    from sslrecipe.models.backbone import export_encoder
    from sslrecipe.recipe.schema import PretrainConfig
    from torchvision.ops import FeaturePyramidNetwork

    m = tiny_resim(64, in_chans=1, fpn_dim=16)

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, key):
            i, seed = key
            return m.views(smooth_image(1, 70, 90, i), np.random.default_rng(seed))

    cfg = PretrainConfig(method="resim", steps=2, batch_size=2, **OPTIM_DEFAULTS)
    settings = LoopSettings(stage="pretrain", stage_dir=tmp_path, stage_hash="h", optim=cfg, batch_size=2, total_steps=2,
                            seed=0, device=torch.device("cpu"), drop_last=True, collate_fn=m.collate)
    loop = TrainLoop(settings, m, m.param_groups(cfg.weight_decay), Images(), lambda model, b: model(b),
                     EventLog(tmp_path / "e.jsonl"), after_step=m.after_step)
    result = loop.run()
    assert result.steps == 2 and math.isfinite(result.last_loss) and type(loop.optimizer).__name__ == "SGD"
    out = tmp_path / "enc"
    export_encoder(m.encoder(), out, "resnet18", {"in_chans": 1, "num_classes": 0})
    written = m.export_extra(out)
    assert written == [out / FPN_FILE] and sorted(p.name for p in out.glob("encoder*.safetensors")) == [
        "encoder.safetensors", FPN_FILE]
    from safetensors.torch import load_file

    enc = timm.create_model("resnet18", in_chans=1, num_classes=0)
    enc.load_state_dict(load_file(str(out / "encoder.safetensors")), strict=True)
    assert torch.equal(enc.conv1.weight, m.query.backbone.conv1.weight)
    fpn = load_fpn(out / FPN_FILE)
    assert sorted(fpn.state_dict()) == sorted(["fpn_lateral5.weight", "fpn_lateral5.bias", "fpn_lateral4.weight",
                                               "fpn_lateral4.bias", "fpn_lateral3.weight", "fpn_lateral3.bias",
                                               "fpn_output4.weight", "fpn_output4.bias", "fpn_output3.weight",
                                               "fpn_output3.bias"])
    # the detector's torchvision FPN (levels at strides 4, 8, 16, 32) loaded from it computes the same P3 and P4
    tv = FeaturePyramidNetwork([64, 128, 256, 512], 16)
    missing, unexpected = tv.load_state_dict(fpn_state_for_torchvision(fpn.state_dict(), [4, 8, 16, 32]), strict=False)
    assert not unexpected and sorted(missing) == sorted(["inner_blocks.0.0.weight", "inner_blocks.0.0.bias",
                                                         "layer_blocks.0.0.weight", "layer_blocks.0.0.bias",
                                                         "layer_blocks.3.0.weight", "layer_blocks.3.0.bias"])
    enc.eval()
    with torch.no_grad():
        c2, c3, c4, c5 = enc.forward_intermediates(torch.randn(1, 1, 64, 64), indices=[1, 2, 3, 4], intermediates_only=True)
        levels = tv(OrderedDict((str(i), c) for i, c in enumerate((c2, c3, c4, c5))))
        p4, p3 = fpn(c3, c4, c5)
    assert torch.allclose(levels["1"], p3, atol=1e-5) and torch.allclose(levels["2"], p4, atol=1e-5)


def test_channels_sizes_and_errors():
    rgb = tiny_resim(96, in_chans=3)
    items = [rgb.views(torch.rand(3, 100, 130), np.random.default_rng(i)) for i in range(2)]
    batch = rgb.collate(items)
    assert [tuple(t.shape) for t in batch] == [(2, 3, 96, 96), (2, 3, 96, 96), (2, 4, 4), (2, 4), (2, 9, 4), (2, 9)]
    assert torch.isfinite(rgb(batch)["loss"])
    big = tiny_resim(128)
    assert big.windows_p4.shape == (9, 4) and "windows_p4" not in big.state_dict()
    # views() never reads the module's tensors: it works wherever the model lives (the loop moves it to the GPU)
    big.to("meta")
    assert big.views(torch.rand(1, 150, 140), np.random.default_rng(0))[2].shape == (9, 4)
    with pytest.raises(RecipeError, match=r"pretrain\.img_size 80: resim needs a multiple of 32"):
        tiny_resim(80)
    with pytest.raises(RecipeError, match=r"pretrain\.img_size 32"):
        tiny_resim(32)
    with pytest.raises(RecipeError, match=r"pretrain\.options\.resim\.queue_sz: unknown option; did you mean 'queue_size'"):
        create_method("resim", "resnet18", 1, 64, {"queue_sz": 8}, {})
    with pytest.raises(RecipeError, match=r"pretrain\.options\.resim\.crop_scale"):
        create_method("resim", "resnet18", 1, 64, {"crop_scale": [0.9, 0.2]}, {})
    with pytest.raises(SSLRecipeError, match=r"supports cnn backbones"):
        create_method("resim", "vit_tiny_patch16_224", 1, 64, {}, {})


def test_short_pretraining_beats_random_init_on_dense_correspondence(tmp_path):
    """Proxy task: on held-out synthetic scenes, retrieve each query-view window's partner among all key-view
    windows of all images (1-NN, cosine, RoI-pooled C3 features of the exported encoder in eval mode)."""
    from sslrecipe.data.synth import generate_synthetic
    from sslrecipe.data.unlabeled import UnlabeledImages
    from sslrecipe.engine.events import EventLog
    from sslrecipe.engine.loop import LoopSettings, TrainLoop
    from sslrecipe.recipe.schema import PretrainConfig
    from sslrecipe.ssl import views as V

    generate_synthetic(tmp_path / "pool", images=32, width=128, height=128, seed=0)
    generate_synthetic(tmp_path / "held", images=40, width=128, height=128, seed=1)
    torch.manual_seed(0)
    m = create_method("resim", "resnet18", 1, 64, {"queue_size": 256, "momentum": 0.99}, {})
    pool = UnlabeledImages(sorted((tmp_path / "pool" / "images").glob("*.png")), 1, transform=m.views)
    held = UnlabeledImages(sorted((tmp_path / "held" / "images").glob("*.png")), 1)

    rng = np.random.default_rng(123)
    views_a, views_b, boxes, valid = [], [], [], []
    for i in [j for j in range(len(held)) for _pair in range(2)]:  # two view pairs per image
        q, k, (_b4, _v4, b3, v3) = m.crops(held.load(i), rng)
        views_a.append(V.normalize(q))
        views_b.append(V.normalize(k))
        boxes.append(b3)
        valid.append(v3)
    a, b, boxes, valid = torch.stack(views_a), torch.stack(views_b), torch.stack(boxes), torch.stack(valid).reshape(-1)
    n = m.windows_p3.shape[0]
    idx = torch.arange(len(a), dtype=torch.float32).repeat_interleave(n)[:, None]
    rois_a = torch.cat([idx, m.windows_p3.repeat(len(a), 1)], 1)[valid]
    rois_b = torch.cat([idx, boxes.reshape(-1, 4)], 1)[valid]

    def correspondence_accuracy(encoder) -> float:
        encoder.eval()
        level = m.query.levels[0]  # stride 8 (C3)
        with torch.no_grad():
            fa = encoder.forward_intermediates(a, indices=[level], intermediates_only=True)[0]
            fb = encoder.forward_intermediates(b, indices=[level], intermediates_only=True)[0]
            ra = F.normalize(roi_align(fa, rois_a, 1, 1 / 8, 8, True).flatten(1), dim=1)
            rb = F.normalize(roi_align(fb, rois_b, 1, 1 / 8, 8, True).flatten(1), dim=1)
        encoder.train()
        return ((ra @ rb.T).argmax(1) == torch.arange(len(ra))).float().mean().item()

    assert len(rois_a) > 100
    before = correspondence_accuracy(m.encoder())
    # a short run: AdamW (the official SGD/lr 0.03 needs far more than a dozen steps)
    cfg = PretrainConfig(method="resim", steps=12, batch_size=8, optimizer="adamw", lr=3e-4, weight_decay=1e-4,
                         warmup_steps=0, schedule="constant")
    settings = LoopSettings(stage="pretrain", stage_dir=tmp_path / "run", stage_hash="h", optim=cfg, batch_size=8,
                            total_steps=12, seed=0, device=torch.device("cpu"), drop_last=True, collate_fn=m.collate,
                            checkpoint_every=1000)
    (tmp_path / "run").mkdir()
    TrainLoop(settings, m, m.param_groups(1e-4), pool, lambda model, batch: model(batch), EventLog(tmp_path / "e.jsonl"),
              after_step=m.after_step).run()
    after = correspondence_accuracy(m.encoder())
    print('dense correspondence 1-NN accuracy', before, after, len(rois_a))
    assert after >= before + 0.05, (before, after)
