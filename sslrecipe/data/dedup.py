"""Near-duplicate images and leakage between a pre-training pool and evaluation images.

Each image gets a 63-bit DCT perceptual hash (pHash): the image is reduced to a 32x32 grey
thumbnail (JPEGs are decoded at reduced scale, so hashing costs about a millisecond per frame),
its 2-D DCT is taken, and each of the 63 lowest-frequency coefficients (the 8x8 corner without
the DC term) gives one bit: above or below their median. Re-encoding, resizing and contrast or
brightness changes barely move these bits; different scenes differ in about half of them.

* :func:`dedup` groups near-duplicate frames (Hamming distance <= ``threshold``). Grouping is
  greedy in path order: the first image not yet grouped leads a new group and takes every
  ungrouped image within ``threshold`` of it, so every member is close to its leader and a slow
  video pan never chains a whole flight into one group. :func:`keep_list` keeps the leaders.
* :func:`find_leakage` lists pool images that are copies of evaluation images. Hash matches are
  only candidates: consecutive video frames hash as closely as copies do, so each candidate is
  verified on pixels. Both images are brought to the smaller one's size (at most
  :data:`VERIFY_SIDE` px), blurred (sigma 1.5 px) and standardised; the pair is a copy when the
  99.9th percentile of the absolute difference stays below :data:`VERIFY_MAX` (a quick pass at
  160 px rejects most distinct frames first). On HIT-UAV, copies re-encoded at JPEG quality 20-40
  or resized 1/4x-2x score <= 0.31; the 380 distinct val/train frame pairs with close hashes >= 0.78.

Distances are computed vectorised in cache-sized blocks (XOR + popcount over uint64), about 10^8
pairs a second on one core: 10^4 images in half a second, 10^5 in about a minute; the cost grows with
the square of the pool size (a 720k-frame pool: most of an hour).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

from sslrecipe.errors import DataError

PathLike = Union[str, "os.PathLike[str]"]

HASH_BITS = 63
#: Default :func:`dedup` threshold (bits of 63): near-duplicate frames of one flight.
DEDUP_THRESHOLD = 8
#: Hash distance up to which a pool/eval pair is verified on pixels in :func:`find_leakage`.
LEAK_CANDIDATE_THRESHOLD = 12
#: Pixel verification: the largest 99.9th-percentile standardised difference of a copy.
VERIFY_MAX = 0.4
#: Pixel verification compares at most this many pixels along the longer side.
VERIFY_SIDE = 640
_VERIFY_SIGMA = 1.5
#: A quick first look at this size rejects clearly different frames before the full comparison
#: (copies score <= 0.37 there, 99% of distinct HIT-UAV neighbours more than the cut-off).
_COARSE_SIDE = 160
_COARSE_SIGMA = 1.0
_COARSE_REJECT = 0.6
_THUMB = 32
_BLOCK_ELEMENTS = 1 << 20  # pairs per vectorised distance block (8 MB of uint64 temporaries: cache-friendly)


class Leak(NamedTuple):
    """A pool image that is a copy of an evaluation image.

    ``kind``: ``exact`` (same bytes or same pixels), ``reencoded`` (same size, different pixels:
    re-compressed or lightly edited), ``resized`` (a different size).
    """

    pool_path: Path
    eval_path: Path
    distance: int
    kind: str


# --------------------------------------------------------------------------- reading


def _open_gray(path: Path, draft: Optional[int] = None) -> Image.Image:
    """A single-band image (``L`` or ``F``) with EXIF orientation applied."""
    try:
        with Image.open(path) as im:
            if draft and im.format == "JPEG":
                im.draft("L", (draft, draft))
            im.load()
            if im.getexif().get(0x0112, 1) != 1:
                im = ImageOps.exif_transpose(im)
            mode = im.mode
            if mode in ("L", "F"):
                return im.copy()
            if mode.startswith("I"):
                return Image.fromarray(np.asarray(im).astype(np.float32), "F")
            return im.convert("L")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as pil_error:
        try:  # TIFF layouts Pillow cannot decode: the project's reader
            from sslrecipe.data.images import read_image

            arr = read_image(path)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"cannot read image {path}: {e}") from pil_error
        return Image.fromarray(arr.mean(axis=2).astype(np.float32), "F")


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT = _dct_matrix(_THUMB)
_BIT_WEIGHTS = (np.uint64(1) << np.arange(HASH_BITS, dtype=np.uint64)).astype(np.uint64)


def phash_array(gray: np.ndarray) -> int:
    """The 63-bit pHash of a 2-D array (any size; it is reduced to 32x32 first)."""
    a = np.asarray(gray, dtype=np.float32)
    if a.ndim == 3:
        a = a.mean(axis=2)
    if a.shape != (_THUMB, _THUMB):
        a = np.asarray(Image.fromarray(a, "F").resize((_THUMB, _THUMB), Image.BOX), dtype=np.float32)
    c = (_DCT @ a.astype(np.float64) @ _DCT.T)[:8, :8].ravel()[1:]
    bits = (c > np.median(c)).astype(np.uint64)
    return int((bits * _BIT_WEIGHTS).sum(dtype=np.uint64))


def phash(path: PathLike) -> int:
    """The 63-bit perceptual hash of an image file. Raises :class:`DataError` when unreadable."""
    p = Path(path)
    im = _open_gray(p, draft=_THUMB * 4)
    return phash_array(np.asarray(im.resize((_THUMB, _THUMB), Image.BOX), dtype=np.float32))


def _hash_one(path: str) -> tuple[Optional[int], Optional[str]]:
    try:
        return phash(path), None
    except DataError as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - one bad file never stops a scan
        return None, f"cannot read image {path}: {type(e).__name__}: {e}"


def hash_images(paths: Sequence[PathLike], workers: int = 1) -> tuple[np.ndarray, list[tuple[Path, str]]]:
    """pHashes of ``paths`` as a uint64 array, and ``(path, reason)`` for unreadable files.

    Unreadable files get hash 0 and are listed in the second value; callers drop them.
    ``workers > 1`` hashes in that many processes (worth it from a few thousand images).
    """
    names = [str(p) for p in paths]
    if workers > 1 and len(names) >= 256:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            results = list(ex.map(_hash_one, names, chunksize=64))
    else:
        results = [_hash_one(n) for n in names]
    hashes = np.zeros(len(names), dtype=np.uint64)
    errors: list[tuple[Path, str]] = []
    for i, (h, err) in enumerate(results):
        if h is None:
            errors.append((Path(names[i]), err or "unreadable"))
        else:
            hashes[i] = np.uint64(h)
    return hashes, errors


# --------------------------------------------------------------------------- distances


_POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).astype(np.uint8, copy=False)
    b = np.ascontiguousarray(x).view(np.uint8).reshape(x.shape + (8,))
    return _POP8[b].sum(axis=-1, dtype=np.uint8)


def hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """All pairwise Hamming distances between two uint64 hash arrays (``len(a) x len(b)`` uint8)."""
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    return _popcount(a[:, None] ^ b[None, :])


def _pairs_within(a: np.ndarray, b: np.ndarray, threshold: int, same: bool = False):
    """Yield ``(i, j, distance)`` arrays for pairs with distance <= threshold, block by block.

    With ``same`` (``a`` is ``b``), a block of rows is compared only with itself and later rows.
    """
    n_b = max(1, len(b))
    block = max(1, _BLOCK_ELEMENTS // n_b)
    for start in range(0, len(a), block):
        stop = min(len(a), start + block)
        lo = start if same else 0
        d = hamming_matrix(a[start:stop], b[lo:])
        ii, jj = np.nonzero(d <= threshold)
        yield ii + start, jj + lo, d[ii, jj]


# --------------------------------------------------------------------------- dedup


def group_hashes(hashes: np.ndarray, threshold: int = DEDUP_THRESHOLD, valid: Optional[np.ndarray] = None) -> list[list[int]]:
    """Greedy leader grouping of hashes in index order; groups of two or more, leader first."""
    n = len(hashes)
    assigned = np.full(n, -1, dtype=np.int64)
    if valid is not None:
        assigned[~np.asarray(valid, dtype=bool)] = -2  # excluded
    members: dict[int, list[int]] = {}
    for ii, jj, _d in _pairs_within(hashes, hashes, threshold, same=True):
        if ii.size == 0:
            continue
        order = np.lexsort((jj, ii))
        ii, jj = ii[order], jj[order]
        starts = np.searchsorted(ii, np.unique(ii))
        bounds = list(starts) + [len(ii)]
        # Rows ascend, and every earlier row (this block's included) is already a leader or a
        # member, so a row still unassigned here starts a group (every valid row pairs with itself).
        for k in range(len(starts)):
            i = int(ii[bounds[k]])
            if assigned[i] != -1:
                continue
            assigned[i] = i
            neigh = jj[bounds[k]:bounds[k + 1]]
            neigh = neigh[assigned[neigh] == -1]
            if neigh.size:
                assigned[neigh] = i
                members[i] = [i] + sorted(int(j) for j in neigh)
    return [members[i] for i in sorted(members)]


def dedup(paths: Sequence[PathLike], threshold: int = DEDUP_THRESHOLD, workers: int = 1,
          errors: Optional[list] = None) -> list[list[Path]]:
    """Groups of near-duplicate images (two or more each), the group's leader first.

    ``paths`` are taken in the order given (sort them for a reproducible choice of leaders).
    Unreadable images are in no group; pass a list as ``errors`` to receive ``(path, reason)``.
    """
    if not 0 <= int(threshold) <= HASH_BITS:
        raise DataError(f"dedup threshold must be 0..{HASH_BITS} bits, got {threshold}")
    paths = [Path(p) for p in paths]
    hashes, errs = hash_images(paths, workers=workers)
    if errors is not None:
        errors.extend(errs)
    bad = {str(p) for p, _ in errs}
    valid = np.array([str(p) not in bad for p in paths], dtype=bool)
    return [[paths[i] for i in g] for g in group_hashes(hashes, int(threshold), valid)]


def keep_list(paths: Sequence[PathLike], groups: Iterable[Sequence[PathLike]], drop: Iterable[PathLike] = ()) -> list[Path]:
    """``paths`` without the non-leader members of ``groups`` (and without ``drop``), order kept."""
    removed = {str(p) for p in drop}
    for g in groups:
        removed.update(str(p) for p in list(g)[1:])
    return [Path(p) for p in paths if str(p) not in removed]


# --------------------------------------------------------------------------- leakage


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (edges replicated), float32."""
    r = max(1, int(3 * sigma + 0.5))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    for axis in (0, 1):
        n = x.shape[axis]
        p = np.pad(x, [(r, r) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
        out = np.zeros_like(x)
        tmp = np.empty_like(x)
        for i in range(2 * r + 1):
            view = p[i:i + n] if axis == 0 else p[:, i:i + n]
            np.multiply(view, k[i], out=tmp)
            out += tmp
        x = out
    return x


def _standardised(im: Image.Image, size: tuple[int, int], sigma: float = _VERIFY_SIGMA) -> np.ndarray:
    if im.mode != "F":
        im = im.convert("F")
    if im.size != size:
        im = im.resize(size, Image.BOX if im.width >= 2 * size[0] else Image.BILINEAR)
    x = _blur(np.asarray(im, dtype=np.float32), sigma)
    return (x - x.mean()) / (x.std() + 1e-6)


def _verify_size(a: Image.Image, b: Image.Image, side: int = VERIFY_SIDE) -> Optional[tuple[int, int]]:
    """The common comparison size, or None when the aspect ratios differ by more than 3% (a crop)."""
    ra, rb = a.width / max(1, a.height), b.width / max(1, b.height)
    if abs(ra - rb) > 0.03 * max(ra, rb):
        return None
    w, h = min(a.width, b.width), min(a.height, b.height)
    s = min(1.0, side / max(w, h))
    return (max(8, round(w * s)), max(8, round(h * s)))


def _score(za: np.ndarray, zb: np.ndarray) -> float:
    """How far apart two images are as pictures (0 = the same; copies <= :data:`VERIFY_MAX`), given both at the
    smaller one's size (at most :data:`VERIFY_SIDE` px, see :func:`_verify_size`: None when the aspect ratios differ
    by more than 3%, a crop and not a copy), blurred and standardised: the 99.9th percentile of their difference."""
    d = np.abs(za - zb).ravel()
    k = min(d.size - 1, int(round(0.999 * (d.size - 1))))
    return float(np.partition(d, k)[k])


class _ImageCache:
    """Recently used grey images and their standardised versions (per comparison size)."""

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self.images: OrderedDict[str, Image.Image] = OrderedDict()
        self.standard: OrderedDict[tuple, np.ndarray] = OrderedDict()

    @staticmethod
    def _put(store: OrderedDict, key, value, limit: int) -> None:
        store[key] = value
        if len(store) > limit:
            store.popitem(last=False)

    def get(self, path: Path) -> Image.Image:
        key = str(path)
        if key in self.images:
            self.images.move_to_end(key)
            return self.images[key]
        im = _open_gray(path, draft=2 * VERIFY_SIDE)
        self._put(self.images, key, im, self.size)
        return im

    def standardised(self, path: Path, size: tuple[int, int], sigma: float = _VERIFY_SIGMA) -> np.ndarray:
        key = (str(path), size, sigma)
        if key in self.standard:
            self.standard.move_to_end(key)
            return self.standard[key]
        z = _standardised(self.get(path), size, sigma)
        self._put(self.standard, key, z, self.size)
        return z


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_leakage(
    pool_paths: Sequence[PathLike],
    eval_paths: Sequence[PathLike],
    threshold: int = LEAK_CANDIDATE_THRESHOLD,
    verify: bool = True,
    workers: int = 1,
    errors: Optional[list] = None,
) -> list[Leak]:
    """Pool images that are copies of evaluation images: ``[Leak(pool_path, eval_path, distance, kind)]``.

    Pairs within ``threshold`` hash bits are candidates; with ``verify`` (default) each is checked
    on pixels (:func:`_score`) so that distinct but similar frames are not reported. Sorted by
    pool path. Unreadable files are skipped (listed in ``errors`` when given).
    """
    pool = [Path(p) for p in pool_paths]
    evals = [Path(p) for p in eval_paths]
    if not pool or not evals:
        return []
    ph, perr = hash_images(pool, workers=workers)
    eh, eerr = hash_images(evals, workers=workers)
    if errors is not None:
        errors.extend(perr + eerr)
    pbad = {str(p) for p, _ in perr}
    ebad = {str(p) for p, _ in eerr}
    candidates: list[tuple[int, int, int]] = []
    for ii, jj, dd in _pairs_within(ph, eh, int(threshold)):
        candidates += [(int(i), int(j), int(d)) for i, j, d in zip(ii, jj, dd)
                       if str(pool[i]) not in pbad and str(evals[j]) not in ebad]
    candidates.sort(key=lambda c: (c[1], c[2]))  # by eval image: each is decoded once
    cache = _ImageCache()
    digests: dict[str, str] = {}
    out: list[Leak] = []
    for i, j, d in candidates:
        pp, ep = pool[i], evals[j]
        try:
            if pp.stat().st_size == ep.stat().st_size:
                for q in (pp, ep):
                    if str(q) not in digests:
                        digests[str(q)] = _digest(q)
                if digests[str(pp)] == digests[str(ep)]:
                    out.append(Leak(pp, ep, d, "exact"))
                    continue
            if not verify:
                out.append(Leak(pp, ep, d, "near"))
                continue
            a, b = cache.get(ep), cache.get(pp)
        except (OSError, DataError) as e:
            if errors is not None:
                errors.append((pp, str(e)))
            continue
        if a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b)):
            out.append(Leak(pp, ep, d, "exact"))
            continue
        coarse = _verify_size(a, b, _COARSE_SIDE)
        if coarse is None:
            continue
        if _score(cache.standardised(ep, coarse, _COARSE_SIGMA), cache.standardised(pp, coarse, _COARSE_SIGMA)) > _COARSE_REJECT:
            continue
        size = _verify_size(a, b)
        if size is not None and _score(cache.standardised(ep, size), cache.standardised(pp, size)) <= VERIFY_MAX:
            out.append(Leak(pp, ep, d, "reencoded" if a.size == b.size else "resized"))
    out.sort(key=lambda leak: (str(leak.pool_path), str(leak.eval_path)))
    return out


