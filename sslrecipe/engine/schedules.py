"""Optimizers and learning-rate schedules shared by every training stage."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from sslrecipe.recipe.schema import OptimConfig


def param_groups_with_decay(model: nn.Module, weight_decay: float, lr_scale: float = 1.0) -> list[dict]:
    """Two groups: weights with decay; biases, norm and other 1-D parameters without (as MAE/DINO/timm do)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or getattr(p, "_no_weight_decay", False):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "lr_scale": lr_scale})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr_scale": lr_scale})
    return groups


def build_optimizer(groups: Iterable[dict], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    groups = list(groups)
    for g in groups:
        g.setdefault("lr_scale", 1.0)
        g["lr"] = lr * g["lr_scale"]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "lamb":
        from timm.optim import Lamb

        return Lamb(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    raise ValueError(cfg.optimizer)


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based) of `total`: linear warmup, then the schedule."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_fraction * total))
    warmup = min(warmup, max(total - 1, 0))
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        factor = 1.0
        for m in cfg.milestones:
            if step >= int(m * total):
                factor *= cfg.gamma
        return factor
    progress = (step - warmup) / max(1, total - warmup)
    floor = cfg.min_lr_ratio
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, total: int, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, cfg))
