"""Convert SSL checkpoints in their official layouts into timm encoders (``encoder.safetensors`` + ``encoder.json``).

Loading never executes pickled code: safetensors files are read directly, anything else goes through
``torch.load(weights_only=True)``, which only rebuilds tensors, containers, numbers and strings. A small
allow-list adds types that are plain data (``argparse.Namespace`` in DINO/MAE checkpoints, numpy arrays in
detectron2-style files). A checkpoint that needs anything else (a pickled ``nn.Module``, a class from the
training code, a ``__reduce__`` that calls a function) is refused with an explanation.

Layouts (``--from``):

==============  ===========================================================================================
``dino``        backbone-only (``*_pretrain.pth``) or full (``student``/``teacher``/heads): keeps the teacher
``moco``        MoCo v1/v2/v3 ``state_dict`` with ``module.encoder_q.`` / ``base_encoder.``: keeps the query
                encoder, drops the key/momentum encoder, the queue and the projection head
``resim``       ReSim's MoCo checkpoint: as ``moco``, also drops the in-backbone FPN (``fpn_*``)
``mae``         ``{"model": ...}`` with or without the decoder: drops ``decoder_*`` and ``mask_token``
``spark``       timm-style backbone, or the "withdecoder" file (``module`` -> ``sparse_encoder.sp_cnn.``)
``leopart``     ``model.`` (student) / ``teacher.`` prefixes, flat or under Lightning's ``state_dict``: keeps the
                student (``model.``), as the official evaluation and README do; drops head and prototypes
``timm``        timm key names (any wrapper prefix such as ``module.`` is stripped)
``torchvision`` torchvision ResNets (same names as timm) and ViTs (``conv_proj``, ``encoder.layers``)
``detectron2``  detectron2 ResNets (``stem.conv1``, ``res2``..``res5``, numpy arrays), e.g. ReSim's backbone file
==============  ===========================================================================================
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import torch

from sslrecipe.errors import SSLRecipeError
from sslrecipe.models.normalization import Normalization
from sslrecipe.weights.catalogue import LAYOUTS

Warn = Callable[[str], None]

NON_COMMERCIAL_LAYOUTS = {"mae": "MAE", "resim": "ReSim"}


class UnsafeCheckpointError(SSLRecipeError):
    """The checkpoint can only be loaded by running code it names (arbitrary unpickling)."""


# --------------------------------------------------------------------------- safe loading


def _safe_globals() -> list:
    """Plain-data types allowed on top of torch's weights-only defaults."""
    import numpy as np

    allowed: list = [argparse.Namespace, np.ndarray, np.dtype]
    try:  # numpy >= 2 pickles as numpy._core, older files say numpy.core
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore
    allowed += [
        (_reconstruct, "numpy._core.multiarray._reconstruct"),
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        (scalar, "numpy._core.multiarray.scalar"),
        (scalar, "numpy.core.multiarray.scalar"),
    ]
    for name in dir(getattr(np, "dtypes", None) or object()):  # numpy 2 dtype classes, e.g. Float32DType
        obj = getattr(np.dtypes, name, None) if hasattr(np, "dtypes") else None
        if isinstance(obj, type) and name.endswith("DType"):
            allowed.append(obj)
    return allowed


