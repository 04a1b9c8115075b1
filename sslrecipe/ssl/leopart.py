"""Leopart: dense fine-tuning of a (DINO) ViT (Ziegler & Asano 2022; MkuuWaUjinga/leopart, ``src/leopart.py``).

Mapping to the official code (docs/ssl.md, "Leopart"):

- start: the student and teacher backbones both start from the same weights, which the pipeline loads into
  :meth:`Leopart.encoder` (``pretrain.init``: a DINO pre-training, a fetched DINO checkpoint or a file); the
  teacher backbone is copied from the student right before the first step. Without such weights the run
  starts from random init and a loud warning is issued (the method is a fine-tuning of DINO features);
- head (``src/vit.py``): every spatial token (cls and other prefix tokens excluded) goes through the MLP
  ``dim -> 2048 -> GELU -> 2048 -> GELU -> 256`` (no BN), L2-normalisation and the prototypes
  ``Linear(256, 300, bias=False)``; trunc-normal(0.02) init. Student and teacher heads are initialised
  independently, as in the official code (only backbone weights are loaded into both);
- every step starts by L2-normalising the prototype rows of student and teacher in place (``shared_step``);
- crops (``LeopartTransforms``): 2 global crops (scale 0.25-1) and 4 local crops (96 px at 224, scale 0.05-0.25),
  bilinear; a crop is re-drawn until its intersection with every global crop exceeds 1 % of the image area
  (2 % between the global crops); colour jitter (0.8, 0.8, 0.8, 0.2) p=0.8, grayscale p=0.2, blur p=0.5 with
  sigma in [0.1, 2]; **no flip**; for every (global crop c, crop v) pair the intersection box is computed in
  c's and in v's pixel coordinates (``calculate_bboxes``);
- targets: for each global crop c the teacher's patch scores ``out`` go through Sinkhorn-Knopp on
  ``exp(out / 0.05)`` with 3 iterations (optionally after the scores of a queue of 8192 earlier teacher
  embeddings, scored with the *student* prototypes, are prepended: used once full, at most ``10 * batch``
  foreground embeddings pushed per step); ``q`` is RoI-aligned (``roi_align``, 7x7, ``aligned=True``, boxes /
  patch size) to each intersection box;
- predictions: the student's scores of every other crop v are RoI-aligned to the same intersection,
  ``p = softmax(out / 0.1)``, ``L = -sum_k q log p`` averaged over the aligned cells, summed over v, divided by
  ``n_crops - 1`` and by the number of global crops;
- foreground mask (``loss_mask: fg``): the teacher's last-layer CLS->patch attention averaged over heads,
  Gaussian blur (kernel 7, sigma 0.6), keep the top 60 % of the attention mass, drop 8-connected components of
  <= 2 patches (``process_attentions``), RoI-align to 7x7 and keep cells ``>= 1.0``; the loss averages over kept
  cells only (a pair with no kept cell adds nothing); ``bg`` inverts the mask, ``all`` uses none;
- EMA teacher (no drop-path; the student has drop-path 0.1): momentum cosine 0.9995 -> 1 over backbone, head and
  prototypes, applied where the official ``training_step`` applies it: after the loss is computed and **before**
  the backward pass and the optimizer step (Lightning steps after ``training_step`` returns), i.e. from the
  pre-step student, with the momentum of the current step index (``momentum_schedule[global_step]``); so it is
  done at the end of :meth:`Leopart.forward` in training mode (per micro-batch under gradient accumulation, as
  Lightning calls ``training_step`` per micro-batch);
- optimiser: AdamW; the head and prototypes get ``head_lr_scale`` = 10 x the backbone lr (lr_backbone 1e-5,
  lr_heads 1e-4 officially: set ``pretrain.lr: 1.0e-5``); cosine to 0 per step without warmup
  (``pretrain.warmup_steps: 0``); weight decay cosine ``pretrain.weight_decay`` (0.04) -> ``weight_decay_end`` (0.5)
  on the decayed backbone and head groups, applied by the optimizer pre-step hook of :class:`OptimizerControl`.

Differences from the official code (also listed in docs/ssl.md): single-process Sinkhorn (no all-reduce); the
queue is a registered buffer (so it survives a checkpoint resume; officially it is rebuilt empty); pushing to
the queue stores ``min(10 * batch, #foreground embeddings)`` vectors (the official code would fail when fewer
foreground embeddings than that exist); ``log_softmax`` instead of ``log(softmax)`` (the same value, no
``-inf``); a crop that does not reach the minimum intersection after 100 draws is replaced by the first global
crop's box (the official loop draws forever); blur is a true Gaussian (views.py); inputs are normalised with the
mean/std of the encoder it starts from (ImageNet's for public DINO weights; 0.5 / 0.25 after our own DINO), which
the exported encoder.json records.
"""

