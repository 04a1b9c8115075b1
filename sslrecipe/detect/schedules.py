"""The survey's fine-tuning schedules, and layer-wise learning-rate decay for detector parameter groups.

The training loop (``sslrecipe.engine.loop``) already implements warmup + step/cosine schedules and the
linear scaling rule (``OptimConfig.peak_lr``: ``blr x batch_size x accumulate / 256`` when ``lr`` is null).
What is detector-specific lives here:

- :func:`survey_schedule`: the survey's settings per encoder family — ResNets: AdamW, step decay x0.2 at
  3/4 and 11/12 of training (its "3x" schedule: epochs 27 and 33 of 36); ViTs: AdamW, cosine, layer-wise
  lr decay (the ViTDet recipe).
- :func:`detector_param_groups`: parameter groups with weight decay only on weights (not biases, norms,
  position embeddings or tokens) and, with ``layer_decay``, an ``lr_scale`` per encoder layer:
  ``layer_decay ** (L + 1 - layer)``, where layer 0 is the patch/stem embedding, layer i the i-th block or
  stage and L + 1 the final norm; the pyramid and the heads keep scale 1. ``build_optimizer`` multiplies
  each group's lr by its ``lr_scale``, and every step of the schedule keeps the ratio.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

from torch import nn

from sslrecipe.errors import SSLRecipeError

#: ViTDet's layer decay for ViT-B is 0.7 (0.8 for ViT-L, 0.9 for ViT-H); deeper models decay less.
DEFAULT_VIT_LAYER_DECAY = 0.7
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "mask_token")


def survey_schedule(family: str) -> dict[str, Any]:
    """Recipe ``finetune`` settings of the survey for an encoder family (``"cnn"`` or ``"vit"``)."""
    if family == "cnn":
        return {"optimizer": "adamw", "schedule": "step", "milestones": (0.75, 11 / 12), "gamma": 0.2, "layer_decay": None}
    if family == "vit":
        return {"optimizer": "adamw", "schedule": "cosine", "layer_decay": DEFAULT_VIT_LAYER_DECAY}
    raise ValueError(f"family must be 'cnn' or 'vit', got {family!r}")


def _encoder_layers(model: nn.Module) -> tuple[Optional[nn.Module], dict[str, int], int]:
    """(encoder, encoder parameter name -> layer id, number of layers L) of a detector built here."""
    body = getattr(getattr(model, "backbone", None), "body", None)
    encoder = getattr(body, "encoder", None)
    if encoder is None:
        return None, {}, 0
    if hasattr(body, "layer_of_parameter"):  # ViT: blocks
        return encoder, body.layer_of_parameter(), int(body.num_layers)
    stages = body.stage_of_parameter()  # CNN: stem 0, level i, -1 after the last level
    n = len(body.level_indices)
    return encoder, {k: (n + 1 if v < 0 else v) for k, v in stages.items()}, n


def detector_param_groups(model: nn.Module, weight_decay: float, layer_decay: Optional[float] = None) -> list[dict]:
    """Optimizer parameter groups of a detector (trainable parameters only), each with ``lr_scale``.

    ``layer_decay`` None or 1 = one lr for everything (two groups: with and without weight decay).
    """
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise SSLRecipeError(f"finetune.layer_decay must be in (0, 1], got {layer_decay}")
    encoder, layers, n_layers = _encoder_layers(model)
    prefix = "backbone.body.encoder."
    groups: "OrderedDict[tuple[float, bool], dict]" = OrderedDict()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        short = name[len(prefix):] if name.startswith(prefix) else None
        no_decay = (p.ndim <= 1 or name.endswith(".bias") or getattr(p, "_no_weight_decay", False)
                    or (short is not None and short.split(".")[0] in _NO_DECAY_NAMES))
        scale = 1.0
        if layer_decay is not None and layer_decay != 1 and short is not None and short in layers:
            scale = float(layer_decay) ** (n_layers + 1 - layers[short])
        key = (scale, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale}
        groups[key]["params"].append(p)
    # the largest scale first: the loop logs param_groups[0]["lr"] as "the" lr
    return sorted(groups.values(), key=lambda g: -g["lr_scale"])
