"""Loading and comparing the official numbers recorded by ``benchmarks/fidelity/`` (issue 14, item 8).

Used by every ``test_fidelity_<name>.py``; none of them needs the official code. Tolerances (stated once, here):

- a loss: **relative 1e-4** (``math.isclose(ours, official, rel_tol=1e-4)``); float32 rounding gives ~1e-7;
- a per-parameter gradient or change, summarised by its norm and its fingerprint (the projection on a fixed unit
  vector, see ``fingerprint``): each within **1e-4 x the official norm** (absolute, plus 1e-9 for zero tensors);
- a stored tensor: ``||ours - official|| <= 1e-4 x ||official|| + 1e-9``.

The key third of each attention ``qkv.bias`` is left out of gradients and changes on both sides
(``without_key_bias``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

DATA = Path(__file__).resolve().parent / "data" / "fidelity"
REL = 1e-4
ABS = 1e-9


def load_record(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the recorded JSON, the recorded tensors in float32 (integers and booleans as stored))."""
    from safetensors.torch import load_file

    record = json.loads((DATA / f"{name}.json").read_text())
    tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(DATA / f"{name}.safetensors")).items()}
    return record, tensors


def section(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors stored under ``prefix/``, without it."""
    p = prefix + "/"
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


def fingerprint(t: torch.Tensor) -> float:
    """``benchmarks/fidelity/_shared.fingerprint``: the projection on the unit vector ``w_i ~ sin(i + 1)``."""
    flat = t.detach().double().flatten()
    w = torch.sin(torch.arange(1, flat.numel() + 1, dtype=torch.float64))
    return float(flat @ (w / w.norm()))


def without_key_bias(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``benchmarks/fidelity/_shared.without_key_bias``: the key third of each attention ``qkv.bias`` set to 0 (its
    gradient is zero in exact arithmetic, so its float gradient and Adam's change of it are rounding noise)."""
    out = {}
    for k, v in tensors.items():
        if k.endswith("attn.qkv.bias"):
            v = v.detach().clone()
            d = v.shape[0] // 3
            v[d : 2 * d] = 0
        out[k] = v
    return out


def assert_loss(ours: float, official: float, what: str) -> None:
    assert math.isclose(ours, official, rel_tol=REL), f"{what}: ours {ours:.8f}, official {official:.8f} (rel tol {REL})"


def assert_stats(ours: Mapping[str, torch.Tensor], norm: Mapping[str, float], fp: Mapping[str, float], what: str,
                 rename: Callable[[str], str] = lambda k: k) -> None:
    """Every official entry has ours (``rename`` maps our name to the official one) with the same norm and
    fingerprint within ``REL x official norm``; all mismatches in one message."""
    mine = without_key_bias({rename(k): v for k, v in ours.items()})
    missing = sorted(set(norm) - set(mine))
    extra = sorted(set(mine) - set(norm))
    assert not missing and not extra, f"{what}: parameters only official {missing}, only ours {extra}"
    bad = []
    for k, n_off in norm.items():
        t = mine[k].detach().double()
        n, f = float(t.norm()), fingerprint(t)
        tol = REL * n_off + ABS
        if abs(n - n_off) > tol or abs(f - fp[k]) > tol:
            bad.append(f"{k}: norm {n:.6e} vs {n_off:.6e}, fingerprint {f:.6e} vs {fp[k]:.6e}")
    assert not bad, f"{what} differs from the official code for {len(bad)} of {len(norm)} parameters:\n" + "\n".join(bad)


def assert_tensors(ours: Mapping[str, torch.Tensor], official: Mapping[str, torch.Tensor], what: str,
                   rename: Callable[[str], str] = lambda k: k) -> None:
    mine = without_key_bias({rename(k): v for k, v in ours.items()})
    bad = []
    for k, ref in official.items():
        assert k in mine, f"{what}: no {k} on our side"
        diff = float((mine[k].detach().double() - ref.double()).norm())
        if diff > REL * float(ref.double().norm()) + ABS:
            bad.append(f"{k}: |ours - official| = {diff:.3e}, |official| = {float(ref.double().norm()):.3e}")
    assert not bad, f"{what}:\n" + "\n".join(bad)


def load_exact(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str,
               keep: Optional[Callable[[str], bool]] = None) -> None:
    """Load ``state`` into ``module`` strictly (``keep`` may leave out keys the module computes itself)."""
    target = module.state_dict()
    state = {k: v.to(target[k].dtype) if k in target else v for k, v in state.items()}
    expected = {k for k in target if keep is None or keep(k)}
    missing, extra = sorted(expected - set(state)), sorted(set(state) - set(target))
    assert not missing and not extra, f"{what}: keys not in the record {missing}, record keys we lack {extra}"
    module.load_state_dict({**target, **state}, strict=True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The recorded official lr of an iteration (each group times its ``lr_scale``): the lr schedule belongs to the
    training loop and is not what these tests pin."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
