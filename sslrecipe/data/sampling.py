"""Few-shot sampling and train/val/test splits of COCO dicts (seeded, deterministic).

Both functions return new COCO dicts that keep ``categories`` (and ``info``/``licenses`` when
present) and hold each selected image with all of its annotations.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from sslrecipe.errors import DataError


def _subset(coco: dict, image_ids: Iterable) -> dict:
    """A COCO dict restricted to ``image_ids`` (images keep their original order)."""
    wanted = set(image_ids)
    out = {key: value for key, value in coco.items() if key not in ("images", "annotations")}
    out["images"] = [image for image in coco["images"] if image["id"] in wanted]
    out["annotations"] = [ann for ann in coco["annotations"] if ann["image_id"] in wanted]
    out["categories"] = list(coco["categories"])
    return out


def _categories_per_image(coco: dict) -> dict:
    present: dict = {image["id"]: set() for image in coco["images"]}
    for ann in coco["annotations"]:
        if ann.get("iscrowd", 0) or ann.get("ignore", 0):
            continue  # an ignore region does not make a class "present"
        if ann["image_id"] in present:
            present[ann["image_id"]].add(ann["category_id"])
    return present


def sample_shots(coco: dict, shots: int, seed: int) -> dict:
    """A seeded subset of ``shots`` labeled images, with every category present where possible.

    Categories are covered first, rarest first: for each category not yet present in the
    selection, a random image that contains it is added (while shots remain). The remaining shots
    are filled with random images. With ``shots`` >= the number of images, all images are kept.
    """
    shots = int(shots)
    if shots < 1:
        raise DataError(f"data.shots must be at least 1, got {shots}")
    images = coco["images"]
    if shots >= len(images):
        return _subset(coco, [image["id"] for image in images])

    rng = np.random.default_rng(seed)
    order = [images[i]["id"] for i in rng.permutation(len(images))]
    rank = {image_id: r for r, image_id in enumerate(order)}
    present = _categories_per_image(coco)

    holders: dict = {}  # category -> image ids containing it, in random order
    for image_id in order:
        for cat in present[image_id]:
            holders.setdefault(cat, []).append(image_id)
    category_order = sorted(holders, key=lambda cat: (len(holders[cat]), str(cat)))

    chosen: list = []
    chosen_set: set = set()
    covered: set = set()
    for cat in category_order:
        if len(chosen) >= shots:
            break
        if cat in covered:
            continue
        image_id = holders[cat][int(rng.integers(len(holders[cat])))]
        chosen.append(image_id)
        chosen_set.add(image_id)
        covered |= present[image_id]
    for image_id in order:
        if len(chosen) >= shots:
            break
        if image_id not in chosen_set:
            chosen.append(image_id)
            chosen_set.add(image_id)
    out = _subset(coco, chosen_set)
    out["images"].sort(key=lambda image: rank[image["id"]])
    return out


def _split_sizes(n: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder rounding of n * fractions; every positive fraction gets >= 1 when n allows."""
    raw = [n * f for f in fractions]
    sizes = [math.floor(x) for x in raw]
    remainders = sorted(range(len(raw)), key=lambda i: (-(raw[i] - sizes[i]), i))
    for i in remainders[: n - sum(sizes)]:
        sizes[i] += 1
    wanted = [i for i, f in enumerate(fractions) if f > 0]
    if n >= len(wanted):
        for i in wanted:
            if sizes[i] == 0:
                donor = max(range(len(sizes)), key=lambda j: (sizes[j], -j))
                sizes[donor] -= 1
                sizes[i] += 1
    return sizes


def split_coco(coco: dict, fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0) -> tuple[dict, dict, dict]:
    """Split a COCO dict into disjoint (train, val, test) dicts by image, seeded.

    Sizes are ``fractions * n_images`` rounded so they sum to the image count; each part with a
    positive fraction gets at least one image when there are enough images. Every image lands in
    exactly one part, together with all of its annotations.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(
            f"data.split must be three non-negative fractions [train, val, test] summing to 1, got {list(fractions)}"
        )
    images = coco["images"]
    n = len(images)
    sizes = _split_sizes(n, fractions)
    order = np.random.default_rng(seed).permutation(n)
    parts = []
    start = 0
    for size in sizes:
        ids = [images[i]["id"] for i in order[start : start + size]]
        parts.append(_subset(coco, ids))
        start += size
    return parts[0], parts[1], parts[2]
