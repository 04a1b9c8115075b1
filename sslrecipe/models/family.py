"""A backbone's family from its timm name, without torch or timm (the advisor and the recipe checks use it)."""

from __future__ import annotations

VIT_PREFIXES = ("vit_", "deit", "eva", "beit")


def backbone_family(timm_name: str) -> str:
    """`vit` for plain vision transformers, `cnn` for everything else timm builds."""
    return "vit" if timm_name.lower().startswith(VIT_PREFIXES) else "cnn"