def assert_no_leakage(
    pool_paths: Sequence[PathLike],
    eval_paths: Sequence[PathLike],
    allow: bool = False,
    warn=None,
    workers: int = 1,
    listed: int = 20,
    pool: str = "pre-training pool image(s)",
    remedy: str = "remove them from the pool (see `sslrecipe data leakage`)",
) -> list[Leak]:
    """The data stage's guard: :class:`DataError` ("leak ...") listing pool images that copy
    evaluation images, unless ``allow`` (``data.allow_leakage``), when ``warn(message)`` is called
    instead. ``pool`` names the pool's images and ``remedy`` what to do in the message. Returns the leaks found."""
    leaks = find_leakage(pool_paths, eval_paths, workers=workers)
    if not leaks:
        return leaks
    lines = "\n  ".join(f"{x.pool_path} is a copy of {x.eval_path} ({x.kind})" for x in leaks[:listed])
    more = f"\n  ... and {len(leaks) - listed} more" if len(leaks) > listed else ""
    head = f"leak: {len(leaks)} {pool} are copies of val/test images:\n  {lines}{more}"
    if allow:
        if warn is not None:
            warn(head + "\n(continuing: data.allow_leakage is true)")
        return leaks
    raise DataError(
        f"{head}\nPre-training on evaluation images inflates the results: {remedy}, "
        "or set data.allow_leakage: true"
    )