from __future__ import annotations

import logging
import warnings
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sslrecipe.ssl import views as V
from sslrecipe.ssl.views import CropScale
from sslrecipe.ssl.dino import cosine_value, default_local_size
from sslrecipe.ssl.ema import ema_update
from sslrecipe.ssl.optim_control import OptimizerControl
from sslrecipe.ssl.registry import SSLMethod, register
from sslrecipe.ssl.vit_utils import check_img_size, check_vit, patch_size_of, vit_forward, vit_forward_with_last_attention

log = logging.getLogger("sslrecipe.ssl.leopart")

RANDOM_INIT_WARNING = (
    "Leopart is a fine-tuning of DINO features but its ViT is randomly initialised: set pretrain.init "
    "(weights from a DINO pre-training, e.g. source: fetch with a DINO ViT checkpoint, or source: file) — "
    "training Leopart from scratch is not what the method was designed or evaluated for"
)


# --------------------------------------------------------------------------- building blocks


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """SwAV/Leopart Sinkhorn-Knopp on ``exp(scores / epsilon)``; ``scores`` (B, K) -> assignments (B, K).

    Each iteration scales the K prototype rows of ``Q = exp(scores/eps)^T`` to mass 1/K, then the B sample
    columns to mass 1/B; the result's rows (samples) are normalised to sum to 1 (so prototype columns sum to
    about B/K).
    """
    q = torch.exp(scores.float() / epsilon).t()
    q = q / q.sum()
    k, b = q.shape
    r = torch.full((k,), 1.0 / k, device=q.device)
    c = torch.full((b,), 1.0 / b, device=q.device)
    for _ in range(iterations):
        u = q.sum(dim=1)
        q = q * (r / u).unsqueeze(1)
        q = q * (c / q.sum(dim=0)).unsqueeze(0)
    return (q / q.sum(dim=0, keepdim=True)).t()


