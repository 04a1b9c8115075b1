"""ReSim: region similarity representation learning (Xiao et al. 2021; Tete-Xiao/ReSim, the ReSim-FPN variant).

Mapping to the official code (docs/methods.md, "ReSim"; the repo implements ReSim-FPN only):

- **base = MoCo v2** (``moco/builder.py``): a query encoder and a momentum key encoder (initialised as a copy,
  ``requires_grad=False``, updated ``theta_k <- m theta_k + (1 - m) theta_q`` with a constant ``m = 0.999`` over all
  parameters, backbone + FPN + MLP), a queue of ``K = 65536`` L2-normalised 128-d keys initialised with normalised
  Gaussian noise, InfoNCE with ``T = 0.2`` (the README command's ``--moco-t 0.2``; the code default is 0.07);
- **MLP head** (``moco/models.py L177-181``): always ``Linear(C5, C5) -> ReLU -> Linear(C5, 128)`` on the globally
  average-pooled C5 (the ``--mlp`` flag is ignored by the official code); PyTorch's default Linear init;
- **in-backbone FPN** (``moco/models.py L200-237, L263-303``, :class:`ReSimFPN`): 1x1 lateral convs from C5, C4,
  C3 to 256 channels (``fpn_lateral5/4/3``), nearest x2 top-down, 3x3 output convs for P4 (stride 16) and P3
  (stride 8) only (``fpn_output4/3``), Caffe2 "XavierFill" init (``c2_xavier_fill``: kaiming-uniform ``a=1``,
  bias 0); ``fpn_norm`` = ``--fpn-bn`` (conv without bias followed by BatchNorm, as ``nn.Sequential(conv, bn)``);
- **views** (``moco/datasets.py``, ``main_moco.py L229-244``): one horizontal flip shared by both views (drawn for
  the query and reused for the key, applied **before** cropping, so boxes need no flip handling), then each view an
  independent ``RandomResizedCrop(img_size, scale=(0.2, 1))`` (bilinear), then per view Gaussian blur p=0.5 (sigma
  U(0.1, 2)) **before** ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, RandomGrayscale p=0.2, normalisation;
- **sliding windows** (``moco/datasets.py L72-125``, :func:`window_grid` / :func:`map_windows`): a fixed grid in
  *query-view* pixels, 48-px windows with stride 32 for P4 and 32-px windows with stride 24 for P3 (at 224 px: 6x6
  = 36 and 8x8 = 64 windows; a window is kept when ``x1 < img_size`` and ``y1 < img_size``, the official loop's
  test, which at other sizes gives the grid that fits); each window is mapped to source-image coordinates with the
  query crop box and then into key-view pixels with the key crop box (``anchor_mapping``); a window whose mapped
  box is not entirely inside the key view (``x0 < 0 or y0 < 0 or x1 >= img_size or y1 >= img_size``) is ignored
  (label -1 / ``CrossEntropyLoss(ignore_index=-1)`` officially; a ``valid`` mask here);
- **region InfoNCE** (``moco/builder.py L153-203``): the query window feature pooled from the query encoder's P4
  (1x1 output, scale 1/16), the positive from the key encoder's P4 at the mapped box, both L2-normalised; the
  negatives are the key encoder's P4 map average-pooled 3x3 / stride 1 / no padding (14x14 -> 12x12 at 224 px),
  L2-normalised, **every position of every image of the batch** (so including the positive's own location and
  the other windows of the same image), logits ``[q.k+, q.N] / T``, cross-entropy with label 0 averaged over the
  valid windows of the whole batch; the same at P3 (scale 1/8, 28x28 -> 26x26 negatives, also 3x3 pooling);
- **loss** (``main_moco.py L331-334``): ``L = L_moco + L_P4 + L_P3``, equal weights, one temperature;
- the queue is updated with the batch's keys after the logits are formed (``_dequeue_and_enqueue``); the exported
  encoder is the **query** encoder (``convert-pretrain-to-detectron2.py`` keeps ``encoder_q``), and its FPN is
  exported beside it as ``encoder_fpn.safetensors`` with the official key names (``fpn_lateral5.weight`` ...,
  detectron2's ``backbone.fpn_*`` without the prefix) so fine-tuning can start from it as the official transfer does;
- optimiser (README command ``--lr 0.03 --batch-size 256 --cos``, ``SGD(model.parameters(), momentum 0.9, wd 1e-4)``):
  :data:`OPTIM_DEFAULTS` as ``pretrain.*`` keys; :meth:`ReSim.param_groups` puts **every** parameter (biases and
  BatchNorm included) in one weight-decayed group, as ``model.parameters()`` does officially.

Simplifications and deviations (also in docs/methods.md, section "ReSim"):

- region features are the official **PrRoIPool** (1x1 output: the exact integral of the bilinearly interpolated
  map over the box, divided by its area, no half-cell offset, the map taken as 0 beyond its last cell), computed
  in closed form by :func:`prroi_pool` instead of the CUDA extension (same value to float rounding, on any
  device). ``torchvision.ops.roi_align`` does not reproduce it: ``aligned=True`` reads every box half a cell
  up-left of PrRoIPool, and even ``aligned=False`` averages a few samples (error ~1e-2 on rough maps), clamps the
  map instead of fading it to 0 past the last cell, and widens boxes narrower than one cell;
- shuffle-BN (``_batch_shuffle_ddp``) needs several GPUs; in one process the effect is emulated with
  ``shuffle_bn_splits`` groups (default 2): the query batch runs through the query encoder in that many chunks
  (BatchNorm statistics per chunk, as per-GPU BN does) and the key batch is randomly permuted, run in chunks
  and un-permuted, so a query and its key never share BatchNorm statistics over the same images;
  ``all_gather`` of keys and P4 negatives is the identity in one process (the batch *is* the global batch);
- the momentum update runs after the optimizer step (:meth:`ReSim.after_step`) instead of at the start of the
  next forward: the same sequence of key encoders, minus the official no-op update at step 0;
- the queue accepts any batch size (wrap-around write) instead of asserting ``K % batch == 0``;
- the lr schedule is the loop's per-step cosine without warmup (officially per-epoch cosine), with
  ``lr = blr * batch / 256`` (officially 0.03 at batch 256, the same value at that batch);
- a batch in which no window of any image overlaps the key view contributes 0 region loss (officially NaN);
- inputs use the encoder's normalisation (the project's 0.5 / 0.25 from random init, the start encoder's with
  ``pretrain.init``; recorded in encoder.json) instead of always ImageNet RGB statistics;
  the blur is a true Gaussian (views.py) instead of PIL's box approximation;
- timm's ResNets zero-initialise the last BatchNorm of every residual block; the official (torchvision) ResNet does
  not (``zero_init_residual=False``), so those weights are reset to 1 here. Other CNNs keep timm's init;
- any timm CNN with stride-8/16/32 feature maps is accepted (C3/C4/C5 = the last feature map at each stride, the
  FPN's input widths read from the model), not only torchvision ResNets; ``img_size`` must be a multiple of 32
  and at least 64 (one P4 window).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sslrecipe.atomic import atomic_write_file
from sslrecipe.errors import RecipeError, SSLRecipeError
from sslrecipe.ssl import views as V
from sslrecipe.ssl.views import CropScale
from sslrecipe.ssl.ema import ema_update
from sslrecipe.ssl.registry import SSLMethod, register

#: The official pre-training optimiser settings (README command + main_moco.py), as pretrain.* recipe keys.
OPTIM_DEFAULTS = {"optimizer": "sgd", "blr": 0.03, "momentum": 0.9, "weight_decay": 1e-4, "schedule": "cosine",
                  "warmup_fraction": 0.0, "min_lr_ratio": 0.0}

#: Sliding windows (size, stride) in query-view pixels: P4 ("C4" in the code) and P3 ("C3").
P4_WINDOWS = (48, 32)
P3_WINDOWS = (32, 24)
#: The FPN's file beside encoder.safetensors.
FPN_FILE = "encoder_fpn.safetensors"


class ReSimOptions(BaseModel):
    """``pretrain.options.resim``."""

    model_config = ConfigDict(extra="forbid")

    dim: int = Field(128, ge=1, description="Output width of the global MLP head (MoCo's --moco-dim).")
    queue_size: int = Field(65536, ge=1, description="Negative keys kept in the queue (MoCo's K).")
    momentum: float = Field(0.999, ge=0, le=1, description="Key-encoder momentum (constant).")
    temperature: float = Field(0.2, gt=0, description="InfoNCE temperature of all three losses (README: --moco-t 0.2).")
    mlp_hidden: Optional[int] = Field(None, ge=1, description="Hidden width of the MLP head; null = the C5 width (2048 on R50).")
    fpn_dim: int = Field(256, ge=1, description="FPN width.")
    fpn_norm: bool = Field(False, description="BatchNorm after the FPN convs (--fpn-bn).")
    crop_scale: CropScale = Field((0.2, 1.0), description="RandomResizedCrop area range of both views.")
    shuffle_bn_splits: int = Field(2, ge=1, description="BatchNorm groups emulating shuffle-BN across GPUs (1 = none).")



# --------------------------------------------------------------------------- windows


def window_grid(img_size: int, size: int, stride: int) -> np.ndarray:
    """The query-view windows ``(x0, y0, x1, y1)``: row-major over ``y0 = i*stride``, ``x0 = j*stride``, kept when
    ``x1 < img_size and y1 < img_size`` (the official loop; 36 / 64 windows at 224 px)."""
    n = 0
    while n * stride + size < img_size:
        n += 1
    out = [(j * stride, i * stride, j * stride + size, i * stride + size) for i in range(n) for j in range(n)]
    return np.asarray(out, dtype=np.float32).reshape(-1, 4)


def map_windows(windows_q: np.ndarray, box_q: V.Box, box_k: V.Box, img_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``ImageFolder.anchor_mapping`` for all windows: query-view pixels -> source pixels -> key-view pixels.

    ``box_q``/``box_k`` are the crops ``(top, left, height, width)`` in source pixels (after the shared flip).
    Returns the key-view boxes and a validity mask; invalid windows (not entirely inside the key view) get the
    official fake box ``(0, 0, 1, 1)``.
    """
    t_q, l_q, h_q, w_q = (float(v) for v in box_q)
    t_k, l_k, h_k, w_k = (float(v) for v in box_k)
    s = float(img_size)
    w = windows_q.astype(np.float64)
    # step 1: query-view -> source image
    ax0 = w_q * w[:, 0] / s + l_q
    ax1 = w_q * w[:, 2] / s + l_q
    ay0 = h_q * w[:, 1] / s + t_q
    ay1 = h_q * w[:, 3] / s + t_q
    # step 2: source image -> key-view
    kx0 = (ax0 - l_k) * s / w_k
    kx1 = (ax1 - l_k) * s / w_k
    ky0 = (ay0 - t_k) * s / h_k
    ky1 = (ay1 - t_k) * s / h_k
    # step 3: entirely inside the key view (the official test, ">=" on the far side)
    valid = (kx0 >= 0) & (ky0 >= 0) & (kx1 < s) & (ky1 < s)
    boxes = np.stack([kx0, ky0, kx1, ky1], axis=1)
    boxes[~valid] = (0.0, 0.0, 1.0, 1.0)
    return boxes.astype(np.float32), valid