def is_safetensors(path: Path) -> bool:
    """A safetensors file: 8-byte little-endian header length, then a JSON header."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n < 100_000_000


#: safetensors' own limit on the JSON header; a longer one is damage, not a header.
SAFETENSORS_MAX_HEADER = 100_000_000


def safetensors_problem(path: Path | str) -> Optional[str]:
    """Why ``path`` cannot be a complete safetensors file, judged from its header alone (None when it can be).

    Checked before the file reaches the safetensors reader so that a truncated or hostile file gets a message
    that says what is wrong: the length field, the JSON header, or tensor offsets beyond the end of the file.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        return f"it is {size} bytes long, shorter than the 8-byte header length a safetensors file starts with"
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > SAFETENSORS_MAX_HEADER:
            return f"its header length field says {n} bytes, more than safetensors allows ({SAFETENSORS_MAX_HEADER})"
        if n > size - 8:
            return f"its header length field says {n} bytes but only {size - 8} follow"
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return f"its header is not valid JSON ({e})"
    if not isinstance(header, dict):
        return f"its header is a JSON {type(header).__name__}, not an object of tensors"
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            return f"the header entry of tensor {name!r} has no data_offsets [begin, end]"
        if not 0 <= offsets[0] <= offsets[1] <= data:
            return f"tensor {name!r} has data_offsets {offsets}, outside the file's {data}-byte data section"
    return None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    problem = safetensors_problem(path)
    if problem is None:
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # dtype, shape or overlap errors the header check leaves to the reader
            problem = str(e) or type(e).__name__
        except BaseException as e:  # a Rust panic inside safetensors (pyo3's PanicException) is no Exception
            if type(e).__name__ != "PanicException":
                raise
            problem = f"the reader failed: {e}"
    raise SSLRecipeError(
        f"cannot read {path} as a safetensors file: {problem}. The file is truncated or damaged (or not a "
        "safetensors file): download or copy it again"
    )


def load_checkpoint(path: Path | str) -> Any:
    """Read a checkpoint without executing pickled code; raise :class:`UnsafeCheckpointError` if it needs that."""
    path = Path(path)
    if not path.is_file():
        raise SSLRecipeError(f"checkpoint {path} not found")
    if path.suffix.lower() == ".safetensors" or is_safetensors(path):
        return _load_safetensors(path)  # never torch.load: newer versions hand .safetensors files on unchecked
    use_mmap = zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as e:
        text = str(e)
        m = re.search(r"GLOBAL ([\w.]+)", text)
        if m is None and "reduce" not in text.lower():  # not a refused object: the pickle itself is damaged
            raise SSLRecipeError(
                f"cannot read {path} as a torch checkpoint or safetensors file ({_first_line(text)}); "
                "is the file complete? Download or copy it again"
            ) from None
        what = f"`{m.group(1)}`" if m else "objects other than tensors and plain containers"
        raise UnsafeCheckpointError(
            f"refused to load {path}: unpickling it would construct or call {what}, which can run arbitrary code. "
            "sslrecipe loads only safetensors files and torch files holding tensors, dicts, lists, numbers and "
            "strings (torch.load(weights_only=True)). If you trust where the file comes from, re-save just its "
            "tensors in a separate Python session, e.g. `sd = torch.load(SRC, weights_only=False)[...]; "
            "safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, 'clean.safetensors')`, "
            "and convert that file instead."
        ) from None
    except Exception as e:  # noqa: BLE001 - a damaged or hostile file may make the unpickler raise anything
        raise SSLRecipeError(
            f"cannot read {path} as a torch checkpoint or safetensors file ({type(e).__name__}: "
            f"{_first_line(str(e))}); is the file complete?"
        ) from None


def _first_line(text: str) -> str:
    """The line of an error that says what is wrong (torch puts the reason after a paragraph of advice)."""
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""


# --------------------------------------------------------------------------- state dict selection


