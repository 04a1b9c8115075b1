"""Unlabeled pools from video: `data.unlabeled` names a video or a folder mixing images and videos; every
`data.video_stride`-th frame is extracted once into the data stage, near-duplicates go with `data.dedup`, and
pre-training reads the frames like images.

The videos are written here with PyAV: scenes of random blobs, each held for a few frames, so that sampled frames
of one scene are near-duplicates and frames of different scenes are not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sslrecipe.cli import main
from sslrecipe.engine.events import read_events

av = pytest.importorskip("av", reason="PyAV (the `video` extra) is not installed: pip install av")

TINY = Path(__file__).with_name("tiny.yaml")
W, H = 128, 96
#: scene of each frame: frames 0-3 one scene, 4-5, 6-7 others, 8-11 a last one
SCENES = [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 3]
MAE = ["--set", "backbone={name: vit_tiny_patch16_224, in_chans: 1}", "--set", "weights.source=pretrain",
       "--set", "pretrain={method: mae, steps: 2, batch_size: 2, img_size: 64}"]


def blobs(seed: int, peak: float) -> np.ndarray:
    """A frame of a few bright Gaussian blobs on a dark background, values in 0..peak."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W]
    img = np.zeros((H, W))
    for _ in range(6):
        cx, cy, s = rng.uniform(0, W), rng.uniform(0, H), rng.uniform(6, 16)
        img += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s))
    return img / img.max() * peak


