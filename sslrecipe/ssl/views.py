"""Augmentations for SSL views on ``C x H x W`` float tensors in [0, 1], driven by a ``numpy.random.Generator``.

The pipeline hands every method ``views(image, rng)`` with ``rng = numpy.random.default_rng(sample_seed)``;
all randomness here comes from that generator, so a view depends only on (image, sample seed) and resume is
exact. The operations reproduce the torchvision/PIL transforms used by the official MAE and DINO code:

- :func:`random_resized_crop_box`: ``torchvision.transforms.RandomResizedCrop.get_params`` (10 tries of a
  random area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``, then the central fallback).
- :func:`resized_crop`: bicubic resize with antialiasing (PIL's bicubic filter antialiases when shrinking),
  clamped to [0, 1] as an 8-bit PIL image would be.
- :func:`color_jitter`: ``ColorJitter`` (random order of brightness/contrast/saturation/hue, factors drawn
  uniformly) through torchvision's tensor kernels.
- :func:`gaussian_blur`: DINO's ``GaussianBlur`` (sigma ~ U(0.1, 2) pixels). **Simplification:** PIL's
  ``ImageFilter.GaussianBlur`` approximates a Gaussian with three box blurs; here it is a true Gaussian kernel
  of size ``2*ceil(3 sigma)+1`` with reflect padding.
- :func:`solarize`: PIL ``ImageOps.solarize`` (threshold 128 of 255): values ``>= 128/255`` become ``1 - x``.

Single-channel (thermal) and other non-RGB inputs — what is done, per operation:

- crops, flips, blur, solarize and the brightness and contrast jitters act on any number of channels
  (contrast blends with the mean of the grayscale image, which for 1 channel is the channel mean);
- saturation and hue jitters are no-ops on 1 channel (torchvision and PIL behave the same on "L" images:
  a gray image has no saturation or hue), and random grayscale is a no-op (the image is already gray);
- with 2 or >= 4 channels (no RGB meaning), saturation, hue and grayscale are skipped and brightness and
  contrast are applied with the mean over all channels.

Normalisation: views are normalised with :func:`normalize`, ``(x - mean) / std`` per channel, with the mean/std
of the method (``SSLMethod.input_mean`` / ``input_std``): the project's own 0.5 / 0.25 (``NORM_MEAN`` /
``NORM_STD``) when pre-training from random init, or the values of the encoder a pre-training starts from
(``pretrain.init`` / ``pretrain.first``; e.g. ImageNet statistics for public DINO weights). The exported encoder
records them in ``encoder.json`` and the detector applies the same (sslrecipe.models.normalization), so the
encoder sees the same input distribution in pre-training and fine-tuning.
"""

from __future__ import annotations

import math
from typing import Annotated, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import AfterValidator

from sslrecipe.models.normalization import DEFAULT_MEAN as NORM_MEAN, DEFAULT_STD as NORM_STD

Box = tuple[int, int, int, int]  # (top, left, height, width) in the source image's pixels


def _check_crop_scale(v: tuple[float, float]) -> tuple[float, float]:
    if not 0 < v[0] <= v[1] <= 1:
        raise ValueError("must be [min, max] with 0 < min <= max <= 1")
    return v


# a RandomResizedCrop area range, as every method's options declare it
CropScale = Annotated[tuple[float, float], AfterValidator(_check_crop_scale)]