def _hat_cdf(t: torch.Tensor) -> torch.Tensor:
    """``integral_{-inf}^{t} max(0, 1 - |x|) dx``: the area under one bilinear "hat" up to ``t``."""
    t = t.clamp(-1.0, 1.0)
    return torch.where(t < 0, 0.5 * (t + 1) ** 2, 1 - 0.5 * (1 - t) ** 2)


def prroi_pool(maps: torch.Tensor, boxes: torch.Tensor, scale: float) -> torch.Tensor:
    """PrRoIPool with a 1x1 output (``prroi_pool2d(maps, rois, 1, 1, scale)`` of ReSim's ``lib/prroi_pool``).

    ``maps`` (B, C, H, W); ``boxes`` (B, n, 4) as ``x0, y0, x1, y1`` in input pixels, ``n`` boxes per image.
    Returns (B, n, C): the integral of the bilinear interpolant of each map over ``boxes * scale`` (cell ``j`` sits
    at coordinate ``j``; no half-cell offset; values outside the map are 0, as the extension's ``GetData``),
    divided by the box area (0 for an empty box, as the extension). The interpolant is separable, so the
    integral is ``sum_ij F[i, j] wy_i wx_j`` with ``w_j`` the exact integral of cell ``j``'s hat over the box.
    """
    h, w = maps.shape[-2:]
    # in the maps' own precision even under autocast (bmm would drop to bf16/fp16; roi_align stayed in fp32)
    with torch.autocast(device_type=maps.device.type, enabled=False):
        bx = boxes.to(maps.dtype) * scale
        x0, y0, x1, y1 = bx.unbind(-1)
        cells_x = torch.arange(w, dtype=maps.dtype, device=maps.device)
        cells_y = torch.arange(h, dtype=maps.dtype, device=maps.device)
        wx = _hat_cdf(x1[..., None] - cells_x) - _hat_cdf(x0[..., None] - cells_x)  # (B, n, W)
        wy = _hat_cdf(y1[..., None] - cells_y) - _hat_cdf(y0[..., None] - cells_y)  # (B, n, H)
        weights = (wy[..., :, None] * wx[..., None, :]).flatten(-2)  # (B, n, H*W)
        total = torch.bmm(weights, maps.flatten(2).transpose(1, 2))  # (B, n, C)
        area = ((x1 - x0).clamp_min(0) * (y1 - y0).clamp_min(0))[..., None]
        return torch.where(area > 0, total / area.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(total))


