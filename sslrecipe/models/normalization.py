"""The input normalisation an encoder expects, which travels with its weights (``encoder.json``, ``detector.json``).

Every image reaches a model scaled to [0, 1] by the data's own normalisation (``data.normalize``: e.g. percentiles
of 16-bit thermal frames). The encoder then sees ``(x - mean) / std`` per channel, with the mean/std its weights
were trained with:

- scratch encoders and the project's own pre-trainings from random init: 0.5 / 0.25 on every channel (what the
  detector and every SSL method used before this was recorded; ``encoder.json`` files without ``mean``/``std``
  mean exactly this);
- public checkpoints: what their training used, ImageNet's RGB statistics for the survey's methods (the
  catalogue records each entry's values);
- a pre-training that starts from an encoder (``pretrain.init``, ``pretrain.first``) keeps that encoder's.

An encoder whose first layer was adapted to another channel count keeps the normalisation consistent with how
its kernels were adapted (timm's ``adapt_input_conv``): to 1 channel the kernels are summed over the RGB
channels, and the one channel's mean/std are the means of the RGB means and stds; to N channels the kernels
repeat the source channels cyclically, and so do the means and stds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from sslrecipe.errors import SSLRecipeError

#: The project's own normalisation (scratch encoders, pre-training from random init, old encoder.json files).
DEFAULT_MEAN = 0.5
DEFAULT_STD = 0.25
#: ImageNet's RGB statistics on [0, 1] inputs (torchvision / timm ``IMAGENET_DEFAULT_MEAN`` / ``_STD``).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``mean`` / ``std`` applied to [0, 1] inputs. One value stands for every channel."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        mean = tuple(float(v) for v in self.mean)
        std = tuple(float(v) for v in self.std)
        if not mean or not std:
            raise SSLRecipeError("normalization mean/std need at least one value each")
        if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
            raise SSLRecipeError(f"normalization needs finite means and positive stds, got mean {list(mean)} std {list(std)}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def default(cls) -> "Normalization":
        return cls((DEFAULT_MEAN,), (DEFAULT_STD,))

    @classmethod
    def imagenet(cls) -> "Normalization":
        return cls(IMAGENET_MEAN, IMAGENET_STD)

    @property
    def channels(self) -> int:
        return max(len(self.mean), len(self.std))

    def adapted(self, in_chans: int) -> "Normalization":
        """The values for an encoder with ``in_chans`` inputs whose first layer was adapted from these channels
        as timm's ``adapt_input_conv`` does (summed to 1 channel: the means; otherwise repeated cyclically)."""
        in_chans = int(in_chans)
        mean, std = self.mean, self.std
        if len(mean) == 1 and len(std) == 1:
            return Normalization(mean * in_chans, std * in_chans)
        if len(mean) == 1 or len(std) == 1:  # one value for every channel on one side: broadcast it first
            n = max(len(mean), len(std))
            mean, std = (mean * n if len(mean) == 1 else mean), (std * n if len(std) == 1 else std)
        if len(mean) != len(std):
            raise SSLRecipeError(f"normalization mean {list(mean)} and std {list(std)} have different lengths")
        if in_chans == len(mean):
            return Normalization(mean, std)
        if in_chans == 1:
            return Normalization((sum(mean) / len(mean),), (sum(std) / len(std),))
        return Normalization(tuple(mean[i % len(mean)] for i in range(in_chans)),
                             tuple(std[i % len(std)] for i in range(in_chans)))

    def for_channels(self, in_chans: int, where: str = "the encoder") -> "Normalization":
        """Exactly ``in_chans`` values: one value is broadcast, any other count that differs is an error."""
        if len(self.mean) in (1, in_chans) and len(self.std) in (1, in_chans):
            return Normalization(self.mean if len(self.mean) == in_chans else self.mean * in_chans,
                                 self.std if len(self.std) == in_chans else self.std * in_chans)
        raise SSLRecipeError(
            f"{where} records mean {list(self.mean)} / std {list(self.std)}, but the model takes {in_chans} "
            "input channel(s): give one value, or one per channel"
        )

    def to_meta(self) -> dict[str, list[float]]:
        """The ``mean``/``std`` fields of encoder.json / detector.json."""
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_values(cls, mean: Any, std: Any, where: str = "the encoder") -> "Normalization":
        def as_list(v: Any, key: str) -> list[float]:
            values = list(v) if isinstance(v, (list, tuple)) else [v]
            try:
                return [float(x) for x in values]
            except (TypeError, ValueError):
                raise SSLRecipeError(f"{where}: `{key}` must be a number or a list of numbers, got {v!r}") from None

        try:
            return cls(tuple(as_list(mean, "mean")), tuple(as_list(std, "std")))
        except SSLRecipeError as e:
            raise SSLRecipeError(f"{where}: {e}") from None

    @classmethod
    def from_meta(cls, meta: Optional[Mapping[str, Any]], in_chans: Optional[int] = None,
                  where: str = "encoder.json") -> "Normalization":
        """The normalisation ``encoder.json`` / ``detector.json`` records; files written before it was recorded
        (no ``mean``/``std``) mean the project's own 0.5 / 0.25. ``in_chans`` checks and broadcasts the count."""
        meta = meta or {}
        if "mean" not in meta and "std" not in meta:
            norm = cls.default()
        elif "mean" not in meta or "std" not in meta:
            raise SSLRecipeError(f"{where} has only one of `mean` / `std`; give both (or neither for 0.5 / 0.25)")
        else:
            norm = cls.from_values(meta["mean"], meta["std"], where)
        return norm.for_channels(int(in_chans), where) if in_chans is not None else norm

    def describe(self) -> str:
        def fmt(vs: Sequence[float]) -> str:
            return ", ".join(f"{v:.4g}" for v in vs)

        return f"mean [{fmt(self.mean)}], std [{fmt(self.std)}]"
