"""Synthetic infrared UAV scenes with small vehicles and people, written as PNG images + COCO JSON.

The generator needs no download and is deterministic by seed: the same arguments give
byte-identical files. Each image is rendered from its own random stream (seeded by
``[seed, image index]``), so image *i* does not depend on how many images are generated.

A scene is a temperature map built from layers, then passed through a simple sensor model:

* ground: a smooth large-scale temperature field, fields/patches (a Voronoi partition, some
  with plough stripes) separated by hedgerows, fine vegetation texture, tree clusters;
* roads: curved polylines with soft edges, dashed centre lines on wide roads;
* buildings: rotated rectangles with heated (day) or cool (night) roofs, wall outlines and
  small rooftop units;
* objects: vehicles (rotated rectangles with an engine hot spot, four wheels, a cooler
  windshield and an exhaust), mostly aligned with roads; people (small elongated blobs with a
  warm head). Box sizes are 6-40 px on their longest side;
* polarity: objects are warm at night and usually by day, but in some scenes they are cold on
  a hot background (parked cars in the sun), and by day single objects may be cold;
* sensor: optical blur, vignetting, temporal and fixed-pattern (column/row) noise, then an
  automatic-gain stretch to the output bit depth.

Every box is the tight pixel extent of what was drawn for its object, clipped to the image.
Objects never overlap each other and never sit on buildings.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image

from sslrecipe.atomic import atomic_write_text
from sslrecipe.errors import DataError

#: COCO categories written by the generator (ids are stable across versions).
CATEGORIES = [{"id": 1, "name": "vehicle"}, {"id": 2, "name": "person"}]

#: Bumped whenever the rendering changes, so cached synthetic datasets are regenerated.
GENERATOR_VERSION = 1

MIN_OBJECT_PX = 6
MAX_OBJECT_PX = 40

_VEHICLE, _PERSON = 1, 2
_BOX_THRESHOLD = 0.25  # a pixel belongs to an object when its coverage exceeds this
_IMAGE_PREFIX = "synth_"


# --------------------------------------------------------------------------- small array helpers


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: float) -> np.ndarray:
    """Zero-mean, unit-ish smooth random field: separable smoothstep interpolation of a coarse grid."""
    gh = max(1, int(round(cells * h / max(h, w))))
    gw = max(1, int(round(cells * w / max(h, w))))
    grid = rng.standard_normal((gh + 1, gw + 1)).astype(np.float32)

    def axis(n: int, g: int):
        f = (np.arange(n, dtype=np.float32) + 0.5) * (g / n)
        i = np.minimum(f.astype(np.int64), g - 1)
        t = f - i
        return i, t * t * (3 - 2 * t)

    iy, ty = axis(h, gh)
    ix, tx = axis(w, gw)
    rows = grid[:, ix] * (1 - tx) + grid[:, ix + 1] * tx  # (gh + 1, w)
    return rows[iy] * (1 - ty)[:, None] + rows[iy + 1] * ty[:, None]


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with reflected borders (loops over kernel taps, not pixels)."""
    if sigma <= 0:
        return img
    radius = max(1, int(math.ceil(3 * sigma)))
    taps = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    h, w = img.shape
    padded = np.pad(img, ((radius, radius), (0, 0)), mode="reflect")
    out = np.zeros_like(img)
    for k, weight in enumerate(kernel):
        out += weight * padded[k : k + h]
    padded = np.pad(out, ((0, 0), (radius, radius)), mode="reflect")
    out = np.zeros_like(img)
    for k, weight in enumerate(kernel):
        out += weight * padded[:, k : k + w]
    return out


def _patch(cx: float, cy: float, radius: float, h: int, w: int):
    """Pixel window around (cx, cy) clipped to the image, with pixel-centre coordinates relative to the centre."""
    x0 = max(0, int(math.floor(cx - radius)))
    x1 = min(w, int(math.ceil(cx + radius)) + 1)
    y0 = max(0, int(math.floor(cy - radius)))
    y1 = min(h, int(math.ceil(cy + radius)) + 1)
    if x1 <= x0 or y1 <= y0:
        return None
    dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]
    dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]
    return (slice(y0, y1), slice(x0, x1)), dx, dy, x0, y0


def _rotated(dx: np.ndarray, dy: np.ndarray, angle: float):
    c, s = math.cos(angle), math.sin(angle)
    u = dx * c + dy * s  # along the object's length
    v = -dx * s + dy * c  # across
    return u, v


