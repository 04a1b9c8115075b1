"""`sslrecipe predict` over files: images, folders, globs and videos in; detections.json, counts.csv and drawn
images out.

- Inputs: image files (any extension Pillow or tifffile reads), folders (recursive: images and videos), globs
  (``'frames/**/*.png'``, quoted so the shell leaves them alone) and videos (:data:`VIDEO_EXTENSIONS`, decoded by
  PyAV, the optional extra ``video``; every ``video_stride``-th frame).
- ``detections.json``: a self-contained COCO file: ``images`` (id, file_name, path, width, height; a video frame also
  ``video`` and ``frame``), ``categories`` and ``annotations``, the COCO results (``image_id``, ``category_id``,
  ``bbox`` [x, y, w, h], ``score``) with an ``id`` and ``area``; ``pycocotools.coco.COCO`` opens it as it is.
- ``counts.csv``: one row per image, the detections per class at or above the score, and their total.
- ``drawn/``: each image with its boxes; a box smaller than :func:`min_drawn_side` is drawn at that size around
  the object (the true box inside it), so a 3-pixel target stays visible.

An image that cannot be read is named in a warning, skipped (listed in ``detections.json``'s ``skipped``) and the
rest goes on. Outputs are written at the end and also when interrupted, for the images done by then.
"""

from __future__ import annotations

import csv
import glob
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from sslrecipe.atomic import atomic_write_text
from sslrecipe.data.images import is_image_file
from sslrecipe.data.video import VIDEO_EXTENSIONS, is_video_file, iter_video_frames, video_frame_count  # noqa: F401 - the one frame reader
from sslrecipe.detect.detector import Detector, Prediction
from sslrecipe.errors import DataError, SSLRecipeError

DETECTIONS_JSON = "detections.json"
COUNTS_CSV = "counts.csv"
DRAWN_DIR = "drawn"
_PALETTE = ("#ff3d00", "#00e676", "#2979ff", "#ffea00", "#d500f9", "#00e5ff", "#ff9100", "#76ff03")


@dataclass
class Inputs:
    files: list[tuple[Path, str]]  # (path, name in the outputs)
    missing: list[tuple[str, str]]  # (argument, why nothing was found)


def collect_inputs(args: Sequence[str]) -> Inputs:
    """Files to predict on from command-line arguments: files, folders (recursive), globs; in argument order."""
    files: list[tuple[Path, str]] = []
    missing: list[tuple[str, str]] = []
    for arg in args:
        p = Path(arg).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and (is_image_file(q) or is_video_file(q))
                           and not any(part.startswith(".") for part in q.relative_to(p).parts))
            if not found:
                missing.append((arg, "a folder without images or videos"))
            files += [(q, q.relative_to(p).as_posix()) for q in found]
        elif p.is_file():
            files.append((p, p.name))
        elif any(ch in arg for ch in "*?["):
            found = sorted(Path(q) for q in glob.glob(str(p), recursive=True) if Path(q).is_file())
            if not found:
                missing.append((arg, "the pattern matches no file"))
            files += [(q, q.name) for q in found]
        else:
            missing.append((arg, "not found"))
    return Inputs(files, missing)


def count_items(inputs: Inputs, stride: int) -> Optional[int]:
    total = 0
    for path, _name in inputs.files:
        if is_video_file(path):
            n = video_frame_count(path, stride)
            if n is None:
                return None
            total += n
        else:
            total += 1
    return total


# --------------------------------------------------------------------------- drawing


def min_drawn_side(width: int, height: int) -> int:
    """The smallest box side drawn: 2 % of the longer image side, at least 8 px."""
    return max(8, round(0.02 * max(width, height)))


def display_pixels(arr: np.ndarray, stretch: bool) -> np.ndarray:
    """``H x W x 3`` uint8 for drawing; ``stretch`` maps the 0.5..99.5 percentiles to 0..255 (16-bit thermal)."""
    x = arr[:, :, :3] if arr.shape[2] >= 3 else np.repeat(arr[:, :, :1], 3, axis=2)
    if np.issubdtype(x.dtype, np.integer):  # raw pixels (video frames): to 0..1 by their type's range
        x = x.astype(np.float32) / np.iinfo(x.dtype).max
    if stretch:
        lo, hi = np.percentile(x, [0.5, 99.5])
        x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def draw_prediction(pixels: np.ndarray, prediction: Prediction, names: Sequence[str]) -> "Any":
    """A PIL image with every detection drawn: class colour, ``name score`` label, small boxes enlarged."""
    from PIL import Image, ImageDraw

    im = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(im)
    height, width = pixels.shape[:2]
    side = min_drawn_side(width, height)
    line = max(1, round(max(width, height) / 500))
    order = {n: i for i, n in enumerate(names)}
    for (x0, y0, x1, y1), score, name in zip(prediction.boxes.tolist(), prediction.scores.tolist(), prediction.names):
        colour = _PALETTE[order.get(name, 0) % len(_PALETTE)]
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=1)
        if x1 - x0 < side or y1 - y0 < side:  # a marker of the minimum size around a small object
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            half = max(side, x1 - x0, y1 - y0) / 2 + line
            x0, y0, x1, y1 = cx - half, cy - half, cx + half, cy + half
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        draw.text((x0 + 1, max(0.0, y0 - 11)), f"{name} {score:.2f}", fill=colour)
    return im


