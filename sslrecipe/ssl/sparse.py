"""Sparse-convolution emulation for any timm CNN: SparK's "masked dense" encoder (keyu-tian/SparK ``pretrain/encoder.py``).

SparK pre-trains a CNN on images whose 32x32 cells are partly removed. A CNN has no tokens to drop, so the
official code emulates submanifold sparse convolution: every convolution and pooling runs densely and its
output is multiplied by the mask (``sp_conv_forward``), and BatchNorm normalises only the visible positions
(``sp_bn_forward``: gather the active positions into ``(N_active, C)``, BatchNorm1d, scatter back into zeros),
so statistics and running statistics come from visible positions only. Masked positions are exactly zero
at every layer of the encoder.

What :func:`sparsify` does to a timm model, **in place, without changing a single parameter or buffer name**
(the model still loads and exports with timm's keys, and behaves exactly like the dense timm model whenever
no mask is active):

- ``nn.Conv2d`` (and every subclass: timm's ``Conv2dSame``, ``StdConv2d``...), ``MaxPool2d``/``AvgPool2d`` (and
  their "same" variants), ``BlurPool2d``: a forward hook multiplies the output by the mask (the official
  ``sp_conv_forward``; in place for plain convs and pools as there);
- LayerNorm: channels-first (``LayerNorm2d``, ``LayerNormAct2d``) and channels-last (``nn.LayerNorm``, timm
  ``LayerNorm``/``LayerNormAct`` on ``(B, H, W, C)``) outputs are multiplied by the mask. A LayerNorm
  normalises each position on its own, so this equals the official ``SparseConvNeXtLayerNorm`` gather/scatter;
  ``nn.Linear`` applied to a 4-D channels-last map (ConvNeXt's MLP) is masked the same way (the official
  ``SparseConvNeXtBlock`` masks the block output instead: same result, the bias of ``pwconv2`` never reaches a
  masked position);
- BatchNorm (``BatchNorm2d``, ``SyncBatchNorm``, timm ``BatchNormAct2d``): the class is swapped for a subclass
  whose forward normalises with the mean and variance of the visible positions only, updates the running
  statistics from them with the module's own momentum and eps, and leaves zeros at masked positions: the
  values of the official ``SparseBatchNorm2d`` (gather into ``(N_active, C)``, BatchNorm1d, scatter back),
  computed in NCHW without the gather (see :func:`sparse_batch_norm`);
- GroupNorm (``nn.GroupNorm``, timm ``GroupNorm``/``GroupNorm1``/``GroupNormAct``): statistics per sample and
  group over visible positions only. **Not in the official code** (SparK issue #56 leaves GroupNorm dense);
- squeeze-excitation (timm ``SEModule``/``EffectiveSEModule``, EfficientNet ``SqueezeExcite``, ``EcaModule``) and
  global pools (``SelectAdaptivePool2d``, ``AdaptiveAvg/MaxPool2d(1)``): the squeeze is a **masked** mean (or max)
  over visible positions. The official code leaves these dense (its gotcha; the author's fix is the snippet in
  SparK issue #54, which this follows);
- pointwise layers with f(0) = 0 (ReLU, GELU, SiLU, Mish, ... , dropout, DropPath, DropBlock, Identity) and zero
  padding need nothing;
- anything else (a sigmoid gate outside an SE block, an attention layer, an unknown norm) is a
  :class:`~sslrecipe.errors.SSLRecipeError` that names each layer type and where it sits.

Because a block can also leak through plain tensor code in its ``forward`` (e.g. an inline ``x.mean()``),
:func:`check_sparsity` runs the sparsified model once on a small input and verifies that every feature map
is exactly zero at the masked positions; SparK calls it when it is built.

The mask state lives in a :class:`MaskState` object shared by the model's sparse layers (the official code
uses a module global, ``encoder._cur_active``); ``with state.masked(active):`` turns the sparse behaviour on.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from sslrecipe.errors import SSLRecipeError

# --------------------------------------------------------------------------- mask state


class MaskState:
    """The active map ``(B, 1, h, w)`` (True = visible) on the encoder's coarsest grid, and its upsampled copies."""

    def __init__(self) -> None:
        self.active: Optional[torch.Tensor] = None
        self._cache: dict = {}

    def __getstate__(self):
        return {"active": None, "_cache": {}}

    @contextlib.contextmanager
    def masked(self, active: Optional[torch.Tensor]) -> Iterator[None]:
        """Run the sparse layers with ``active`` (bool ``(B, 1, h, w)``); ``None`` runs them densely."""
        if active is not None and (active.ndim != 4 or active.shape[1] != 1 or active.dtype != torch.bool):
            raise ValueError(f"the active map must be a bool (B, 1, h, w) tensor, got {tuple(active.shape)} {active.dtype}")
        previous, previous_cache = self.active, self._cache
        self.active, self._cache = active, {}
        try:
            yield
        finally:
            self.active, self._cache = previous, previous_cache

    def expanded(self, height: int, width: int, where: str) -> Optional[torch.Tensor]:
        """The active map at ``height x width`` (``(B, 1, H, W)`` bool), or None when no mask applies.

        ``None`` also for a 1x1 map when the grid is larger: that is a globally pooled tensor (after a squeeze
        or the classifier's pool), which has no spatial positions left to mask.
        """
        active = self.active
        if active is None:
            return None
        h, w = int(active.shape[-2]), int(active.shape[-1])
        if (height, width) == (1, 1) and (h, w) != (1, 1):
            return None
        key = (height, width)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        if height % h or width % w:
            raise SSLRecipeError(
                f"SparK: the feature map after {where} is {height}x{width}, not a multiple of the {h}x{w} mask grid; "
                "use an image size that is a multiple of the backbone's total stride (32)"
            )
        ex = active.repeat_interleave(height // h, dim=2).repeat_interleave(width // w, dim=3)
        self._cache[key] = ex
        return ex

    def as_float(self, height: int, width: int, dtype: torch.dtype, where: str) -> Optional[torch.Tensor]:
        ex = self.expanded(height, width, where)
        if ex is None:
            return None
        key = (height, width, dtype)
        hit = self._cache.get(key)
        if hit is None:
            hit = ex.to(dtype)
            self._cache[key] = hit
        return hit


def _state_of(module: nn.Module) -> MaskState:
    return module.__dict__["_sparse_state"]


def _where(module: nn.Module) -> str:
    return f"'{module.__dict__.get('_sparse_name', '?')}' ({type(module).__name__})"


# --------------------------------------------------------------------------- output-masking hooks


class _MaskOutput:
    """Forward hook: multiply a module's output by the mask (picklable, unlike a closure)."""

    def __init__(self, state: MaskState, name: str, layout: str, inplace: bool):
        self.state, self.name, self.layout, self.inplace = state, name, layout, inplace

    def __call__(self, module: nn.Module, inputs, out):
        if self.state.active is None or not isinstance(out, torch.Tensor) or out.ndim != 4:
            return None
        where = f"'{self.name}' ({type(module).__name__})"
        if self.layout == "nchw":
            m = self.state.as_float(int(out.shape[2]), int(out.shape[3]), out.dtype, where)
        else:  # channels-last (B, H, W, C)
            m = self.state.as_float(int(out.shape[1]), int(out.shape[2]), out.dtype, where)
            if m is not None:
                m = m.permute(0, 2, 3, 1)
        if m is None:
            return None
        return out.mul_(m) if self.inplace else out * m


# --------------------------------------------------------------------------- sparse norms


def _bn_factor(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """``_BatchNorm.forward``'s exponential_average_factor (and its num_batches_tracked update)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return factor


def sparse_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The official ``sp_bn_forward``: BatchNorm over the visible positions only, zeros elsewhere.

    ``m`` is the ``(B, 1, H, W)`` active map. The official code gathers the visible positions into ``(N, C)``,
    runs BatchNorm1d and scatters back; this computes the same statistics (mean and biased variance over the
    visible positions for normalising, unbiased variance for the running estimate, the module's momentum, eps
    and ``num_batches_tracked``) directly in NCHW, which avoids the layout changes of the gather/scatter (on the
    CPU they made every following convolution convert its weights to channels-last).
    """
    mf = m.to(torch.float32)
    xf = x.float()
    factor = _bn_factor(bn)
    use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
    if use_batch:
        n = mf.sum()
        mean = (xf * mf).sum(dim=(0, 2, 3)) / n
        d = (xf - mean.view(1, -1, 1, 1)) * mf
        var = (d * d).sum(dim=(0, 2, 3)) / n
        if bn.training and bn.track_running_stats and bn.running_mean is not None:
            with torch.no_grad():
                unbiased = var.detach() * (n / (n - 1).clamp_min(1.0))
                bn.running_mean.mul_(1 - factor).add_(mean.detach() * factor)
                bn.running_var.mul_(1 - factor).add_(unbiased * factor)
    else:
        mean, var = bn.running_mean, bn.running_var
        d = (xf - mean.view(1, -1, 1, 1)) * mf
    y = d * torch.rsqrt(var + bn.eps).view(1, -1, 1, 1)
    if bn.affine:
        y = y * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1) * mf
    return y.to(x.dtype)


class SparseBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that normalises only visible positions while a mask is active (``SparseBatchNorm2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = _state_of(self).expanded(int(x.shape[2]), int(x.shape[3]), _where(self)) if x.ndim == 4 else None
        if m is None:
            return super().forward(x)
        return sparse_batch_norm(self, x, m)


class SparseSyncBatchNorm(nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` with the same sparse path. **Simplification:** the sparse statistics are computed per
    process (no all-reduce over processes); the official ``SparseSyncBatchNorm2d`` syncs them. This project
    pre-trains in one process, where the two are the same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = _state_of(self).expanded(int(x.shape[2]), int(x.shape[3]), _where(self)) if x.ndim == 4 else None
        if m is None:
            return super().forward(x)
        return sparse_batch_norm(self, x, m)


def _timm_class(path: str, name: str):
    import importlib

    try:
        return getattr(importlib.import_module(path), name)
    except (ImportError, AttributeError):  # pragma: no cover - older/newer timm
        return None


_BatchNormAct2d = _timm_class("timm.layers.norm_act", "BatchNormAct2d")
_GroupNormAct = _timm_class("timm.layers.norm_act", "GroupNormAct")
_GroupNorm1Act = _timm_class("timm.layers.norm_act", "GroupNorm1Act")
_TimmGroupNorm = _timm_class("timm.layers.norm", "GroupNorm")
_TimmGroupNorm1 = _timm_class("timm.layers.norm", "GroupNorm1")
_LayerNorm2d = _timm_class("timm.layers.norm", "LayerNorm2d")
_LayerNormAct2d = _timm_class("timm.layers.norm_act", "LayerNormAct2d")
_LayerNormAct = _timm_class("timm.layers.norm_act", "LayerNormAct")
_SEModule = _timm_class("timm.layers.squeeze_excite", "SEModule")
_EffectiveSEModule = _timm_class("timm.layers.squeeze_excite", "EffectiveSEModule")
_EfficientNetSE = _timm_class("timm.models._efficientnet_blocks", "SqueezeExcite")
_EcaModule = _timm_class("timm.layers.eca", "EcaModule")
_SelectAdaptivePool2d = _timm_class("timm.layers.adaptive_avgmax_pool", "SelectAdaptivePool2d")
_BlurPool2d = _timm_class("timm.layers.blur_pool", "BlurPool2d")
_DropPath = _timm_class("timm.layers.drop", "DropPath")
_DropBlock2d = _timm_class("timm.layers.drop", "DropBlock2d")


if _BatchNormAct2d is not None:

    class SparseBatchNormAct2d(_BatchNormAct2d):
        """timm ``BatchNormAct2d`` (BN, then dropout and activation) with the sparse BN path."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = _state_of(self).expanded(int(x.shape[2]), int(x.shape[3]), _where(self)) if x.ndim == 4 else None
            if m is None:
                return super().forward(x)
            return self.act(self.drop(sparse_batch_norm(self, x, m)))


def sparse_group_norm(gn: nn.GroupNorm, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """GroupNorm whose per-(sample, group) statistics use only visible positions; zeros at masked ones."""
    b, c, h, w = x.shape
    g = gn.num_groups
    xg = x.float().view(b, g, c // g, h, w)
    mg = m.view(b, 1, 1, h, w).to(xg.dtype)
    count = (mg.sum(dim=(2, 3, 4), keepdim=True) * (c // g)).clamp_min(1.0)
    mean = (xg * mg).sum(dim=(2, 3, 4), keepdim=True) / count
    var = (((xg - mean) ** 2) * mg).sum(dim=(2, 3, 4), keepdim=True) / count
    out = ((xg - mean) * torch.rsqrt(var + gn.eps)).view(b, c, h, w).to(x.dtype)
    if gn.affine:
        out = out * gn.weight.view(1, c, 1, 1) + gn.bias.view(1, c, 1, 1)
    return out * m.to(out.dtype)


class SparseGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (and timm's ``GroupNorm``/``GroupNorm1``) with statistics from visible positions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = _state_of(self).expanded(int(x.shape[2]), int(x.shape[3]), _where(self)) if x.ndim == 4 else None
        if m is None:
            return super().forward(x)
        return sparse_group_norm(self, x, m)


if _GroupNormAct is not None:

    class SparseGroupNormAct(_GroupNormAct):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = _state_of(self).expanded(int(x.shape[2]), int(x.shape[3]), _where(self)) if x.ndim == 4 else None
            if m is None:
                return super().forward(x)
            return self.act(self.drop(sparse_group_norm(self, x, m)))


# --------------------------------------------------------------------------- squeezes and global pools


def masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean over the visible positions of ``x`` ``(B, C, H, W)`` with ``m`` ``(B, 1, H, W)`` -> ``(B, C, 1, 1)``."""
    mf = m.to(x.dtype)
    return (x * mf).sum(dim=(2, 3), keepdim=True) / mf.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)


def masked_amax(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Max over the visible positions -> ``(B, C, 1, 1)``."""
    return x.masked_fill(~m, float("-inf")).amax(dim=(2, 3), keepdim=True)


def masked_global_pool(x: torch.Tensor, active: Optional[torch.Tensor], pool_type: str = "avg") -> torch.Tensor:
    """Global pool of ``x`` over the positions ``active`` marks visible (any grid that divides ``x``'s size);
    ``active=None`` is the ordinary dense pool. Returns ``(B, C)`` (``2C`` for ``catavgmax``)."""
    if active is None:
        m = torch.ones(x.shape[0], 1, x.shape[2], x.shape[3], dtype=torch.bool, device=x.device)
    else:
        h, w = int(active.shape[-2]), int(active.shape[-1])
        m = active.repeat_interleave(x.shape[2] // h, dim=2).repeat_interleave(x.shape[3] // w, dim=3)
    return _pool(x, m, pool_type).flatten(1)


def _pool(x: torch.Tensor, m: torch.Tensor, pool_type: str) -> torch.Tensor:
    if pool_type == "avg":
        return masked_mean(x, m)
    if pool_type == "max":
        return masked_amax(x, m)
    if pool_type == "avgmax":
        return 0.5 * (masked_mean(x, m) + masked_amax(x, m))
    if pool_type == "catavgmax":
        return torch.cat([masked_mean(x, m), masked_amax(x, m)], dim=1)
    raise SSLRecipeError(f"SparK: global pool type '{pool_type}' has no sparse version (avg, max, avgmax, catavgmax)")


def _squeeze(module: nn.Module, x: torch.Tensor, add_maxpool: bool = False) -> Optional[torch.Tensor]:
    """SE's squeeze over visible positions, or None when no mask is active (then the dense forward runs)."""
    m = _state_of(module).expanded(int(x.shape[2]), int(x.shape[3]), _where(module))
    if m is None:
        return None
    x_se = masked_mean(x, m)
    if add_maxpool:
        x_se = 0.5 * x_se + 0.5 * masked_amax(x, m)
    return x_se


if _SEModule is not None:

    class SparseSEModule(_SEModule):
        """timm ``SEModule`` with a masked squeeze (SparK issue #54)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x_se = _squeeze(self, x, self.add_maxpool)
            if x_se is None:
                return super().forward(x)
            x_se = self.fc2(self.act(self.bn(self.fc1(x_se))))
            return x * self.gate(x_se)


if _EffectiveSEModule is not None:

    class SparseEffectiveSEModule(_EffectiveSEModule):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x_se = _squeeze(self, x, self.add_maxpool)
            if x_se is None:
                return super().forward(x)
            return x * self.gate(self.fc(x_se))


if _EfficientNetSE is not None:

    class SparseEfficientNetSE(_EfficientNetSE):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x_se = _squeeze(self, x)
            if x_se is None:
                return super().forward(x)
            x_se = self.conv_expand(self.act1(self.conv_reduce(x_se)))
            return x * self.gate(x_se)


if _EcaModule is not None:

    class SparseEcaModule(_EcaModule):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x_se = _squeeze(self, x)
            if x_se is None:
                return super().forward(x)
            y = self.conv(x_se.view(x.shape[0], 1, -1))
            if self.conv2 is not None:
                y = self.conv2(self.act(y))
            return x * self.gate(y).view(x.shape[0], -1, 1, 1)


if _SelectAdaptivePool2d is not None:

    class SparseSelectAdaptivePool2d(_SelectAdaptivePool2d):
        """timm's global pool (avg/max/avgmax/catavgmax) over visible positions only."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = _state_of(self).expanded(int(x.shape[2]), int(x.shape[3]), _where(self)) if x.ndim == 4 else None
            if m is None or not self.pool_type:
                return super().forward(x)
            kind = self.pool_type.lower()
            kind = kind[4:] if kind.startswith("fast") else kind
            out = _pool(x, m, kind or "avg")
            # the 'fast' pools flatten inside `pool`; the others through `flatten`
            if isinstance(self.flatten, nn.Flatten) or getattr(self.pool, "flatten", False) is True:
                out = out.flatten(1)
            return out


class SparseAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = _state_of(self).expanded(int(x.shape[-2]), int(x.shape[-1]), _where(self)) if x.ndim == 4 else None
        return super().forward(x) if m is None else masked_mean(x, m)


class SparseAdaptiveMaxPool2d(nn.AdaptiveMaxPool2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = _state_of(self).expanded(int(x.shape[-2]), int(x.shape[-1]), _where(self)) if x.ndim == 4 else None
        return super().forward(x) if m is None else masked_amax(x, m)


# --------------------------------------------------------------------------- the walker

# exact class -> sparse subclass (class swap keeps every attribute, parameter and buffer)
_SWAP: dict = {nn.BatchNorm2d: SparseBatchNorm2d, nn.SyncBatchNorm: SparseSyncBatchNorm, nn.GroupNorm: SparseGroupNorm,
               nn.AdaptiveAvgPool2d: SparseAdaptiveAvgPool2d, nn.AdaptiveMaxPool2d: SparseAdaptiveMaxPool2d}
for _cls, _sparse in ((_BatchNormAct2d, "SparseBatchNormAct2d"), (_GroupNormAct, "SparseGroupNormAct"),
                      (_SEModule, "SparseSEModule"), (_EffectiveSEModule, "SparseEffectiveSEModule"),
                      (_EfficientNetSE, "SparseEfficientNetSE"), (_EcaModule, "SparseEcaModule"),
                      (_SelectAdaptivePool2d, "SparseSelectAdaptivePool2d")):
    if _cls is not None:
        _SWAP[_cls] = globals()[_sparse]
for _cls in (_TimmGroupNorm, _TimmGroupNorm1):
    if _cls is not None:  # plain GroupNorm forward (timm's fast-norm switch aside)
        _SWAP[_cls] = SparseGroupNorm
if _GroupNorm1Act is not None and _GroupNormAct is not None:
    _SWAP[_GroupNorm1Act] = SparseGroupNormAct

_SPARSE_CLASSES = tuple(set(_SWAP.values()))

# modules whose children are used only on the squeezed (1x1) tensor: handled as one unit, not descended into
_UNITS = tuple(c for c in (_SEModule, _EffectiveSEModule, _EfficientNetSE, _EcaModule, _SelectAdaptivePool2d) if c is not None)

# pointwise layers with f(0) = 0: masked positions stay zero through them
_POINTWISE_NAMES = {
    "ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "ELU", "CELU", "SELU", "GELU", "GELUTanh", "QuickGELU", "SiLU",
    "Swish", "SwishAuto", "SwishMe", "Mish", "MishAuto", "MishMe", "Hardswish", "HardSwish", "HardSwishMe",
    "HardSwishAuto", "HardMish", "HardMishMe", "HardMishAuto", "Hardtanh", "Tanh", "Softsign", "Tanhshrink",
    "Softshrink", "Hardshrink",
    "Identity", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "Flatten",
}
_POINTWISE_CLASSES = tuple(c for c in (_DropPath, _DropBlock2d) if c is not None)
_CONV_LIKE = tuple(c for c in (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, _BlurPool2d) if c is not None)
_NORM_FIRST = tuple(c for c in (_LayerNorm2d, _LayerNormAct2d) if c is not None)  # channels-first LayerNorms
_NORM_LAST = tuple(c for c in (nn.LayerNorm, _LayerNormAct) if c is not None)  # channels-last (checked after _NORM_FIRST)

SUPPORTED = (
    "Conv2d and subclasses, MaxPool2d/AvgPool2d (and 'same' variants), BlurPool2d, BatchNorm2d/SyncBatchNorm/"
    "BatchNormAct2d, GroupNorm/GroupNormAct, LayerNorm/LayerNorm2d/LayerNormAct(2d), Linear on channels-last maps, "
    "SEModule/EffectiveSEModule/EfficientNet SqueezeExcite/EcaModule, global pools, zero padding, and pointwise activations "
    "with f(0)=0"
)


def _is_pointwise(m: nn.Module) -> bool:
    if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d)):  # zero padding keeps masked positions at zero
        return float(getattr(m, "value", 0.0)) == 0.0
    return type(m).__name__ in _POINTWISE_NAMES or isinstance(m, _POINTWISE_CLASSES)


def sparsify(model: nn.Module, name: str = "backbone") -> MaskState:
    """Make every spatial layer of ``model`` sparse-aware (in place) and return the shared :class:`MaskState`.

    Raises :class:`SSLRecipeError` naming every layer type that has no sparse version (and where it sits)
    before changing anything. Calling it twice returns the existing state.
    """
    existing = model.__dict__.get("_sparse_state")
    if isinstance(existing, MaskState):
        return existing
    plan: list[tuple[str, nn.Module, str]] = []  # (path, module, action)
    problems: list[tuple[str, str]] = []  # (type name, "path (type, detail)")

    def walk(module: nn.Module, path: str, parent: Optional[nn.Module]) -> None:
        cls = type(module)
        if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and module.output_size not in (1, (1, 1)):
            problems.append((cls.__name__, f"{path or '<root>'} ({cls.__name__} to {module.output_size}, not a global pool)"))
            return
        if _SelectAdaptivePool2d is not None and isinstance(module, _SelectAdaptivePool2d) and \
                tuple(getattr(module.pool, "dim", (2, 3))) != (2, 3):
            problems.append((cls.__name__, f"{path or '<root>'} ({cls.__name__} on channels-last input)"))
            return
        if cls in _SWAP or isinstance(module, _SPARSE_CLASSES):
            plan.append((path, module, "swap"))
            if isinstance(module, _UNITS):
                return  # the squeeze path runs on 1x1 tensors
            for child_name, child in module.named_children():  # e.g. BatchNormAct2d's act and drop
                walk(child, f"{path}.{child_name}" if path else child_name, module)
            return
        if isinstance(module, _UNITS):
            problems.append((cls.__name__, f"{path or '<root>'} ({cls.__name__}, a subclass with its own forward)"))
            return
        if isinstance(module, _CONV_LIKE):
            plan.append((path, module, "nchw"))
            return
        if isinstance(module, _NORM_FIRST):
            plan.append((path, module, "nchw"))
            return
        if isinstance(module, _NORM_LAST) or isinstance(module, nn.Linear):
            plan.append((path, module, "nhwc"))
            return
        if isinstance(module, nn.modules.batchnorm._BatchNorm) or isinstance(module, nn.GroupNorm):
            problems.append((cls.__name__, f"{path or '<root>'} ({cls.__name__})"))
            return
        children = list(module.named_children())
        if not children:
            if _is_pointwise(module):
                return
            inside = f", inside {type(parent).__name__}" if parent is not None else ""
            problems.append((cls.__name__, f"{path or '<root>'} ({cls.__name__}{inside})"))
            return
        for child_name, child in children:
            walk(child, f"{path}.{child_name}" if path else child_name, module)

    walk(model, "", None)
    if problems:
        kinds = sorted({kind for kind, _ in problems})
        listing = "\n  ".join(p for _, p in problems[:12]) + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise SSLRecipeError(
            f"SparK cannot sparsify backbone '{name}': it has layers with no sparse version "
            f"({', '.join(kinds)}):\n  {listing}\n"
            f"Supported layers: {SUPPORTED}. Use a ResNet (resnet18...resnet200, resnet-d, SE-ResNet, ResNeXt) "
            "or ConvNeXt backbone, or a method that pre-trains this backbone densely (dino, resim)."
        )
    state = MaskState()
    for path, module, action in plan:
        module.__dict__["_sparse_state"] = state
        module.__dict__["_sparse_name"] = path
        if action == "swap":
            if type(module) in _SWAP:
                module.__class__ = _SWAP[type(module)]
        else:
            inplace = type(module) in (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)  # as the official sp_conv_forward
            module.register_forward_hook(_MaskOutput(state, path, action, inplace))
    model.__dict__["_sparse_state"] = state
    return state


# --------------------------------------------------------------------------- masks, features, checks


def random_active(batch: int, grid: tuple[int, int], len_keep: int, generator: Optional[torch.Generator] = None,
                  device=None) -> torch.Tensor:
    """SparK's ``mask``: per sample, ``len_keep`` cells of the ``h x w`` grid chosen uniformly at random
    (``torch.rand(B, h*w).argsort(dim=1)[:, :len_keep]``, on the CPU as in the official code), as a bool
    active map ``(B, 1, h, w)``."""
    h, w = grid
    idx = torch.rand(batch, h * w, generator=generator).argsort(dim=1)[:, :len_keep]
    active = torch.zeros(batch, h * w, dtype=torch.bool).scatter_(1, idx, True)
    return active.view(batch, 1, h, w).to(device if device is not None else "cpu")


def upsample_active(active: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``repeat_interleave`` of the active map to ``height x width`` (the official ``_get_active_ex_or_ii``)."""
    h, w = int(active.shape[-2]), int(active.shape[-1])
    return active.repeat_interleave(height // h, dim=2).repeat_interleave(width // w, dim=3)


def stage_indices(model: nn.Module, reductions: tuple[int, ...] = (4, 8, 16, 32), name: str = "backbone") -> list[int]:
    """``feature_info`` indices of the last feature map at each of ``reductions`` (SparK's 4 scales)."""
    info = getattr(model, "feature_info", None)
    if not info or not hasattr(model, "forward_intermediates"):
        raise SSLRecipeError(f"SparK: backbone '{name}' exposes no timm feature_info/forward_intermediates; "
                             "use a timm CNN such as resnet50 or convnext_tiny")
    entries = [dict(e) for e in (info.get_dicts() if hasattr(info, "get_dicts") else info)]
    out = []
    for r in reductions:
        idx = [i for i, e in enumerate(entries) if int(e["reduction"]) == r]
        if not idx:
            have = sorted({int(e["reduction"]) for e in entries})
            raise SSLRecipeError(
                f"SparK needs feature maps at strides {', '.join(map(str, reductions))} but backbone '{name}' has "
                f"strides {', '.join(map(str, have))}; use a CNN with a total stride of 32 (ResNet, ConvNeXt)"
            )
        out.append(idx[-1])
    return out


def feature_channels(model: nn.Module, indices: list[int]) -> list[int]:
    info = getattr(model, "feature_info")
    entries = [dict(e) for e in (info.get_dicts() if hasattr(info, "get_dicts") else info)]
    return [int(entries[i]["num_chs"]) for i in indices]


def stage_features(model: nn.Module, x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
    """The feature maps at ``indices`` (shallowest first) through timm's ``forward_intermediates``."""
    return list(model.forward_intermediates(x, indices=indices, intermediates_only=True, stop_early=True))


@torch.no_grad()
def check_sparsity(model: nn.Module, state: MaskState, indices: list[int], in_chans: int, grid: tuple[int, int] = (2, 2),
                   name: str = "backbone", stride: int = 32) -> None:
    """Run ``model`` once on a small masked input and require exact zeros at masked positions of every stage.

    Catches leaks no module walk can see (tensor code inside a block's ``forward``). Runs in eval mode so no
    running statistic changes; the training flags are restored afterwards.
    """
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        g = torch.Generator().manual_seed(0)
        h, w = grid
        x = torch.randn(2, in_chans, h * stride, w * stride, generator=g)
        param = next(model.parameters(), None)
        if param is not None:
            x = x.to(device=param.device, dtype=param.dtype)
        active = torch.zeros(2, 1, h, w, dtype=torch.bool, device=x.device)
        active[0, 0, 0, 0] = active[1, 0, h - 1, w - 1] = True
        x = x * upsample_active(active, x.shape[2], x.shape[3]).to(x.dtype)
        with state.masked(active):
            feats = stage_features(model, x, indices)
        for i, f in zip(indices, feats):
            m = upsample_active(active, f.shape[2], f.shape[3])
            leak = f.masked_select(~m.expand_as(f)).abs().max() if (~m).any() else torch.zeros(())
            if float(leak) != 0.0:
                raise SSLRecipeError(
                    f"SparK: backbone '{name}' leaks values into masked positions at feature {i} "
                    f"(max |value| {float(leak):.3g}); a block's forward mixes positions outside its layers. "
                    f"Supported layers: {SUPPORTED}."
                )
    finally:
        for m, t in flags.items():
            m.training = t


def count_sparse_layers(model: nn.Module) -> dict[str, int]:
    """How many layers :func:`sparsify` made sparse-aware, by kind (for logs and tests)."""
    out = {"hooked": 0, "swapped": 0}
    for m in model.modules():
        if "_sparse_state" in m.__dict__ and m is not model:
            out["swapped" if isinstance(m, _SPARSE_CLASSES) else "hooked"] += 1
    return out


__all__ = [
    "MaskState", "sparsify", "random_active", "upsample_active", "stage_indices", "stage_features", "feature_channels",
    "check_sparsity", "masked_mean", "masked_global_pool", "sparse_batch_norm", "SparseBatchNorm2d", "SUPPORTED",
    "count_sparse_layers",
]
