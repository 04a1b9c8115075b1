"""Backbones from timm, and the encoder exchange format every stage shares.

An *encoder* is a timm model built with ``num_classes=0`` (no classifier). Between stages it travels as
two files in one directory:

- ``encoder.safetensors``: the model's ``state_dict`` with timm's own key names (no ``module.`` /
  ``_orig_mod.`` / wrapper prefixes), contiguous CPU tensors;
- ``encoder.json``: ``{"timm_name": ..., "timm_kwargs": {...}, "mean": [...], "std": [...], ...extra}`` such that
  ``timm.create_model(timm_name, **timm_kwargs).load_state_dict(load_file("encoder.safetensors"), strict=True)``
  works with nothing but timm and safetensors installed, and ``(x - mean) / std`` (one value per input channel,
  on images scaled to [0, 1]) is the input the weights expect (:mod:`sslrecipe.models.normalization`; a file
  without ``mean``/``std`` means 0.5 / 0.25, the project's own). The safetensors header repeats them.

Both files are written atomically (temporary file + ``os.replace``) so a killed writer never leaves a
half-written encoder behind.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from sslrecipe.atomic import atomic_write_file, atomic_write_text
from sslrecipe.errors import SSLRecipeError
from sslrecipe.models.normalization import Normalization

ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_META = "encoder.json"

# Wrapper prefixes that are not part of timm's key names: DDP, torch.compile, our own detector body.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Attributes `create_backbone` leaves on the model so that export can find its timm spec.
_NAME_ATTR = "_sslrecipe_timm_name"
_KWARGS_ATTR = "_sslrecipe_timm_kwargs"
# ... and the input normalisation its weights expect (set by load_encoder, read by export and the detector).
_NORM_ATTR = "_sslrecipe_normalization"


def _close_timm_names(name: str, n: int = 5) -> list[str]:
    import timm

    names = timm.list_models()
    lowered = {m.lower(): m for m in names}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.6)
    if not close:  # e.g. "resnet" -> resnet10t, resnet14t, ...: fall back to a prefix match
        close = [m for m in lowered if m.startswith(name.lower())][:n]
    return [lowered[c] for c in close]


def timm_kwargs_of(in_chans: int = 3, **kwargs: Any) -> dict[str, Any]:
    """The complete ``timm.create_model`` keyword arguments of an encoder (what ``encoder.json`` stores).

    Always holds ``num_classes=0`` (no classifier) and ``in_chans``; never ``pretrained`` (weights come
    from our files, not timm's hub). The values must be JSON-serialisable.
    """
    out: dict[str, Any] = {k: v for k, v in kwargs.items() if k not in ("pretrained", "num_classes", "in_chans")}
    out["in_chans"] = int(in_chans)
    out["num_classes"] = 0
    try:
        json.dumps(out)
    except TypeError as e:
        raise SSLRecipeError(f"backbone kwargs must be plain JSON values (numbers, strings, lists): {e}") from None
    return dict(sorted(out.items()))


def create_backbone(name: str, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """A timm model without a classifier (``num_classes=0``), randomly initialised.

    ``in_chans`` adapts the first layer as timm does (1 for single-band thermal). The model remembers its
    timm name and kwargs so :func:`timm_spec_of` / :func:`export_encoder` can recover them.
    """
    import timm

    if not timm.is_model(name):
        close = _close_timm_names(name)
        hint = f" Did you mean {', '.join(close)}?" if close else " See timm.list_models() for the names."
        raise SSLRecipeError(f"unknown timm backbone {name!r}.{hint}")
    if kwargs.get("pretrained"):
        raise SSLRecipeError(
            "backbone kwargs cannot ask timm for pretrained weights; use weights.source: fetch (or file) instead"
        )
    tkw = timm_kwargs_of(in_chans=in_chans, **kwargs)
    try:
        model = timm.create_model(name, pretrained=False, **tkw)
    except TypeError as e:
        raise SSLRecipeError(f"timm model {name!r} does not accept these backbone kwargs {kwargs}: {e}") from None
    setattr(model, _NAME_ATTR, name)
    setattr(model, _KWARGS_ATTR, tkw)
    return model


def timm_spec_of(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """(timm_name, timm_kwargs) of a model made by :func:`create_backbone` or :func:`load_encoder`."""
    model = _unwrap(model)
    name = getattr(model, _NAME_ATTR, None)
    kwargs = getattr(model, _KWARGS_ATTR, None)
    if name is None or kwargs is None:
        raise SSLRecipeError(
            "this model carries no timm spec; build it with sslrecipe.models.backbone.create_backbone "
            "or pass timm_name and timm_kwargs explicitly"
        )
    return name, dict(kwargs)


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(model, "module"):
            model = model.module
        else:
            break
    return model


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if key.startswith(p):
                key = key[len(p):]
                changed = True
    return key


def _first_conv_in_chans(state: Mapping[str, torch.Tensor]) -> Optional[int]:
    for v in state.values():
        if v.ndim == 4:
            return int(v.shape[1])
    return None


def _expected_shapes(timm_name: str, timm_kwargs: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a fresh timm model with this spec, built on the meta device (no memory, fast)."""
    import timm

    try:
        with torch.device("meta"):
            ref = timm.create_model(timm_name, pretrained=False, **timm_kwargs)
    except Exception as e:  # unknown name, bad kwargs
        raise SSLRecipeError(f"cannot build timm model {timm_name!r} with {dict(timm_kwargs)}: {e}") from None
    return {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def _mismatch_message(got: Mapping[str, tuple], want: Mapping[str, tuple]) -> Optional[str]:
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    shape = sorted(k for k in set(got) & set(want) if tuple(got[k]) != tuple(want[k]))
    if not (missing or unexpected or shape):
        return None

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

    parts = []
    if missing:
        parts.append(f"missing keys: {few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {few(unexpected)}")
    if shape:
        parts.append(
            "shape mismatch: " + ", ".join(f"{k} {tuple(got[k])} vs {tuple(want[k])}" for k in shape[:5])
        )
    return "; ".join(parts)


def export_encoder(
    model: nn.Module,
    out_dir: Union[str, Path],
    timm_name: Optional[str] = None,
    timm_kwargs: Optional[Mapping[str, Any]] = None,
    extra: Optional[dict[str, Any]] = None,
    normalization: Optional[Normalization] = None,
) -> Path:
    """Write ``out_dir/encoder.safetensors`` and ``out_dir/encoder.json``; returns the safetensors path.

    ``model`` is the timm encoder (DDP / torch.compile wrappers are unwrapped). ``timm_name`` and
    ``timm_kwargs`` default to what :func:`create_backbone` recorded on the model. The key set and shapes
    are checked against a fresh ``timm.create_model(timm_name, **timm_kwargs)`` before anything is
    written, so the files always load strictly. ``extra`` is merged into ``encoder.json`` (e.g. the SSL
    method, the stage hash); it cannot override ``timm_name`` / ``timm_kwargs`` / ``mean`` / ``std``.
    ``normalization`` is the input normalisation the weights expect (default: what :func:`load_encoder`
    recorded on the model, else the project's 0.5 / 0.25), written per input channel.
    """
    from safetensors.torch import save_file

    model = _unwrap(model)
    if timm_name is None or timm_kwargs is None:
        rec_name, rec_kwargs = timm_spec_of(model)
        timm_name = timm_name or rec_name
        timm_kwargs = rec_kwargs if timm_kwargs is None else timm_kwargs

    state: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        key = _strip_prefixes(k)
        if key in state:
            raise SSLRecipeError(f"duplicate key {key!r} after removing wrapper prefixes")
        # clone: safetensors refuses tensors that share storage (tied weights, views)
        state[key] = v.detach().to("cpu").contiguous().clone()

    kwargs = dict(timm_kwargs)
    if "in_chans" not in kwargs:
        inferred = _first_conv_in_chans(state)
        if inferred is not None:
            kwargs["in_chans"] = inferred
    kwargs = timm_kwargs_of(**kwargs)  # adds num_classes=0, drops pretrained, checks JSON

    problem = _mismatch_message({k: tuple(v.shape) for k, v in state.items()}, _expected_shapes(timm_name, kwargs))
    if problem:
        raise SSLRecipeError(
            f"the encoder's weights do not match timm model {timm_name!r} with {kwargs}: {problem}"
        )

    norm = normalization or getattr(model, _NORM_ATTR, None) or Normalization.default()
    norm = norm.for_channels(int(kwargs.get("in_chans", 3)), "the encoder's normalization")
    meta: dict[str, Any] = {"timm_name": timm_name, "timm_kwargs": kwargs, **norm.to_meta()}
    meta.update({k: v for k, v in (extra or {}).items() if k not in meta})
    try:
        meta_text = json.dumps(meta, indent=2, sort_keys=False) + "\n"
    except TypeError as e:
        raise SSLRecipeError(f"encoder.json extra fields must be JSON values: {e}") from None

    out_dir = Path(out_dir)
    weights_path = out_dir / ENCODER_WEIGHTS
    header = {"format": "pt", "timm_name": timm_name, "timm_kwargs": json.dumps(kwargs, sort_keys=True),
              "mean": json.dumps(list(norm.mean)), "std": json.dumps(list(norm.std))}
    atomic_write_file(weights_path, lambda tmp: save_file(state, tmp, metadata=header))
    atomic_write_text(out_dir / ENCODER_META, meta_text)
    return weights_path


def encoder_paths(dir_or_file: Union[str, Path]) -> tuple[Path, Path]:
    """(encoder.safetensors, encoder.json) for a directory, or for either file of the pair."""
    p = Path(dir_or_file)
    if p.is_dir():
        weights, meta = p / ENCODER_WEIGHTS, p / ENCODER_META
    elif p.suffix == ".json":
        weights, meta = p.with_suffix(".safetensors"), p
    else:
        weights, meta = p, p.with_suffix(".json")
    for f in (weights, meta):
        if not f.is_file():
            raise SSLRecipeError(
                f"encoder file {f} not found (an encoder is {ENCODER_WEIGHTS} + {ENCODER_META} in one directory)"
            )
    return weights, meta


def load_encoder(dir_or_file: Union[str, Path], map_location: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Build the timm model described by ``encoder.json`` and load ``encoder.safetensors`` strictly.

    Returns ``(model, meta)`` where ``meta`` is the parsed ``encoder.json``; the model carries the normalisation
    it expects (:func:`normalization_of`).
    """
    import timm
    from safetensors.torch import load_file

    weights, meta_path = encoder_paths(dir_or_file)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SSLRecipeError(f"cannot read {meta_path}: {e}") from None
    if not isinstance(meta, dict) or "timm_name" not in meta or not isinstance(meta.get("timm_kwargs"), dict):
        raise SSLRecipeError(f"{meta_path} must hold {{\"timm_name\": ..., \"timm_kwargs\": {{...}}}}")
    name, kwargs = meta["timm_name"], dict(meta["timm_kwargs"])
    if not timm.is_model(name):
        raise SSLRecipeError(f"{meta_path}: unknown timm model {name!r} (is timm too old?)")
    try:
        state = load_file(str(weights), device=map_location)
    except Exception as e:
        raise SSLRecipeError(f"cannot read {weights}: {e}") from None
    try:
        # Built on the meta device (no random init, which is slow for big models), then the loaded
        # tensors are assigned in place of the meta ones.
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as e:
        raise SSLRecipeError(f"{meta_path}: cannot build timm model {name!r} with {kwargs}: {e}") from None
    problem = _mismatch_message(
        {k: tuple(v.shape) for k, v in state.items()}, {k: tuple(v.shape) for k, v in model.state_dict().items()}
    )
    if problem:
        raise SSLRecipeError(f"{weights} does not fit timm model {name!r} with {kwargs}: {problem}")
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        # non-persistent buffers (not in a state_dict) exist only after a real construction
        model = timm.create_model(name, pretrained=False, **kwargs)
        model.load_state_dict(state, strict=True)
    model.to(map_location)
    setattr(model, _NAME_ATTR, name)
    setattr(model, _KWARGS_ATTR, timm_kwargs_of(**kwargs))
    setattr(model, _NORM_ATTR, Normalization.from_meta(meta, int(kwargs.get("in_chans", 3)), str(meta_path)))
    return model, meta


def normalization_of(model: nn.Module) -> Optional[Normalization]:
    """The input normalisation recorded on an encoder by :func:`load_encoder` (None for a fresh model)."""
    return getattr(_unwrap(model), _NORM_ATTR, None)
