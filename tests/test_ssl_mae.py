"""MAE (issue 7): masking, loss, norm-pix target, decoder isolation, timm export, learning probe (k-NN)."""

import math

import numpy as np
import pytest
import timm
import torch

from sslrecipe.errors import RecipeError, SSLRecipeError
from sslrecipe.ssl import views as V
from sslrecipe.ssl.mae import MAE, MAEOptions
from sslrecipe.ssl.registry import create_method
from sslrecipe.ssl.vit_utils import resize_pos_embed_in_state, sincos_pos_embed_2d


DEPTH = 2  # the real widths, heads and patch sizes, fewer blocks: keeps the tests fast on 2 shared cores


def tiny_mae(img_size=64, in_chans=1, **opts):
    torch.manual_seed(0)
    opts = {"decoder_depth": 1, "decoder_dim": 64, "decoder_heads": 4, **opts}
    return create_method("mae", "vit_tiny_patch16_224", in_chans, img_size, opts, {"depth": DEPTH})


def batch(m, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, m.in_chans, m.img_size, m.img_size, generator=g)


def test_visible_token_count_is_exact():
    m = tiny_mae(64)  # 4x4 = 16 patches
    assert m.len_keep(196) == 49  # the official 49 of 196 at ratio 0.75
    latent, mask, ids_restore = m.forward_encoder(batch(m, 3))
    assert latent.shape == (3, 1 + 4, 192)  # cls + int(16 * 0.25) visible patches
    assert mask.shape == (3, 16) and torch.equal(mask.sum(1), torch.full((3,), 12.0))
    assert torch.equal(torch.sort(ids_restore, 1).values, torch.arange(16).expand(3, -1))
    m2 = tiny_mae(48, mask_ratio=0.6)  # 9 patches: int(9 * 0.4) = 3 (int, not round)
    latent, mask, _ = m2.forward_encoder(batch(m2, 2))
    assert latent.shape[1] == 1 + 3 and torch.equal(mask.sum(1), torch.full((2,), 6.0))


def test_masking_keeps_the_smallest_noise_per_sample():
    m = tiny_mae(64)
    noise = torch.rand(2, 16)
    x = torch.arange(16.0).view(1, 16, 1).expand(2, -1, 3)
    kept, mask, ids_restore = m.random_masking(x, noise)
    for b in range(2):
        want = torch.argsort(noise[b])[:4]
        assert torch.equal(kept[b, :, 0], want.float())
        assert torch.equal(mask[b] == 0, torch.isin(torch.arange(16), want))


def test_loss_counts_only_masked_patches():
    m = tiny_mae(64)
    imgs = batch(m)
    noise = torch.rand(2, 16)
    latent, mask, ids_restore = m.forward_encoder(imgs, noise)
    pred = m.forward_decoder(latent, ids_restore).detach()
    loss = m.forward_loss(imgs, pred, mask)
    target = m.targets(imgs)
    per_patch = ((pred - target) ** 2).mean(-1)
    assert torch.allclose(loss, per_patch[mask.bool()].mean(), atol=1e-6)
    visible = (mask == 0).unsqueeze(-1)
    changed_visible = torch.where(visible, pred + 100.0, pred)
    assert torch.allclose(m.forward_loss(imgs, changed_visible, mask), loss, atol=1e-6)
    changed_masked = torch.where(visible, pred, pred + 1.0)
    assert not torch.allclose(m.forward_loss(imgs, changed_masked, mask), loss)


def test_norm_pix_target_matches_direct_computation():
    m = tiny_mae(32, in_chans=3)  # 2x2 patches of 16x16x3
    imgs = batch(m)
    got = m.targets(imgs)
    p = 16
    for n in range(2):
        for i in range(2):
            for j in range(2):
                patch = imgs[n, :, i * p : (i + 1) * p, j * p : (j + 1) * p].permute(1, 2, 0).reshape(-1).double()
                mean = patch.mean()
                var = ((patch - mean) ** 2).sum() / (patch.numel() - 1)  # unbiased
                want = (patch - mean) / math.sqrt(var + 1e-6)
                assert torch.allclose(got[n, i * 2 + j].double(), want, atol=1e-5)
    raw = tiny_mae(32, in_chans=3, norm_pix_loss=False)
    assert torch.equal(raw.targets(imgs)[1, 3], imgs[1, :, 16:, 16:].permute(1, 2, 0).reshape(-1))


