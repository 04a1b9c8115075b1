"""A ViTDet-style simple feature pyramid over a plain timm ViT, as the backbone of torchvision R-CNNs.

Li et al., "Exploring Plain Vision Transformer Backbones for Object Detection" (ViTDet): the ViT's last
feature map (stride 16) alone builds the pyramid: two stride-2 deconvolutions give stride 4, one gives
stride 8, the map itself is stride 16 and a 2x2 max-pool gives stride 32; each level then goes through a
1x1 and a 3x3 convolution, each followed by a channel LayerNorm. A max-pool of the stride-32 level adds
the stride-64 level the RPN uses (as torchvision's ``LastLevelMaxPool``).

Any input size works: the absolute position embedding is resampled (bicubic, timm's
``resample_abs_pos_embed``) to the input's patch grid on every forward, and the input is zero-padded at the
bottom/right to a multiple of the patch size. Patch sizes other than 16 (e.g. DINOv2's 14) are supported by
resampling the patch map to the stride-16 grid, so the pyramid's strides are always exactly 4, 8, 16, 32
(torchvision's RoIAlign infers each level's scale as a power of two).

The encoder instance is the detector's body (``backbone.body.encoder``): the weights loaded from
``encoder.safetensors`` are the ones that fine-tune, under the key prefix ``backbone.body.encoder.``.
Global attention is kept in every block (ViTDet's windowed attention is a memory optimisation for
1024-px inputs; it would change the pre-trained blocks' behaviour).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from sslrecipe.errors import SSLRecipeError

PYRAMID_STRIDES = (4, 8, 16, 32)


def is_plain_vit(encoder: nn.Module) -> bool:
    """A timm ``VisionTransformer`` (or subclass): patch embedding + blocks at one stride."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(encoder, VisionTransformer)


def _patch_size(vit: nn.Module) -> tuple[int, int]:
    p = vit.patch_embed.patch_size
    return (int(p[0]), int(p[1])) if isinstance(p, (tuple, list)) else (int(p), int(p))


