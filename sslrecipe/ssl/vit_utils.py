"""Helpers shared by the ViT SSL methods (MAE, DINO, Leopart) on timm ``VisionTransformer`` models.

- :func:`sincos_pos_embed_2d`: MAE's fixed 2-D sin-cos position embedding (``util/pos_embed.py`` of
  facebookresearch/mae), generalised to non-square grids and any number of prefix tokens.
- :func:`interpolate_patch_pos_embed`: DINO's ``interpolate_pos_encoding`` (bicubic, scale factor with the
  ``+0.1`` guard of facebookresearch/dino issue #8), used for the 96-px local crops.
- :func:`vit_tokens` / :func:`vit_forward`: a timm ViT forward that accepts any input size divisible by the
  patch size by interpolating the position embedding, as DINO's ``prepare_tokens`` does.
- :func:`vit_forward_with_last_attention`: the final tokens plus the last block's softmax attention
  (DINO's ``get_last_selfattention``), used by Leopart's foreground mask.
- :func:`resize_pos_embed_in_state`: resample a checkpoint's ``pos_embed`` to a model's grid (MAE/DeiT's
  ``interpolate_pos_embed``), for fine-tuning or continuing at another image size.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sslrecipe.errors import SSLRecipeError


# --------------------------------------------------------------------------- model checks


def check_vit(model: nn.Module, timm_name: str, method: str) -> None:
    """Raise a clear error unless ``model`` is a plain timm VisionTransformer the ViT methods can drive."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise SSLRecipeError(
            f"pretrain.method '{method}' needs a timm VisionTransformer (vit_*, deit_* without distillation); "
            f"backbone.name '{timm_name}' builds a {type(model).__name__}"
        )
    if getattr(model, "dist_token", None) is not None:
        raise SSLRecipeError(
            f"pretrain.method '{method}': backbone.name '{timm_name}' is a distilled DeiT (extra dist token); "
            "use the non-distilled model, e.g. deit_small_patch16_224"
        )
    if not hasattr(model.patch_embed, "proj") or not isinstance(model.patch_embed.proj, nn.Conv2d):
        raise SSLRecipeError(f"pretrain.method '{method}': backbone '{timm_name}' has no convolutional patch embedding")


def patch_size_of(vit: nn.Module) -> tuple[int, int]:
    p = vit.patch_embed.patch_size
    return (int(p[0]), int(p[1])) if isinstance(p, (tuple, list)) else (int(p), int(p))


def grid_size_of(vit: nn.Module) -> tuple[int, int]:
    g = vit.patch_embed.grid_size
    return int(g[0]), int(g[1])


def check_img_size(img_size: int, vit: nn.Module, method: str) -> None:
    ph, pw = patch_size_of(vit)
    if img_size % ph or img_size % pw:
        raise SSLRecipeError(
            f"pretrain.img_size {img_size} is not divisible by the ViT's patch size {ph}; "
            f"use a multiple of {ph} (e.g. {max(ph, img_size // ph * ph)}) for pretrain.method '{method}'"
        )


