"""Helpers shared by the fidelity recorders in this folder (issue 14, item 8).

Nothing here belongs to an official repository: these are the fixed-weight, fixed-input and recording conventions
the three scripts share, and the thin stand-ins that let official GPU/cluster code run in one CPU process (each one
named where it is installed, with the reason).

File conventions (the same as ``spark.py``): ``tests/data/fidelity/<name>.safetensors`` holds the official weights
before the first step (``official/<key>``; every float rounded to a float16 value before use, so float16 storage is
exact), the inputs (``input/<name>``) and the whole change of a few parameters (``delta<step>/<key>``, and
``grad/<key>`` for their gradients); ``<name>.json`` holds the numbers, the settings, the commit and the command.
"""

from __future__ import annotations

import contextlib
import io
import json
import platform
import subprocess
import sys
import types
from pathlib import Path
from typing import Iterable, Mapping

import torch

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "data" / "fidelity"


def official_commit(official: Path, given: str | None) -> str:
    """The commit of the official checkout: ``--commit``, else ``git rev-parse HEAD`` in it."""
    if given:
        return given
    try:
        return subprocess.run(["git", "-C", str(official), "rev-parse", "HEAD"], check=True, capture_output=True,
                              text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        raise SystemExit(f"{official} is not a git checkout: give its commit with --commit") from None


def check_commit(commit: str, expected: str, what: str) -> None:
    if commit != expected:
        print(f"note: commit {commit} is not {expected}, the one the project's {what} cites", file=sys.stderr)


def quiet():
    """The official code prints models, settings and progress: kept out of this script's output."""
    return contextlib.redirect_stdout(io.StringIO())


# --------------------------------------------------------------------------- fixed weights


@torch.no_grad()
def perturb_1d(named_params: Iterable[tuple[str, torch.Tensor]], generator: torch.Generator) -> None:
    """Norm weights near 1 and biases near 0 instead of the init's exact 1 / 0, so every parameter takes part in the
    numbers compared (a zero bias and a unit scale hide a mix-up of the two)."""
    for name, p in named_params:
        if p.ndim == 1 and p.requires_grad:
            noise = torch.rand(p.shape, generator=generator) * 2 - 1
            p.copy_(1 + 0.5 * noise if name.endswith("weight") or name.endswith("weight_g") else 0.1 * noise)


@torch.no_grad()
def round_to_half(params: Iterable[torch.Tensor]) -> None:
    """Make every given float tensor exactly representable in float16 (stored in half the bytes; the computation
    stays float32 on both sides)."""
    for t in params:
        if t.is_floating_point():
            t.copy_(t.half().float())


def half_exact(t: torch.Tensor) -> torch.Tensor:
    return t.half().float()


# --------------------------------------------------------------------------- stand-ins for one CPU process


@contextlib.contextmanager
def cuda_calls_on_cpu():
    """Stand-in: official training loops move batches with ``.cuda()`` and call ``torch.cuda.synchronize()``; in
    one CPU process the first is the identity and the second has nothing to wait for."""
    saved = torch.Tensor.cuda, torch.cuda.synchronize
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.cuda.synchronize = lambda *args, **kwargs: None
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.cuda.synchronize = saved


def single_process_group() -> None:
    """A real ``torch.distributed`` group of one CPU process (gloo), so official code that all-reduces (DINO's
    center) or wraps models in DistributedDataParallel runs unchanged."""
    import socket
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


class FixedBatches:
    """A data loader that yields the given batches while reporting ``length`` batches per epoch, so an official
    epoch loop (``it = len(data_loader) * epoch + i``) runs exactly these iterations at that point of its schedule."""

    def __init__(self, batches: list, length: int):
        self.batches = list(batches)
        self.length = int(length)

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        return iter(self.batches)


def no_tensorboard_shim() -> None:
    """Stand-in: official entry modules import ``torch.utils.tensorboard`` for their logger, unused here."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        tb = types.ModuleType("torch.utils.tensorboard")

        class SummaryWriter:  # noqa: D401 - stand-in
            def __init__(self, *args, **kwargs):
                raise RuntimeError("tensorboard stand-in: not used by the fidelity scripts")

        tb.SummaryWriter = SummaryWriter
        sys.modules["torch.utils.tensorboard"] = tb


# --------------------------------------------------------------------------- recording


def norms(tensors: Mapping[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.detach().double().norm()) for k, v in tensors.items()}


def fingerprint(t: torch.Tensor) -> float:
    """``<t, w>`` with the fixed unit vector ``w_i ~ sin(i + 1)`` over the flattened tensor: unlike a norm or a sum it
    changes when entries are permuted or their signs flip; ``|fingerprint| <= norm``. The tests compute the same."""
    flat = t.detach().double().flatten()
    w = torch.sin(torch.arange(1, flat.numel() + 1, dtype=torch.float64))
    return float(flat @ (w / w.norm()))


def fingerprints(tensors: Mapping[str, torch.Tensor]) -> dict[str, float]:
    return {k: fingerprint(v) for k, v in tensors.items()}


def snapshot(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in named}


def changes(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: after[k].double() - before[k].double() for k in before}


def without_key_bias(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The key third of every attention ``qkv.bias`` set to 0. It gets no gradient in exact arithmetic (it shifts all
    of a query's logits by one amount, which the softmax ignores): its float gradient is rounding noise, which
    Adam's first steps scale up to about the lr, so it cannot be compared. The tests leave it out the same way."""
    out = {}
    for k, v in tensors.items():
        if k.endswith("attn.qkv.bias"):
            v = v.clone()
            d = v.shape[0] // 3
            v[d : 2 * d] = 0
        out[k] = v
    return out


def write(name: str, tensors: dict[str, torch.Tensor], record: dict, out: Path = OUT) -> None:
    """``<out>/<name>.safetensors`` (float tensors stored as given) and ``<out>/<name>.json``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"{name}.safetensors"),
              metadata={"official_commit": record["official_commit"],
                        "note": f"inputs and weights of tests/test_fidelity_{record['method']}.py"})
    record = {**record, "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                     **record.get("versions", {})},
              "command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:])}
    (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    size = (out / f"{name}.safetensors").stat().st_size
    print(f"wrote {out / (name + '.json')} and {name}.safetensors ({size / 1024:.0f} KiB)")