def _to_tensor(v: Any) -> Optional[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        return v
    try:
        import numpy as np

        if isinstance(v, np.ndarray) and v.dtype != object:
            return torch.from_numpy(np.ascontiguousarray(v))
    except ImportError:  # pragma: no cover
        pass
    return None


def _tensor_count(d: Any) -> int:
    if not isinstance(d, Mapping):
        return 0
    return sum(1 for v in d.values() if _to_tensor(v) is not None)


def _has_tensors(d: Any, depth: int = 3) -> bool:
    if not isinstance(d, Mapping) or depth < 0:
        return False
    return any(_to_tensor(v) is not None or _has_tensors(v, depth - 1) for v in d.values())


_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state", "model_state_dict", "encoder", "ema")


def select_state_dict(
    obj: Any, layout: Optional[str], notes: list[str]
) -> tuple[dict[str, torch.Tensor], Optional[str]]:
    """The flat tensor mapping inside a checkpoint object, and a layout implied by its structure (or None).

    Descends through training-checkpoint wrappers (``state_dict``, ``model``, ``module``, ...) and, where a
    checkpoint holds a ``student`` and a ``teacher`` (DINO), picks the teacher.
    """
    implied = None
    if not isinstance(obj, Mapping):
        raise SSLRecipeError(f"the checkpoint holds a {type(obj).__name__}, not a state dict")
    cur: Mapping = obj
    for _ in range(4):
        if _tensor_count(cur) > 0 and not any(isinstance(cur.get(k), Mapping) for k in _WRAPPER_KEYS + ("teacher",)):
            break
        if isinstance(cur.get("teacher"), Mapping) and _has_tensors(cur["teacher"]):
            if isinstance(cur.get("student"), Mapping):
                notes.append("the checkpoint holds a student and a teacher: kept the teacher (EMA) weights")
            cur = cur["teacher"]
            implied = implied or "dino"
            continue
        for k in _WRAPPER_KEYS:
            if isinstance(cur.get(k), Mapping) and _has_tensors(cur[k]):
                cur = cur[k]
                break
        else:
            break
    out: dict[str, torch.Tensor] = {}
    for k, v in cur.items():
        t = _to_tensor(v)
        if t is not None:
            out[str(k)] = t
    if not out:
        raise SSLRecipeError(
            "found no tensors in the checkpoint (looked at the top level and under state_dict/model/module/teacher)"
        )
    return out, implied


def detect_layout(keys: Iterable[str]) -> str:
    """Guess the layout from key names (see the module docstring)."""
    keys = list(keys)
    ks = set(keys)

    def any_has(*parts: str) -> bool:
        return any(p in k for k in keys for p in parts)

    def any_starts(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if any_has("encoder_q."):
        return "resim" if any_has("fpn_lateral", "fpn_output") else "moco"
    if any_has("base_encoder.", "momentum_encoder."):
        return "moco"
    if any_starts("sparse_encoder.", "module.sparse_encoder."):
        return "spark"
    if any_starts("decoder_", "module.decoder_") or ("mask_token" in ks and any_has("blocks.")):
        return "mae"
    if "stem.conv1.weight" in ks or any_starts("res2.", "backbone.bottom_up.res2."):
        return "detectron2"
    if "conv_proj.weight" in ks or any_starts("encoder.layers.encoder_layer_"):
        return "torchvision"
    if any_has("prototypes") and any_starts("teacher.", "model.", "student."):
        return "leopart"
    return "timm"


# prefixes to try, in order of preference, per layout ('' = none)
_PREFIXES: dict[str, tuple[str, ...]] = {
    "dino": ("module.backbone.", "backbone.", "module.", ""),
    "moco": ("module.encoder_q.", "encoder_q.", "module.base_encoder.", "base_encoder.", "module.", ""),
    "resim": ("module.encoder_q.", "encoder_q.", "module.", ""),
    "mae": ("module.", ""),
    "spark": ("sparse_encoder.sp_cnn.", "module.sparse_encoder.sp_cnn.", "module.", ""),
    "leopart": ("model.", "student.", "teacher.", "module.", ""),  # the student first: what Leopart evaluates
    "timm": ("", "module.", "_orig_mod.", "model.", "backbone.", "encoder.", "module.backbone.", "trunk."),
    "torchvision": ("", "module.", "backbone.body.", "body.", "backbone."),
    "detectron2": ("", "backbone.bottom_up.", "module."),
}

_DROP_RULES: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile(p), reason)
    for p, reason in (
        (r"(^|\.)(encoder_k|momentum_encoder|key_encoder)\.", "momentum (key) encoder"),
        (r"(^|\.)queue(_ptr|_\w+)?$", "negative queue"),
        (r"(^|\.)(decoder_\w+|decoder|mask_token|dense_decoder)(\.|$)", "decoder and mask token"),
        (r"(^|\.)(densify_norms|densify_projs|mask_tokens|imn_m|imn_s|norm_black)(\.|$)", "SparK densify layers"),
        (r"(^|\.)fpn_(lateral|output)\d", "in-backbone FPN (ReSim)"),
        (r"(^|\.)(prototypes|predictor|projector|projection_head)(\.|$)", "projection head / prototypes"),
        (r"(^|\.)(head|heads|fc|classifier|head_dist|last_layer)(\.|$)", "classification / projection head"),
    )
)