def test_decoder_never_sees_the_masked_pixels():
    """Predictions depend only on the visible patches: replacing every removed patch changes nothing."""
    m = tiny_mae(64).eval()
    imgs = batch(m)
    noise = torch.rand(2, 16)
    latent, mask, ids_restore = m.forward_encoder(imgs, noise)
    pred = m.forward_decoder(latent, ids_restore)
    removed = mask.view(2, 1, 4, 1, 4, 1).expand(2, 1, 4, 16, 4, 16).reshape(2, 1, 64, 64).bool()
    other = torch.where(removed, torch.randn_like(imgs) * 5, imgs)
    latent2, mask2, _ = m.forward_encoder(other, noise)
    assert torch.equal(mask, mask2)
    assert torch.allclose(m.forward_decoder(latent2, ids_restore), pred, atol=1e-5)
    visible_changed = torch.where(removed, imgs, imgs + 1.0)
    latent3, _, _ = m.forward_encoder(visible_changed, noise)
    assert not torch.allclose(m.forward_decoder(latent3, ids_restore), pred, atol=1e-3)


def test_fixed_sincos_position_embeddings():
    m = tiny_mae(64)
    pos = m.vit.pos_embed
    assert not pos.requires_grad and not m.decoder_pos_embed.requires_grad
    assert torch.equal(pos[0, 0], torch.zeros(192))  # the cls slot
    # MAE's formula: first half encodes the column index, second half the row; omega = 1/10000^(2i/(D/2))
    d, q = 192, 48
    omega = 1.0 / 10000 ** (np.arange(q) / q)
    row, col = 1, 2
    want = np.concatenate([np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)])
    assert np.allclose(pos[0, 1 + row * 4 + col].numpy(), want, atol=1e-6)
    assert sincos_pos_embed_2d(d, 2, 3, num_prefix=0).shape == (1, 6, d)
    assert m.decoder_pos_embed.shape == (1, 17, 64)
    assert not any(p is pos for g in m.param_groups(0.05) for p in g["params"])


@pytest.mark.parametrize(
    "name,size,dec",
    [("vit_tiny_patch16_224", 48, (256, 8)), ("vit_small_patch8_224", 32, (256, 8)), ("vit_base_patch16_224", 32, (512, 16))],
)
def test_any_timm_vit_trains_and_exports_strictly(tmp_path, name, size, dec):
    from sslrecipe.models.backbone import export_encoder, load_encoder

    torch.manual_seed(0)
    m = create_method("mae", name, 3, size, {"decoder_depth": 1}, {"depth": 1})
    assert (m.decoder_embed.out_features, m.decoder_blocks[0].attn.num_heads) == dec
    out = m(batch(m, 2))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and m.vit.blocks[0].attn.qkv.weight.grad is not None
    assert m.export_timm_kwargs == {"img_size": size}
    kwargs = {"in_chans": 3, "num_classes": 0, "depth": 1, **m.export_timm_kwargs}
    export_encoder(m.encoder(), tmp_path, name, kwargs, extra={"method": "mae"})
    enc, meta = load_encoder(tmp_path)  # strict
    assert meta["timm_kwargs"]["img_size"] == size
    timm.create_model(name, **kwargs).load_state_dict(m.encoder().state_dict(), strict=True)


def test_pos_embed_resampled_for_another_size():
    m = tiny_mae(64)
    target = timm.create_model("vit_tiny_patch16_224", in_chans=1, num_classes=0, img_size=96, depth=DEPTH)
    state = resize_pos_embed_in_state(m.encoder().state_dict(), target)
    target.load_state_dict(state, strict=True)
    assert target.pos_embed.shape == (1, 37, 192)
    assert torch.equal(target.pos_embed[0, 0], m.vit.pos_embed[0, 0])


def test_bad_sizes_and_options_are_clear_errors():
    with pytest.raises(SSLRecipeError, match="not divisible by the ViT's patch size 16"):
        create_method("mae", "vit_tiny_patch16_224", 1, 40, {}, {"depth": 1})
    with pytest.raises(RecipeError, match=r"pretrain\.options\.mae\.mask_rati: unknown option; did you mean 'mask_ratio'"):
        create_method("mae", "vit_tiny_patch16_224", 1, 32, {"mask_rati": 0.5}, {"depth": 1})
    with pytest.raises(RecipeError, match=r"pretrain\.options\.mae\.mask_ratio: "):
        create_method("mae", "vit_tiny_patch16_224", 1, 32, {"mask_ratio": 1.5}, {"depth": 1})
    with pytest.raises(SSLRecipeError, match="supports vit"):
        create_method("mae", "resnet18", 1, 32, {}, {})


