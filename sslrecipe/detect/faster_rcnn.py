"""torchvision Faster R-CNN / Mask R-CNN on any timm encoder: CNNs through an FPN, ViTs through a
ViTDet-style simple feature pyramid (:mod:`sslrecipe.detect.vit_pyramid`).

The encoder instance itself is the detector's body (``detector.backbone.body.encoder``): a CNN's feature
levels at strides 4, 8, 16 and 32 come from timm's ``forward_intermediates`` on that same module, a ViT's
stride-16 map from its blocks, so the weights loaded from ``encoder.safetensors`` are exactly the ones
that fine-tune, under the same key names (prefixed ``backbone.body.encoder.``).

Defaults follow the SSL-transfer protocol: every backbone stage trainable and BatchNorm trainable (not
torchvision's FrozenBatchNorm2d), small anchors, and an input transform that resizes the longer image
side to ``img_size`` and maps predictions back to original pixels.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections import OrderedDict
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from sslrecipe.errors import SSLRecipeError
from sslrecipe.models.backbone import normalization_of
from sslrecipe.models.normalization import Normalization

FPN_STRIDES = (4, 8, 16, 32)
ASPECT_RATIOS = (0.5, 1.0, 2.0)
# Anchor sizes (px, after resizing) when neither the recipe nor the data say otherwise: COCO's
# (32..512) halved twice, for objects of a few to a few tens of pixels.
DEFAULT_ANCHOR_SIZES = (8, 16, 32, 64, 128)
# FasterRCNN keyword arguments a caller may pass through (the ones build_faster_rcnn sets are excluded)
_FASTER_RCNN_KWARGS = set(inspect.signature(FasterRCNN.__init__).parameters) - {
    "self", "backbone", "num_classes", "min_size", "max_size", "image_mean", "image_std",
    "rpn_anchor_generator", "box_roi_pool", "box_head", "box_predictor", "box_detections_per_img",
    "box_score_thresh", "kwargs",
} | {"size_divisible", "fixed_size", "_skip_resize"}
SUPPORTED_HINT = (
    "supported: timm CNNs with feature levels at strides 4-32 (e.g. resnet18, resnet50, resnet200, "
    "convnext_tiny, efficientnet_b0, regnety_016) and plain timm ViTs (vit_small_patch16_224, ...)"
)
DETECTORS = ("faster_rcnn", "mask_rcnn")


def _model_name(encoder: nn.Module) -> str:
    cfg = getattr(encoder, "pretrained_cfg", None) or {}
    return getattr(encoder, "_sslrecipe_timm_name", None) or cfg.get("architecture") or type(encoder).__name__


def _select_levels(encoder: nn.Module) -> list[int]:
    """Indices into ``encoder.feature_info`` of the last feature at each stride 4, 8, 16, 32."""
    name = _model_name(encoder)
    info = getattr(encoder, "feature_info", None)
    if not info or not hasattr(encoder, "forward_intermediates"):
        raise SSLRecipeError(
            f"backbone {name!r} exposes no timm feature levels (feature_info / forward_intermediates); {SUPPORTED_HINT}"
        )
    reductions = [int(f["reduction"]) for f in info]
    if len(set(reductions)) == 1:  # a single-stride transformer that is not a timm VisionTransformer
        raise SSLRecipeError(
            f"backbone {name!r} has all its features at stride {reductions[0]} but is not a timm VisionTransformer, "
            f"so neither the FPN nor the simple feature pyramid applies. {SUPPORTED_HINT}"
        )
    chosen = []
    for stride in FPN_STRIDES:
        idx = [i for i, r in enumerate(reductions) if r == stride]
        if idx:
            chosen.append(idx[-1])
    if len(chosen) < 2 or reductions[chosen[-1]] < 16:
        raise SSLRecipeError(
            f"backbone {name!r} has feature strides {reductions}; an FPN needs at least two of 4/8/16/32 "
            f"reaching stride 16 or more. {SUPPORTED_HINT}"
        )
    return chosen


def _module_spans(encoder: nn.Module) -> dict[str, tuple[int, int]]:
    """Module name -> (first, last) position of its subtree in ``named_modules()`` order."""
    names = [n for n, _ in encoder.named_modules()]
    spans: dict[str, tuple[int, int]] = {}
    for i, n in enumerate(names):
        parts = n.split(".") if n else []
        for depth in range(len(parts) + 1):
            key = ".".join(parts[:depth])
            a, _ = spans.get(key, (i, i))
            spans[key] = (a, i)
    return spans


class TimmFeatures(nn.Module):
    """The encoder's feature maps at strides 4..32 as ``OrderedDict{"0": C2, "1": C3, ...}``.

    Holds the encoder instance (no copy). ``stage_of_parameter`` maps every encoder parameter to a stage:
    0 = stem (before the first level), i = the i-th selected level, -1 = after the last level (heads
    that the detector never runs; they are frozen so DDP sees no unused trainable parameters).
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.level_indices = _select_levels(encoder)
        info = encoder.feature_info
        self.strides = [int(info[i]["reduction"]) for i in self.level_indices]
        self.level_modules = [str(info[i]["module"]) for i in self.level_indices]
        self.out_channels_list = self._probe_channels()

    def _probe_channels(self) -> list[int]:
        """Channels per level from a tiny eval-mode forward (checks indices and feature_info agree)."""
        in_chans = _encoder_in_chans(self.encoder) or 3
        size = max(self.strides) * 2
        was_training = self.encoder.training
        param = next(self.encoder.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        try:
            self.encoder.eval()  # never touch BatchNorm running stats here
            with torch.no_grad():
                feats = self._forward_levels(torch.zeros(1, in_chans, size, size, device=device))
        except Exception as e:
            raise SSLRecipeError(
                f"backbone {_model_name(self.encoder)!r} failed to produce its feature levels: {e}. {SUPPORTED_HINT}"
            ) from None
        finally:
            self.encoder.train(was_training)
        if len(feats) != len(self.level_indices):
            raise SSLRecipeError(
                f"backbone {_model_name(self.encoder)!r} returned {len(feats)} feature maps for levels "
                f"{self.level_indices}; {SUPPORTED_HINT}"
            )
        return [int(f.shape[1]) for f in feats]

    def _forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(
            self.encoder.forward_intermediates(x, indices=self.level_indices, stop_early=True, intermediates_only=True)
        )

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict((str(i), f) for i, f in enumerate(self._forward_levels(x)))

    def stage_of_parameter(self) -> dict[str, int]:
        spans = _module_spans(self.encoder)
        ends = [spans[m][1] for m in self.level_modules]
        first = spans[self.level_modules[0]][0]
        out: dict[str, int] = {}
        for pname, _ in self.encoder.named_parameters():
            mod = pname.rsplit(".", 1)[0] if "." in pname else ""
            pos = spans.get(mod, (0, 0))[0]
            if pos < first:
                out[pname] = 0
            else:
                out[pname] = next((i + 1 for i, e in enumerate(ends) if pos <= e), -1)
        return out


def _encoder_in_chans(encoder: nn.Module) -> Optional[int]:
    kw = getattr(encoder, "_sslrecipe_timm_kwargs", None)
    if kw and "in_chans" in kw:
        return int(kw["in_chans"])
    cfg = getattr(encoder, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv")
    if isinstance(first, (list, tuple)):
        first = first[0] if first else None
    if first:
        try:
            mod = encoder.get_submodule(first)
            if hasattr(mod, "in_channels"):
                return int(mod.in_channels)
        except AttributeError:
            pass
    for p in encoder.parameters():
        if p.ndim == 4:
            return int(p.shape[1])
    return None


class TimmFPNBackbone(nn.Module):
    """Body (timm encoder levels) + torchvision FPN with a max-pool P6; what FasterRCNN calls ``backbone``.

    ``frozen_bn`` BatchNorm layers stay in eval mode whatever ``train()`` says, so their running
    statistics never change (their affine parameters have ``requires_grad=False``).
    """

    def __init__(self, encoder: nn.Module, out_channels: int = 256):
        super().__init__()
        self.body = TimmFeatures(encoder)
        self.fpn = FeaturePyramidNetwork(
            self.body.out_channels_list, out_channels, extra_blocks=LastLevelMaxPool()
        )
        self.out_channels = out_channels
        self._frozen_bn: list[nn.Module] = []

    @property
    def num_levels(self) -> int:
        """Feature maps the heads see: one per body level plus the max-pool level."""
        return len(self.body.level_indices) + 1

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(self.body(x))

    def train(self, mode: bool = True) -> "TimmFPNBackbone":
        super().train(mode)
        for m in self._frozen_bn:
            m.eval()
        return self


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def configure_trainable(backbone: TimmFPNBackbone, norm: str = "bn", trainable_stages: Optional[int] = None) -> None:
    """Freeze backbone parts: ``trainable_stages=N`` trains the last N of [stem, level1, ..., levelL]
    (None = all, 0 = none); ``norm="frozen_bn"`` freezes every BatchNorm's statistics and affine
    parameters. BatchNorm inside a frozen stage is frozen too. Parameters after the last level are frozen."""
    if norm not in ("bn", "frozen_bn"):
        raise SSLRecipeError(f"finetune.norm must be 'bn' or 'frozen_bn', got {norm!r}")
    body = backbone.body
    n_stages = len(body.level_indices) + 1  # stem + levels
    if trainable_stages is not None and trainable_stages < 0:
        raise SSLRecipeError(f"finetune.trainable_stages must be >= 0 or null, got {trainable_stages}")
    first_trainable = 0 if trainable_stages is None else max(0, n_stages - trainable_stages)
    stages = body.stage_of_parameter()
    params = dict(body.encoder.named_parameters())
    for pname, stage in stages.items():
        params[pname].requires_grad_(stage >= 0 and stage >= first_trainable)

    frozen: list[nn.Module] = []
    for m in body.encoder.modules():
        if not _is_bn(m):
            continue
        own = [p for p in m.parameters(recurse=False)]
        in_frozen_stage = bool(own) and not any(p.requires_grad for p in own)
        if norm == "frozen_bn" or in_frozen_stage:
            for p in own:
                p.requires_grad_(False)
            frozen.append(m)
    backbone._frozen_bn = frozen
    backbone.train(backbone.training)


def _fit_anchor_sizes(sizes: Sequence[int], n: int) -> tuple[int, ...]:
    sizes = sorted(float(s) for s in sizes)
    if len(sizes) == n:
        out = sizes
    elif len(sizes) == 1:
        out = [sizes[0] * 2**i for i in range(n)]
    else:  # geometric interpolation between the smallest and largest requested size
        lo, hi = math.log(sizes[0]), math.log(sizes[-1])
        out = [math.exp(lo + (hi - lo) * i / (n - 1)) for i in range(n)]
        warnings.warn(
            f"{len(sizes)} anchor sizes given for {n} FPN levels; using {[round(s) for s in out]}", stacklevel=3
        )
    result: list[int] = []
    for s in out:
        v = max(4, int(round(s)))
        if result and v <= result[-1]:
            v = result[-1] + 1
        result.append(v)
    return tuple(result)


def encoder_family(encoder: nn.Module) -> str:
    """``"vit"`` for a plain timm VisionTransformer (simple feature pyramid), else ``"cnn"`` (FPN)."""
    from sslrecipe.detect.vit_pyramid import is_plain_vit

    return "vit" if is_plain_vit(encoder) else "cnn"


def build_detector_backbone(encoder: nn.Module, fpn_channels: int = 256, norm: str = "bn",
                            trainable_stages: Optional[int] = None) -> nn.Module:
    """FPN over a CNN's levels, or the simple feature pyramid over a ViT; freezing applied."""
    if encoder_family(encoder) == "vit":
        from sslrecipe.detect.vit_pyramid import ViTPyramidBackbone, configure_vit_trainable

        if norm not in ("bn", "frozen_bn"):
            raise SSLRecipeError(f"finetune.norm must be 'bn' or 'frozen_bn', got {norm!r}")
        backbone = ViTPyramidBackbone(encoder, out_channels=fpn_channels)
        configure_vit_trainable(backbone, trainable_stages)  # LayerNorm only: `norm` has nothing to freeze
        return backbone
    backbone = TimmFPNBackbone(encoder, out_channels=fpn_channels)
    configure_trainable(backbone, norm=norm, trainable_stages=trainable_stages)
    return backbone


def build_detector(
    encoder: nn.Module,
    num_classes: int,
    img_size: int,
    anchor_sizes: Optional[Sequence[int]] = None,
    in_chans: int = 3,
    norm: str = "bn",
    trainable_stages: Optional[int] = None,
    max_detections: int = 300,
    image_mean: Optional[Sequence[float]] = None,
    image_std: Optional[Sequence[float]] = None,
    *,
    detector: str = "faster_rcnn",
    fpn_channels: int = 256,
    representation_size: int = 1024,
    box_score_thresh: float = 0.001,
    mask_channels: Optional[int] = None,
    **rcnn_kwargs: Any,
) -> FasterRCNN:
    """A torchvision ``FasterRCNN`` (``detector="faster_rcnn"``) or ``MaskRCNN`` (``"mask_rcnn"``) whose
    backbone is ``encoder`` (a timm CNN + FPN, or a plain timm ViT + simple feature pyramid).

    - ``num_classes``: object classes; the background class is added here (labels are 1..num_classes).
    - ``img_size``: the longer image side after resizing (``min_size = max_size = img_size``); boxes come
      back in the original image's pixels.
    - ``anchor_sizes``: one size in resized pixels per pyramid level (body levels + the max-pool level, 5 for
      a ResNet or a ViT); None = ``DEFAULT_ANCHOR_SIZES``. A different count is interpolated geometrically
      (with a warning). Aspect ratios are (0.5, 1, 2).
    - ``image_mean`` / ``image_std``: per-channel normalisation of the [0, 1] input (torchvision's
      ``GeneralizedRCNNTransform`` applies it, in training and in prediction); default: what the encoder's
      ``encoder.json`` records when it was loaded with ``load_encoder`` (ImageNet's for public weights), else
      the project's 0.5 / 0.25, for each of ``in_chans`` channels.
    - ``norm`` / ``trainable_stages``: see :func:`configure_trainable` (CNNs) and
      :func:`sslrecipe.detect.vit_pyramid.configure_vit_trainable` (ViTs: stages are blocks).
    - ``fpn_channels`` (pyramid width) and ``representation_size`` (box head MLP width) trade accuracy for
      speed on a CPU; ``mask_channels`` is the mask head's width (default ``fpn_channels``);
      ``box_score_thresh`` is kept low so that evaluation chooses its own threshold.
      Extra keyword arguments go to torchvision's ``FasterRCNN`` (e.g. ``box_batch_size_per_image``,
      ``rpn_post_nms_top_n_train``); unknown ones are an error (torchvision would silently drop them).
    """
    if detector not in DETECTORS:
        raise SSLRecipeError(f"unknown detector {detector!r}; torchvision detectors here: {', '.join(DETECTORS)} "
                             "(yolo is sslrecipe.detect.yolo)")
    unknown = set(rcnn_kwargs) - _FASTER_RCNN_KWARGS
    if unknown:
        raise SSLRecipeError(f"unknown Faster R-CNN option(s) {sorted(unknown)}; known: {sorted(_FASTER_RCNN_KWARGS)}")
    if num_classes < 1:
        raise SSLRecipeError(f"the detector needs at least one object class, got num_classes={num_classes}")
    enc_chans = _encoder_in_chans(encoder)
    if enc_chans is not None and enc_chans != in_chans:
        raise SSLRecipeError(
            f"backbone takes {enc_chans}-channel input but the data has {in_chans} channel(s); set backbone.in_chans: {in_chans}"
        )
    recorded = normalization_of(encoder) or Normalization.default()
    mean = list(recorded.for_channels(in_chans).mean) if image_mean is None else [float(v) for v in image_mean]
    std = list(recorded.for_channels(in_chans).std) if image_std is None else [float(v) for v in image_std]
    if len(mean) != in_chans or len(std) != in_chans:
        raise SSLRecipeError(f"image_mean/image_std need {in_chans} value(s) each, got {mean} / {std}")

    backbone = build_detector_backbone(encoder, fpn_channels, norm, trainable_stages)
    n_levels = backbone.num_levels
    sizes = _fit_anchor_sizes(anchor_sizes or DEFAULT_ANCHOR_SIZES[:n_levels], n_levels)
    anchors = AnchorGenerator(sizes=tuple((s,) for s in sizes), aspect_ratios=(ASPECT_RATIOS,) * n_levels)
    featmaps = [str(i) for i in range(n_levels - 1)]
    roi_pool = MultiScaleRoIAlign(featmap_names=featmaps, output_size=7, sampling_ratio=2)
    box_head = TwoMLPHead(fpn_channels * 7 * 7, representation_size)
    box_predictor = FastRCNNPredictor(representation_size, num_classes + 1)
    common = dict(
        num_classes=None,  # given by box_predictor (num_classes + background)
        min_size=img_size,
        max_size=img_size,
        image_mean=mean,
        image_std=std,
        rpn_anchor_generator=anchors,
        box_roi_pool=roi_pool,
        box_head=box_head,
        box_predictor=box_predictor,
        box_detections_per_img=max_detections,
        box_score_thresh=box_score_thresh,
    )
    if detector == "mask_rcnn":
        width = int(mask_channels or fpn_channels)
        model = MaskRCNN(
            backbone,
            mask_roi_pool=MultiScaleRoIAlign(featmap_names=featmaps, output_size=14, sampling_ratio=2),
            mask_head=MaskRCNNHeads(fpn_channels, (width,) * 4, 1),
            mask_predictor=MaskRCNNPredictor(width, width, num_classes + 1),
            **common,
            **rcnn_kwargs,
        )
    else:
        model = FasterRCNN(backbone, **common, **rcnn_kwargs)
    model.anchor_sizes = sizes  # for logs and the report
    return model


def build_faster_rcnn(*args: Any, **kwargs: Any) -> FasterRCNN:
    """:func:`build_detector` with ``detector="faster_rcnn"`` (same arguments)."""
    return build_detector(*args, detector="faster_rcnn", **kwargs)


def build_mask_rcnn(*args: Any, **kwargs: Any) -> MaskRCNN:
    """:func:`build_detector` with ``detector="mask_rcnn"``: boxes plus instance masks (the data needs
    ``segmentation`` on its annotations; see :func:`sslrecipe.detect.masks.require_masks`)."""
    return build_detector(*args, detector="mask_rcnn", **kwargs)


def _boxes_and_scales(coco: Mapping[str, Any], img_size: int) -> list[float]:
    images = {im["id"]: im for im in coco.get("images", [])}
    out = []
    for ann in coco.get("annotations", []):
        if ann.get("iscrowd", 0):
            continue
        bbox = ann.get("bbox") or []
        if len(bbox) != 4:
            continue
        w, h = float(bbox[2]), float(bbox[3])
        if w <= 0 or h <= 0:
            continue
        im = images.get(ann.get("image_id"), {})
        longer = max(float(im.get("width") or 0), float(im.get("height") or 0))
        scale = img_size / longer if longer > 0 else 1.0
        out.append(math.sqrt(w * h) * scale)
    return out


def suggest_anchor_sizes(coco: Mapping[str, Any], img_size: int, n_levels: int = 5) -> tuple[int, ...]:
    """One anchor size per FPN level from the training boxes, after resizing the longer side to ``img_size``.

    The sizes are the 5th..95th percentiles (evenly spaced) of sqrt(box area) in resized pixels, rounded,
    strictly increasing and at least 4 px. Without boxes: ``DEFAULT_ANCHOR_SIZES``.
    """
    import numpy as np

    sizes = _boxes_and_scales(coco, img_size)
    if not sizes:
        return _fit_anchor_sizes(DEFAULT_ANCHOR_SIZES[:n_levels], n_levels)
    qs = np.linspace(0.05, 0.95, n_levels) if n_levels > 1 else np.array([0.5])
    values = np.quantile(np.asarray(sizes, dtype=np.float64), qs)
    result: list[int] = []
    for v in values:
        s = max(4, int(round(float(v))))
        if result and s <= result[-1]:
            s = result[-1] + 1
        result.append(s)
    return tuple(result)


def suggest_img_size(coco: Mapping[str, Any], min_object_px: float = 8.0, multiple: int = 32,
                     max_size: int = 1333) -> int:
    """Detector input size (the longer image side after resizing) from the training boxes.

    Starts at the images' median longer side and grows it (up to 2x, capped at ``max_size``) until the
    10th percentile of sqrt(box area) reaches ``min_object_px`` resized pixels — the stride-4 level then
    still sees the small objects as about 2x2 cells. Rounded up to a multiple of ``multiple``; 512 without
    images.
    """
    import numpy as np

    longer = [max(float(im.get("width") or 0), float(im.get("height") or 0)) for im in coco.get("images", [])]
    longer = [v for v in longer if v > 0]
    if not longer:
        return 512
    native = float(np.median(longer))
    sizes = _boxes_and_scales(coco, int(round(native)))  # sqrt(area) at the native size
    size = native
    if sizes:
        p10 = float(np.quantile(np.asarray(sizes), 0.1))
        if 0 < p10 < min_object_px:
            size = native * min(2.0, min_object_px / p10)
    size = min(size, float(max_size))
    return int(math.ceil(size / multiple) * multiple)


def to_sync_batchnorm(model: nn.Module) -> nn.Module:
    """The detector with every BatchNorm as ``SyncBatchNorm`` (for DDP: the SSL-transfer protocol's SyncBN),
    keeping frozen BatchNorm layers frozen (eval mode, no gradients). Call before wrapping in DDP."""
    backbone = getattr(model, "backbone", None)
    frozen_ids = {id(m) for m in getattr(backbone, "_frozen_bn", [])}
    frozen_names = {name for name, m in model.named_modules() if id(m) in frozen_ids}
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if backbone is not None:
        model.backbone._frozen_bn = [m for name, m in model.named_modules() if name in frozen_names]
        for m in model.backbone._frozen_bn:
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
        model.backbone.train(model.backbone.training)
    return model