# --------------------------------------------------------------------------- sin-cos position embedding


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """MAE's ``get_1d_sincos_pos_embed_from_grid``: [sin(pos*omega), cos(pos*omega)], omega = 1/10000^(2i/D)."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(embed_dim: int, grid_h: int, grid_w: int, num_prefix: int = 1) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, shape ``(1, num_prefix + grid_h*grid_w, embed_dim)``.

    Exactly MAE's ``get_2d_sincos_pos_embed`` for a square grid: ``np.meshgrid(grid_w, grid_h)`` ("w goes
    first"), so the first half of the channels encodes the column (x) index and the second half the row;
    patches are in row-major order; the prefix slots (cls token) are zeros.
    """
    if embed_dim % 4:
        raise SSLRecipeError(f"the sin-cos position embedding needs an embed_dim divisible by 4, got {embed_dim}")
    gw, gh = np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64))  # 'xy' indexing
    emb = np.concatenate([_sincos_1d(embed_dim // 2, gw), _sincos_1d(embed_dim // 2, gh)], axis=1)
    if num_prefix:
        emb = np.concatenate([np.zeros((num_prefix, embed_dim)), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)


# --------------------------------------------------------------------------- position-embedding interpolation


def interpolate_patch_pos_embed(patch_pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Resample patch position embeddings ``(1, gh*gw, D)`` to ``new_grid`` the way DINO does.

    DINO (``vision_transformer.py interpolate_pos_encoding``) calls ``F.interpolate(mode='bicubic')`` with a
    *scale factor* ``(new + 0.1) / old`` (the 0.1 avoids a floating-point off-by-one in the output size) and
    ``align_corners=False``; the scale factor, not the output size, drives the sampling grid. Same here.
    """
    if tuple(old_grid) == tuple(new_grid):
        return patch_pos
    dim = patch_pos.shape[-1]
    gh, gw = old_grid
    nh, nw = new_grid
    grid = patch_pos.reshape(1, gh, gw, dim).permute(0, 3, 1, 2).float()
    out = F.interpolate(grid, scale_factor=((nh + 0.1) / gh, (nw + 0.1) / gw), mode="bicubic", align_corners=False)
    if out.shape[-2:] != (nh, nw):  # cannot happen with the +0.1 guard; kept as the official assert
        raise RuntimeError(f"position-embedding interpolation gave {tuple(out.shape[-2:])}, wanted {(nh, nw)}")
    return out.permute(0, 2, 3, 1).reshape(1, nh * nw, dim).to(patch_pos.dtype)


def pos_embed_for_grid(vit: nn.Module, grid: tuple[int, int]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(prefix slots, patch slots) of the ViT's position embedding for a ``grid`` of patches.

    The prefix part is None when the model has no prefix slots (``no_embed_class`` models, or no cls token).
    """
    pos = vit.pos_embed
    if pos is None:
        return None, None
    n_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    prefix = pos[:, :n_prefix] if n_prefix else None
    patches = interpolate_patch_pos_embed(pos[:, n_prefix:], grid_size_of(vit), grid)
    return prefix, patches


def resize_pos_embed_in_state(state: dict, vit: nn.Module) -> dict:
    """A copy of ``state`` whose ``pos_embed`` is resampled (bicubic, DeiT/MAE style) to ``vit``'s grid.

    For loading a checkpoint trained at another image size (e.g. public 224-px MAE weights into a
    pre-training at 256 px). The prefix slots are kept unchanged.
    """
    state = dict(state)
    if "pos_embed" not in state or vit.pos_embed is None or state["pos_embed"].shape == vit.pos_embed.shape:
        return state
    src = state["pos_embed"]
    n_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    n_old = src.shape[1] - n_prefix
    side = int(round(math.sqrt(n_old)))
    if side * side != n_old:
        raise SSLRecipeError(f"cannot resample a non-square pos_embed of {n_old} patches")
    gh, gw = grid_size_of(vit)
    patches = src[:, n_prefix:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(gh, gw), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, gh * gw, -1).to(src.dtype)
    state["pos_embed"] = torch.cat([src[:, :n_prefix], patches], dim=1) if n_prefix else patches
    return state


# --------------------------------------------------------------------------- forward passes


def patch_tokens(vit: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch embedding of any input whose sides are multiples of the patch size: ``(B, L, D)`` and the grid."""
    ph, pw = patch_size_of(vit)
    if x.shape[-2] % ph or x.shape[-1] % pw:
        raise ValueError(f"input {tuple(x.shape[-2:])} is not divisible by the patch size {(ph, pw)}")
    t = vit.patch_embed.proj(x)  # B, D, gh, gw
    grid = (int(t.shape[-2]), int(t.shape[-1]))
    t = t.flatten(2).transpose(1, 2)
    return vit.patch_embed.norm(t), grid


def prefix_tokens(vit: nn.Module, batch: int) -> list[torch.Tensor]:
    out = []
    if vit.cls_token is not None:
        out.append(vit.cls_token.expand(batch, -1, -1))
    if getattr(vit, "reg_token", None) is not None:
        out.append(vit.reg_token.expand(batch, -1, -1))
    return out


def vit_tokens(vit: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Tokens entering the first block (prefix tokens first), with the position embedding interpolated to
    the input's grid (DINO's ``prepare_tokens`` on a timm ViT), and the patch grid."""
    t, grid = patch_tokens(vit, x)
    pre = prefix_tokens(vit, t.shape[0])
    prefix_pos, patch_pos = pos_embed_for_grid(vit, grid)
    if patch_pos is not None:
        t = t + patch_pos
    if pre:
        pre_t = torch.cat(pre, dim=1)
        if prefix_pos is not None:
            pre_t = pre_t + prefix_pos
        t = torch.cat([pre_t, t], dim=1)
    t = vit.pos_drop(t)
    t = vit.patch_drop(t)
    return vit.norm_pre(t), grid


def vit_forward(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """All output tokens ``(B, prefix + L, D)`` after the final norm, for any input size divisible by the patch."""
    t, _grid = vit_tokens(vit, x)
    t = vit.blocks(t)
    return vit.norm(t)


def attention_weights(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention ``(B, heads, N, N)`` that ``block`` computes on its input ``x`` (timm Block)."""
    attn = block.attn
    B, N, _ = x.shape
    h = block.norm1(x)
    qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def vit_forward_with_last_attention(vit: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """(output tokens after the final norm, last block's attention ``(B, heads, N, N)``, patch grid)."""
    t, grid = vit_tokens(vit, x)
    blocks = list(vit.blocks)
    for blk in blocks[:-1]:
        t = blk(t)
    attn = attention_weights(blocks[-1], t)
    t = blocks[-1](t)
    return vit.norm(t), attn, grid