def _drop_reason(key: str) -> Optional[str]:
    for pat, reason in _DROP_RULES:
        if pat.search(key):
            return reason
    return None


def _rename_torchvision_vit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        n = k
        n = re.sub(r"^class_token$", "cls_token", n)
        n = re.sub(r"^conv_proj\.", "patch_embed.proj.", n)
        n = re.sub(r"^encoder\.pos_embedding$", "pos_embed", n)
        n = re.sub(r"^encoder\.ln\.", "norm.", n)
        m = re.match(r"^encoder\.layers\.encoder_layer_(\d+)\.(.*)$", n)
        if m:
            i, rest = m.groups()
            rest = re.sub(r"^ln_1\.", "norm1.", rest)
            rest = re.sub(r"^ln_2\.", "norm2.", rest)
            rest = re.sub(r"^self_attention\.in_proj_weight$", "attn.qkv.weight", rest)
            rest = re.sub(r"^self_attention\.in_proj_bias$", "attn.qkv.bias", rest)
            rest = re.sub(r"^self_attention\.out_proj\.", "attn.proj.", rest)
            rest = re.sub(r"^mlp\.(0|linear_1)\.", "mlp.fc1.", rest)
            rest = re.sub(r"^mlp\.(3|linear_2)\.", "mlp.fc2.", rest)
            n = f"blocks.{i}.{rest}"
        out[n] = v
    return out