def test_views_crop_flip_normalise_deterministically():
    m = tiny_mae(32)
    img = torch.rand(1, 50, 70)
    a = m.views(img, np.random.default_rng(5))
    b = m.views(img, np.random.default_rng(5))
    assert a.shape == (1, 32, 32) and torch.equal(a, b)
    assert a.min() >= (0 - V.NORM_MEAN) / V.NORM_STD - 1e-6 and a.max() <= (1 - V.NORM_MEAN) / V.NORM_STD + 1e-6
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(200):
        top, left, h, w = V.random_resized_crop_box(50, 70, rng, scale=(0.2, 1.0))
        assert 0 <= top and top + h <= 50 and 0 <= left and left + w <= 70
        areas.append(h * w / 3500)
    assert 0.17 < min(areas) and max(areas) <= 1.0


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
    m = tiny_mae(32, in_chans=1)
    g = torch.Generator().manual_seed(1)
    # a fixed batch with structure (smooth gradients) so there is something to learn
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    imgs = torch.stack([torch.sin(6 * (xx * a + yy * b)) for a, b in torch.rand(4, 2, generator=g)]).unsqueeze(1)
    noise = torch.rand(4, 4, generator=g)
    opt = torch.optim.AdamW(m.param_groups(0.05), lr=1e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(8):
        loss = m(imgs, noise)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow
def test_pretraining_beats_random_init_on_the_orientation_knn_probe(tmp_path, ssl_probe):
    """300 MAE steps (ViT-Ti, 64 px, 2-block decoder, AdamW 1.5e-3) on 256 unlabelled stripe images make frozen
    features classify held-out stripes by orientation (k-NN) clearly better than the random init: 0.87 vs 0.67 on
    this machine. The same run on noise images (the control in benchmarks/results/ssl_probe-mae-*.json) reaches 0.54,
    so the gain is learned from the images' structure; the control is not re-run here to keep the test short."""
    import argparse
    import json

    args = argparse.Namespace(method="mae", model="vit_tiny_patch16_224", timm_kwargs="{}", seed=0, device="cpu",
                              options=json.dumps({"decoder_depth": 2, "decoder_dim": 128, "decoder_heads": 4}),
                              steps=300, batch=32, lr=1.5e-3, weight_decay=0.05, img_size=64, images=256)
    train, test = ssl_probe.stripe_images(300, 64, seed=1), ssl_probe.stripe_images(300, 64, seed=2)
    run = ssl_probe.probe_run(args, "avg", train, test, tmp_path / "mae")
    before, after = run["random"], run["trained"]
    assert after >= before + 0.1, (before, after)


def test_runs_in_the_training_loop(tmp_path):
    from sslrecipe.engine.events import EventLog
    from sslrecipe.engine.loop import LoopSettings, TrainLoop
    from sslrecipe.recipe.schema import PretrainConfig

    m = tiny_mae(32)

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, key):
            i, seed = key
            return m.views(torch.rand(1, 40, 40, generator=torch.Generator().manual_seed(i)), np.random.default_rng(seed))

    cfg = PretrainConfig(method="mae", steps=2, batch_size=2, betas=(0.9, 0.95), lr=1e-4)
    settings = LoopSettings(stage="pretrain", stage_dir=tmp_path, stage_hash="h", optim=cfg, batch_size=2, total_steps=2,
                            seed=0, device=torch.device("cpu"), drop_last=True, collate_fn=m.collate)
    result = TrainLoop(settings, m, m.param_groups(0.05), Images(), lambda model, b: model(b), EventLog(tmp_path / "e.jsonl"),
                       after_step=m.after_step).run()
    assert result.steps == 2 and math.isfinite(result.last_loss)


def test_options_model_defaults_follow_the_paper():
    o = MAEOptions()
    assert (o.mask_ratio, o.norm_pix_loss, o.decoder_depth, o.crop_scale, o.hflip) == (0.75, True, 8, (0.2, 1.0), True)
    assert isinstance(tiny_mae(32), MAE)
