"""Perceptual hashing, near-duplicate groups and pool/evaluation leakage on real HIT-UAV frames."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageEnhance

from sslrecipe.cli import main
from sslrecipe.errors import DataError
from sslrecipe.data.dedup import (
    DEDUP_THRESHOLD,
    assert_no_leakage,
    LEAK_CANDIDATE_THRESHOLD,
    dedup,
    find_leakage,
    group_hashes,
    hamming_matrix,
    keep_list,
    phash,
)

HIT_UAV = Path(__file__).parents[1].parent / "shared/data/hit-uav"


@pytest.fixture
def hit() -> Path:
    if not HIT_UAV.is_dir():
        pytest.skip(f"HIT-UAV data not found at {HIT_UAV} (the tests expect ../shared/data/hit-uav)")
    return HIT_UAV


def _distinct_train(hit: Path) -> list[Path]:
    return sorted((hit / "train").glob("*.jpg"))[::60]  # 12 frames of different flights


def _dist(a: Path, b: Path) -> int:
    return bin(phash(a) ^ phash(b)).count("1")


def _reencode(src: Path, dst: Path, quality: int = 40) -> Path:
    Image.open(src).save(dst, "JPEG", quality=quality)
    return dst


def _half(src: Path, dst: Path) -> Path:
    im = Image.open(src)
    im.resize((im.width // 2, im.height // 2), Image.BILINEAR).save(dst)
    return dst


def test_hamming_and_leader_grouping() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**63, 7, dtype=np.uint64)
    b = rng.integers(0, 2**63, 5, dtype=np.uint64)
    d = hamming_matrix(a, b)
    assert d.shape == (7, 5)
    assert all(d[i, j] == bin(int(a[i]) ^ int(b[j])).count("1") for i in range(7) for j in range(5))
    # 0 -- 6 bits -- h1 -- 6 bits -- h2: within 8 of its neighbour but 12 from the leader, so no chaining
    h1 = np.uint64(0b111111)
    h2 = np.uint64(0b111111111111)
    far = np.uint64((1 << 62) - 1)
    hashes = np.array([0, h1, h2, far, 0], dtype=np.uint64)
    assert group_hashes(hashes, 8) == [[0, 1, 4]]
    assert group_hashes(hashes, 8, valid=np.array([True, True, True, True, False])) == [[0, 1]]
    assert group_hashes(hashes, 12) == [[0, 1, 2, 4]]


def test_phash_is_robust_to_reencoding_resizing_and_contrast(hit: Path, tmp_path: Path) -> None:
    frames = _distinct_train(hit)
    for i, src in enumerate(frames[:3]):
        variants = [
            _reencode(src, tmp_path / f"q{i}.jpg", quality=30),
            _half(src, tmp_path / f"h{i}.png"),
            tmp_path / f"c{i}.png",
        ]
        ImageEnhance.Contrast(ImageEnhance.Brightness(Image.open(src)).enhance(1.2)).enhance(0.8).save(variants[2])
        for v in variants:
            assert _dist(src, v) <= 6, v
    hashes = np.array([phash(p) for p in frames], dtype=np.uint64)
    d = hamming_matrix(hashes, hashes)
    np.fill_diagonal(d, 63)
    assert d.min() > 2 * DEDUP_THRESHOLD  # distinct scenes are far apart


def test_dedup_groups_copies_and_consecutive_frames(hit: Path, tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    frames = _distinct_train(hit)
    for f in frames:
        shutil.copyfile(f, pool / f.name)
    shutil.copyfile(frames[0], pool / "zz_copy.jpg")
    _reencode(frames[1], pool / "zz_reencoded.jpg")
    _half(frames[2], pool / "zz_half.png")
    for name in ("0_100_40_0_08101.jpg", "0_100_40_0_08113.jpg"):  # consecutive frames of one flight
        shutil.copyfile(hit / "train" / name, pool / name)
    (pool / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    paths = sorted(pool.iterdir())
    errors: list = []
    groups = dedup(paths, errors=errors)
    named = sorted(sorted(p.name for p in g) for g in groups)
    assert named == sorted([
        sorted([frames[0].name, "zz_copy.jpg"]),
        sorted([frames[1].name, "zz_reencoded.jpg"]),
        sorted([frames[2].name, "zz_half.png"]),
        ["0_100_40_0_08101.jpg", "0_100_40_0_08113.jpg"],
    ])
    assert all(g[0].name < g[1].name for g in groups)  # the leader is the first in path order
    assert [p.name for p, _ in errors] == ["zz_broken.jpg"]
    kept = keep_list(paths, groups, drop=[p for p, _ in errors])
    assert len(kept) == len(paths) - 4 - 1

    out = tmp_path / "kept.txt"
    r = CliRunner().invoke(main, ["data", "dedup", str(pool), "--json", "--write-list", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output[r.output.index("{"):])
    assert data["group_count"] == 4 and data["removed"] == 4 and data["kept"] == len(kept)
    assert [Path(line).name for line in out.read_text().split()] == [p.name for p in kept]
    r = CliRunner().invoke(main, ["data", "dedup", str(pool), "--threshold", "0"])
    assert r.exit_code == 0 and "group(s) of near-duplicates" in r.output


def test_leakage_finds_planted_copies_without_false_alarms(hit: Path, tmp_path: Path) -> None:
    val = sorted((hit / "val").glob("*.jpg"))[::70][:3] + [hit / "val" / "0_120_80_0_05511.jpg"]
    neighbour = hit / "train" / "0_120_80_0_05514.jpg"  # a different frame of the same flight
    assert _dist(val[3], neighbour) <= LEAK_CANDIDATE_THRESHOLD  # a hash match: only pixels tell them apart
    pool = tmp_path / "pool"
    pool.mkdir()
    for f in _distinct_train(hit)[:8] + [neighbour]:
        shutil.copyfile(f, pool / f.name)
    shutil.copyfile(val[0], pool / "planted_copy.jpg")
    _reencode(val[1], pool / "planted_reencoded.jpg", quality=50)
    _half(val[2], pool / "planted_half.jpg")

    leaks = find_leakage(sorted(pool.iterdir()), val)
    got = sorted((x.pool_path.name, x.eval_path.name, x.kind) for x in leaks)
    assert got == sorted([
        ("planted_copy.jpg", val[0].name, "exact"),
        ("planted_reencoded.jpg", val[1].name, "reencoded"),
        ("planted_half.jpg", val[2].name, "resized"),
    ])
    assert all(0 <= x.distance <= 4 for x in leaks)
    with pytest.raises(DataError, match="leak: 3 pre-training pool image") as err:
        assert_no_leakage(sorted(pool.iterdir()), val)
    assert "planted_half.jpg" in str(err.value) and "data.allow_leakage" in str(err.value)
    warned: list = []
    assert len(assert_no_leakage(sorted(pool.iterdir()), val, allow=True, warn=warned.append)) == 3
    assert len(warned) == 1 and "leak" in warned[0]

    # the CLI reads the evaluation images from an annotation file (HIT-UAV format here)
    raw = json.loads((hit / "annotations" / "val.json").read_text())
    names = {p.name for p in val}
    images = [i for i in raw["images"] if i["filename"] in names]
    ann = tmp_path / "val.json"
    ann.write_text(json.dumps(dict(raw, images=images, annotation=[])))
    r = CliRunner().invoke(main, ["data", "leakage", str(pool), str(ann), "--images", str(hit / "val"), "--json"])
    assert r.exit_code == 1, r.output
    data = json.loads(r.output[r.output.index("{"):])
    assert data["count"] == 3 and {x["kind"] for x in data["leaks"]} == {"exact", "reencoded", "resized"}
    for planted in pool.glob("planted_*"):
        planted.unlink()
    r = CliRunner().invoke(main, ["data", "leakage", str(pool), str(ann), "--images", str(hit / "val")])
    assert r.exit_code == 0, r.output
    assert "no leakage" in r.output