def random_resized_crop_box(
    height: int, width: int, rng: np.random.Generator, scale: Sequence[float], ratio: Sequence[float] = (3 / 4, 4 / 3)
) -> Box:
    """torchvision's ``RandomResizedCrop.get_params`` with a numpy generator."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(img: torch.Tensor, box: Box, size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """Crop ``box`` out of ``img`` (C, H, W) and resize it to ``size x size`` (antialiased, clamped to [0, 1]).

    ``interpolation`` is ``bicubic`` (MAE, DINO) or ``bilinear`` (torchvision's default, used by Leopart).
    """
    top, left, h, w = box
    crop = img[:, top : top + h, left : left + w].unsqueeze(0).float()
    out = F.interpolate(crop, size=(size, size), mode=interpolation, align_corners=False, antialias=True)
    return out.squeeze(0).clamp_(0.0, 1.0)


def random_resized_crop(
    img: torch.Tensor, size: int, rng: np.random.Generator, scale: Sequence[float], ratio: Sequence[float] = (3 / 4, 4 / 3),
    interpolation: str = "bicubic",
) -> tuple[torch.Tensor, Box]:
    box = random_resized_crop_box(int(img.shape[-2]), int(img.shape[-1]), rng, scale, ratio)
    return resized_crop(img, box, size, interpolation), box


def random_hflip(img: torch.Tensor, rng: np.random.Generator, p: float = 0.5) -> torch.Tensor:
    return img.flip(-1) if rng.random() < p else img


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: float) -> torch.Tensor:
    return (ratio * a + (1.0 - ratio) * b).clamp(0.0, 1.0)


def _gray(img: torch.Tensor) -> torch.Tensor:
    """Luma of an RGB image (ITU-R 601-2, as PIL/torchvision), or the channel mean otherwise; (1, H, W)."""
    if img.shape[0] == 3:
        r, g, b = img[0], img[1], img[2]
        return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(0)
    return img.mean(dim=0, keepdim=True)


def color_jitter(
    img: torch.Tensor, rng: np.random.Generator, brightness: float, contrast: float, saturation: float, hue: float
) -> torch.Tensor:
    """torchvision ``ColorJitter``: the four adjustments in a random order with uniformly drawn factors."""
    import torchvision.transforms.v2.functional as TF

    order = rng.permutation(4)
    b = rng.uniform(max(0.0, 1 - brightness), 1 + brightness) if brightness > 0 else None
    c = rng.uniform(max(0.0, 1 - contrast), 1 + contrast) if contrast > 0 else None
    s = rng.uniform(max(0.0, 1 - saturation), 1 + saturation) if saturation > 0 else None
    h = rng.uniform(-hue, hue) if hue > 0 else None
    rgb = img.shape[0] == 3
    for fn in order:
        if fn == 0 and b is not None:
            img = (img * b).clamp(0.0, 1.0)
        elif fn == 1 and c is not None:
            img = _blend(img, _gray(img).mean(), c)
        elif fn == 2 and s is not None and rgb:  # no-op on 1 channel (as torchvision/PIL); skipped otherwise
            img = TF.adjust_saturation_image(img, s)
        elif fn == 3 and h is not None and rgb:
            img = TF.adjust_hue_image(img, h)
    return img


def random_color_jitter(
    img: torch.Tensor, rng: np.random.Generator, p: float, brightness: float, contrast: float, saturation: float, hue: float
) -> torch.Tensor:
    """``RandomApply([ColorJitter(...)], p)``."""
    if rng.random() < p:
        return color_jitter(img, rng, brightness, contrast, saturation, hue)
    return img


def random_grayscale(img: torch.Tensor, rng: np.random.Generator, p: float) -> torch.Tensor:
    """``RandomGrayscale(p)``: RGB -> 3 equal luma channels; a no-op for other channel counts."""
    if rng.random() < p and img.shape[0] == 3:
        return _gray(img).expand(3, -1, -1).contiguous()
    return img


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur with std ``sigma`` pixels (kernel ``2*ceil(3 sigma)+1``, reflect padding)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    radius = min(radius, (min(img.shape[-2:]) - 1))  # reflect padding needs pad < size
    if radius < 1:
        return img
    xs = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (xs / sigma) ** 2)
    k = k / k.sum()
    c = img.shape[0]
    x = F.pad(img.unsqueeze(0), (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x.squeeze(0)


def random_gaussian_blur(
    img: torch.Tensor, rng: np.random.Generator, p: float, sigma: Sequence[float] = (0.1, 2.0)
) -> torch.Tensor:
    """DINO's ``GaussianBlur(p)``: with probability p, blur with sigma ~ U(sigma)."""
    if rng.random() < p:
        return gaussian_blur(img, float(rng.uniform(sigma[0], sigma[1])))
    return img


def solarize(img: torch.Tensor, threshold: float = 128 / 255) -> torch.Tensor:
    return torch.where(img >= threshold, 1.0 - img, img)


def random_solarize(img: torch.Tensor, rng: np.random.Generator, p: float) -> torch.Tensor:
    """DINO's ``Solarization(p)``."""
    return solarize(img) if rng.random() < p else img


def normalize(img: torch.Tensor, mean: float | Sequence[float] = NORM_MEAN,
              std: float | Sequence[float] = NORM_STD) -> torch.Tensor:
    """``(img - mean) / std`` per channel of a ``(..., C, H, W)`` tensor in [0, 1]; one value for all channels,
    or one per channel."""
    m = torch.as_tensor(mean, dtype=img.dtype, device=img.device).reshape(-1, 1, 1)
    s = torch.as_tensor(std, dtype=img.dtype, device=img.device).reshape(-1, 1, 1)
    return (img - m) / s


# --------------------------------------------------------------------------- method options
# (kept here because every method, CNN or ViT, imports this module; it could move to registry.py)


def parse_options(model_cls, options: dict, method: str):
    """Validate ``pretrain.options.<method>`` with the pydantic model ``model_cls`` (which must forbid extra keys).

    Errors name the full recipe key (``pretrain.options.mae.mask_ratio: ...``) and suggest the closest valid
    key for a typo.
    """
    import difflib

    from pydantic import ValidationError

    from sslrecipe.errors import RecipeError

    try:
        return model_cls(**dict(options or {}))
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            key = f"pretrain.options.{method}.{loc}" if loc else f"pretrain.options.{method}"
            if err["type"] == "extra_forbidden":
                close = difflib.get_close_matches(str(err["loc"][0]), list(model_cls.model_fields), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(model_cls.model_fields)}"
                lines.append(f"{key}: unknown option{hint}")
            else:
                lines.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
        raise RecipeError("invalid pre-training options:\n  " + "\n  ".join(lines)) from None
