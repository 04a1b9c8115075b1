"""DINO: self-distillation with no labels (Caron et al. 2021; facebookresearch/dino, ``main_dino.py``).

Mapping to the official code (docs/ssl.md, "DINO"):

- :class:`DINOHead` = ``vision_transformer.DINOHead``: MLP ``in -> 2048 -> GELU -> 2048 -> GELU -> 256`` (optional
  BN, Linear biases always), trunc-normal(0.02) init, L2-normalise, then a weight-normalised
  ``Linear(256, out_dim=65536, bias=False)`` with ``g = 1``, frozen when ``norm_last_layer`` (default True);
- :class:`DINOLoss` = ``DINOLoss``: teacher ``softmax((t - center) / temp)`` on the 2 global crops, student
  ``log_softmax(s / 0.1)`` on all crops, cross-entropy averaged over every (teacher view, other student view)
  pair; the center is updated after the loss with momentum 0.9 from the teacher batch mean (all-reduced when
  ``torch.distributed`` is initialised);
- multi-crop (``DataAugmentationDINO``): 2 global crops (scale (0.4, 1) for ViTs), ``local_crops_number`` = 8
  local crops (96 px at 224, scale (0.05, 0.4)), bicubic; flip, ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8,
  grayscale p=0.2; blur p = 1.0 / 0.1 / 0.5 (global 1 / global 2 / locals); solarize p=0.2 on global 2 only;
- ``MultiCropWrapper``: same-resolution crops are concatenated into one backbone pass and the head runs once on
  all of them; the teacher sees only the 2 global crops;
- ViT specifics: the backbone output is the cls token after the final norm; the 96-px local crops go through
  the position embedding interpolated like ``interpolate_pos_encoding`` (:mod:`vit_utils`); the student has
  stochastic depth ``drop_path_rate`` 0.1 (linearly spaced over blocks), the teacher none; the cls token gets
  DINO's trunc-normal(0.02) init (the rest of timm's ViT init already equals DINO's);
- EMA teacher: built separately (no drop-path), starts from the student's weights, ``requires_grad=False``,
  updated after every optimizer step in :meth:`DINO.after_step` over all backbone + head parameters with the
  per-iteration cosine momentum ``0.996 -> 1`` (``utils.cosine_scheduler``);
- teacher temperature: ``linspace(warmup_teacher_temp, teacher_temp)`` over the warmup, then constant; the code
  defaults (0.04 -> 0.04, no warmup) are the defaults here (the README's "boosted" ViT-S run trains 300 epochs with
  0.07 warmed up over 30 of them, ``teacher_temp: 0.07, warmup_teacher_temp_fraction: 0.1``, and
  ``norm_last_layer: false``; its absolute 10 lr-warmup and 1 frozen epochs are ``warmup_fraction: 0.0333`` and
  ``freeze_last_layer_fraction: 0.00333``; docs/ssl.md has the recipe);
- optimiser side, applied by a step pre-hook on the optimizer that the training loop builds from
  :meth:`DINO.param_groups` (see :class:`OptimizerControl`): the weight decay of the regularised group (not
  biases or 1-D params, ``utils.get_params_groups``) follows the per-iteration cosine ``weight_decay ->
  weight_decay_end`` (0.04 -> 0.4 officially; the start is ``pretrain.weight_decay``); gradients are clipped
  **per parameter** to ``clip_grad`` = 3.0 (``utils.clip_gradients``), then the last layer's gradients are
  dropped during the first ``freeze_last_layer_fraction`` of training (``cancel_gradients_last_layer``), then the
  optimizer steps. The lr (``0.0005 * batch / 256``, 10 of 100 epochs linear warmup, cosine) comes from the
  recipe's ``pretrain.blr`` / ``warmup_fraction`` / ``schedule`` (docs/ssl.md lists the keys).

CNN backbones (``("vit", "cnn")`` families): the same head, loss, crops and EMA on the timm model's pooled
features (``num_classes=0``, = torchvision's ``fc = Identity``); the defaults switch to the README's ResNet-50
recipe where it differs (global crops (0.14, 1), local crops (0.05, 0.14), constant weight decay, no
drop-path). ``build_dino`` hands CNN backbones to ``dino_cnn.build_dino_cnn`` (issue 6), which adds the
torchvision ResNet initialisation and the SGD recipe's ``optim_defaults``. BN layers run in training mode in
both networks as in the official code (a single process has no SyncBN to convert to).

Simplifications (also in docs/ssl.md): schedules indexed by *epoch* in the official code (teacher-temperature
warmup, last-layer freezing) are expressed as fractions of the total optimizer steps and evaluated per step;
the lr schedule floor is ``pretrain.min_lr_ratio`` x peak instead of an absolute ``min_lr=1e-6``; the blur is a
true Gaussian instead of PIL's box-blur approximation; inputs use the encoder's normalisation (0.5 / 0.25 from
random init, the start encoder's with ``pretrain.init``; views.py, recorded in encoder.json).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sslrecipe.models.family import backbone_family
from sslrecipe.ssl import views as V
from sslrecipe.ssl.views import CropScale
from sslrecipe.ssl.ema import ema_update
from sslrecipe.ssl.optim_control import OptimizerControl
from sslrecipe.ssl.registry import SSLMethod, register
from sslrecipe.ssl.vit_utils import check_img_size, check_vit, patch_size_of, vit_forward


# --------------------------------------------------------------------------- schedules


def cosine_value(base: float, final: float, it: int, total: int) -> float:
    """``utils.cosine_scheduler(base, final, ...)[it]`` without warmup: ``final + (base-final)(1+cos(pi it/total))/2``."""
    if total <= 0:
        return base
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * min(it, total) / total))


def linear_warmup_then_constant(start: float, end: float, it: int, warmup: int) -> float:
    """``np.concatenate((np.linspace(start, end, warmup), np.ones(...) * end))[it]``."""
    if it >= warmup:
        return end
    if warmup == 1:
        return start
    return start + (end - start) * it / (warmup - 1)


# --------------------------------------------------------------------------- head and loss


class WeightNormLinear(nn.Module):
    """``nn.utils.weight_norm(nn.Linear(in, out, bias=False))`` with ``weight_g`` filled with 1.

    Written out (``weight = g * v / ||v||`` per output row) instead of torch's parametrization so the module can be
    pickled (DataLoader workers started with ``spawn`` pickle the method with its ``views``); the parameter names
    ``weight_g`` / ``weight_v`` are those of the official checkpoints.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        init = nn.Linear(in_features, out_features, bias=False)  # PyTorch's default init of the direction
        self.weight_v = nn.Parameter(init.weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # g / ||v|| is one number per output row: one full-size multiply instead of a multiply and a divide
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """``vision_transformer.DINOHead``."""

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True, nlayers: int = 3,
                 hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # created after the init above, as in the official code: the direction keeps PyTorch's default init
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


class DINOLoss(nn.Module):
    """``main_dino.DINOLoss``; the teacher temperature is passed per call (the schedule lives in the method)."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, teacher_temp: float, ncrops: int,
                n_teacher: int = 2) -> torch.Tensor:
        # The official double loop sums, over every (teacher view iq, student view v != iq) pair,
        # mean_b(-q_iq . log_softmax(s_v)). Grouped by student view it is mean_b(-(sum_{iq != v} q_iq) . log_softmax(s_v)):
        # the same terms, with one log_softmax per student view instead of one per pair (8 instead of 14 at 2+6 crops).
        log_p = F.log_softmax(student_output.float() * (1.0 / self.student_temp), dim=-1).chunk(ncrops)
        teacher_output = teacher_output.float()
        q = F.softmax((teacher_output - self.center) * (1.0 / teacher_temp), dim=-1).detach().chunk(n_teacher)
        q_all = torch.stack(q).sum(0)
        total = student_output.new_zeros((), dtype=torch.float32)
        n_terms = 0
        for v in range(len(log_p)):
            others = [q[i] for i in range(n_teacher) if i != v]  # every teacher view but the student's own
            target = q_all if len(others) == n_teacher else (others[0] if len(others) == 1 else torch.stack(others).sum(0))
            total = total - (target * log_p[v]).sum(-1).mean()
            n_terms += len(others)
        total = total / n_terms
        self.update_center(teacher_output)
        return total

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        count = len(teacher_output)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(batch_center)
            count *= torch.distributed.get_world_size()
        batch_center = batch_center / count
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))


def clip_gradients_per_param(params, clip: float) -> None:
    """``utils.clip_gradients``: every parameter's gradient norm is clipped to ``clip`` on its own."""
    for p in params:
        if p.grad is not None:
            norm = p.grad.detach().norm(2)
            coef = clip / (norm + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)


# The official ViT optimiser settings (main_dino.py defaults) as pretrain.* recipe keys; exposed as
# ``method.optim_defaults`` (the CNN variant, dino_cnn.DINOCNN, has its own); the pipeline fills them into unset pretrain.* keys.
OPTIM_DEFAULTS = {"optimizer": "adamw", "betas": (0.9, 0.999), "blr": 5e-4, "weight_decay": 0.04, "schedule": "cosine",
                  "warmup_fraction": 0.1, "min_lr_ratio": 0.002, "clip_grad": None}  # clipping is per parameter, here


# --------------------------------------------------------------------------- options


class DINOOptions(BaseModel):
    """``pretrain.options.dino``."""

    model_config = ConfigDict(extra="forbid")

    out_dim: int = Field(65536, ge=2, description="Prototype (output) dimension of the head.")
    hidden_dim: int = Field(2048, ge=1, description="Head MLP hidden width.")
    bottleneck_dim: int = Field(256, ge=1, description="Head bottleneck width before the weight-normed last layer.")
    nlayers: int = Field(3, ge=1, description="Head MLP layers.")
    use_bn_in_head: bool = Field(False, description="BatchNorm in the head MLP.")
    norm_last_layer: bool = Field(True, description="Freeze the weight-norm magnitude g=1 of the last layer.")
    momentum_teacher: float = Field(0.996, ge=0, le=1, description="EMA momentum at the start; cosine to 1.")
    teacher_temp: float = Field(0.04, gt=0, description="Teacher temperature after the warmup.")
    warmup_teacher_temp: float = Field(0.04, gt=0, description="Teacher temperature at the start of the warmup.")
    warmup_teacher_temp_fraction: float = Field(0.0, ge=0, le=1, description="Warmup length as a fraction of training.")
    student_temp: float = Field(0.1, gt=0, description="Student temperature.")
    center_momentum: float = Field(0.9, ge=0, lt=1, description="Momentum of the teacher-output center.")
    local_crops_number: int = Field(8, ge=0, description="Number of local crops.")
    local_crop_size: Optional[int] = Field(None, ge=8, description="Local crop size; null = 96/224 of img_size (a patch multiple for ViTs).")
    global_crops_scale: Optional[CropScale] = Field(None, description="Global crop area range; null = (0.4, 1) ViT, (0.14, 1) CNN.")
    local_crops_scale: Optional[CropScale] = Field(None, description="Local crop area range; null = (0.05, 0.4) ViT, (0.05, 0.14) CNN.")
    drop_path_rate: Optional[float] = Field(None, ge=0, lt=1, description="Student stochastic depth; null = 0.1 ViT, 0 CNN.")
    weight_decay_end: Optional[float] = Field(None, ge=0, description="Final weight decay of the cosine schedule; null = 0.4 ViT, constant CNN.")
    clip_grad: Optional[float] = Field(3.0, gt=0, description="Per-parameter gradient-norm clipping; null = off.")
    freeze_last_layer_fraction: float = Field(0.01, ge=0, le=1, description="Keep the last layer fixed for this fraction of training (1 of 100 epochs).")



# --------------------------------------------------------------------------- the method


def default_local_size(img_size: int, patch: Optional[int]) -> int:
    size = img_size * 96 / 224
    if patch:
        return max(patch, int(round(size / patch)) * patch)
    return max(8, int(round(size)))


class DINO(OptimizerControl, SSLMethod):
    name = "dino"
    optim_defaults = OPTIM_DEFAULTS

    def __init__(self, timm_name: str, in_chans: int, img_size: int, options: DINOOptions, timm_kwargs: Optional[dict] = None):
        super().__init__()
        from sslrecipe.errors import RecipeError
        from sslrecipe.models.backbone import create_backbone

        o = options
        self.opts = o
        self.img_size = int(img_size)
        self.family = backbone_family(timm_name)
        vit = self.family == "vit"
        kwargs = dict(timm_kwargs or {})
        if vit:
            kwargs["img_size"] = self.img_size
        dpr = o.drop_path_rate if o.drop_path_rate is not None else kwargs.pop("drop_path_rate", 0.1 if vit else 0.0)
        kwargs.pop("drop_path_rate", None)
        student_kwargs = dict(kwargs, drop_path_rate=dpr) if dpr > 0 else kwargs
        self.student_backbone = create_backbone(timm_name, in_chans=in_chans, **student_kwargs)
        self.teacher_backbone = create_backbone(timm_name, in_chans=in_chans, **kwargs)
        if vit:
            check_vit(self.student_backbone, timm_name, "dino")
            check_img_size(self.img_size, self.student_backbone, "dino")
            nn.init.trunc_normal_(self.student_backbone.cls_token, std=0.02)  # DINO's cls init (timm: normal 1e-6)
            self.patch = patch_size_of(self.student_backbone)[0]
            self.export_timm_kwargs = {"img_size": self.img_size}
        else:
            self.patch = None
            self.export_timm_kwargs = {}
        self.local_size = o.local_crop_size or default_local_size(self.img_size, self.patch)
        if self.patch and self.local_size % self.patch:
            raise RecipeError(f"pretrain.options.dino.local_crop_size ({self.local_size}) must be a multiple of the patch size {self.patch}")
        self.global_scale = o.global_crops_scale or ((0.4, 1.0) if vit else (0.14, 1.0))
        self.local_scale = o.local_crops_scale or ((0.05, 0.4) if vit else (0.05, 0.14))
        self.wd_end = o.weight_decay_end if o.weight_decay_end is not None else (0.4 if vit else None)
        embed_dim = int(self.student_backbone.num_features)
        head_args = dict(use_bn=o.use_bn_in_head, nlayers=o.nlayers, hidden_dim=o.hidden_dim, bottleneck_dim=o.bottleneck_dim)
        self.student_head = DINOHead(embed_dim, o.out_dim, norm_last_layer=o.norm_last_layer, **head_args)
        self.teacher_head = DINOHead(embed_dim, o.out_dim, **head_args)
        # teacher and student start with the same weights; no gradients through the teacher
        self.teacher_backbone.load_state_dict(self.student_backbone.state_dict())
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        for p in list(self.teacher_backbone.parameters()) + list(self.teacher_head.parameters()):
            p.requires_grad_(False)
        self.loss_fn = DINOLoss(o.out_dim, o.student_temp, o.center_momentum)
        # schedule state, saved in checkpoints with the model: optimizer steps done so far and the total
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.register_buffer("total_steps", torch.zeros((), dtype=torch.long))
        self._wd_base: Optional[float] = None
        self._decay_ids: set[int] = set()
        self._init_optimizer_control()

    # ------------------------------------------------------------------ schedules
    def _it_total(self) -> tuple[int, int]:
        return int(self.iteration), int(self.total_steps)

    def teacher_temp_at(self, it: int, total: int) -> float:
        o = self.opts
        if o.warmup_teacher_temp_fraction <= 0:
            return o.teacher_temp
        if total <= 0:  # before the first step the total is not known yet; it = 0 is the warmup start
            return o.warmup_teacher_temp
        warmup = max(1, int(round(o.warmup_teacher_temp_fraction * total)))
        return linear_warmup_then_constant(o.warmup_teacher_temp, o.teacher_temp, it, warmup)

    def momentum_at(self, it: int, total: int) -> float:
        return cosine_value(self.opts.momentum_teacher, 1.0, it, total)

    def weight_decay_at(self, it: int, total: int) -> Optional[float]:
        if self._wd_base is None or self.wd_end is None:
            return None
        return cosine_value(self._wd_base, self.wd_end, it, total)

    def last_layer_frozen_at(self, it: int, total: int) -> bool:
        frac = self.opts.freeze_last_layer_fraction
        if frac <= 0:
            return False
        return total <= 0 or it < frac * total

    # ------------------------------------------------------------------ data
    def _flip_and_color_jitter(self, img: torch.Tensor, rng) -> torch.Tensor:
        img = V.random_hflip(img, rng)
        img = V.random_color_jitter(img, rng, 0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
        return V.random_grayscale(img, rng, 0.2)

    def views(self, image: torch.Tensor, rng) -> list[torch.Tensor]:
        crops = []
        for k in range(2):
            c, _box = V.random_resized_crop(image, self.img_size, rng, self.global_scale)
            c = self._flip_and_color_jitter(c, rng)
            c = V.random_gaussian_blur(c, rng, 1.0 if k == 0 else 0.1)
            if k == 1:
                c = V.random_solarize(c, rng, 0.2)
            crops.append(V.normalize(c, self.input_mean, self.input_std))
        for _ in range(self.opts.local_crops_number):
            c, _box = V.random_resized_crop(image, self.local_size, rng, self.local_scale)
            c = self._flip_and_color_jitter(c, rng)
            crops.append(V.normalize(V.random_gaussian_blur(c, rng, 0.5), self.input_mean, self.input_std))
        return crops

    def collate(self, items: list) -> list[torch.Tensor]:
        return [torch.stack([item[i] for item in items]) for i in range(len(items[0]))]

    # ------------------------------------------------------------------ model
    def backbone_features(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.family == "vit":
            return backbone.forward_head(vit_forward(backbone, x), pre_logits=True)  # cls token (timm's pooling)
        return backbone(x)

    def multicrop(self, backbone: nn.Module, head: nn.Module, crops: list[torch.Tensor]) -> torch.Tensor:
        """``MultiCropWrapper``: consecutive crops of one resolution share a backbone pass; one head pass."""
        outputs, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            outputs.append(self.backbone_features(backbone, torch.cat(crops[start:end])))
            start = end
        return head(torch.cat(outputs))

    def forward(self, crops: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        it, total = self._it_total()
        temp = self.teacher_temp_at(it, total)
        with torch.no_grad():
            teacher_out = self.multicrop(self.teacher_backbone, self.teacher_head, crops[:2])
        student_out = self.multicrop(self.student_backbone, self.student_head, crops)
        loss = self.loss_fn(student_out, teacher_out, temp, ncrops=len(crops))
        return {"loss": loss}

    def student_parameters(self) -> list[torch.Tensor]:
        return list(self.student_backbone.parameters()) + list(self.student_head.parameters())

    def teacher_parameters(self) -> list[torch.Tensor]:
        return list(self.teacher_backbone.parameters()) + list(self.teacher_head.parameters())

    def after_step(self, step: int, total: int) -> None:
        """EMA update of the teacher with the momentum of the iteration just finished (``step - 1``)."""
        ema_update(self.teacher_parameters(), self.student_parameters(), self.momentum_at(step - 1, total))
        self.iteration.fill_(step)
        self.total_steps.fill_(total)

    def encoder(self) -> nn.Module:
        return self.teacher_backbone  # the released DINO backbones are the teachers

    # ------------------------------------------------------------------ optimizer side
    def param_groups(self, weight_decay: float) -> list[dict]:
        """``utils.get_params_groups`` on the student: group 0 regularised, biases and 1-D params not."""
        named = list(self.student_backbone.named_parameters()) + list(self.student_head.named_parameters())
        return self._scheduled_decay_groups(named, weight_decay, lambda name, p: name.endswith(".bias") or p.ndim == 1)

    def _anchor_param(self) -> torch.Tensor:
        return next(p for p in self.student_backbone.parameters() if p.requires_grad)

    def before_optimizer_step(self, optimizer) -> None:
        it, total = self._it_total()
        wd = self.weight_decay_at(it, total)
        if wd is not None:
            for group in optimizer.param_groups:
                if group["params"] and id(group["params"][0]) in self._decay_ids:
                    group["weight_decay"] = wd
        if self.opts.clip_grad is not None:
            clip_gradients_per_param(self.student_parameters(), self.opts.clip_grad)
        if self.last_layer_frozen_at(it, total):
            for p in self.student_head.last_layer.parameters():
                p.grad = None


def _dino_optim_defaults(timm_name: str) -> dict:
    if backbone_family(timm_name) == "cnn":
        from sslrecipe.ssl.dino_cnn import OPTIM_DEFAULTS as CNN_DEFAULTS

        return CNN_DEFAULTS
    return OPTIM_DEFAULTS


@register("dino", ("vit", "cnn"), "self-distillation with no labels (Caron et al. 2021): multi-crop, EMA teacher, centering",
          optim_defaults=_dino_optim_defaults)
def build_dino(timm_name: str, in_chans: int, img_size: int, options: dict, timm_kwargs: dict) -> DINO:
    if backbone_family(timm_name) == "cnn":  # the ResNet specifics (issue 6) live in dino_cnn.py
        from sslrecipe.ssl.dino_cnn import build_dino_cnn

        return build_dino_cnn(timm_name, in_chans, img_size, options, timm_kwargs)
    opts = V.parse_options(DINOOptions, options, "dino")
    return DINO(timm_name, in_chans, img_size, opts, timm_kwargs)
