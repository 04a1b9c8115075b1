"""Hybrid: SparK's masked reconstruction + CMAE-style instance discrimination, for CNNs. **The project's own design.**

No official repository combines masked image modeling with instance discrimination for CNNs (CMAE, SiameseIM
and iBOT are ViT-only; docs/methods.md, "Hybrid"). The survey recommends the combination for
frugal ResNet settings; this is our adaptation of CMAE (ZhichengHuang/CMAE) to SparK's sparse CNN:

- **reconstruction branch** = :class:`sslrecipe.ssl.spark.SparK` unchanged (mask 0.6 on the stride-32 grid,
  sparse encoder, densify with mask tokens, light U-Net decoder, per-patch normalised pixel loss on masked
  32x32 patches);
- **instance branch (online)**: the sparse encoder's stride-32 output (the same forward as the reconstruction)
  -> a **masked** global average pool over the visible cells only (SparK issue #54's squeeze; a dense pool would
  average in the zeros of the masked cells) -> projector -> predictor. CMAE runs a 2-block feature decoder
  (with mask tokens) before its mean pool; a CNN has no token decoder, so the pooled sparse features feed the
  projector directly;
- **instance branch (target)**: an EMA copy of the encoder and of the projector (no predictor, no gradient)
  sees the **unmasked** second view densely -> global average pool -> target projector;
- projector and predictor = CMAE's ``NonLinearNeck`` (``num_layers=2, with_bias=True, with_last_bn=False``):
  ``Linear(in, 1536) -> BatchNorm1d(eps 1e-6) -> ReLU -> Linear(1536, 256, bias=False)``; the projector's
  input is the encoder's last-stage width (512 for ResNet-18, 2048 for ResNet-50) instead of ViT-B's 768;
- loss (``heads/cmae_head.py``): ``L = w_rec * L_rec + w_ct * 2 * tau * CE(q k^T / tau, diag)`` with ``q``, ``k``
  L2-normalised, the other images of the batch as negatives, ``tau = 0.07``, both weights 1;
- EMA (``MomentumUpdateHook``): after every optimizer step, over the encoder's and projector's parameters,
  momentum ``m = m_end - (m_end - m_0)(cos(pi k / K) + 1) / 2`` at iteration ``k`` of ``K``; CMAE's setting
  ``m_0 = m_end = 0.996`` makes it constant (the defaults here). The target encoder's BatchNorm runs in
  training mode on its own batch statistics (as MoCo/BYOL targets do); its buffers are not averaged;
- views (``datasets/cmae_dataset.py``): one base crop of ``img_size + s + 1`` pixels (s = 31 at 224 px,
  scaled with the image size) with SparK's mild scale (0.67, 1) and a shared flip; the online view is its
  top-left ``img_size`` crop (``ShiftPixel(pixel=0)``), the target view a crop shifted by ``U{0..s}`` pixels on
  each axis with CMAE's colour augmentation: ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2, Gaussian
  blur sigma U(0.1, 2) p=0.5 (saturation, hue and grayscale are no-ops on 1-channel thermal images). CMAE's
  base crop scale is (0.2, 1); SparK's milder (0.67, 1) is kept so the reconstruction branch sees what SparK
  sees (``crop_scale``);
- optimiser side: SparK's (LAMB, per-iteration weight-decay cosine 0.04 -> 0.2, the official lr curve, clip 5)
  because the backbone is trained SparK-style; CMAE's own (AdamW (0.9, 0.95), wd 0.05) is available through
  the recipe (``pretrain.optimizer: adamw``, ``lr_schedule: recipe``);
- export: the **online** (student) encoder, as CMAE fine-tunes its online backbone; its BatchNorm running
  statistics come from visible positions (SparK's).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from sslrecipe.ssl import sparse as S
from sslrecipe.ssl import views as V
from sslrecipe.ssl.ema import ema_update
from sslrecipe.ssl.registry import register
from sslrecipe.ssl.spark import OPTIM_DEFAULTS, SparK, SparKOptions, optim_defaults_for


class HybridOptions(SparKOptions):
    """``pretrain.options.hybrid``: SparK's keys plus the instance branch."""

    temperature: float = Field(0.07, gt=0, description="InfoNCE temperature tau (CMAE).")
    contrastive_weight: float = Field(
        1.0, ge=0, description="Weight of the instance loss (which is also multiplied by 2*tau, as CMAE).")
    reconstruction_weight: float = Field(1.0, ge=0, description="Weight of SparK's reconstruction loss.")
    momentum: float = Field(
        0.996, ge=0, le=1, description="EMA momentum of the target encoder and projector at the start.")
    momentum_end: float = Field(
        0.996, ge=0, le=1, description="EMA momentum at the end (cosine); equal to `momentum` = constant (CMAE).")
    proj_hidden_dim: int = Field(1536, ge=1, description="Hidden width of the projector and predictor (CMAE).")
    proj_dim: int = Field(256, ge=1, description="Output width of the projector and predictor (CMAE).")
    max_shift_fraction: float = Field(
        31 / 224, ge=0, lt=1, description="Largest shift of the target view against the online view, as a fraction of "
        "img_size (31 px at 224).")
    target_color_augment: bool = Field(True, description="CMAE's colour jitter, grayscale and blur on the target view.")