def _rename_detectron2(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        n = k
        if n.startswith("stem."):
            n = n[len("stem."):]
            n = re.sub(r"^conv1\.norm\.", "bn1.", n)
        m = re.match(r"^res(\d)\.(\d+)\.(.*)$", n)
        if m:
            stage, block, rest = m.groups()
            rest = re.sub(r"^conv(\d)\.norm\.", r"bn\1.", rest)
            rest = re.sub(r"^shortcut\.norm\.", "downsample.1.", rest)
            rest = re.sub(r"^shortcut\.weight$", "downsample.0.weight", rest)
            n = f"layer{int(stage) - 1}.{block}.{rest}"
        out[n] = v
    return out


def _score(sd: Mapping[str, torch.Tensor], prefix: str, target: Mapping[str, torch.Tensor]) -> int:
    n = 0
    for k, v in sd.items():
        if k.startswith(prefix):
            t = target.get(k[len(prefix):])
            if t is not None and t.ndim == v.ndim:
                n += 1
    return n


def _discovered_prefixes(keys: Iterable[str]) -> set[str]:
    out = {""}
    for k in keys:
        parts = k.split(".")
        for depth in (1, 2, 3):
            if len(parts) > depth:
                out.add(".".join(parts[:depth]) + ".")
    return out


def _choose_prefix(sd: Mapping[str, torch.Tensor], layout: str, target: Mapping[str, torch.Tensor]) -> str:
    """The preferred prefix that covers most of the target; else the best-covering prefix of any kind."""
    need = max(1, len(target) // 2)
    for p in _PREFIXES.get(layout, ("",)):
        if _score(sd, p, target) >= need:
            return p
    best, best_score = "", -1
    candidates = list(_PREFIXES.get(layout, ())) + sorted(_discovered_prefixes(sd) - set(_PREFIXES.get(layout, ())))
    for p in candidates:
        s = _score(sd, p, target)
        if s > best_score:
            best, best_score = p, s
    return best


# --------------------------------------------------------------------------- conversion


@dataclass
class Conversion:
    """The result of converting a checkpoint into a timm encoder."""

    timm_name: str
    timm_kwargs: dict[str, Any]
    layout: str
    state_dict: dict[str, torch.Tensor]  # complete: every key of the timm model
    loaded: list[str] = field(default_factory=list)  # target keys taken from the checkpoint
    missing: list[str] = field(default_factory=list)  # target keys left at their random init
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys that fit nowhere
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> number of checkpoint keys discarded on purpose
    prefix: str = ""
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # the input normalisation the converted encoder expects (the source's, adapted like the first layer)
    normalization: Optional[Normalization] = None

    def summary(self) -> dict[str, Any]:
        return {
            "layout": self.layout,
            "prefix": self.prefix,
            "loaded": len(self.loaded),
            "total": len(self.loaded) + len(self.missing),
            "missing_keys": self.missing,
            "unexpected_keys": self.unexpected,
            "dropped": self.dropped,
            "notes": self.notes,
        }


def _first_conv_keys(model: torch.nn.Module) -> list[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    fc = cfg.get("first_conv")
    names = [fc] if isinstance(fc, str) else list(fc or [])
    return [f"{n}.weight" for n in names]


def _adapt_first_conv(
    sd: dict[str, torch.Tensor], model: torch.nn.Module, target: Mapping[str, torch.Tensor], conv: Conversion
) -> None:
    from timm.models import adapt_input_conv

    for key in _first_conv_keys(model):
        w, t = sd.get(key), target.get(key)
        if w is None or t is None or w.ndim != 4 or w.shape == t.shape:
            continue
        if w.shape[0] != t.shape[0] or w.shape[2:] != t.shape[2:]:
            continue  # a different model: reported as a shape mismatch later
        src, dst = int(w.shape[1]), int(t.shape[1])
        sd[key] = adapt_input_conv(dst, w.float(), base_chans=src).to(w.dtype)
        how = "summed over the source channels" if dst == 1 else (
            f"source channels repeated and scaled by {src}/{dst}" if dst > src else
            f"the first {dst} source channels kept and scaled by {src}/{dst}"
        )
        conv.notes.append(f"adapted {key} from {src} to {dst} input channels as timm does ({how})")
        if src != 3 or dst not in (1, 3):
            conv.warnings.append(
                f"the checkpoint's first layer takes {src} channels and the backbone {dst}: adapted as timm does "
                f"({how}); check that this matches what your images carry"
            )


def _resample_vit(
    sd: dict[str, torch.Tensor], model: torch.nn.Module, target: Mapping[str, torch.Tensor], conv: Conversion
) -> None:
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    pw, tw = sd.get("patch_embed.proj.weight"), target.get("patch_embed.proj.weight")
    if (pw is not None and tw is not None and pw.ndim == 4
            and pw.shape[2:] != tw.shape[2:] and pw.shape[:2] == tw.shape[:2]):
        sd["patch_embed.proj.weight"] = resample_patch_embed(pw.float(), list(tw.shape[2:])).to(pw.dtype)
        conv.notes.append(f"resampled the patch embedding from {tuple(pw.shape[2:])} to {tuple(tw.shape[2:])}")
    pe, tp = sd.get("pos_embed"), target.get("pos_embed")
    if pe is None or tp is None or pe.shape == tp.shape or pe.ndim != 3 or pe.shape[-1] != tp.shape[-1]:
        return
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None:
        return
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    n_src = pe.shape[1] - prefix
    side = int(math.isqrt(n_src))
    if side * side != n_src:
        return
    sd["pos_embed"] = resample_abs_pos_embed(pe.float(), new_size=list(grid), old_size=[side, side],
                                             num_prefix_tokens=prefix).to(pe.dtype)
    conv.notes.append(f"resampled the position embedding from a {side}x{side} to a {grid[0]}x{grid[1]} grid")


def _set_normalization(conv: Conversion, sd: Mapping[str, torch.Tensor], model: torch.nn.Module, in_chans: int,
                       source: Optional[Normalization]) -> None:
    """``conv.normalization``: the source's mean/std, adapted to ``in_chans`` like the first layer's kernels."""
    src_chans = next((int(sd[k].shape[1]) for k in _first_conv_keys(model) if k in sd and sd[k].ndim == 4), None)
    if source is None:
        if src_chans not in (None, 3):
            source = Normalization.default()
            conv.warnings.append(
                f"the checkpoint's first layer takes {src_chans} channels and its input normalisation is unknown: "
                f"recorded the project's {source.describe()}; check what its training used")
        else:
            source = Normalization.imagenet()
    norm = source.adapted(in_chans)
    conv.normalization = norm
    how = ""
    if src_chans is not None and src_chans != in_chans and source.channels > 1:
        how = " (the means of the source channels' means and stds, as the first layer's kernels are summed)" \
            if in_chans == 1 else " (repeated like the first layer's kernels)"
    conv.notes.append(f"input normalization: {norm.describe()}{how}")


def convert_state(
    obj: Any,
    timm_name: str,
    in_chans: int = 3,
    layout: Optional[str] = None,
    timm_kwargs: Optional[Mapping[str, Any]] = None,
    normalization: Optional[Normalization] = None,
) -> Conversion:
    """Convert a loaded checkpoint object into the complete state dict of ``timm.create_model(timm_name, ...)``.

    ``normalization`` is the input normalisation the checkpoint was trained with (None: ImageNet's, what every
    supported layout's official training used, for a 3-channel first layer); the conversion's is that, adapted
    to ``in_chans`` as the first layer is (:meth:`Normalization.adapted`).
    """
    from sslrecipe.models.backbone import create_backbone, timm_kwargs_of

    if layout in (None, "", "auto"):
        layout = None
    elif layout not in LAYOUTS:
        raise SSLRecipeError(f"unknown checkpoint layout {layout!r}; use one of: auto, {', '.join(LAYOUTS)}")
    kwargs = {k: v for k, v in dict(timm_kwargs or {}).items() if k not in ("in_chans", "num_classes", "pretrained")}
    with torch.device("meta"):  # shapes and attributes only; real tensors are made for missing keys alone
        model = create_backbone(timm_name, in_chans=in_chans, **kwargs)
    target = model.state_dict()
    tkw = timm_kwargs_of(in_chans=in_chans, **kwargs)

    notes: list[str] = []
    flat, implied = select_state_dict(obj, layout, notes)
    detected = layout or implied or detect_layout(flat)
    conv = Conversion(timm_name=timm_name, timm_kwargs=tkw, layout=detected, state_dict={}, notes=notes)
    if layout is None:
        conv.notes.insert(0, f"layout detected from the keys: {detected}")

    prefix = _choose_prefix(flat, detected, target) if detected not in ("torchvision", "detectron2") else ""
    if detected in ("torchvision", "detectron2"):
        # strip a wrapper prefix first, then rename
        renamer = _rename_torchvision_vit if detected == "torchvision" else _rename_detectron2
        best, best_score = "", -1
        for p in _PREFIXES[detected]:
            s = _score(renamer({k[len(p):]: v for k, v in flat.items() if k.startswith(p)}), "", target)
            if s > best_score:
                best, best_score = p, s
        prefix = best
        used = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        outside = [k for k in flat if not k.startswith(prefix)]
        sd = renamer(used)
    else:
        sd = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        outside = [k for k in flat if not k.startswith(prefix)]
    conv.prefix = prefix
    if prefix:
        conv.notes.append(f"took the weights under `{prefix}`")
    leopart_pair = detected == "leopart" and prefix in ("model.", "student.") and any(k.startswith("teacher.") for k in flat)
    if leopart_pair:
        conv.notes.append(f"the checkpoint holds a student ({prefix}) and a teacher (teacher.): kept the student, "
                          "as Leopart's evaluation (keys starting with 'model') and README do")

    # keys outside the chosen sub-network: deliberate drops (or the other network of a pair)
    for k in outside:
        reason = _drop_reason(k)
        if reason is None and leopart_pair and k.startswith("teacher."):
            reason = "EMA teacher (student kept)"
        if reason is None and prefix.endswith(("encoder_q.", "base_encoder.")):
            reason = "outside the query encoder"
        if reason is None and detected == "spark":
            reason = "SparK decoder side"
        if reason is None:
            conv.unexpected.append(k)
        else:
            conv.dropped[reason] = conv.dropped.get(reason, 0) + 1

    _set_normalization(conv, sd, model, in_chans, normalization)
    _adapt_first_conv(sd, model, target, conv)
    _resample_vit(sd, model, target, conv)

    loaded: dict[str, torch.Tensor] = {}
    shape_errors: list[str] = []
    for k, v in sd.items():
        t = target.get(k)
        if t is None:
            reason = _drop_reason(k)
            if reason is not None:
                conv.dropped[reason] = conv.dropped.get(reason, 0) + 1
            else:
                conv.unexpected.append(prefix + k)
            continue
        if tuple(v.shape) != tuple(t.shape):
            shape_errors.append(f"{k}: checkpoint {tuple(v.shape)} vs {timm_name} {tuple(t.shape)}")
            continue
        loaded[k] = v.detach().to(dtype=t.dtype, device="cpu").contiguous()

    def counted(keys: Iterable[str]) -> list[str]:
        return [k for k in keys if not k.endswith("num_batches_tracked")]

    n_target = len(counted(target))
    n_loaded = len(counted(loaded))
    if shape_errors:
        few = "; ".join(shape_errors[:4]) + (f"; (+{len(shape_errors) - 4} more)" if len(shape_errors) > 4 else "")
        raise SSLRecipeError(
            f"the checkpoint does not fit {timm_name} (in_chans={in_chans}): {len(shape_errors)} tensors have other "
            f"shapes: {few}. Is it for another backbone? (layout {detected}, prefix `{prefix}`)"
        )
    if n_loaded < max(1, math.ceil(0.75 * n_target)):
        sample = ", ".join(list(flat)[:6])
        raise SSLRecipeError(
            f"the checkpoint does not fit {timm_name}: only {n_loaded} of its {n_target} tensors were found "
            "(at least 3/4 must be) "
            f"(layout {detected}, prefix `{prefix}`). The checkpoint's keys start like: {sample}. "
            "Pick the right backbone (--backbone / backbone.name) or layout (--from / weights.format)."
        )

    fresh: dict[str, torch.Tensor] = {
        k: torch.zeros(t.shape, dtype=t.dtype) for k, t in target.items() if k.endswith("num_batches_tracked")
    }
    if any(k not in loaded and k not in fresh for k in target):  # timm's random init for what the checkpoint lacks
        fresh.update(create_backbone(timm_name, in_chans=in_chans, **kwargs).state_dict())
    full = {k: (loaded[k] if k in loaded else fresh[k].detach().cpu().contiguous()) for k in target}
    conv.state_dict = full
    conv.loaded = sorted(loaded)
    conv.missing = sorted(k for k in counted(target) if k not in loaded)
    if conv.missing:
        conv.warnings.append(
            f"{len(conv.missing)} of {n_target} tensors of {timm_name} are not in the checkpoint and keep their "
            f"random initialisation: {', '.join(conv.missing[:6])}" + (" ..." if len(conv.missing) > 6 else "")
        )
    if conv.unexpected:
        conv.warnings.append(
            f"{len(conv.unexpected)} checkpoint tensors were not used: {', '.join(conv.unexpected[:6])}"
            + (" ..." if len(conv.unexpected) > 6 else "")
        )
    return conv


def convert_file(
    path: Path | str,
    timm_name: str,
    in_chans: int = 3,
    layout: Optional[str] = None,
    timm_kwargs: Optional[Mapping[str, Any]] = None,
    normalization: Optional[Normalization] = None,
) -> Conversion:
    """:func:`load_checkpoint` + :func:`convert_state`; ``normalization`` defaults to what the file records
    (:func:`recorded_normalization`), else ImageNet's."""
    if normalization is None:
        normalization = recorded_normalization(path)
    return convert_state(load_checkpoint(path), timm_name, in_chans, layout, timm_kwargs, normalization)


def recorded_normalization(path: Path | str) -> Optional[Normalization]:
    """The input normalisation an encoder.safetensors written by sslrecipe records in its header (files written
    before it was recorded: the project's 0.5 / 0.25); None for any other file."""
    import json

    path = Path(path)
    if not is_safetensors(path):
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception:  # noqa: BLE001 - a damaged file is reported by load_checkpoint
        return None
    if "timm_name" not in header:
        return None
    if "mean" not in header or "std" not in header:
        return Normalization.default()
    try:
        return Normalization.from_values(json.loads(header["mean"]), json.loads(header["std"]), str(path))
    except ValueError:
        return Normalization.default()


def write_encoder(conv: Conversion, out_dir: Path | str, extra: Optional[dict[str, Any]] = None) -> Path:
    """Write ``out_dir/encoder.safetensors`` + ``encoder.json`` (the format of :mod:`sslrecipe.models.backbone`)."""
    from sslrecipe.models.backbone import create_backbone, export_encoder

    kwargs = {k: v for k, v in conv.timm_kwargs.items() if k not in ("in_chans", "num_classes")}
    with torch.device("meta"):  # no random init: every tensor is assigned from the conversion
        model = create_backbone(conv.timm_name, in_chans=int(conv.timm_kwargs.get("in_chans", 3)), **kwargs)
    model.load_state_dict(conv.state_dict, strict=True, assign=True)
    meta = {"conversion": conv.summary()}
    meta.update(extra or {})
    export_encoder(model, out_dir, conv.timm_name, conv.timm_kwargs, extra=meta, normalization=conv.normalization)
    return Path(out_dir)


# --------------------------------------------------------------------------- the pipeline's entry point


def _default_warn(msg: str) -> None:
    warnings.warn(msg, UserWarning, stacklevel=3)


def resolve_weights(
    source: str,
    id_or_path: str,
    sha256: Optional[str],
    fmt: Optional[str],
    timm_name: str,
    in_chans: int,
    out_dir: Path | str,
    *,
    timm_kwargs: Optional[Mapping[str, Any]] = None,
    warn: Optional[Warn] = None,
    progress: Optional[bool] = None,
) -> Path:
    """Fetch (``source="fetch"``) or read (``"file"``) a checkpoint, convert it to ``timm_name`` with ``in_chans``
    inputs, and write ``out_dir/encoder.safetensors`` + ``encoder.json``. Returns ``out_dir``.

    Licence notices (MAE and ReSim weights are non-commercial), adaptations and missing keys are reported
    through ``warn(msg)`` (default: :func:`warnings.warn`) and recorded in ``encoder.json``.
    """
    from sslrecipe.weights.fetch import ChecksumError, _normalise_sha, fetch, sha256_file

    say = warn or _default_warn
    entry = None
    if source == "fetch":
        if not id_or_path:
            raise SSLRecipeError("weights.source is 'fetch' but no weights.id was given")
        got = fetch(id_or_path, sha256, warn=say, progress=progress)
        path, file_sha, entry = got.path, got.sha256, got.entry
    elif source == "file":
        if not id_or_path:
            raise SSLRecipeError("weights.source is 'file' but no weights.path was given")
        path = Path(id_or_path).expanduser()
        if not path.is_file():
            raise SSLRecipeError(f"weights.path {path} does not exist (or is not a file)")
        file_sha = sha256_file(path)
        expected = _normalise_sha(sha256, "weights.sha256")
        if expected is not None and file_sha != expected:
            raise ChecksumError(f"{path}: expected sha256 {expected}, got {file_sha}")
    else:
        raise SSLRecipeError(f"resolve_weights handles weights.source fetch or file, not {source!r}")

    layout = fmt or (entry.layout if entry is not None else None)
    if entry is not None:
        if entry.backbone != timm_name:
            say(f"{entry.name} was trained as {entry.backbone}; converting it to backbone {timm_name}")
        if entry.in_chans != in_chans:
            say(f"{entry.name} takes {entry.in_chans} input channels; the backbone has {in_chans}: "
                "the first layer is adapted")
    conv = convert_file(path, timm_name, in_chans, layout, timm_kwargs,
                        normalization=entry.normalization if entry is not None else None)
    if entry is None and conv.layout in NON_COMMERCIAL_LAYOUTS:
        say(
            f"licence: if this is the official {NON_COMMERCIAL_LAYOUTS[conv.layout]} release, its weights are "
            "CC-BY-NC-4.0 (NON-COMMERCIAL use only), and models fine-tuned from them inherit that restriction"
        )
    for w in conv.warnings:
        say(w)
    extra: dict[str, Any] = {
        "source": source,
        "id": str(id_or_path),
        "file": str(path),
        "file_sha256": file_sha,
    }
    if entry is not None:
        extra.update({
            "catalogue": entry.name, "method": entry.method, "licence": entry.licence,
            "non_commercial": entry.non_commercial, "paper": entry.paper,
        })
    elif conv.layout in NON_COMMERCIAL_LAYOUTS:
        extra["licence_note"] = f"layout {conv.layout}: the official release is CC-BY-NC-4.0"
    write_encoder(conv, out_dir, extra=extra)
    return Path(out_dir)
