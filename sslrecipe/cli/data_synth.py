"""`sslrecipe data synth`: write synthetic infrared scenes (images + COCO JSON)."""

from __future__ import annotations

import json
import time
from collections import Counter

import click


@click.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--images", default=120, show_default=True, type=click.IntRange(min=1), help="Number of images.")
@click.option("--seed", default=0, show_default=True, type=int, help="Generator seed (same seed = identical files).")
@click.option("--width", default=320, show_default=True, type=click.IntRange(min=32), help="Image width in pixels.")
@click.option("--height", default=256, show_default=True, type=click.IntRange(min=32), help="Image height in pixels.")
@click.option(
    "--bit-depth", default="8", show_default=True, type=click.Choice(["8", "16"]), help="Bits per pixel of the PNGs."
)
def synth(out: str, images: int, seed: int, width: int, height: int, bit_depth: str) -> None:
    """Write synthetic infrared scenes with small vehicles and people to OUT.

    \b
    OUT/images/*.png       single-channel thermal-looking UAV scenes
    OUT/annotations.json   COCO detection labels (vehicle, person; boxes 6-40 px)
    """
    from sslrecipe.data.synth import generate_synthetic

    start = time.perf_counter()
    ann_path = generate_synthetic(out, images=images, width=width, height=height, seed=seed, bit_depth=int(bit_depth))
    elapsed = time.perf_counter() - start
    coco = json.loads(ann_path.read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    counts = Counter(a["category_id"] for a in coco["annotations"])
    per_class = ", ".join(f"{names[cid]}: {counts.get(cid, 0)}" for cid in sorted(names))
    click.echo(
        f"wrote {len(coco['images'])} images ({width}x{height}, {bit_depth}-bit) with "
        f"{len(coco['annotations'])} objects ({per_class}) in {elapsed:.1f}s"
    )
    click.echo(f"annotations: {ann_path}")
    click.echo(f"images:      {ann_path.parent / 'images'}")
