"""The EMA (momentum) teacher update that DINO, Leopart, ReSim and the hybrid share."""

from __future__ import annotations

import torch


@torch.no_grad()
def ema_update(teacher_params, student_params, momentum: float) -> None:
    """``param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)`` for every pair (DINO's ``main_dino.py``;
    MoCo/ReSim's ``k * m + q * (1 - m)`` rounds the same: two products, then their sum)."""
    for pt, ps in zip(teacher_params, student_params):
        pt.mul_(momentum).add_(ps.detach() * (1 - momentum))