def write_video(path: Path, grey16: bool) -> None:
    """12 frames following SCENES: 16-bit grey lossless (FFV1 in MKV, as a thermal camera records) or colour MPEG-4."""
    with av.open(str(path), "w") as container:
        if grey16:
            stream = container.add_stream("ffv1", rate=10)
            stream.width, stream.height, stream.pix_fmt = W, H, "gray16le"
        else:
            stream = container.add_stream("mpeg4", rate=10)
            stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for scene in SCENES:
            if grey16:  # a thermal range: 20000..30000 counts
                frame = av.VideoFrame.from_ndarray((20000 + blobs(scene, 10000)).astype(np.uint16), format="gray16le")
            else:
                grey = blobs(scene, 255).astype(np.uint8)
                frame = av.VideoFrame.from_ndarray(np.stack([grey, grey // 2, 255 - grey], axis=2), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def run(run_dir: Path, pool: Path, *extra: str):
    res = CliRunner().invoke(main, ["run", str(TINY), "--run-dir", str(run_dir), *MAE, "--set", f"data.unlabeled={pool}",
                                    "--set", "data.dedup=true", *extra, "--until", "weights"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def events(run_dir: Path, start: int = 0) -> list[dict]:
    return list(read_events(run_dir / "events.jsonl"))[start:]


def metric(evs: list[dict], name: str):
    [value] = [e["value"] for e in evs if e["event"] == "metric" and e.get("name") == name]
    return value


def stage_dir(run_dir: Path, name: str) -> Path:
    [d] = [p for p in run_dir.glob(f"{name}-*") if p.is_dir()]
    return d


def test_video_pool_sampled_deduplicated_cached_and_restrided(tmp_path):
    video = tmp_path / "flight.mkv"
    write_video(video, grey16=True)
    run_dir = tmp_path / "r"
    run(run_dir, video, "--set", "data.video_stride=2")

    evs = events(run_dir)
    # every 2nd frame of 12: 0, 2, 4, 6, 8, 10; frames 0/2 and 8/10 show one scene each
    assert metric(evs, "data/video_frames") == {"stride": 2, "frames": {"flight.mkv": 6}}
    assert metric(evs, "data/dedup_removed") == 2
    data = stage_dir(run_dir, "data")
    pool = (data / "unlabeled.txt").read_text().splitlines()
    assert [Path(p).name for p in pool] == ["frame_000000.png", "frame_000004.png", "frame_000006.png", "frame_000008.png"]
    assert all(Path(p).parent == data / "frames" / "flight.mkv" for p in pool)
    # a 16-bit grey video stays 16-bit grey: one channel at full precision, as its counts were recorded
    with Image.open(pool[0]) as im:
        assert im.mode.startswith("I") and im.size == (W, H)
        counts = np.asarray(im)
    assert np.array_equal(counts, (20000 + blobs(0, 10000)).astype(np.uint16))
    done = json.loads((stage_dir(run_dir, "pretrain") / "done.json").read_text())
    assert done["steps"] == 2

    # the same recipe again: the data stage and pre-training are reused
    n = len(events(run_dir))
    run(run_dir, video, "--set", "data.video_stride=2")
    later = events(run_dir, n)
    assert {e["stage"] for e in later if e["event"] == "stage_cached"} >= {"data", "pretrain"}
    assert not [e for e in later if e["event"] == "stage_start"]

    # another stride is another pool: both stages run again, into new folders
    n = len(events(run_dir))
    run(run_dir, video, "--set", "data.video_stride=3")
    later = events(run_dir, n)
    assert {"data", "pretrain"} <= {e["stage"] for e in later if e["event"] == "stage_start"}
    assert metric(later, "data/video_frames") == {"stride": 3, "frames": {"flight.mkv": 4}}  # 0, 3, 6, 9
    assert metric(later, "data/dedup_removed") == 1  # 0 and 3 are one scene
    assert len(list(run_dir.glob("data-*"))) == 2


def test_folder_of_images_and_videos_with_a_broken_video(tmp_path):
    pool = tmp_path / "pool"
    (pool / "clips").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(blobs(100 + i, 255).astype(np.uint8), "L").save(pool / f"img{i}.png")
    write_video(pool / "clips" / "a.mp4", grey16=False)
    (pool / "clips" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 4)
    run_dir = tmp_path / "r"
    res = run(run_dir, pool, "--set", "data.video_stride=4")

    evs = events(run_dir)
    assert "Traceback" not in res.output
    [warning] = [e["message"] for e in evs if e["event"] == "warning" and "unlabeled video skipped" in e["message"]]
    assert str(pool / "clips" / "broken.mp4") in warning and "Traceback" not in warning
    assert metric(evs, "data/videos_skipped") == 1
    # frames 0, 4, 8 of a.mp4: three scenes, no duplicates; the images come first, in path order
    assert metric(evs, "data/video_frames") == {"stride": 4, "frames": {"clips/a.mp4": 3, "clips/broken.mp4": 0}}
    assert metric(evs, "data/dedup_removed") == 0
    data = stage_dir(run_dir, "data")
    listed = (data / "unlabeled.txt").read_text().splitlines()
    assert listed[:3] == [str(pool / f"img{i}.png") for i in range(3)]
    assert [Path(p).relative_to(data).as_posix() for p in listed[3:]] == [
        f"frames/clips/a.mp4/frame_{i:06d}.png" for i in (0, 4, 8)]
    with Image.open(listed[3]) as im:
        assert im.mode == "RGB"  # a colour video stays colour on disk; in_chans 1 averages it when read, as for images
    assert (stage_dir(run_dir, "pretrain") / "done.json").is_file()


def test_video_stride_enters_the_hash_only_for_pools_with_videos(tmp_path):
    from sslrecipe.engine.stages import build_pipeline
    from sslrecipe.recipe import load_recipe

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(blobs(1, 255).astype(np.uint8), "L").save(images / "a.png")
    video = tmp_path / "v.mp4"
    write_video(video, grey16=False)

    def hashes(pool: Path, stride: int) -> dict:
        recipe = load_recipe(TINY, overrides=[*MAE[1::2], f"data.unlabeled={pool}", f"data.video_stride={stride}"])
        return build_pipeline().stage_hashes(recipe)

    assert hashes(images, 2) == hashes(images, 30)  # image pools (and runs made before videos) keep their hashes
    one, other = hashes(video, 2), hashes(video, 30)
    assert one["data"] != other["data"] and one["pretrain"] != other["pretrain"]


def test_missing_pyav_names_the_extra(tmp_path, monkeypatch):
    video = tmp_path / "v.mp4"
    write_video(video, grey16=False)
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now fails as it does without the extra
    res = CliRunner().invoke(main, ["run", str(TINY), "--run-dir", str(tmp_path / "r"), *MAE,
                                    "--set", f"data.unlabeled={video}", "--until", "data"])
    assert res.exit_code == 2, res.output
    assert "pip install 'sslrecipe[video]'" in res.output and "Traceback" not in res.output


def test_video_pool_without_dedup_warns_that_duplicates_stay(tmp_path):
    video = tmp_path / "v.mp4"
    write_video(video, grey16=False)
    res = CliRunner().invoke(main, ["run", str(TINY), "--run-dir", str(tmp_path / "r"), *MAE, "--set",
                                    f"data.unlabeled={video}", "--set", "data.video_stride=2", "--until", "data"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "data.dedup is false: near-duplicate frames" in res.output
    data = stage_dir(tmp_path / "r", "data")
    assert len((data / "unlabeled.txt").read_text().splitlines()) == 6  # all sampled frames kept