# --------------------------------------------------------------------------- the run


@dataclass
class PredictSummary:
    images: int
    detections: int
    skipped: list[tuple[str, str]]
    out: Path
    interrupted: bool = False


def _is_8bit(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.mode in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr")
    except Exception:  # noqa: BLE001 - read_image has read it (e.g. through tifffile): treat as high bit depth
        return False


def predict_files(
    detector: Detector, inputs: Inputs, out: Path, score: float = 0.25, tile: Optional[int] = None,
    overlap: float = 0.2, max_dets: Optional[int] = None, video_stride: int = 1, draw: bool = True,
    on_item: Optional[Callable[[str], None]] = None, warn: Optional[Callable[[str], None]] = None,
) -> PredictSummary:
    """Predict on every image and video frame of ``inputs``, writing the outputs into ``out`` (see the module)."""
    from sslrecipe.data.images import read_image

    if video_stride < 1:
        raise SSLRecipeError(f"--video-stride must be at least 1, got {video_stride}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if draw:
        (out / DRAWN_DIR).mkdir(exist_ok=True)
    images: list[dict] = []
    annotations: list[dict] = []
    counts: list[dict] = []
    skipped: list[tuple[str, str]] = list(inputs.missing)
    used_names: set[str] = set()
    names = detector.class_names
    warn = warn or (lambda message: None)
    for arg, why in inputs.missing:
        warn(f"{arg}: {why}; skipped")

    def unique(name: str) -> str:
        base, n = name, 2
        while name in used_names:
            name = f"{base}-{n}"
            n += 1
        used_names.add(name)
        return name

    def one(arr: np.ndarray, source: str, name: str, stretch: bool, extra: dict) -> None:
        tensor = detector.prepare(arr, source)
        pred = detector.to_prediction(detector.predict_tensor(tensor, score, tile, overlap, max_dets), source,
                                      int(tensor.shape[-1]), int(tensor.shape[-2]))
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": name, "path": source, "width": pred.width,
                       "height": pred.height, **extra})
        for r in pred.to_coco(image_id):
            r["id"] = len(annotations) + 1
            r["area"] = round(r["bbox"][2] * r["bbox"][3], 3)
            annotations.append(r)
        row = {"file_name": name, **{n: 0 for n in names}}
        for n in pred.names:
            row[n] += 1
        row["total"] = len(pred)
        counts.append(row)
        if draw:
            target = out / DRAWN_DIR / (name.replace("/", "__") + ".jpg")
            buffer = io.BytesIO()
            draw_prediction(display_pixels(arr, stretch), pred, names).save(buffer, format="JPEG", quality=92)
            target.write_bytes(buffer.getvalue())

    interrupted = False
    try:
        for path, name in inputs.files:
            if is_video_file(path):
                try:
                    for index, frame in iter_video_frames(path, video_stride):
                        one(frame, f"{path}#frame={index}", unique(f"{name}/frame_{index:06d}"), False,
                            {"video": str(path), "frame": index})
                        if on_item:
                            on_item(f"{name} frame {index}")
                except DataError as e:
                    skipped.append((str(path), str(e)))
                    warn(f"{e}; skipped")
                continue
            try:
                arr = read_image(path)
                one(arr, str(path), unique(name), not _is_8bit(path), {})
            except DataError as e:
                skipped.append((str(path), str(e)))
                warn(f"{e}; skipped")
            if on_item:
                on_item(name)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:  # what is done is written, also after Ctrl-C
        _write_outputs(out, detector, images, annotations, counts, skipped, names,
                       {"score": score, "tile": tile, "overlap": overlap if tile else None, "max_dets": max_dets,
                        "video_stride": video_stride, "interrupted": interrupted})
    return PredictSummary(len(images), len(annotations), skipped, out, interrupted)


def _write_outputs(out: Path, detector: Detector, images, annotations, counts, skipped, names, settings) -> None:
    doc = {
        "info": {"detector": str(detector.directory) if detector.directory else None, **settings},
        "images": images,
        "categories": [{"id": c["id"], "name": c["name"]} for c in detector.categories],
        "annotations": annotations,
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
    }
    atomic_write_text(out / DETECTIONS_JSON, json.dumps(doc, indent=1))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["file_name", *names, "total"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(counts)
    atomic_write_text(out / COUNTS_CSV, buffer.getvalue())
