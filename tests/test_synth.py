"""The synthetic infrared scene generator and `sslrecipe data synth`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sslrecipe.cli import main
from sslrecipe.data.images import read_image
from sslrecipe.data.synth import CATEGORIES, generate_synthetic, render_scene, synthetic_cache_key

SMALL = dict(images=6, width=160, height=128)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "images").glob("*.png"))}


@pytest.fixture(scope="module")
def synth_pair(tmp_path_factory):
    """The same small dataset generated twice into different folders (seed 3)."""
    a = generate_synthetic(tmp_path_factory.mktemp("a"), seed=3, **SMALL)
    b = generate_synthetic(tmp_path_factory.mktemp("b"), seed=3, **SMALL)
    return a, b


def test_writes_coco_with_images(synth_pair):
    ann, _ = synth_pair
    assert ann.name == "annotations.json"
    coco = json.loads(ann.read_text())
    assert coco["categories"] == CATEGORIES
    assert len(coco["images"]) == SMALL["images"]
    assert len({im["id"] for im in coco["images"]}) == SMALL["images"]
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    image_ids = {im["id"] for im in coco["images"]}
    for im in coco["images"]:
        arr = read_image(ann.parent / "images" / im["file_name"])
        assert arr.shape == (SMALL["height"], SMALL["width"], 1)
        assert (im["width"], im["height"]) == (SMALL["width"], SMALL["height"])
        assert arr.std() > 0.02  # a scene, not a flat image
    for a in coco["annotations"]:
        assert a["image_id"] in image_ids
        assert a["category_id"] in (1, 2)
        assert a["iscrowd"] == 0
        assert a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3])
    assert {a["category_id"] for a in coco["annotations"]} == {1, 2}


def test_same_seed_identical_bytes(synth_pair):
    a, b = synth_pair
    assert a.read_bytes() == b.read_bytes()
    files_a, files_b = _files(a.parent), _files(b.parent)
    assert len(files_a) == SMALL["images"]
    assert files_a == files_b


def test_different_seed_differs(synth_pair, tmp_path):
    a, _ = synth_pair
    c = generate_synthetic(tmp_path, seed=4, **SMALL)
    assert json.loads(a.read_text())["annotations"] != json.loads(c.read_text())["annotations"]
    assert _files(a.parent) != _files(c.parent)
    assert synthetic_cache_key(seed=3, **SMALL) != synthetic_cache_key(seed=4, **SMALL)


def test_cache_key_fills_defaults():
    assert synthetic_cache_key() == synthetic_cache_key(images=120, width=320, height=256, seed=0)
    assert synthetic_cache_key(out_dir="/x") == synthetic_cache_key(out_dir="/y")
    assert synthetic_cache_key(bit_depth=16) != synthetic_cache_key(bit_depth=8)
    assert synthetic_cache_key(objects_per_image=(1, 2)) != synthetic_cache_key()


def test_image_does_not_depend_on_count(tmp_path):
    img_a, objs_a = render_scene(5, 2, 160, 128)
    img_b, objs_b = render_scene(5, 2, 160, 128)
    assert np.array_equal(img_a, img_b) and objs_a == objs_b
    few = generate_synthetic(tmp_path / "few", images=2, seed=5, width=160, height=128)
    more = generate_synthetic(tmp_path / "more", images=3, seed=5, width=160, height=128)
    assert _files(few.parent)["synth_000001.png"] == _files(more.parent)["synth_000001.png"]


def test_boxes_tight_inside_and_sized():
    """Boxes lie in the image, have 6-40 px on their longest side, and enclose a local extremum."""
    sizes = []
    for index in range(10):
        image, objects = render_scene(11, index, 320, 256, (3, 12))
        assert 1 <= len(objects) <= 12
        h, w = image.shape
        assert image.min() >= 0 and image.max() <= 1
        boxes = []
        for (x, y, bw, bh), cat in objects:
            assert cat in (1, 2)
            assert 0 <= x and 0 <= y and x + bw <= w and y + bh <= h
            assert bw > 0 and bh > 0
            assert 6 <= max(bw, bh) <= 40
            sizes.append(max(bw, bh))
            boxes.append((x, y, x + bw, y + bh))
            inside = image[y : y + bh, x : x + bw]
            ring = image[max(0, y - 4) : y + bh + 4, max(0, x - 4) : x + bw + 4].copy()
            ring[min(4, y) : min(4, y) + bh, min(4, x) : min(4, x) + bw] = np.nan
            background = np.nanmedian(ring)
            # the object stands out from its surroundings: warm (brighter) or cold (darker)
            assert max(inside.max() - background, background - inside.min()) > 0.04
        for i in range(len(boxes)):  # objects never overlap
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
    assert min(sizes) < 12 and max(sizes) > 20  # a range of small object sizes


def test_boxes_are_tight_and_polarity_varies(monkeypatch):
    """On a flat background without sensor effects, every drawn pixel lies in its box (up to the
    1 px anti-aliasing fringe) and every box edge touches the object: boxes are tight."""
    from sslrecipe.data import synth

    def flat_background(rng, h, w):
        return synth._Scene(
            temp=np.full((h, w), 0.5, np.float32),
            roads=[],
            blocked=np.zeros((h, w), bool),
            night=bool(rng.random() < 0.45),
        )

    monkeypatch.setattr(synth, "_render_background", flat_background)
    monkeypatch.setattr(synth, "_sensor", lambda rng, temp: temp)
    warm = cold = 0
    for index in range(40):
        image, objects = synth.render_scene(1, index, 160, 128, (2, 5))
        deviation = image - 0.5
        covered = np.zeros(image.shape, bool)
        for (x, y, bw, bh), _ in objects:
            covered[max(0, y - 1) : y + bh + 1, max(0, x - 1) : x + bw + 1] = True
            box = np.abs(deviation[y : y + bh, x : x + bw])
            for edge in (box[0], box[-1], box[:, 0], box[:, -1]):
                assert edge.max() > 0.005
            signed = deviation[y : y + bh, x : x + bw]
            if signed.max() > -signed.min():
                warm += 1
            else:
                cold += 1
        assert not (np.abs(deviation) > 1e-6)[~covered].any()
    assert warm > cold > 0  # mostly warm objects, some cold ones (day/night polarity)


def test_sixteen_bit(tmp_path):
    ann = generate_synthetic(tmp_path, images=1, width=64, height=48, bit_depth=16, seed=1)
    path = ann.parent / "images" / "synth_000000.png"
    from PIL import Image

    with Image.open(path) as im:
        assert im.mode.startswith("I")
        raw = np.asarray(im)
    assert raw.max() > 255  # genuinely 16-bit values
    arr = read_image(path)
    assert arr.shape == (48, 64, 1) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="bit_depth"):
        generate_synthetic(tmp_path, images=1, bit_depth=12)
    with pytest.raises(ValueError, match="objects_per_image"):
        generate_synthetic(tmp_path, images=1, objects_per_image=(5, 2))


def test_cli_data_synth(tmp_path):
    out = tmp_path / "ir"
    result = CliRunner().invoke(
        main, ["data", "synth", str(out), "--images", "3", "--seed", "2", "--width", "96", "--height", "64"]
    )
    assert result.exit_code == 0, result.output
    ann = out / "annotations.json"
    assert str(ann) in result.output
    coco = json.loads(ann.read_text())
    assert "wrote 3 images" in result.output
    assert f"{len(coco['annotations'])} objects" in result.output
    assert "vehicle:" in result.output and "person:" in result.output
    assert len(list((out / "images").glob("*.png"))) == 3
    assert read_image(out / "images" / coco["images"][0]["file_name"]).shape == (64, 96, 1)


def test_cli_rejects_bad_bit_depth(tmp_path):
    result = CliRunner().invoke(main, ["data", "synth", str(tmp_path / "x"), "--bit-depth", "12"])
    assert result.exit_code != 0
    assert "12" in result.output and "Traceback" not in result.output
