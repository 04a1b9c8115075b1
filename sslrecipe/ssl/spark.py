"""SparK: sparse masked modeling for CNNs (Tian et al., ICLR 2023; keyu-tian/SparK ``pretrain/``).

Mapping to the official code (docs/methods.md, "SparK"; file:line at commit a63e386):

- masking (``spark.py`` ``mask``): the mask lives on the encoder's stride-32 grid (224 px -> 7x7), per sample
  ``torch.rand(B, h*w).argsort(dim=1)[:, :len_keep]`` from torch's global RNG on the CPU, ``len_keep =
  round(h*w*(1 - mask_ratio))`` (20 of 49 at 0.6); the input is multiplied by the active map upsampled with
  ``repeat_interleave`` x32, so masked pixels become 0 in normalised space;
- sparse encoder (``encoder.py``): :func:`sslrecipe.ssl.sparse.sparsify` walks the timm CNN in place: every conv
  and pool output re-masked, BatchNorm statistics from visible positions only (the values of the official
  gather / BatchNorm1d / scatter, computed in NCHW), SE blocks
  and global pools masked, LayerNorm (ConvNeXt) sparse; stage outputs at strides 4, 8, 16, 32 from timm's
  ``forward_intermediates`` (the official ``ResNet.forward(hierarchical=True)``, layer1..layer4);
- densify (``spark.py`` L37-71, L99-109), smallest scale first: the densify norm (a fresh sparse BatchNorm for
  BN backbones, ``densify_norm='bn'``; LayerNorm with eps 1e-6 for LN backbones, ``'ln'``), then
  ``where(active, feature, mask_token_i)`` with one learnable ``(1, C_i, 1, 1)`` token per scale
  (trunc-normal std .02 in [-.02, .02]), then ``densify_proj_i``: a 1x1 conv for the deepest scale (an
  Identity when the widths already match, as ConvNeXt-S), 3x3 convs for the others, to decoder widths
  768, 384, 192, 96; the active map is dilated x2 between scales;
- decoder (``decoder.py`` ``LightDecoder``): 5 ``UNetBlock`` s (ConvTranspose2d k4 s2 with bias, then conv3x3 ->
  BN -> ReLU6 -> conv3x3 -> BN, convs without bias) with widths 768 -> 384 -> 192 -> 96 -> 48 -> 24, the densified
  feature of scale i **added** before block i (blocks 0-3), a final 1x1 conv to the input channels; init
  trunc-normal(.02) for Conv2d, kaiming-normal (fan_out, relu) for ConvTranspose2d, BN 1/0; the BN is dense
  (``nn.BatchNorm2d``, the official single-process setting ``sbn=False``);
- loss (``spark.py`` L113-120): 32x32 patches (``'bchpwq->bhwpqc'``), target normalised per patch
  ``(x - mean) / sqrt(var + 1e-6)`` with torch's unbiased var, ``mean_d (rec - tgt)^2`` averaged over the
  **masked** patches: ``sum(l * (1 - active)) / (sum(1 - active) + 1e-8)``;
- views (``utils/imagenet.py`` L66-70): ``RandomResizedCrop(img_size, scale=(0.67, 1.0), bicubic)`` + flip only;
- optimiser side (``main.py`` L73-81, ``utils/lr_control.py``): parameters without weight decay are biases,
  1-D parameters and the mask tokens (``nowd_keys``); a step pre-hook on the loop's optimizer (the mechanism of
  :class:`sslrecipe.ssl.optim_control.OptimizerControl`) applies, every iteration, the official weight-decay cosine from
  ``pretrain.weight_decay`` (0.04 officially) to ``weight_decay_end`` (0.2), the official lr curve (linear warmup
  from 0.5 % of the peak over ``warmup_fraction`` of training, then cosine down to 0.1 % of the peak; the peak is
  the recipe's ``pretrain.lr`` or ``blr x batch / 256``) and the gradient clip 5.0 (inside LAMB as
  ``max_grad_norm``, as ``TheSameAsTimmLAMB(max_grad_norm=5.0)``; ``clip_grad_norm_`` for AdamW/SGD as the
  official ``--clip``); drop-path per model as ``models/__init__.py`` (R50 0.05, R101 0.08, R152 0.10, R200
  0.15, ConvNeXt-S/B/L 0.2/0.3/0.4, otherwise 0). The official optimizer is LAMB with betas (0.9, 0.95) for
  ResNets and (0.9, 0.999) for ConvNeXt at ``base_lr`` 2e-4: :func:`optim_defaults_for` (LAMB, blr 2e-4, wd 0.04,
  betas by architecture; other CNNs, which the official code does not support, get the ResNet value) fills every
  ``pretrain.*`` key the recipe leaves unset.

Differences from the official code (also in docs/methods.md, "SparK"):

- inputs use the encoder's normalisation (the project's 0.5 / 0.25 from random init, the start encoder's with
  ``pretrain.init``; recorded in encoder.json) instead of always ImageNet RGB statistics, so 1-channel thermal data
  works and pre-training matches fine-tuning; the decoder predicts ``in_chans`` channels;
- any timm CNN with a stride-32 feature pyramid is accepted (the official code patches timm's ResNet and ships
  its own ConvNeXt); SE blocks, global pools and GroupNorm are sparse here, dense there (see sparse.py);
- ConvNeXt's block is timm's (Linear MLP masked per layer) instead of the official ``SparseConvNeXtBlock``
  (masked after the block): the same values at every position;
- sparse SyncBatchNorm statistics are not all-reduced (one process);
- the lr warmup needs the run length: at the very first step, before the training loop has reported it, the lr
  is the warmup start (0.5 % of the peak) even when the run is too short to have any warmup (< 20 steps at the
  default 2.5 % warmup), where the official curve would start at the peak;
- with ``lr_schedule: recipe`` the loop's schedule (``pretrain.schedule``, ``warmup_*``, ``min_lr_ratio``) is used
  instead of the official curve; with ``official``, the loop's progress event of the first step logs the loop's
  own lr (it reads the lr before the optimizer pre-hook runs), later steps log the official curve;
- sparse BatchNorm computes the visible-position statistics in NCHW instead of gather / BatchNorm1d / scatter
  (same values; the layout changes of the gather cost ~20 % of the encoder's time on the CPU).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sslrecipe.errors import RecipeError, SSLRecipeError
from sslrecipe.ssl import sparse as S
from sslrecipe.ssl import views as V
from sslrecipe.ssl.views import CropScale
from sslrecipe.ssl.optim_control import OptimizerControl
from sslrecipe.ssl.registry import SSLMethod, is_convnext, register

#: The official optimiser settings (``utils/arg_util.py``, ResNet), as ``pretrain.*`` recipe keys; the pipeline fills
#: them into the keys a recipe leaves unset (registry.apply_method_defaults) through :func:`optim_defaults_for`.
#: ``schedule``/``warmup_fraction``/``min_lr_ratio`` only matter with ``lr_schedule: recipe`` (the official curve
#: is applied by the method itself otherwise).
OPTIM_DEFAULTS = {"optimizer": "lamb", "betas": (0.9, 0.95), "blr": 2e-4, "weight_decay": 0.04,
                  "schedule": "cosine", "warmup_fraction": 40 / 1600, "min_lr_ratio": 0.001}
#: ``arg_util.py``: ``args.ada = args.ada or 0.95``, then for ConvNeXt (``'convnext' in model``) ``or 0.999``.
CONVNEXT_BETAS = (0.9, 0.999)


def optim_defaults_for(timm_name: str) -> dict:
    """:data:`OPTIM_DEFAULTS`, with betas (0.9, 0.999) for a ConvNeXt as the official code (0.95 otherwise)."""
    return {**OPTIM_DEFAULTS, "betas": CONVNEXT_BETAS} if is_convnext(timm_name) else dict(OPTIM_DEFAULTS)

#: ``pretrain/models/__init__.py`` ``pretrain_default_model_kwargs``: drop-path rate per model.
DROP_PATH_DEFAULTS = {"resnet50": 0.05, "resnet101": 0.08, "resnet152": 0.10, "resnet200": 0.15,
                      "convnext_small": 0.2, "convnext_base": 0.3, "convnext_large": 0.4}

DOWNSAMPLE = 32  # the mask cell = the encoder's total stride (there is no patch-size option, as officially)
SCALES = (4, 8, 16, 32)


class SparKOptions(BaseModel):
    """``pretrain.options.spark``."""

    model_config = ConfigDict(extra="forbid")

    mask_ratio: float = Field(
        0.6, gt=0, lt=1, description="Fraction of the 32x32 cells masked per image (0.75 at 384 px officially).")
    decoder_width: int = Field(
        768, ge=16, description="Width of the first decoder block; halves per block (768 officially).")
    densify_norm: Optional[Literal["bn", "ln", "none"]] = Field(
        None, description="Norm before the mask tokens; null = bn for BatchNorm backbones, ln for LayerNorm ones "
        "(as officially).")
    drop_path_rate: Optional[float] = Field(
        None, ge=0, lt=1, description="Encoder stochastic depth; null = the official value for the model (R50 0.05 ... "
        "R200 0.15, ConvNeXt-S/B/L 0.2/0.3/0.4), else backbone.kwargs.drop_path_rate, else 0.")
    crop_scale: CropScale = Field(
        (0.67, 1.0), description="RandomResizedCrop area range (mild, as officially).")
    hflip: bool = Field(True, description="Random horizontal flip.")
    weight_decay_end: float = Field(
        0.2, ge=0, description="Weight decay at the end of the per-iteration cosine that starts at pretrain.weight_decay.")
    lr_schedule: Literal["official", "recipe"] = Field(
        "official", description="official: warmup from 0.5% of the peak, cosine to 0.1% (pretrain.schedule, warmup_* "
        "and min_lr_ratio unused); recipe: the training loop's schedule.")
    warmup_fraction: float = Field(
        40 / 1600, ge=0, lt=1, description="Warmup of the official lr curve as a fraction of training (40 of 1600 epochs).")
    clip_grad: Optional[float] = Field(
        5.0, gt=0, description="Global gradient-norm clip: LAMB's max_grad_norm, or clip_grad_norm_ for AdamW/SGD; "
        "null = off.")



# --------------------------------------------------------------------------- decoder (decoder.py)


class UNetBlock(nn.Module):
    """``decoder.UNetBlock``: 2x up-sampling, then two 3x3 convs with BN (ReLU6 between)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up_sample = nn.ConvTranspose2d(cin, cin, kernel_size=4, stride=2, padding=1, bias=True)
        self.conv = nn.Sequential(
            nn.Conv2d(cin, cin, kernel_size=3, stride=1, padding=1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(inplace=True),
            nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up_sample(x))


class LightDecoder(nn.Module):
    """``decoder.LightDecoder``: log2(32) = 5 UNet blocks, widths halving from ``width``, 1x1 conv to the image."""

    def __init__(self, up_sample_ratio: int = DOWNSAMPLE, width: int = 768, out_chans: int = 3):
        super().__init__()
        self.width = width
        n = round(math.log2(up_sample_ratio))
        channels = [max(1, width // 2**i) for i in range(n + 1)]
        self.dec = nn.ModuleList([UNetBlock(cin, cout) for cin, cout in zip(channels[:-1], channels[1:])])
        self.proj = nn.Conv2d(channels[-1], out_chans, kernel_size=1, stride=1, bias=True)
        self.initialize()

    def forward(self, to_dec: list[Optional[torch.Tensor]]) -> torch.Tensor:
        x: Any = 0
        for i, block in enumerate(self.dec):
            if i < len(to_dec) and to_dec[i] is not None:
                x = x + to_dec[i]
            x = block(x)
        return self.proj(x)

    def initialize(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.ConvTranspose2d):  # not a Conv2d: the official elif falls through to kaiming
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- schedules (utils/lr_control.py)


def spark_lr_factor(it: int, total: int, warmup_fraction: float) -> float:
    """``lr_wd_annealing``'s lr as a fraction of the peak at iteration ``it`` (0-based) of ``total``."""
    if total <= 0:  # the loop has not reported the run length yet (only at the very first step)
        return 0.005 if warmup_fraction > 0 else 1.0
    wp = round(warmup_fraction * total)
    if it < wp:
        return 0.005 + 0.995 * it / wp
    span = total - 1 - wp
    ratio = (it - wp) / span if span > 0 else 0.0
    return 0.001 + 0.999 * (0.5 + 0.5 * math.cos(math.pi * min(1.0, ratio)))


def spark_weight_decay(it: int, total: int, wd: float, wd_end: float) -> float:
    """``lr_wd_annealing``'s weight decay: cosine from ``wd`` to ``wd_end`` over ``it / (total - 1)``."""
    ratio = it / (total - 1) if total > 1 else 0.0
    return wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * min(1.0, ratio)))


# --------------------------------------------------------------------------- the method


def _has_norm(model: nn.Module, kinds: tuple) -> bool:
    return any(isinstance(m, kinds) for m in model.modules())


class SparK(OptimizerControl, SSLMethod):
    name = "spark"
    optim_defaults = OPTIM_DEFAULTS

    def __init__(self, timm_name: str, in_chans: int, img_size: int, options: SparKOptions, timm_kwargs: Optional[dict] = None,
                 method_name: str = "spark"):
        super().__init__()
        from sslrecipe.models.backbone import create_backbone

        o = options
        self.opts = o
        self.optim_defaults = optim_defaults_for(timm_name)  # ConvNeXt's betas differ
        self.method_name = method_name
        self.img_size = int(img_size)
        self.in_chans = int(in_chans)
        if self.img_size % DOWNSAMPLE:
            raise RecipeError(
                f"pretrain.img_size {self.img_size} is not a multiple of 32: {method_name} masks 32x32 cells (the "
                f"encoder's total stride); use {max(DOWNSAMPLE, self.img_size // DOWNSAMPLE * DOWNSAMPLE)} or "
                f"{(self.img_size // DOWNSAMPLE + 1) * DOWNSAMPLE}"
            )
        self.grid = (self.img_size // DOWNSAMPLE, self.img_size // DOWNSAMPLE)
        cells = self.grid[0] * self.grid[1]
        self.len_keep = round(cells * (1 - o.mask_ratio))
        if not 0 < self.len_keep < cells:
            raise RecipeError(
                f"pretrain.options.{method_name}.mask_ratio {o.mask_ratio} leaves {self.len_keep} of {cells} cells visible at "
                f"{self.img_size} px; at least one cell must be visible and one masked (raise pretrain.img_size or change mask_ratio)"
            )
        kwargs = dict(timm_kwargs or {})
        self.timm_name = timm_name
        if o.drop_path_rate is not None:
            dpr = o.drop_path_rate
        else:
            dpr = kwargs.get("drop_path_rate", DROP_PATH_DEFAULTS.get(timm_name.split(".")[0], 0.0))
        kwargs.pop("drop_path_rate", None)
        if dpr > 0:
            kwargs["drop_path_rate"] = dpr
        self.drop_path_rate = float(dpr)
        self.backbone = create_backbone(timm_name, in_chans=in_chans, **kwargs)
        self.indices = S.stage_indices(self.backbone, SCALES, timm_name)
        self.state = S.sparsify(self.backbone, timm_name)
        S.check_sparsity(self.backbone, self.state, self.indices, self.in_chans, name=timm_name)
        self.export_timm_kwargs: dict = {}
        enc_chs = S.feature_channels(self.backbone, self.indices)

        norm_kind = o.densify_norm
        if norm_kind is None:
            has_bn = _has_norm(self.backbone, (nn.modules.batchnorm._BatchNorm,))
            has_ln = _has_norm(self.backbone, (nn.LayerNorm,))
            norm_kind = "ln" if has_ln and not has_bn else "bn"
        self.densify_norm_kind = norm_kind
        self.mask_tokens = nn.ParameterList()
        self.densify_norms = nn.ModuleList()
        self.densify_projs = nn.ModuleList()
        d_width = o.decoder_width
        for i, e_width in enumerate(reversed(enc_chs)):  # smallest feature map first
            token = nn.Parameter(torch.zeros(1, e_width, 1, 1))
            nn.init.trunc_normal_(token, mean=0.0, std=0.02, a=-0.02, b=0.02)
            self.mask_tokens.append(token)
            if norm_kind == "bn":
                norm: nn.Module = S.SparseBatchNorm2d(e_width)
                norm.__dict__["_sparse_state"] = self.state
                norm.__dict__["_sparse_name"] = f"densify_norms.{i}"
            elif norm_kind == "ln":
                from timm.layers import LayerNorm2d

                # the official SparseConvNeXtLayerNorm(channels_first, sparse): per-position LN; its zeros at masked
                # positions are replaced by the mask token right after, so a dense LayerNorm2d gives the same values
                norm = LayerNorm2d(e_width, eps=1e-6)
            else:
                norm = nn.Identity()
            self.densify_norms.append(norm)
            if i == 0 and e_width == d_width:
                proj: nn.Module = nn.Identity()
            else:
                k = 1 if i == 0 else 3
                proj = nn.Conv2d(e_width, d_width, kernel_size=k, stride=1, padding=k // 2, bias=True)
            self.densify_projs.append(proj)
            d_width //= 2
        self.decoder = LightDecoder(DOWNSAMPLE, width=o.decoder_width, out_chans=self.in_chans)
        # schedule state, saved in checkpoints with the model: optimizer steps done so far and the run length
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.register_buffer("total_steps", torch.zeros((), dtype=torch.long))
        self._wd_base: Optional[float] = None
        self._decay_ids: set[int] = set()
        self._init_optimizer_control()

    # ------------------------------------------------------------------ data
    def views(self, image: torch.Tensor, rng) -> torch.Tensor:
        crop, _box = V.random_resized_crop(image, self.img_size, rng, scale=self.opts.crop_scale)
        if self.opts.hflip:
            crop = V.random_hflip(crop, rng)
        return V.normalize(crop, self.input_mean, self.input_std)

    # ------------------------------------------------------------------ model
    def mask(self, batch: int, device=None, generator: Optional[torch.Generator] = None, grid: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Bool active map ``(B, 1, h, w)``, exactly ``len_keep`` visible cells per sample."""
        grid = grid or self.grid
        keep = self.len_keep if grid == self.grid else round(grid[0] * grid[1] * (1 - self.opts.mask_ratio))
        return S.random_active(batch, grid, keep, generator=generator, device=device)

    def encode(self, x: torch.Tensor, active: Optional[torch.Tensor]) -> list[torch.Tensor]:
        """Sparse stage features (shallowest first) of ``x`` with ``active`` (None = dense)."""
        with self.state.masked(active):
            return S.stage_features(self.backbone, x, self.indices)

    def _grid_of(self, x: torch.Tensor) -> tuple[int, int]:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if h % DOWNSAMPLE or w % DOWNSAMPLE:
            raise SSLRecipeError(f"{self.method_name}: input {h}x{w} is not a multiple of 32")
        return h // DOWNSAMPLE, w // DOWNSAMPLE

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, h*w, 32*32*C)`` in the official order ``'bchpwq->bhwpqc'``."""
        p = DOWNSAMPLE
        b, c = x.shape[:2]
        h, w = x.shape[2] // p, x.shape[3] // p
        x = x.reshape(b, c, h, p, w, p)
        x = torch.einsum("bchpwq->bhwpqc", x)
        return x.reshape(b, h * w, c * p * p)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        p = DOWNSAMPLE
        h, w = grid
        b, c = x.shape[0], x.shape[-1] // (p * p)
        x = x.reshape(b, h, w, p, p, c)
        x = torch.einsum("bhwpqc->bchpwq", x)
        return x.reshape(b, c, h * p, w * p)

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        inp = self.patchify(x)
        mean = inp.mean(dim=-1, keepdim=True)
        std = (inp.var(dim=-1, keepdim=True) + 1e-6) ** 0.5  # unbiased var, as torch's default in the official code
        return (inp - mean) / std

    def loss_from(self, x: torch.Tensor, rec: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        l2 = ((self.patchify(rec).float() - self.targets(x).float()) ** 2).mean(dim=2)  # (B, L)
        non_active = active.logical_not().to(l2.dtype).view(active.shape[0], -1)
        return (l2 * non_active).sum() / (non_active.sum() + 1e-8)

    def forward_parts(self, x: torch.Tensor, active: Optional[torch.Tensor] = None) -> dict[str, Any]:
        """The official ``SparK.forward``: mask, sparse encode, densify, decode; the loss and its pieces."""
        grid = self._grid_of(x)
        if active is None:
            active = self.mask(x.shape[0], x.device, grid=grid)
        active = active.to(x.device)
        active_hw = S.upsample_active(active, x.shape[2], x.shape[3])
        masked = x * active_hw.to(x.dtype)
        with self.state.masked(active):
            feats = S.stage_features(self.backbone, masked, self.indices)
            to_dec = []
            cur = active
            for i, f in enumerate(reversed(feats)):  # smallest feature map first
                f = self.densify_norms[i](f)
                f = torch.where(cur.expand_as(f), f, self.mask_tokens[i].to(f.dtype).expand_as(f))
                to_dec.append(self.densify_projs[i](f))
                cur = cur.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        rec = self.decoder(to_dec)
        loss = self.loss_from(x, rec, active)
        return {"loss": loss, "rec": rec, "active": active, "features": feats, "grid": grid}

    def forward(self, x: torch.Tensor, active: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        return {"loss": self.forward_parts(x, active)["loss"]}

    def encoder(self) -> nn.Module:
        return self.backbone

    # ------------------------------------------------------------------ schedules and optimizer side
    _HOOK_STATE = OptimizerControl._HOOK_STATE + ("_last_optimizer",)  # process-local, never pickled

    def after_step(self, step: int, total: int) -> None:
        self.iteration.fill_(step)
        self.total_steps.fill_(total)
        ref = self.__dict__.get("_last_optimizer")
        optimizer = ref() if ref is not None else None
        if optimizer is not None and self.opts.lr_schedule == "official":
            # set the next iteration's lr now, so the loop's progress events log the lr actually used
            self._apply_lr(optimizer, step, total)

    def _apply_lr(self, optimizer, it: int, total: int) -> None:
        factor = self.lr_factor_at(it, total)
        for group in optimizer.param_groups:
            peak = group.get("initial_lr")  # set by the loop's LambdaLR: the peak lr x lr_scale
            if peak is None:
                peak = group.setdefault("spark_peak_lr", group["lr"])
            group["lr"] = peak * factor

    def _nowd(self, name: str, p: torch.Tensor) -> bool:
        # get_param_groups(nowd_keys={'cls_token', 'pos_embed', 'mask_token', 'gamma'}) + 1-D and biases
        return p.ndim == 1 or name.endswith(".bias") or any(k in name for k in ("mask_token", "gamma", "cls_token", "pos_embed"))

    def trainable_named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def param_groups(self, weight_decay: float) -> list[dict]:
        return self._scheduled_decay_groups(self.trainable_named_parameters(), weight_decay, self._nowd)

    def _anchor_param(self) -> torch.Tensor:
        return next(p for p in self.backbone.parameters() if p.requires_grad)

    def weight_decay_at(self, it: int, total: int) -> Optional[float]:
        if self._wd_base is None:
            return None
        return spark_weight_decay(it, total, self._wd_base, self.opts.weight_decay_end)

    def lr_factor_at(self, it: int, total: int) -> float:
        return spark_lr_factor(it, total, self.opts.warmup_fraction)

    def before_optimizer_step(self, optimizer) -> None:
        it, total = int(self.iteration), int(self.total_steps)
        wd = self.weight_decay_at(it, total)
        if wd is not None:
            for group in optimizer.param_groups:
                if group["params"] and id(group["params"][0]) in self._decay_ids:
                    group["weight_decay"] = wd
        if self.opts.lr_schedule == "official":
            import weakref

            self.__dict__["_last_optimizer"] = weakref.ref(optimizer)
            self._apply_lr(optimizer, it, total)
        clip = self.opts.clip_grad
        from timm.optim import Lamb

        if isinstance(optimizer, Lamb):
            optimizer.defaults["max_grad_norm"] = clip  # TheSameAsTimmLAMB(max_grad_norm=5.0); None disables it
        elif clip is not None:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, clip)


def build_spark_options(options: dict, method: str = "spark") -> SparKOptions:
    return V.parse_options(SparKOptions, options, method)


@register("spark", ("cnn",), "sparse masked modeling for CNNs (Tian et al. 2023): sparse encoder, U-Net decoder, masked 32x32 patches",
          optim_defaults=optim_defaults_for)
def build_spark(timm_name: str, in_chans: int, img_size: int, options: dict, timm_kwargs: dict) -> SparK:
    return SparK(timm_name, in_chans, img_size, build_spark_options(options), timm_kwargs)
