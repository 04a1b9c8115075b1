"""Atomic, resumable checkpoints: model, optimizer, scheduler, scaler, RNG states, step, stage hash.

Written to a temporary file in the same directory and renamed over the old one, so a kill at
any moment leaves either the previous checkpoint or the new one, never a torn file; a second
Ctrl-C waits for a write under way (`signals.deferred_interrupts`). Loaded with
`weights_only=True`: a checkpoint never executes code. A write that fails on an OS error (a full
disk) raises that OSError naming the file it was writing, and leaves the previous version in place.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from sslrecipe.atomic import atomic_write, atomic_write_file


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    atomic_write_file(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, "wb", lambda f: torch.save(obj, f))


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # numpy's state holds an ndarray; stored as a list so weights_only loading accepts it
        "numpy": (np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(path: Path, *, model, optimizer, scheduler, scaler, step: int, stage_hash: str, extra: Optional[dict] = None) -> None:
    atomic_torch_save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_state(),
            "step": step,
            "stage_hash": stage_hash,
            "extra": extra or {},
        },
        path,
    )


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def unreadable_reason(exc: BaseException) -> str:
    """Why `load_checkpoint` failed, in one line."""
    if isinstance(exc, pickle.UnpicklingError) and "Unsupported global" in str(exc):
        return "it is not a weights-only checkpoint: it holds Python objects, which are never unpickled"
    # torch wraps the unpickler's own error in a long explanation: keep the error's first line
    lines = [line.strip() for line in str(exc).split("WeightsUnpickler error:", 1)[-1].splitlines() if line.strip()]
    first = (lines[0] if lines else "").split(". ")[0]
    return f"it is not a readable checkpoint ({type(exc).__name__}: {first[:200]})"


def check_checkpoint(state: Any) -> None:
    """Raise ValueError unless `state` is laid out as `save_checkpoint` writes it."""
    if not isinstance(state, dict):
        raise ValueError(f"it holds a {type(state).__name__}, not a checkpoint")
    for key, kind in (("model", dict), ("optimizer", dict), ("scheduler", dict), ("rng", dict), ("step", int)):
        if not isinstance(state.get(key), kind):
            raise ValueError(f"its '{key}' entry is missing or not a {kind.__name__}")
    if state["step"] < 0:
        raise ValueError(f"its step is {state['step']}")


def quarantine(path: Path) -> Path:
    """Move an unusable checkpoint aside as `<name>.corrupt` (kept for inspection, never loaded again)."""
    path = Path(path)
    dest = path.with_name(path.name + ".corrupt")
    os.replace(path, dest)
    return dest


def non_finite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors in `state` that hold a NaN or an infinity (one device sync in all)."""
    names = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel()]
    if not names:
        return []
    flags = [torch.isfinite(state[k]).all() for k in names]
    ok = torch.stack([f.to(flags[0].device) for f in flags]).tolist()
    return [name for name, good in zip(names, ok) if not good]