# --------------------------------------------------------------------------- model parts


def c2_xavier_fill(conv: nn.Conv2d) -> None:
    """detectron2's ``c2_xavier_fill`` (Caffe2 XavierFill): kaiming-uniform with ``a=1``, bias 0."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class ReSimFPN(nn.Module):
    """The in-backbone FPN of ``moco/models.py``: laterals on C5/C4/C3, output convs on P4 and P3 only."""

    def __init__(self, in_channels: tuple[int, int, int], dim: int = 256, norm: bool = False):
        super().__init__()
        c3, c4, c5 = in_channels
        self.in_channels = (int(c3), int(c4), int(c5))
        self.dim, self.norm = int(dim), bool(norm)
        for lvl, cin in zip((5, 4, 3), (c5, c4, c3)):
            setattr(self, f"fpn_lateral{lvl}", self._conv(cin, dim, 1))
            if lvl < 5:
                setattr(self, f"fpn_output{lvl}", self._conv(dim, dim, 3))

    def _conv(self, cin: int, cout: int, k: int) -> nn.Module:
        conv = nn.Conv2d(cin, cout, kernel_size=k, padding=k // 2, bias=not self.norm)
        c2_xavier_fill(conv)
        return nn.Sequential(conv, nn.BatchNorm2d(cout)) if self.norm else conv

    def forward(self, c3: torch.Tensor, c4: torch.Tensor, c5: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prev = self.fpn_lateral5(c5)
        # nearest x2 (officially scale_factor=2; the same for input sizes that are multiples of 32)
        prev = self.fpn_lateral4(c4) + F.interpolate(prev, size=c4.shape[-2:], mode="nearest")
        p4 = self.fpn_output4(prev)
        prev = self.fpn_lateral3(c3) + F.interpolate(prev, size=c3.shape[-2:], mode="nearest")
        p3 = self.fpn_output3(prev)
        return p4, p3


def select_fpn_levels(backbone: nn.Module, timm_name: str) -> list[int]:
    """feature_info indices of C3, C4, C5: the last feature map at stride 8, 16 and 32."""
    info = getattr(backbone, "feature_info", None)
    if not info or not hasattr(backbone, "forward_intermediates"):
        raise SSLRecipeError(
            f"pretrain.method 'resim' needs a timm CNN with feature_info and forward_intermediates; "
            f"backbone.name '{timm_name}' ({type(backbone).__name__}) has neither. Use e.g. resnet18 or resnet50"
        )
    reductions = [int(f["reduction"]) for f in info]
    chosen = []
    for stride in (8, 16, 32):
        idx = [i for i, r in enumerate(reductions) if r == stride]
        if not idx:
            raise SSLRecipeError(
                f"pretrain.method 'resim' needs feature maps at strides 8, 16 and 32 (C3, C4, C5 for its FPN); "
                f"backbone.name '{timm_name}' has strides {reductions}. Use a ResNet-style CNN such as resnet50"
            )
        chosen.append(idx[-1])
    return chosen


def reset_torchvision_resnet_init(backbone: nn.Module) -> None:
    """Undo timm's ``zero_init_last`` on ResNet blocks (torchvision's default ``zero_init_residual=False``)."""
    from timm.models.resnet import BasicBlock, Bottleneck

    for m in backbone.modules():
        bn = m.bn2 if isinstance(m, BasicBlock) else m.bn3 if isinstance(m, Bottleneck) else None
        if bn is not None and getattr(bn, "weight", None) is not None:
            nn.init.ones_(bn.weight)


class ReSimEncoder(nn.Module):
    """``moco/models.py`` ResNet with ``return_mocodet_feats=True``: (MLP(pool(C5)), P4, P3)."""

    def __init__(self, backbone: nn.Module, levels: list[int], in_channels: tuple[int, int, int], dim: int,
                 mlp_hidden: Optional[int], fpn_dim: int, fpn_norm: bool):
        super().__init__()
        self.backbone = backbone
        self.levels = list(levels)
        feat = int(backbone.num_features)
        hidden = mlp_hidden or feat
        self.fc = nn.Sequential(nn.Linear(feat, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))
        self.fpn = ReSimFPN(in_channels, fpn_dim, fpn_norm)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        final, (c3, c4, c5) = self.backbone.forward_intermediates(x, indices=self.levels)
        z = self.fc(self.backbone.forward_head(final, pre_logits=True))  # global average pool of C5
        p4, p3 = self.fpn(c3, c4, c5)
        return z, p4, p3


def _probe_channels(backbone: nn.Module, levels: list[int], in_chans: int) -> tuple[int, int, int]:
    was = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            feats = backbone.forward_intermediates(torch.zeros(1, in_chans, 64, 64), indices=levels, intermediates_only=True)
    finally:
        backbone.train(was)
    return tuple(int(f.shape[1]) for f in feats)  # type: ignore[return-value]


# --------------------------------------------------------------------------- the method


class ReSim(SSLMethod):
    name = "resim"
    optim_defaults = OPTIM_DEFAULTS

    def __init__(self, timm_name: str, in_chans: int, img_size: int, options: ReSimOptions, timm_kwargs: Optional[dict] = None):
        super().__init__()
        from sslrecipe.models.backbone import create_backbone

        o = options
        self.opts = o
        self.img_size = int(img_size)
        self.in_chans = int(in_chans)
        if self.img_size % 32 or self.img_size < 64:
            raise RecipeError(
                f"pretrain.img_size {self.img_size}: resim needs a multiple of 32 of at least 64 "
                f"(its 48-px P4 windows and the FPN's x2 steps), e.g. {max(64, self.img_size // 32 * 32)}"
            )
        backbone = create_backbone(timm_name, in_chans=in_chans, **dict(timm_kwargs or {}))
        reset_torchvision_resnet_init(backbone)
        levels = select_fpn_levels(backbone, timm_name)
        channels = _probe_channels(backbone, levels, in_chans)
        self.query = ReSimEncoder(backbone, levels, channels, o.dim, o.mlp_hidden, o.fpn_dim, o.fpn_norm)
        self.key = copy.deepcopy(self.query)  # param_k.data.copy_(param_q.data)
        for p in self.key.parameters():
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(o.dim, o.queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # numpy copies for views() (which runs on the CPU even when the model sits on a GPU), buffers for forward()
        self._grids = (window_grid(self.img_size, *P4_WINDOWS), window_grid(self.img_size, *P3_WINDOWS))
        self.register_buffer("windows_p4", torch.from_numpy(self._grids[0].copy()), persistent=False)
        self.register_buffer("windows_p3", torch.from_numpy(self._grids[1].copy()), persistent=False)
        self.export_timm_kwargs: dict = {}

    # ------------------------------------------------------------------ data
    def geometry(self, height: int, width: int, rng) -> tuple[bool, V.Box, V.Box]:
        """The shared flip and the two crop boxes, drawn in the official order (flip, crop q, crop k)."""
        flip = bool(rng.random() < 0.5)
        box_q = V.random_resized_crop_box(height, width, rng, self.opts.crop_scale)
        box_k = V.random_resized_crop_box(height, width, rng, self.opts.crop_scale)
        return flip, box_q, box_k

    def _ending(self, img: torch.Tensor, rng) -> torch.Tensor:
        img = V.random_gaussian_blur(img, rng, 0.5)  # blur before the jitter, as in ReSim's main_moco.py
        img = V.random_color_jitter(img, rng, 0.8, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
        img = V.random_grayscale(img, rng, 0.2)
        return V.normalize(img, self.input_mean, self.input_std)

    def crops(self, image: torch.Tensor, rng) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """The two geometric views (un-normalised, no colour augmentation) and their windows."""
        flip, box_q, box_k = self.geometry(int(image.shape[-2]), int(image.shape[-1]), rng)
        src = image.flip(-1) if flip else image
        q = V.resized_crop(src, box_q, self.img_size, interpolation="bilinear")
        k = V.resized_crop(src, box_k, self.img_size, interpolation="bilinear")
        wins = []
        for grid in self._grids:
            boxes_k, valid = map_windows(grid, box_q, box_k, self.img_size)
            wins += [torch.from_numpy(boxes_k), torch.from_numpy(valid)]
        return q, k, tuple(wins)

    def views(self, image: torch.Tensor, rng) -> tuple[torch.Tensor, ...]:
        """``(q, k, boxes_k_p4, valid_p4, boxes_k_p3, valid_p3)``; the query windows are the fixed grids."""
        q, k, wins = self.crops(image, rng)
        return (self._ending(q, rng), self._ending(k, rng)) + wins

    # ------------------------------------------------------------------ model
    def _splits(self, batch: int) -> int:
        return max(1, min(self.opts.shuffle_bn_splits, batch))

    def _encode_query(self, x: torch.Tensor):
        outs = [self.query(c) for c in x.tensor_split(self._splits(x.shape[0]))]
        return tuple(torch.cat(parts) for parts in zip(*outs))

    @torch.no_grad()
    def _encode_key(self, x: torch.Tensor):
        splits = self._splits(x.shape[0])
        if splits == 1:
            return self.key(x)
        perm = torch.randperm(x.shape[0], device=x.device)  # _batch_shuffle_ddp; torch's RNG is checkpointed
        unperm = torch.argsort(perm)
        outs = [self.key(c) for c in x[perm].tensor_split(splits)]
        return tuple(torch.cat(parts)[unperm] for parts in zip(*outs))

    def region_loss(self, fq: torch.Tensor, fk: torch.Tensor, boxes_q: torch.Tensor, boxes_k: torch.Tensor,
                    valid: torch.Tensor, scale: float) -> torch.Tensor:
        """Region InfoNCE at one level: positive = the key's mapped window, negatives = all 3x3-pooled key cells."""
        b, n = valid.shape
        keep = valid.reshape(-1)
        if not bool(keep.any()):
            return fq.float().sum() * 0.0  # no window overlaps any key view (officially a NaN mean)
        # rows are image-major, window-minor, as the official RoI list
        q = prroi_pool(fq.float(), boxes_q.float().expand(b, n, 4), scale).reshape(b * n, -1)[keep]
        q = F.normalize(q, dim=1)
        with torch.no_grad():
            k = prroi_pool(fk.float(), boxes_k.float().reshape(b, n, 4), scale).reshape(b * n, -1)[keep]
            k = F.normalize(k, dim=1)
            neg = F.normalize(F.avg_pool2d(fk.float(), 3, stride=1, padding=0), dim=1)
            neg = neg.transpose(0, 1).reshape(neg.shape[1], -1)  # (C, B*h*w): every cell of every image
        pos = (q * k).sum(1, keepdim=True)
        logits = torch.cat([pos, q @ neg], dim=1) / self.opts.temperature
        return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))

    def forward(self, batch) -> dict[str, torch.Tensor]:
        im_q, im_k, boxes_k4, valid4, boxes_k3, valid3 = batch
        z_q, p4_q, p3_q = self._encode_query(im_q)
        q = F.normalize(z_q.float(), dim=1)
        z_k, p4_k, p3_k = self._encode_key(im_k)
        k = F.normalize(z_k.float(), dim=1)
        queue = self.queue.clone().detach()
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], dim=1) / self.opts.temperature
        loss_moco = F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))
        loss_p4 = self.region_loss(p4_q, p4_k, self.windows_p4, boxes_k4, valid4.bool(), 1 / 16)
        loss_p3 = self.region_loss(p3_q, p3_k, self.windows_p3, boxes_k3, valid3.bool(), 1 / 8)
        self._dequeue_and_enqueue(k)
        return {"loss": loss_moco + loss_p4 + loss_p3, "moco": loss_moco.detach(), "region_p4": loss_p4.detach(),
                "region_p3": loss_p3.detach()}

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        keys = keys.detach().to(self.queue.dtype)
        size = self.queue.shape[1]
        if len(keys) > size:
            keys = keys[-size:]
        ptr = int(self.queue_ptr)
        idx = (torch.arange(len(keys), device=keys.device) + ptr) % size
        self.queue[:, idx] = keys.T
        self.queue_ptr[0] = (ptr + len(keys)) % size

    @torch.no_grad()
    def momentum_update(self) -> None:
        ema_update(self.key.parameters(), self.query.parameters(), self.opts.momentum)

    def after_step(self, step: int, total: int) -> None:
        self.momentum_update()

    # ------------------------------------------------------------------ optimiser and export
    def param_groups(self, weight_decay: float) -> list[dict]:
        """One group, every trainable parameter decayed (``SGD(model.parameters(), weight_decay=1e-4)``)."""
        return [{"params": [p for p in self.query.parameters() if p.requires_grad], "weight_decay": float(weight_decay)}]

    def encoder(self) -> nn.Module:
        return self.query.backbone

    def export_extra(self, out_dir: Union[str, os.PathLike]) -> list[Path]:
        """Write the query encoder's FPN as ``encoder_fpn.safetensors`` beside the encoder (atomic)."""
        return [save_fpn(self.query.fpn, Path(out_dir) / FPN_FILE, strides=(8, 16, 32))]