def keep_attention_mass(attn: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean mask of the largest entries of each row of ``attn`` (N, L) holding ``threshold`` of its mass
    (DINO's ``visualize_attention`` thresholding: ascending sort, keep where ``cumsum > 1 - threshold``)."""
    val, idx = torch.sort(attn, dim=-1)
    val = val / val.sum(dim=-1, keepdim=True)
    keep_sorted = torch.cumsum(val, dim=-1) > (1 - threshold)
    return torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)


def remove_small_components(mask: torch.Tensor, max_size: int = 2) -> torch.Tensor:
    """Drop 8-connected components of at most ``max_size`` pixels from a boolean mask (N, H, W).

    ``skimage.measure.label`` on the official (1, H, W) arrays uses full connectivity, i.e. 8-connectivity in the
    image plane. Labels are found by propagating the maximum pixel id inside each component.
    """
    n, h, w = mask.shape
    ids = torch.arange(1, h * w + 1, dtype=torch.float32, device=mask.device).view(1, h, w).expand(n, h, w)
    m = mask.float()
    labels = ids * m
    while True:
        grown = F.max_pool2d(labels.unsqueeze(1), 3, stride=1, padding=1).squeeze(1) * m
        if torch.equal(grown, labels):
            break
        labels = grown
    out = mask.clone()
    for i in range(n):
        lab = labels[i].long().flatten()
        counts = torch.bincount(lab, minlength=h * w + 1)
        small = (counts[lab] <= max_size) & (lab > 0)
        out[i].view(-1)[small] = False
    return out


def foreground_mask(cls_attn: torch.Tensor, grid: tuple[int, int], threshold: float = 0.6, blur_sigma: float = 0.6) -> torch.Tensor:
    """``experiments.utils.process_attentions`` on head-averaged CLS attention ``(N, L)``: float mask (N, 1, h, w)."""
    import torchvision.transforms.v2.functional as TF

    n = cls_attn.shape[0]
    a = cls_attn.float().reshape(n, 1, *grid)
    a = TF.gaussian_blur(a, kernel_size=[7, 7], sigma=[blur_sigma, blur_sigma])
    keep = keep_attention_mass(a.reshape(n, -1), threshold).reshape(n, *grid)
    return remove_small_components(keep).float().unsqueeze(1)


def crop_intersection_boxes(boxes: np.ndarray, sizes: list[int], n_global: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``LeopartTransforms.calculate_bboxes``.

    ``boxes`` (n, 4): every crop's ``x1, y1, x2, y2`` in the image; ``sizes``: each crop's output size. Returns
    ``gc`` (n_global, n, 4): the intersection of global crop c and crop v in c's output pixels, and ``all``
    (n, n_global, 4): the same intersection in v's output pixels (``x1, y1, x2, y2``).
    """
    b = torch.as_tensor(boxes, dtype=torch.float32)
    n = b.shape[0]
    size = torch.as_tensor(sizes, dtype=torch.float32).view(n, 1)
    wh = torch.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], dim=1)  # (n, 2): w, h
    g = b[:n_global]
    left_top = torch.maximum(g[:, None, :2], b[None, :, :2])  # (n_global, n, 2)
    right_bottom = torch.minimum(g[:, None, 2:], b[None, :, 2:])
    if not torch.all(right_bottom - left_top > 0):
        raise RuntimeError("Leopart crops without intersection (the crop sampler should prevent this)")
    # in global crop c's coordinates
    gc = torch.cat([(left_top - g[:, None, :2]) / wh[:n_global, None] * size[:n_global, None],
                    (right_bottom - g[:, None, :2]) / wh[:n_global, None] * size[:n_global, None]], dim=2)
    # in crop v's coordinates
    lt_v = left_top.permute(1, 0, 2)  # (n, n_global, 2)
    rb_v = right_bottom.permute(1, 0, 2)
    allb = torch.cat([(lt_v - b[:, None, :2]) / wh[:, None] * size[:, None],
                      (rb_v - b[:, None, :2]) / wh[:, None] * size[:, None]], dim=2)
    return gc, allb


def align_to_boxes(maps: torch.Tensor, boxes: torch.Tensor, patch: int, size: int) -> torch.Tensor:
    """RoI-align per-image maps ``(B, C, h, w)`` on the patch grid to boxes ``(B, n, 4)`` given in crop pixels
    (``x1, y1, x2, y2``): ``torchvision.ops.roi_align(maps, boxes / patch, size, aligned=True)`` -> (B, n, C, size, size)."""
    from torchvision.ops import roi_align

    b, n = boxes.shape[:2]
    out = roi_align(maps, list(torch.unbind(boxes.to(maps.dtype) / patch)), size, aligned=True)
    return out.view(b, n, maps.shape[1], size, size)


def _box_area_overlaps(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    lt = np.maximum(box[:2], others[:, :2])
    rb = np.minimum(box[2:], others[:, 2:])
    wh = np.clip(rb - lt, 0, None)
    return wh[:, 0] * wh[:, 1]


class LeopartHead(nn.Module):
    """Projection head + prototypes of ``src/vit.py`` (``forward_head``): returns (embeddings, scores)."""

    def __init__(self, in_dim: int, out_dim: int = 256, hidden_dim: int = 2048, nlayers: int = 3, n_prototypes: int = 300):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.projection_head = nn.Linear(in_dim, out_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, out_dim))
            self.projection_head = nn.Sequential(*layers)
        self.prototypes = nn.Linear(out_dim, n_prototypes, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1, p=2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = F.normalize(self.projection_head(x), dim=1, p=2)
        return emb, self.prototypes(emb)


# --------------------------------------------------------------------------- options


class LeopartOptions(BaseModel):
    """``pretrain.options.leopart``."""

    model_config = ConfigDict(extra="forbid")

    num_prototypes: int = Field(300, ge=2, description="Prototypes (clusters); the paper ablates 100 and 500.")
    projection_dim: int = Field(256, ge=1, description="Head output (embedding) dimension.")
    projection_hidden_dim: int = Field(2048, ge=1, description="Head MLP hidden width.")
    projection_layers: int = Field(3, ge=1, description="Head MLP layers.")
    temperature: float = Field(0.1, gt=0, description="Student softmax temperature.")
    epsilon: float = Field(0.05, gt=0, description="Sinkhorn-Knopp entropic regularisation.")
    sinkhorn_iterations: int = Field(3, ge=1, description="Sinkhorn-Knopp iterations.")
    roi_align_size: int = Field(7, ge=1, description="RoI-align output size (cells per side).")
    loss_mask: Literal["fg", "bg", "all"] = Field("fg", description="Tokens the loss uses: attention foreground, background, or all.")
    fg_threshold: float = Field(0.6, gt=0, lt=1, description="Fraction of the CLS attention mass kept as foreground.")
    fg_blur_sigma: float = Field(0.6, gt=0, description="Gaussian blur (kernel 7) of the attention before thresholding.")
    queue_length: int = Field(8192, ge=0, description="Queue of earlier teacher embeddings for Sinkhorn; 0 = off.")
    momentum_teacher: float = Field(0.9995, ge=0, le=1, description="EMA momentum at the start; cosine to momentum_teacher_end.")
    momentum_teacher_end: float = Field(1.0, ge=0, le=1, description="EMA momentum at the end.")
    weight_decay_end: Optional[float] = Field(0.5, ge=0, description="Final weight decay of the cosine schedule (from pretrain.weight_decay); null = constant.")
    head_lr_scale: float = Field(10.0, gt=0, description="Head and prototype lr as a multiple of the backbone lr (1e-4 / 1e-5).")
    drop_path_rate: float = Field(0.1, ge=0, lt=1, description="Student stochastic depth.")
    local_crops_number: int = Field(4, ge=0, description="Local crops (2 global crops are always used).")
    local_crop_size: Optional[int] = Field(None, ge=8, description="Local crop size; null = 96/224 of img_size rounded to the patch size.")
    global_crops_scale: CropScale = Field((0.25, 1.0), description="Global crop area range.")
    local_crops_scale: CropScale = Field((0.05, 0.25), description="Local crop area range.")
    min_intersection: float = Field(0.01, gt=0, lt=1, description="Minimum crop/global-crop intersection as a fraction of the image (x2 between globals).")
    jitter_strength: float = Field(1.0, ge=0, description="Colour jitter strength s: ColorJitter(0.8s, 0.8s, 0.8s, 0.2s).")
    blur_strength: float = Field(1.0, ge=0, description="Blur sigma range [0.1, 2] x this.")



# --------------------------------------------------------------------------- the method


N_GLOBAL = 2  # crops_for_assign = [0, 1]

# train_coco_config.yml as pretrain.* recipe keys (ViT-S/16; batch 32 per GPU x 2). Exposed as
# ``method.optim_defaults``; the pipeline fills them into unset pretrain.* keys (registry.apply_method_defaults).
OPTIM_DEFAULTS = {"optimizer": "adamw", "betas": (0.9, 0.999), "lr": 1e-5, "weight_decay": 0.04, "schedule": "cosine",
                  "warmup_steps": 0, "min_lr_ratio": 0.0, "clip_grad": None}


class Leopart(OptimizerControl, SSLMethod):
    name = "leopart"
    optim_defaults = OPTIM_DEFAULTS

    def __init__(self, timm_name: str, in_chans: int, img_size: int, options: LeopartOptions, timm_kwargs: Optional[dict] = None):
        super().__init__()
        from sslrecipe.errors import RecipeError, SSLRecipeError
        from sslrecipe.models.backbone import create_backbone

        o = options
        self.opts = o
        self.img_size = int(img_size)
        kwargs = {**(timm_kwargs or {}), "img_size": self.img_size}
        kwargs.pop("drop_path_rate", None)
        student_kwargs = dict(kwargs, drop_path_rate=o.drop_path_rate) if o.drop_path_rate > 0 else kwargs
        self.student_backbone = create_backbone(timm_name, in_chans=in_chans, **student_kwargs)
        self.teacher_backbone = create_backbone(timm_name, in_chans=in_chans, **kwargs)
        check_vit(self.student_backbone, timm_name, "leopart")
        check_img_size(self.img_size, self.student_backbone, "leopart")
        if o.loss_mask != "all" and self.student_backbone.cls_token is None:
            raise SSLRecipeError(f"pretrain.options.leopart.loss_mask '{o.loss_mask}' needs a ViT with a cls token; use loss_mask: all")
        self.patch = patch_size_of(self.student_backbone)[0]
        self.num_prefix = int(self.student_backbone.num_prefix_tokens)
        self.global_grid = self.img_size // self.patch
        if o.loss_mask != "all" and self.global_grid < 4:
            raise RecipeError(f"pretrain.img_size {self.img_size} gives a {self.global_grid}x{self.global_grid} patch grid; the "
                              "foreground mask's 7x7 blur needs at least 4x4 (raise img_size or set pretrain.options.leopart.loss_mask: all)")
        self.local_size = o.local_crop_size or default_local_size(self.img_size, self.patch)
        if self.local_size % self.patch:
            raise RecipeError(f"pretrain.options.leopart.local_crop_size ({self.local_size}) must be a multiple of the patch size {self.patch}")
        self.export_timm_kwargs = {"img_size": self.img_size}
        embed_dim = int(self.student_backbone.embed_dim)
        head_args = dict(out_dim=o.projection_dim, hidden_dim=o.projection_hidden_dim, nlayers=o.projection_layers,
                         n_prototypes=o.num_prototypes)
        self.student_head = LeopartHead(embed_dim, **head_args)
        self.teacher_head = LeopartHead(embed_dim, **head_args)  # independent init, as officially
        for p in list(self.teacher_backbone.parameters()) + list(self.teacher_head.parameters()):
            p.requires_grad_(False)
        if o.queue_length > 0:
            self.register_buffer("queue", torch.zeros(N_GLOBAL, o.queue_length, o.projection_dim))
        else:
            self.queue = None
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.register_buffer("total_steps", torch.zeros((), dtype=torch.long))
        # to detect "no pretrain.init": the student's random patch embedding at construction
        self._random_fingerprint = self.student_backbone.patch_embed.proj.weight.detach().clone()
        self._synced = False
        self._wd_base: Optional[float] = None
        self._decay_ids: set[int] = set()
        self._init_optimizer_control()

    # ------------------------------------------------------------------ data
    def views(self, image: torch.Tensor, rng) -> list[torch.Tensor]:
        o = self.opts
        h, w = int(image.shape[-2]), int(image.shape[-1])
        n = N_GLOBAL + o.local_crops_number
        sizes = [self.img_size] * N_GLOBAL + [self.local_size] * o.local_crops_number
        scales = [o.global_crops_scale] * N_GLOBAL + [o.local_crops_scale] * o.local_crops_number
        boxes = np.zeros((n, 4), dtype=np.float64)
        min_inter = int(h * w * o.min_intersection)
        s = o.jitter_strength
        crops = []
        for i in range(n):
            top, left, ch, cw = V.random_resized_crop_box(h, w, rng, scales[i])
            if i > 0:
                need = min_inter * 2 if i < N_GLOBAL else min_inter
                for _ in range(100):
                    box = np.array([left, top, left + cw, top + ch], dtype=np.float64)
                    if np.all(_box_area_overlaps(box, boxes[: min(i, N_GLOBAL)]) > need):
                        break
                    top, left, ch, cw = V.random_resized_crop_box(h, w, rng, scales[i])
                else:  # simplification: fall back to the first global crop's region (it meets both globals)
                    x1, y1, x2, y2 = boxes[0]
                    top, left, ch, cw = int(y1), int(x1), int(y2 - y1), int(x2 - x1)
            boxes[i] = [left, top, left + cw, top + ch]
            c = V.resized_crop(image, (top, left, ch, cw), sizes[i], interpolation="bilinear")
            c = V.random_color_jitter(c, rng, 0.8, brightness=0.8 * s, contrast=0.8 * s, saturation=0.8 * s, hue=0.2 * s)
            c = V.random_grayscale(c, rng, 0.2)
            c = V.random_gaussian_blur(c, rng, 0.5, sigma=(0.1 * o.blur_strength, 2.0 * o.blur_strength))
            crops.append(V.normalize(c, self.input_mean, self.input_std))
        gc, allb = crop_intersection_boxes(boxes, sizes, N_GLOBAL)
        return crops + [gc, allb]

    def collate(self, items: list) -> list[torch.Tensor]:
        """Crops stacked per crop index, then the ``gc`` (B, 2, n, 4) and ``all`` (B, n, 2, 4) boxes."""
        return [torch.stack([item[i] for item in items]) for i in range(len(items[0]))]

    # ------------------------------------------------------------------ model
    def _spatial(self, backbone: nn.Module, crops: list[torch.Tensor], with_attention: bool = False):
        """Spatial tokens of same-resolution crop groups concatenated ``(sum B*L, D)`` (+ CLS attention)."""
        tokens, attns, start = [], [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            x = torch.cat(crops[start:end])
            if with_attention:
                out, attn, _grid = vit_forward_with_last_attention(backbone, x)
                attns.append(attn[:, :, 0, self.num_prefix:].mean(dim=1))  # CLS -> patches, averaged over heads
            else:
                out = vit_forward(backbone, x)
            tokens.append(out[:, self.num_prefix:].reshape(-1, out.shape[-1]))
            start = end
        return torch.cat(tokens), (torch.cat(attns) if with_attention else None)

    def _sync_teacher_once(self) -> None:
        if self._synced:
            return
        self._synced = True
        if int(self.iteration) != 0:
            return  # resumed: the teacher comes from the checkpoint
        if torch.equal(self.student_backbone.patch_embed.proj.weight.detach().cpu(), self._random_fingerprint.cpu()):
            warnings.warn(RANDOM_INIT_WARNING, stacklevel=2)
            log.warning(RANDOM_INIT_WARNING)
        self.teacher_backbone.load_state_dict(self.student_backbone.state_dict())

    def forward(self, batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        o = self.opts
        self._sync_teacher_once()
        crops, gc_boxes, all_boxes = batch[:-2], batch[-2], batch[-1]
        n_crops = len(crops)
        bs = crops[0].shape[0]
        res = crops[0].shape[-1] // self.patch
        k = self.opts.roi_align_size
        # 1. normalise the prototypes of student and teacher
        self.student_head.normalize_prototypes()
        self.teacher_head.normalize_prototypes()
        # 2. forward passes (the teacher sees the global crops only)
        use_mask = o.loss_mask != "all"
        with torch.no_grad():
            t_tokens, t_attn = self._spatial(self.teacher_backbone, crops[:N_GLOBAL], with_attention=use_mask)
            t_emb, t_out = self.teacher_head(t_tokens)
        s_tokens, _ = self._spatial(self.student_backbone, crops)
        _s_emb, s_out = self.student_head(s_tokens)
        s_out = s_out.float()
        n_gc_tokens = bs * res * res
        gc_student = s_out[: N_GLOBAL * n_gc_tokens]
        lc_student = s_out[N_GLOBAL * n_gc_tokens :]
        lc_res = crops[-1].shape[-1] // self.patch if n_crops > N_GLOBAL else 0
        attn_hard = None
        if use_mask:
            attn_hard = foreground_mask(t_attn, (res, res), o.fg_threshold, o.fg_blur_sigma)
            if o.loss_mask == "bg":
                attn_hard = 1.0 - attn_hard
        # 3. swapped prediction over crop intersections
        loss = s_out.sum() * 0.0  # keeps the graph even when every pair is masked out
        for c in range(N_GLOBAL):
            with torch.no_grad():
                out = t_out[n_gc_tokens * c : n_gc_tokens * (c + 1)].float()
                n_pred = out.shape[0]
                if self.queue is not None:
                    out = self._queue_step(c, out, t_emb[n_gc_tokens * c : n_gc_tokens * (c + 1)], attn_hard, bs)
                q = sinkhorn(out, o.epsilon, o.sinkhorn_iterations)[-n_pred:]
                q = q.reshape(bs, res, res, -1).permute(0, 3, 1, 2)
                boxes_c = gc_boxes[:, c].float()  # (B, n, 4): intersections with every crop, in c's pixels
                aligned_q = align_to_boxes(q, boxes_c, self.patch, k)
                if attn_hard is not None:
                    aligned_mask = align_to_boxes(attn_hard[bs * c : bs * (c + 1)], boxes_c, self.patch, k)
                    keep = (aligned_mask[:, :, 0] >= 1.0).float()  # (B, n, k, k)
            subloss = 0.0
            for v in range(n_crops):
                if v == c:
                    continue
                if v < N_GLOBAL:
                    pred = gc_student[n_gc_tokens * v : n_gc_tokens * (v + 1)]
                    r = res
                else:
                    i = v - N_GLOBAL
                    n_lc = bs * lc_res * lc_res
                    pred, r = lc_student[n_lc * i : n_lc * (i + 1)], lc_res
                pred = pred.reshape(bs, r, r, -1).permute(0, 3, 1, 2)
                aligned_p = align_to_boxes(pred, all_boxes[:, v, c].float().unsqueeze(1), self.patch, k)[:, 0]
                ce = torch.sum(aligned_q[:, v] * F.log_softmax(aligned_p / o.temperature, dim=1), dim=1)  # (B, k, k)
                if attn_hard is not None:
                    m = keep[:, v]
                    if float(m.sum()) != 0:
                        subloss = subloss - torch.sum(ce * m) / torch.sum(m)
                else:
                    subloss = subloss - ce.mean()
            loss = loss + subloss / (n_crops - 1)
        if self.training:  # the official training_step's EMA: after the loss, before backward and the step
            ema_update(self.teacher_parameters(), self.student_parameters(),
                       self.momentum_at(int(self.iteration), int(self.total_steps)))
        return {"loss": loss / N_GLOBAL}

    @torch.no_grad()
    def _queue_step(self, c: int, out: torch.Tensor, emb: torch.Tensor, attn_hard: Optional[torch.Tensor], bs: int) -> torch.Tensor:
        """Prepend the queue's scores (student prototypes) once the queue is full, then push new embeddings."""
        queue = self.queue
        if not torch.all(queue[c, -1] == 0):
            out = torch.cat([queue[c].float() @ self.student_head.prototypes.weight.float().t(), out])
        if attn_hard is not None:
            fg = attn_hard[bs * c : bs * (c + 1)].permute(0, 2, 3, 1).flatten().bool()
            emb = emb[fg]
        n_store = min(bs * 10, queue.shape[1], emb.shape[0])
        if n_store > 0:
            idx = torch.randperm(emb.shape[0], device=emb.device)[:n_store]
            queue[c, n_store:] = queue[c, :-n_store].clone()
            queue[c, :n_store] = emb[idx].to(queue.dtype)
        return out

    def student_parameters(self) -> list[torch.Tensor]:
        return list(self.student_backbone.parameters()) + list(self.student_head.parameters())

    def teacher_parameters(self) -> list[torch.Tensor]:
        return list(self.teacher_backbone.parameters()) + list(self.teacher_head.parameters())

    def momentum_at(self, it: int, total: int) -> float:
        return cosine_value(self.opts.momentum_teacher, self.opts.momentum_teacher_end, it, total)

    def after_step(self, step: int, total: int) -> None:
        # only the schedule position: the EMA itself ran in forward(), before this step's optimizer update
        self.iteration.fill_(step)
        self.total_steps.fill_(total)

    def encoder(self) -> nn.Module:
        # the student: what the official evaluation (``self.model``) and the README's loading snippet use
        return self.student_backbone

    # ------------------------------------------------------------------ optimizer side
    def param_groups(self, weight_decay: float) -> list[dict]:
        """``configure_optimizers`` with ``exclude_norm_bias``: backbone decay / no-decay, head decay / no-decay."""
        groups, decay_ids = [], set()
        for module, scale in ((self.student_backbone, 1.0), (self.student_head, self.opts.head_lr_scale)):
            decay, no_decay = [], []
            for name, p in module.named_parameters():
                if not p.requires_grad:
                    continue
                (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
            decay_ids |= {id(p) for p in decay}
            groups.append({"params": decay, "weight_decay": float(weight_decay), "lr_scale": scale})
            groups.append({"params": no_decay, "weight_decay": 0.0, "lr_scale": scale})
        self._wd_base = float(weight_decay)
        self._decay_ids = decay_ids
        self._register_optimizer_hook()
        return [g for g in groups if g["params"]]

    def _anchor_param(self) -> torch.Tensor:
        return next(p for p in self.student_backbone.parameters() if p.requires_grad)

    def before_optimizer_step(self, optimizer) -> None:
        if self._wd_base is None or self.opts.weight_decay_end is None:
            return
        wd = cosine_value(self._wd_base, self.opts.weight_decay_end, int(self.iteration), int(self.total_steps))
        for group in optimizer.param_groups:
            if group["params"] and id(group["params"][0]) in self._decay_ids:
                group["weight_decay"] = wd


@register("leopart", ("vit",), "dense fine-tuning of DINO ViTs (Ziegler & Asano 2022): patch clustering over crop intersections", optim_defaults=OPTIM_DEFAULTS)
def build_leopart(timm_name: str, in_chans: int, img_size: int, options: dict, timm_kwargs: dict) -> Leopart:
    opts = V.parse_options(LeopartOptions, options, "leopart")
    return Leopart(timm_name, in_chans, img_size, opts, timm_kwargs)
