"""The SSL method registry: name -> builder, with the backbone families each method supports.

Contract of a method (see docs/architecture.md): an `SSLMethod` is an nn.Module built from a timm
backbone name and its options; `views(image, rng)` makes the augmented views of one image (numpy
Generator, so augmentation is reproducible and resumable); `forward(batch)` returns a dict of
losses with the total under "loss"; `after_step(step, total)` updates its own state (EMA teachers,
temperatures, centers, queues); `encoder()` returns the timm backbone to export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from sslrecipe.errors import SSLRecipeError
from sslrecipe.models.family import backbone_family
from sslrecipe.models.normalization import DEFAULT_MEAN, DEFAULT_STD


def is_convnext(timm_name: str) -> bool:
    """A ConvNeXt (v1 or v2): SparK's official code switches its defaults on ``'convnext' in model``."""
    return "convnext" in timm_name.lower()


class SSLMethod(nn.Module):
    """Base class of every SSL method."""

    name: str = ""
    #: per-channel normalisation of the [0, 1] views (views.normalize); the project's 0.5 / 0.25 unless the
    #: pre-training starts from an encoder that expects other values (set_input_normalization)
    input_mean: tuple[float, ...] = (DEFAULT_MEAN,)
    input_std: tuple[float, ...] = (DEFAULT_STD,)

    def set_input_normalization(self, mean, std) -> None:
        """Normalise the views as the encoder it starts from expects (its encoder.json's ``mean`` / ``std``)."""
        self.input_mean = tuple(float(v) for v in mean)
        self.input_std = tuple(float(v) for v in std)

    def views(self, image: torch.Tensor, rng) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def after_step(self, step: int, total: int) -> None:
        """Called after every optimizer step (EMA updates, schedules)."""

    def encoder(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def export_extra(self, out_dir) -> list:
        """Write extra pretrained parts beside the encoder (e.g. ReSim's FPN as encoder_fpn.safetensors)."""
        return []

    def teacher_encoder(self) -> Optional[nn.Module]:
        """The EMA/momentum teacher's backbone, if the method has one (it must start equal to the student)."""
        return getattr(self, "teacher_backbone", None)

    def load_encoder_weights(self, state: dict) -> None:
        """Start from given encoder weights (`pretrain.init`): the student, and the teacher with it."""
        self.encoder().load_state_dict(state, strict=True)
        teacher = self.teacher_encoder()
        if teacher is not None:
            teacher.load_state_dict(state, strict=True)

    def param_groups(self, weight_decay: float) -> list[dict]:
        from sslrecipe.engine.schedules import param_groups_with_decay

        return param_groups_with_decay(self, weight_decay)

    def collate(self, items: list) -> Any:
        return torch.utils.data.default_collate(items)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    families: tuple[str, ...]
    build: Callable[..., SSLMethod]  # build(timm_name, in_chans, img_size, options: dict, timm_kwargs: dict)
    summary: str
    # the official recipe's optimizer/schedule keys as a function of the backbone's timm name
    optim_defaults: Optional[Callable[[str], dict]] = None


_REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, families: tuple[str, ...], summary: str, optim_defaults=None):
    """Register a builder. `optim_defaults`: the official recipe's `pretrain.*` optimizer keys (a dict, or a
    callable timm_name -> dict when they depend on the architecture, e.g. ResNet vs ConvNeXt: use
    `backbone_family` / `is_convnext`); they fill every key the recipe leaves unset (see `apply_method_defaults`)."""

    def deco(build):
        defaults = optim_defaults if callable(optim_defaults) or optim_defaults is None else (lambda timm_name: optim_defaults)
        _REGISTRY[name] = MethodSpec(name, families, build, summary, defaults)
        return build

    return deco


def available() -> dict[str, MethodSpec]:
    _import_methods()
    return dict(_REGISTRY)


def _import_methods() -> None:
    import importlib
    import pkgutil

    import sslrecipe.ssl as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in ("registry",) and not info.name.startswith("_"):
            importlib.import_module(f"sslrecipe.ssl.{info.name}")


def create_method(name: str, timm_name: str, in_chans: int, img_size: int, options: Optional[dict] = None,
                  timm_kwargs: Optional[dict] = None, key: str = "pretrain.method") -> SSLMethod:
    """The one door to a method; `key` is the recipe key that chose it (for error messages)."""
    methods = available()
    family = backbone_family(timm_name)
    if name not in methods:
        raise SSLRecipeError(f"unknown {key} '{name}'; methods: {', '.join(sorted(methods))}")
    spec = methods[name]
    if family not in spec.families:
        fitting = sorted(n for n, s in methods.items() if family in s.families)
        raise SSLRecipeError(
            f"{key} '{name}' supports {', '.join(spec.families)} backbones, but backbone.name "
            f"'{timm_name}' is a {family}; choose a {' or '.join(spec.families)} backbone, or a method for "
            f"{family} backbones: {', '.join(fitting) or 'none yet'}"
        )
    return spec.build(timm_name=timm_name, in_chans=in_chans, img_size=img_size, options=dict(options or {}),
                      timm_kwargs=dict(timm_kwargs or {}))


def apply_method_defaults(recipe):
    """The recipe with the pre-training method's official optimizer keys filled in wherever the user set
    none (pydantic's `model_fields_set`), so `resolved.yaml` shows what really runs; `pretrain.first` likewise."""
    if recipe.weights.source != "pretrain" or not recipe.pretrain.method:
        return recipe
    def unset_defaults(p) -> dict:
        spec = available().get(p.method) if p.method else None
        if spec is None or spec.optim_defaults is None:
            return {}
        defaults = spec.optim_defaults(recipe.backbone.name) or {}
        return {k: v for k, v in defaults.items() if k not in p.model_fields_set and k in type(p).model_fields}

    main = unset_defaults(recipe.pretrain)
    first = unset_defaults(recipe.pretrain.first) if recipe.pretrain.first is not None else {}
    if not main and not first:
        return recipe
    data = recipe.model_dump(mode="json")
    data["pretrain"].update(main)
    if first:
        data["pretrain"]["first"].update(first)
    return type(recipe).model_validate(data)