class ViTFeatures(nn.Module):
    """The ViT's last block output as a ``B x D x H/16 x W/16`` map, for any input size."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        name = getattr(encoder, "_sslrecipe_timm_name", type(encoder).__name__)
        if not is_plain_vit(encoder):
            raise SSLRecipeError(f"backbone {name!r} is not a timm VisionTransformer; the simple feature pyramid needs one")
        if not isinstance(getattr(encoder.patch_embed, "proj", None), nn.Conv2d):
            raise SSLRecipeError(f"backbone {name!r} has no convolutional patch embedding (patch_embed.proj)")
        if getattr(encoder, "dist_token", None) is not None:
            raise SSLRecipeError(f"backbone {name!r} is a distilled DeiT (extra token); use the non-distilled model")
        self.encoder = encoder
        self.patch = _patch_size(encoder)
        self.embed_dim = int(encoder.embed_dim)
        self.num_layers = len(encoder.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.encoder
        h, w = x.shape[-2:]
        ph, pw = self.patch
        pad_h, pad_w = (-h) % ph, (-w) % pw
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        t = vit.patch_embed.proj(x)  # B, D, gh, gw
        gh, gw = int(t.shape[-2]), int(t.shape[-1])
        t = vit.patch_embed.norm(t.flatten(2).transpose(1, 2))
        t = self._add_position(t, (gh, gw))
        t = vit.patch_drop(t)
        t = vit.norm_pre(t)
        t = vit.blocks(t)
        t = vit.norm(t)
        t = t[:, vit.num_prefix_tokens:]
        fmap = t.transpose(1, 2).reshape(t.shape[0], self.embed_dim, gh, gw)
        if self.patch != (16, 16):  # resample to the stride-16 grid of the (padded) input
            size = (math.ceil(h / 16), math.ceil(w / 16))
            fmap = F.interpolate(fmap, size=size, mode="bilinear", align_corners=False)
        return fmap

    def _add_position(self, t: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        from timm.layers import resample_abs_pos_embed

        vit = self.encoder
        prefix = []
        if getattr(vit, "cls_token", None) is not None:
            prefix.append(vit.cls_token.expand(t.shape[0], -1, -1))
        if getattr(vit, "reg_token", None) is not None:
            prefix.append(vit.reg_token.expand(t.shape[0], -1, -1))
        pos = vit.pos_embed
        if pos is None:
            return vit.pos_drop(torch.cat(prefix + [t], dim=1))
        n_prefix_pos = 0 if vit.no_embed_class else vit.num_prefix_tokens
        if tuple(vit.patch_embed.grid_size) != tuple(grid):
            pos = resample_abs_pos_embed(pos, new_size=list(grid), old_size=list(vit.patch_embed.grid_size),
                                         num_prefix_tokens=n_prefix_pos)
        if vit.no_embed_class:
            t = t + pos
            t = torch.cat(prefix + [t], dim=1) if prefix else t
        else:
            t = torch.cat(prefix + [t], dim=1) if prefix else t
            t = t + pos
        return vit.pos_drop(t)

    def layer_of_parameter(self) -> dict[str, int]:
        """Encoder parameter -> layer id for layer-wise lr decay: 0 = embeddings, i = block i-1, L+1 = final norm."""
        out = {}
        for name, _ in self.encoder.named_parameters():
            if name.startswith("blocks."):
                out[name] = int(name.split(".")[1]) + 1
            elif name.startswith(("cls_token", "reg_token", "pos_embed", "patch_embed", "mask_token")):
                out[name] = 0
            else:
                out[name] = self.num_layers + 1
        return out


def _ln(channels: int) -> nn.Module:
    from timm.layers import LayerNorm2d

    return LayerNorm2d(channels)


class SimpleFeaturePyramid(nn.Module):
    """Strides 4, 8, 16, 32 from one stride-16 map of ``in_channels``, each with ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int = 256):
        super().__init__()
        d = in_channels
        self.scale_layers = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(d, d // 2, 2, stride=2), _ln(d // 2), nn.GELU(),
                          nn.ConvTranspose2d(d // 2, d // 4, 2, stride=2)),
            nn.ConvTranspose2d(d, d // 2, 2, stride=2),
            nn.Identity(),
            nn.MaxPool2d(2, stride=2, ceil_mode=True),
        ])
        dims = (d // 4, d // 2, d, d)
        self.output_layers = nn.ModuleList([
            nn.Sequential(nn.Conv2d(c, out_channels, 1, bias=False), _ln(out_channels),
                          nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), _ln(out_channels))
            for c in dims
        ])
        self.out_channels = out_channels

    def forward(self, fmap: torch.Tensor) -> list[torch.Tensor]:
        return [out(scale(fmap)) for scale, out in zip(self.scale_layers, self.output_layers)]


class ViTPyramidBackbone(nn.Module):
    """Body (ViT) + simple feature pyramid + max-pool P6: what torchvision's R-CNNs call ``backbone``.

    Returns ``OrderedDict{"0": stride 4, "1": 8, "2": 16, "3": 32, "pool": 64}`` like torchvision's FPN.
    """

    def __init__(self, encoder: nn.Module, out_channels: int = 256):
        super().__init__()
        self.body = ViTFeatures(encoder)
        self.fpn = SimpleFeaturePyramid(self.body.embed_dim, out_channels)
        self.out_channels = out_channels
        self.strides = PYRAMID_STRIDES
        self._frozen_bn: list[nn.Module] = []

    @property
    def num_levels(self) -> int:
        return len(PYRAMID_STRIDES) + 1

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.fpn(self.body(x))
        out = OrderedDict((str(i), f) for i, f in enumerate(feats))
        out["pool"] = F.max_pool2d(feats[-1], 1, 2, 0)
        return out


def configure_vit_trainable(backbone: ViTPyramidBackbone, trainable_stages: Optional[int] = None) -> None:
    """``trainable_stages=N`` trains the last N of [embeddings, block 1, ..., block L] (the final norm goes
    with the last block); None = all, 0 = a frozen encoder. The pyramid and heads always train."""
    if trainable_stages is not None and trainable_stages < 0:
        raise SSLRecipeError(f"finetune.trainable_stages must be >= 0 or null, got {trainable_stages}")
    body = backbone.body
    n_stages = body.num_layers + 1
    first = 0 if trainable_stages is None else max(0, n_stages - trainable_stages)
    layers = body.layer_of_parameter()
    params = dict(body.encoder.named_parameters())
    for name, layer in layers.items():
        stage = min(layer, body.num_layers)  # the final norm belongs to the last block's stage
        params[name].requires_grad_(stage >= first)
    # a timm ViT without classifier may still hold an unused head norm / attention pool: never trained
    used = {"fc_norm", "head", "attn_pool", "head_drop"}
    for name, p in params.items():
        if name.split(".")[0] in used and not isinstance(getattr(body.encoder, name.split(".")[0]), nn.Identity):
            p.requires_grad_(False)
