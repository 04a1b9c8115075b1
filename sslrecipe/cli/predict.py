"""`sslrecipe predict`: a fine-tuned detector on new images, folders, globs and videos."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click


def _warn(message: str) -> None:
    click.secho(f"warning: {message}", fg="yellow", err=True)


@click.command("predict")
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("predictions"), show_default=True,
              help="Folder for detections.json, counts.csv and drawn/.")
@click.option("--score", type=click.FloatRange(0, 1), default=0.25, show_default=True,
              help="Lowest score kept (written, counted and drawn).")
@click.option("--tile", type=click.IntRange(min=8), default=None,
              help="Sliced inference: tiles of this many pixels (plus the whole image), merged by NMS.")
@click.option("--overlap", type=click.FloatRange(0, 1, max_open=True), default=0.2, show_default=True,
              help="Overlap of neighbouring tiles, a fraction of the tile (with --tile).")
@click.option("--max-dets", type=click.IntRange(min=1), default=None,
              help="Detections per image (default: the fine-tuning's finetune.max_detections).")
@click.option("--video-stride", type=click.IntRange(min=1), default=1, show_default=True,
              help="Read every N-th frame of a video.")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda:0.")
@click.option("--no-draw", is_flag=True, help="Write no drawn images.")
@click.option("--overwrite", is_flag=True, help="Replace the results of an earlier predict in --out.")
def predict(source: Path, images: tuple[str, ...], out: Path, score: float, tile: Optional[int], overlap: float,
            max_dets: Optional[int], video_stride: int, device: str, no_draw: bool, overwrite: bool) -> None:
    """Detect objects in IMAGES with the detector of SOURCE (a run directory: its newest fine-tuning; or a
    detector directory RUN/finetune-<hash>).

    \b
    IMAGES: image files, folders (recursive), globs ('frames/**/*.png', quoted),
            videos (mp4, avi, mov, mkv, ...: pip install 'sslrecipe[video]')
    Images are read as training read them (8/16-bit, 1/3 channels, the run's
    normalisation, recorded in detector.json). Writes --out/detections.json
    (COCO: images, categories, annotations with scores), counts.csv (per image
    and class) and drawn/ (boxes drawn; small objects at a visible minimum size).
    An unreadable image is named and skipped; the exit status is then 1.
    """
    from sslrecipe.detect.detector import load_detector, resolve_detector_dir
    from sslrecipe.detect.predict_files import DETECTIONS_JSON, collect_inputs, count_items, predict_files
    from sslrecipe.errors import SSLRecipeError

    if (out / DETECTIONS_JSON).exists() and not overwrite:
        raise SSLRecipeError(f"{out / DETECTIONS_JSON} exists from an earlier predict; give another --out, "
                             "or --overwrite to replace it")
    resolve_detector_dir(source)  # a wrong SOURCE is said before the images are looked at
    inputs = collect_inputs(images)
    if not inputs.files:
        listing = "; ".join(f"{a}: {why}" for a, why in inputs.missing)
        raise SSLRecipeError(f"no images or videos to predict on ({listing})")
    detector = load_detector(source, device=device, warn=_warn)
    click.echo(f"detector: {detector.directory} ({', '.join(detector.class_names)}; img_size {detector.img_size})",
               err=True)
    total = count_items(inputs, video_stride)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True, highlight=False)
    columns = [TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.description}")]
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as progress:
        task = progress.add_task("", total=total)
        summary = predict_files(detector, inputs, out, score=score, tile=tile, overlap=overlap, max_dets=max_dets,
                                video_stride=video_stride, draw=not no_draw, warn=_warn,
                                on_item=lambda name: progress.update(task, advance=1, description=name))
    click.echo(f"{summary.images} image(s), {summary.detections} detection(s) at score >= {score:g} -> {out}")
    if summary.skipped:
        click.secho(f"{len(summary.skipped)} input(s) skipped: " + ", ".join(p for p, _ in summary.skipped),
                    fg="yellow", err=True)
        sys.exit(1)