# --------------------------------------------------------------------------- FPN file


def save_fpn(fpn: ReSimFPN, path: Path, strides=(8, 16, 32)) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in fpn.state_dict().items()}
    meta = {"format": "resim_fpn", "in_channels": json.dumps(list(fpn.in_channels)), "dim": str(fpn.dim),
            "norm": json.dumps(fpn.norm), "strides": json.dumps(list(strides)),
            "levels": json.dumps({"fpn_lateral3": 8, "fpn_output3": 8, "fpn_lateral4": 16, "fpn_output4": 16, "fpn_lateral5": 32})}
    atomic_write_file(path, lambda tmp: save_file(state, tmp, metadata=meta))
    return path


def load_fpn(path: Union[str, os.PathLike]) -> ReSimFPN:
    """Rebuild a :class:`ReSimFPN` from ``encoder_fpn.safetensors`` (strict)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "resim_fpn":
        raise SSLRecipeError(f"{path} is not a ReSim FPN file (metadata format {meta.get('format')!r})")
    fpn = ReSimFPN(tuple(json.loads(meta["in_channels"])), int(meta["dim"]), json.loads(meta["norm"]))
    fpn.load_state_dict(load_file(str(path)), strict=True)
    return fpn


def fpn_state_for_torchvision(state: dict[str, torch.Tensor], level_strides: list[int]) -> dict[str, torch.Tensor]:
    """Map ReSim FPN weights onto ``torchvision.ops.FeaturePyramidNetwork`` keys (what the detector uses).

    ``level_strides`` are the strides of the detector's FPN inputs in order (e.g. ``[4, 8, 16, 32]``). ReSim's
    laterals at strides 8/16/32 become ``inner_blocks.<i>.0`` and its output convs at 8/16 ``layer_blocks.<i>.0``;
    the detector's other FPN convs (stride 4, the stride-32 output conv) have no pretrained counterpart, as in the
    official detectron2 transfer. Only the BN-free FPN (``fpn_norm: false``, the default) maps onto torchvision's.
    """
    if any(".1." in k or k.count(".") > 1 for k in state):
        raise SSLRecipeError("a ReSim FPN trained with fpn_norm: true has no torchvision FeaturePyramidNetwork counterpart")
    level = {3: 8, 4: 16, 5: 32}
    out = {}
    for key, value in state.items():
        name, param = key.split(".")
        kind, lvl = ("inner_blocks", int(name[-1])) if name.startswith("fpn_lateral") else ("layer_blocks", int(name[-1]))
        stride = level[lvl]
        if stride in level_strides:
            out[f"{kind}.{level_strides.index(stride)}.0.{param}"] = value
    return out


@register("resim", ("cnn",), "region similarity learning (Xiao et al. 2021): MoCo v2 + region InfoNCE on an in-backbone FPN",
          optim_defaults=OPTIM_DEFAULTS)
def build_resim(timm_name: str, in_chans: int, img_size: int, options: dict, timm_kwargs: dict) -> ReSim:
    opts = V.parse_options(ReSimOptions, options, "resim")
    return ReSim(timm_name, in_chans, img_size, opts, timm_kwargs)