class NonLinearNeck(nn.Module):
    """CMAE's ``NonLinearNeck(num_layers=2, with_bias=True, with_last_bn=False, with_last_bias=False)``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.fc0 = nn.Linear(in_dim, hidden_dim, bias=True)
        self.bn0 = nn.BatchNorm1d(hidden_dim, eps=1e-6)
        self.relu = nn.ReLU(inplace=True)
        self.fc1 = nn.Linear(hidden_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(self.relu(self.bn0(self.fc0(x))))


def cmae_momentum(base: float, end: float, it: int, total: int) -> float:
    """``MomentumUpdateHook``: ``end - (end - base) * (cos(pi * it / total) + 1) / 2``."""
    if total <= 0:
        return base
    return end - (end - base) * (math.cos(math.pi * min(it, total) / total) + 1) / 2


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """CMAE's contrastive term: ``2 tau CE(normalize(q) normalize(k)^T / tau, diag)`` (``k`` detached)."""
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1).detach()
    logits = q @ k.t() / temperature
    labels = torch.arange(q.shape[0], device=q.device)
    return 2 * temperature * F.cross_entropy(logits, labels)


class Hybrid(SparK):
    name = "hybrid"

    def __init__(self, timm_name: str, in_chans: int, img_size: int, options: HybridOptions, timm_kwargs: Optional[dict] = None):
        super().__init__(timm_name, in_chans, img_size, options, timm_kwargs, method_name="hybrid")
        from sslrecipe.models.backbone import create_backbone

        o = options
        kwargs = {k: v for k, v in dict(timm_kwargs or {}).items() if k != "drop_path_rate"}
        self.teacher = create_backbone(timm_name, in_chans=in_chans, **kwargs)  # no drop-path in the target
        self.teacher.load_state_dict(self.backbone.state_dict())
        width = S.feature_channels(self.backbone, self.indices)[-1]
        self.projector = NonLinearNeck(width, o.proj_hidden_dim, o.proj_dim)
        self.predictor = NonLinearNeck(o.proj_dim, o.proj_hidden_dim, o.proj_dim)
        self.target_projector = NonLinearNeck(width, o.proj_hidden_dim, o.proj_dim)
        self.target_projector.load_state_dict(self.projector.state_dict())
        for p in list(self.teacher.parameters()) + list(self.target_projector.parameters()):
            p.requires_grad_(False)
        self.max_shift = int(round(o.max_shift_fraction * self.img_size))

    # ------------------------------------------------------------------ data
    def views(self, image: torch.Tensor, rng) -> tuple[torch.Tensor, torch.Tensor]:
        o, size, s = self.opts, self.img_size, self.max_shift
        base, _box = V.random_resized_crop(image, size + s + 1, rng, scale=o.crop_scale)
        if o.hflip:
            base = V.random_hflip(base, rng)
        online = base[:, :size, :size]
        dy, dx = int(rng.integers(0, s + 1)), int(rng.integers(0, s + 1))
        target = base[:, dy : dy + size, dx : dx + size]
        if o.target_color_augment:
            target = V.random_color_jitter(target, rng, 0.8, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
            target = V.random_grayscale(target, rng, 0.2)
            target = V.random_gaussian_blur(target, rng, 0.5)
        norm = (self.input_mean, self.input_std)
        return V.normalize(online.contiguous(), *norm), V.normalize(target.contiguous(), *norm)

    def collate(self, items: list) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])

    # ------------------------------------------------------------------ model
    def online_embedding(self, features: list[torch.Tensor], active: torch.Tensor) -> torch.Tensor:
        pooled = S.masked_global_pool(features[-1], active)  # visible cells only
        return self.predictor(self.projector(pooled))

    @torch.no_grad()
    def target_embedding(self, x: torch.Tensor) -> torch.Tensor:
        deep = S.stage_features(self.teacher, x, [self.indices[-1]])[-1]
        return self.target_projector(deep.mean(dim=(2, 3)))

    def forward(self, batch: Any, active: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        online, target = batch
        parts = self.forward_parts(online, active)
        q = self.online_embedding(parts["features"], parts["active"])
        k = self.target_embedding(target)
        loss_ct = info_nce(q, k, self.opts.temperature)
        loss_rec = parts["loss"]
        o = self.opts
        loss = o.reconstruction_weight * loss_rec + o.contrastive_weight * loss_ct
        return {"loss": loss, "loss_rec": loss_rec.detach(), "loss_ct": loss_ct.detach()}

    def teacher_encoder(self) -> nn.Module:
        """The EMA target encoder (``pretrain.init`` loads it together with the online encoder)."""
        return self.teacher

    # ------------------------------------------------------------------ EMA
    def momentum_at(self, it: int, total: int) -> float:
        return cmae_momentum(self.opts.momentum, self.opts.momentum_end, it, total)

    def student_parameters(self) -> list[torch.Tensor]:
        return list(self.backbone.parameters()) + list(self.projector.parameters())

    def teacher_parameters(self) -> list[torch.Tensor]:
        return list(self.teacher.parameters()) + list(self.target_projector.parameters())

    @torch.no_grad()
    def after_step(self, step: int, total: int) -> None:
        """EMA of the target with the momentum of the iteration just finished (``step - 1``), then SparK's state."""
        m = self.momentum_at(step - 1, total)
        ema_update(self.teacher_parameters(), self.student_parameters(), m)
        super().after_step(step, total)


@register("hybrid", ("cnn",), "the project's own MIM + instance discrimination for CNNs: SparK + a CMAE-style EMA contrastive branch",
          optim_defaults=optim_defaults_for)  # SparK's, betas by architecture included
def build_hybrid(timm_name: str, in_chans: int, img_size: int, options: dict, timm_kwargs: dict) -> Hybrid:
    return Hybrid(timm_name, in_chans, img_size, V.parse_options(HybridOptions, options, "hybrid"), timm_kwargs)