def _rect_coverage(u: np.ndarray, v: np.ndarray, half_len: float, half_wid: float) -> np.ndarray:
    """Anti-aliased coverage (0..1) of a rectangle in its own frame."""
    return np.clip(half_len - np.abs(u) + 0.5, 0.0, 1.0) * np.clip(half_wid - np.abs(v) + 0.5, 0.0, 1.0)


def _bump(u: np.ndarray, v: np.ndarray, cu: float, cv: float, su: float, sv: float) -> np.ndarray:
    return np.exp(-0.5 * (((u - cu) / su) ** 2 + ((v - cv) / sv) ** 2))


# --------------------------------------------------------------------------- scene layers


@dataclass
class _Road:
    points: np.ndarray  # (n, 2) polyline vertices (x, y)
    half_width: float


@dataclass
class _Scene:
    temp: np.ndarray  # temperature map (arbitrary units, ~0..1)
    roads: list
    blocked: np.ndarray  # bool mask where objects must not be placed (buildings)
    night: bool


def _road_polyline(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A gently curving polyline that crosses the image (it starts and ends outside it)."""
    diag = math.hypot(w, h)
    angle = rng.uniform(0, math.pi)
    # anchor near the image, then walk both ways
    ax, ay = rng.uniform(0.15 * w, 0.85 * w), rng.uniform(0.15 * h, 0.85 * h)
    n_seg = int(rng.integers(2, 5))
    step = diag / n_seg
    pts_fwd, pts_bwd = [(ax, ay)], []
    a = angle
    x, y = ax, ay
    for _ in range(n_seg):
        a += rng.normal(0, 0.25)
        x, y = x + step * math.cos(a), y + step * math.sin(a)
        pts_fwd.append((x, y))
    a = angle + math.pi
    x, y = ax, ay
    for _ in range(n_seg):
        a += rng.normal(0, 0.25)
        x, y = x + step * math.cos(a), y + step * math.sin(a)
        pts_bwd.append((x, y))
    return np.array(pts_bwd[::-1] + pts_fwd, dtype=np.float32)


def _polyline_distance(xx: np.ndarray, yy: np.ndarray, pts: np.ndarray):
    """Distance of every pixel to a polyline and the arc length of the nearest point."""
    best = np.full((yy.shape[0], xx.shape[1]), np.inf, dtype=np.float32)
    along = np.zeros_like(best)
    offset = 0.0
    for (x0, y0), (x1, y1) in zip(pts[:-1].tolist(), pts[1:].tolist()):
        sx, sy = x1 - x0, y1 - y0
        length = math.hypot(sx, sy)
        if length < 1e-6:
            continue
        ux, uy = sx / length, sy / length
        px, py = xx - x0, yy - y0  # (1, w), (h, 1)
        t = np.clip(px * ux + py * uy, 0.0, length)  # arc length along the segment
        ex = px - t * ux
        ey = py - t * uy
        d2 = ex * ex + ey * ey
        closer = d2 < best
        np.copyto(best, d2, where=closer)
        np.copyto(along, t + offset, where=closer)
        offset += length
    return np.sqrt(best), along


def _render_background(rng: np.random.Generator, h: int, w: int) -> _Scene:
    yy = (np.arange(h, dtype=np.float32) + 0.5)[:, None]
    xx = (np.arange(w, dtype=np.float32) + 0.5)[None, :]
    night = bool(rng.random() < 0.45)
    urban = bool(rng.random() < 0.35)
    contrast = 0.6 if night else 1.0  # night scenes are thermally flatter

    temp = 0.45 + contrast * (0.07 * _smooth_field(rng, h, w, 3) + 0.03 * _smooth_field(rng, h, w, 9))

    # fields / patches: Voronoi partition with per-patch temperature and plough stripes
    k = int(rng.integers(4, 12))
    sx = rng.uniform(-0.1 * w, 1.1 * w, k).astype(np.float32)
    sy = rng.uniform(-0.1 * h, 1.1 * h, k).astype(np.float32)
    d1 = np.full((h, w), np.inf, dtype=np.float32)  # squared distance to the nearest seed
    d2 = np.full((h, w), np.inf, dtype=np.float32)  # ... and to the second nearest
    nearest = np.zeros((h, w), dtype=np.intp)
    for i in range(k):
        d = (xx - sx[i]) ** 2 + (yy - sy[i]) ** 2
        closer = d < d1
        np.copyto(d2, np.where(closer, d1, np.minimum(d2, d)))
        np.copyto(d1, d, where=closer)
        nearest[closer] = i
    edge_dist = (np.sqrt(d2) - np.sqrt(d1)) * 0.5  # ~ distance to the patch boundary
    patch_temp = rng.normal(0, 0.08 * contrast, k).astype(np.float32)
    temp += patch_temp[nearest]
    striped = (rng.random(k) < 0.45).astype(np.float32) * rng.uniform(0.01, 0.035, k).astype(np.float32) * contrast
    theta = rng.uniform(0, math.pi, k).astype(np.float32)
    period = rng.uniform(4.0, 9.0, k).astype(np.float32)
    fx = (np.cos(theta) / period)[nearest]
    fy = (np.sin(theta) / period)[nearest]
    temp += striped[nearest] * np.sin(2 * math.pi * (xx * fx + yy * fy))
    # hedgerows along patch boundaries: cool by day, slightly warm at night
    hedge = np.exp(-0.5 * (edge_dist / rng.uniform(0.8, 1.8)) ** 2)
    temp += (0.03 if night else -0.06) * hedge * (rng.random() < 0.7)
    # fine vegetation texture: blurred white noise (no grid artefacts)
    fine = _gaussian_blur(rng.standard_normal((h, w)).astype(np.float32), float(rng.uniform(1.0, 2.0)))
    temp += contrast * float(rng.uniform(0.02, 0.04)) * fine

    # tree clusters (soft canopies)
    canopy = np.zeros((h, w), dtype=np.float32)
    for _ in range(int(rng.integers(0, 3 if urban else 6))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        for _ in range(int(rng.integers(3, 14))):
            bx, by = cx + rng.normal(0, 14), cy + rng.normal(0, 14)
            r = rng.uniform(3.0, 9.0)
            win = _patch(bx, by, r + 2, h, w)
            if win is None:
                continue
            sl, dx, dy, _, _ = win
            cover = np.clip(r - np.hypot(dx, dy) + 0.5, 0.0, 1.0)
            canopy[sl] = np.maximum(canopy[sl], cover)
    canopy_texture = 1.0 + 0.3 * _smooth_field(rng, h, w, max(h, w) / 4)
    temp += (0.035 if night else -0.09) * canopy * canopy_texture

    # roads
    roads = []
    road_area = np.zeros((h, w), dtype=np.float32)
    n_roads = int(rng.integers(2, 5) if urban else rng.integers(0, 3))
    road_texture = 0.01 * _smooth_field(rng, h, w, 12) if n_roads else 0.0
    for _ in range(n_roads):
        pts = _road_polyline(rng, h, w)
        paved = bool(rng.random() < (0.9 if urban else 0.6))
        half = float(rng.uniform(4.0, 8.0) if paved else rng.uniform(2.0, 3.5))
        dist, along = _polyline_distance(xx, yy, pts)
        cover = np.clip(half - dist + 0.5, 0.0, 1.0)
        if paved:
            road_temp = rng.uniform(0.06, 0.12) if night else rng.uniform(0.12, 0.22)
        else:
            road_temp = rng.uniform(0.02, 0.06) * (1 if night else 1.5)
        base = float(np.mean(temp))
        target = base + road_temp + road_texture
        temp = temp * (1 - cover) + target * cover
        np.maximum(road_area, cover, out=road_area)
        if paved and half >= 5.5 and rng.random() < 0.6:
            dash = ((along % 12.0) < 6.0) & (dist < 0.7)
            temp = np.where(dash, temp - 0.05, temp)
        roads.append(_Road(points=pts, half_width=half))

    # buildings
    blocked = np.zeros((h, w), dtype=bool)
    n_buildings = int(rng.integers(3, 10) if urban else rng.integers(0, 3))
    placed = 0
    for _ in range(4 * n_buildings):
        if placed >= n_buildings:
            break
        bl = rng.uniform(24, 64)  # clearly larger than any vehicle, so roofs are not look-alikes
        bw = bl * rng.uniform(0.5, 1.0)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        angle = rng.uniform(0, math.pi)
        win = _patch(cx, cy, 0.5 * math.hypot(bl, bw) + 3, h, w)
        if win is None:
            continue
        sl, dx, dy, _, _ = win
        u, v = _rotated(dx, dy, angle)
        cover = _rect_coverage(u, v, bl / 2, bw / 2)
        if (road_area[sl] * cover).max() > 0.05 or (blocked[sl] & (cover > 0)).any():
            continue  # buildings stand beside roads, not on them, and do not overlap
        inner = _rect_coverage(u, v, bl / 2 - 1.5, bw / 2 - 1.5)
        wall = np.clip(cover - inner, 0.0, 1.0)
        roof = (rng.uniform(-0.12, 0.08) if night else rng.uniform(0.1, 0.3))
        local = temp[sl]
        roof_map = float(np.mean(local)) + roof
        if rng.random() < 0.5:  # ridge line
            roof_map = roof_map + 0.04 * np.exp(-0.5 * (v / 0.8) ** 2)
        local = local * (1 - cover) + roof_map * cover
        local = local + (0.08 if night else -0.05) * wall
        for _ in range(int(rng.integers(0, 3))):  # small rooftop units (not labelled)
            pu = rng.uniform(-0.35, 0.35) * bl
            pv = rng.uniform(-0.3, 0.3) * bw
            size = rng.uniform(1.0, 2.0)
            local = local + rng.uniform(0.05, 0.15) * _rect_coverage(u - pu, v - pv, size, size)
        temp[sl] = local
        blocked[sl] |= cover > 0.05
        placed += 1

    return _Scene(temp=temp.astype(np.float32), roads=roads, blocked=blocked, night=night)


# --------------------------------------------------------------------------- objects


def _vehicle_pattern(u, v, half_len, half_wid, hot: bool, rng: np.random.Generator):
    """Relative intensity inside a vehicle (1 = body), front is +u."""
    L, W = 2 * half_len, 2 * half_wid
    pattern = np.ones_like(u)
    # windshield: a cooler band just behind the bonnet
    pattern -= 0.35 * np.clip(1 - np.abs(u - 0.12 * L) / (0.08 * L + 0.5), 0, 1) * (np.abs(v) < 0.4 * W)
    if hot:
        pattern += rng.uniform(0.5, 1.0) * _bump(u, v, 0.33 * L, 0.0, 0.12 * L + 0.4, 0.3 * W + 0.3)  # engine
        wheel = rng.uniform(0.3, 0.7)
        s = max(0.6, 0.06 * L)
        for su in (-0.3, 0.3):
            for sv in (-0.45, 0.45):
                pattern += wheel * _bump(u, v, su * L, sv * W, s, s)
        pattern += 0.4 * _bump(u, v, -0.47 * L, 0.25 * W, s, s)  # exhaust
    return pattern


def _place_objects(rng: np.random.Generator, scene: _Scene, count: int, h: int, w: int):
    """Draw objects into ``scene.temp`` and return their boxes and categories."""
    temp = scene.temp
    occupied = np.zeros((h, w), dtype=bool)
    cold_scene = (not scene.night) and rng.random() < 0.25
    base_contrast = rng.uniform(0.14, 0.32) if scene.night else rng.uniform(0.1, 0.25)
    max_px = min(MAX_OBJECT_PX, min(h, w) - 2)
    results = []
    group_anchor: Optional[tuple[float, float]] = None
    for _ in range(count):
        is_vehicle = rng.random() < 0.6
        for _attempt in range(40):
            if is_vehicle:
                length = float(math.exp(rng.uniform(math.log(9.0), math.log(min(36.0, max_px)))))
                width = length * rng.uniform(0.4, 0.55)
                angle = rng.uniform(0, 2 * math.pi)
                if scene.roads and rng.random() < 0.6:
                    road = scene.roads[int(rng.integers(len(scene.roads)))]
                    seg = int(rng.integers(len(road.points) - 1))
                    (x0, y0), (x1, y1) = road.points[seg], road.points[seg + 1]
                    t = rng.random()
                    seg_angle = math.atan2(y1 - y0, x1 - x0)
                    lateral = rng.uniform(-1, 1) * max(0.0, road.half_width - width / 2)
                    cx = x0 + t * (x1 - x0) - math.sin(seg_angle) * lateral
                    cy = y0 + t * (y1 - y0) + math.cos(seg_angle) * lateral
                    angle = seg_angle + (math.pi if rng.random() < 0.5 else 0.0) + rng.normal(0, 0.05)
                else:
                    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            else:
                length = rng.uniform(6.5, 14.0)
                width = length * rng.uniform(0.45, 0.65)
                angle = rng.uniform(0, 2 * math.pi)
                if group_anchor is not None and rng.random() < 0.5:
                    cx = group_anchor[0] + rng.normal(0, 10)
                    cy = group_anchor[1] + rng.normal(0, 10)
                else:
                    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            radius = 0.5 * math.hypot(length, width) + 1.5
            if not (radius <= cx <= w - radius and radius <= cy <= h - radius):
                continue  # keep objects whole inside the image
            win = _patch(cx, cy, radius, h, w)
            if win is None:
                continue
            sl, dx, dy, ox, oy = win
            if scene.blocked[int(cy), int(cx)]:
                continue
            u, v = _rotated(dx, dy, angle)
            if is_vehicle:
                cover = _rect_coverage(u, v, length / 2, width / 2)
            else:
                r = np.sqrt((u / (length / 2)) ** 2 + (v / (width / 2)) ** 2)
                cover = np.clip((1 - r) * (width / 2) + 0.5, 0.0, 1.0)
            mask = cover > _BOX_THRESHOLD
            rows = np.flatnonzero(mask.any(axis=1))
            cols = np.flatnonzero(mask.any(axis=0))
            if rows.size == 0 or cols.size == 0:
                continue
            bx0, bx1 = ox + int(cols[0]), ox + int(cols[-1]) + 1
            by0, by1 = oy + int(rows[0]), oy + int(rows[-1]) + 1
            bw, bh = bx1 - bx0, by1 - by0
            if not (MIN_OBJECT_PX <= max(bw, bh) <= max_px) or min(bw, bh) < 2:
                continue
            if occupied[max(0, by0 - 1) : by1 + 1, max(0, bx0 - 1) : bx1 + 1].any():
                continue
            if scene.blocked[sl][mask].any():
                continue
            # intensity: warm by default, cold in "cold scenes" and sometimes by day
            cold = cold_scene or ((not scene.night) and rng.random() < 0.12)
            contrast = base_contrast * rng.uniform(0.75, 1.3)
            if is_vehicle:
                pattern = _vehicle_pattern(u, v, length / 2, width / 2, hot=not cold, rng=rng)
            else:
                pattern = 1.0 + 0.5 * _bump(u, v, 0.3 * length, 0.0, 0.18 * length, 0.3 * width)
            local = temp[sl]
            if cold:
                local_bg = float(np.median(local))
                drawn = local * (1 - cover) + (local_bg - contrast * (2.0 - pattern) * 0.8) * cover
            else:
                drawn = local + contrast * pattern * cover
            temp[sl] = drawn
            occupied[by0:by1, bx0:bx1] = True
            results.append(((bx0, by0, bw, bh), _VEHICLE if is_vehicle else _PERSON))
            if not is_vehicle:
                group_anchor = (cx, cy)
            break
    return results


# --------------------------------------------------------------------------- sensor model


def _sensor(rng: np.random.Generator, temp: np.ndarray) -> np.ndarray:
    h, w = temp.shape
    img = _gaussian_blur(temp, float(rng.uniform(0.5, 1.0)))
    yy = (np.arange(h, dtype=np.float32) + 0.5 - h / 2)[:, None] / (h / 2)
    xx = (np.arange(w, dtype=np.float32) + 0.5 - w / 2)[None, :] / (w / 2)
    r2 = (xx * xx + yy * yy) / 2.0
    sample = img[::2, ::2]  # percentiles on a subsample: same result to ~1e-3, 4x cheaper
    p1, p99 = np.percentile(sample, [1, 99])
    span = float(p99 - p1) + 1e-3
    img = img - rng.uniform(0.05, 0.3) * span * r2  # vignetting: darker corners
    noise = rng.uniform(0.008, 0.025) * span
    img = img + rng.standard_normal((h, w)).astype(np.float32) * noise
    img = img + rng.standard_normal((1, w)).astype(np.float32) * noise * rng.uniform(0.2, 0.6)  # column FPN
    img = img + rng.standard_normal((h, 1)).astype(np.float32) * noise * rng.uniform(0.0, 0.3)  # row FPN
    lo, hi = np.percentile(img[::2, ::2], [0.5, 99.8])
    img = (img - lo) / max(float(hi - lo), 1e-6)
    # leave a little headroom so AGC output is not always full-scale
    img = rng.uniform(0.02, 0.08) + img * rng.uniform(0.85, 0.95)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- public API


def render_scene(
    seed: int, index: int, width: int = 320, height: int = 256, objects_per_image: tuple[int, int] = (3, 12)
):
    """Render one scene: returns (image float32 H x W in [0, 1], list of ((x, y, w, h), category_id))."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, int(index), GENERATOR_VERSION])
    scene = _render_background(rng, height, width)
    lo, hi = objects_per_image
    count = int(rng.integers(lo, hi + 1))
    objects = _place_objects(rng, scene, count, height, width)
    image = _sensor(rng, scene.temp)
    return image, objects


def _check_args(images: int, width: int, height: int, objects_per_image, bit_depth: int) -> tuple[int, int]:
    if int(images) < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    if int(width) < 32 or int(height) < 32:
        raise ValueError(f"width and height must be >= 32 pixels, got {width}x{height}")
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    lo, hi = (int(x) for x in objects_per_image)
    if lo < 0 or hi < lo:
        raise ValueError(f"objects_per_image must be (min, max) with 0 <= min <= max, got {objects_per_image}")
    return lo, hi


def synthetic_cache_key(
    images: int = 120,
    width: int = 320,
    height: int = 256,
    seed: int = 0,
    objects_per_image: tuple[int, int] = (3, 12),
    bit_depth: int = 8,
    out_dir: Union[str, os.PathLike, None] = None,
) -> str:
    """A short hex digest identifying the dataset ``generate_synthetic`` writes for these arguments.

    Defaults are filled in (so omitted and explicit default values give the same key) and the
    generator version is included. ``out_dir`` is accepted and ignored, so the same keyword
    arguments can be passed to both functions.
    """
    del out_dir
    lo, hi = _check_args(images, width, height, objects_per_image, bit_depth)
    payload = {
        "version": GENERATOR_VERSION,
        "images": int(images),
        "width": int(width),
        "height": int(height),
        "seed": int(seed),
        "objects_per_image": [lo, hi],
        "bit_depth": int(bit_depth),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def generate_synthetic(
    out_dir: Union[str, os.PathLike],
    images: int = 120,
    width: int = 320,
    height: int = 256,
    seed: int = 0,
    objects_per_image: tuple[int, int] = (3, 12),
    bit_depth: int = 8,
) -> Path:
    """Write ``images`` synthetic IR scenes to ``out_dir/images/*.png`` and return ``out_dir/annotations.json``.

    Images are single-channel PNGs of ``bit_depth`` 8 or 16. The annotation file is standard
    COCO (``file_name`` relative to ``out_dir/images``; ``bbox`` as [x, y, w, h] in pixels) with
    the categories in :data:`CATEGORIES`; it is written last and atomically, so its presence means
    the dataset is complete. When an object cannot be placed without overlapping another one or a
    building (rare, in crowded scenes), an image holds fewer objects than ``objects_per_image[0]``.
    """
    lo, hi = _check_args(images, width, height, objects_per_image, bit_depth)
    out = Path(out_dir)
    image_dir = out / "images"
    try:
        image_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {image_dir}: {e} — choose an output folder you can write to") from e

    coco_images, annotations = [], []
    scale = 65535.0 if bit_depth == 16 else 255.0
    dtype = np.uint16 if bit_depth == 16 else np.uint8
    for i in range(int(images)):
        image, objects = render_scene(seed, i, width, height, (lo, hi))
        pixels = np.round(image * scale).astype(dtype)
        name = f"{_IMAGE_PREFIX}{i:06d}.png"
        try:
            Image.fromarray(pixels).save(image_dir / name, format="PNG", compress_level=4)
        except OSError as e:
            raise DataError(f"cannot write {image_dir / name}: {e} — check free disk space and permissions") from e
        image_id = i + 1
        coco_images.append({"id": image_id, "file_name": name, "width": int(width), "height": int(height)})
        for (x, y, bw, bh), category in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [float(x), float(y), float(bw), float(bh)],
                    "area": float(bw * bh),
                    "iscrowd": 0,
                }
            )

    coco = {
        "info": {
            "description": "sslrecipe synthetic infrared UAV scenes",
            "generator_version": GENERATOR_VERSION,
            "seed": int(seed),
            "images": int(images),
            "width": int(width),
            "height": int(height),
            "objects_per_image": [lo, hi],
            "bit_depth": int(bit_depth),
        },
        "licenses": [],
        "images": coco_images,
        "annotations": annotations,
        "categories": [dict(c) for c in CATEGORIES],
    }
    ann_path = out / "annotations.json"
    try:
        atomic_write_text(ann_path, json.dumps(coco, separators=(",", ":")))
    except OSError as e:
        raise DataError(f"cannot write {ann_path}: {e} — check free disk space and permissions") from e
    return ann_path
