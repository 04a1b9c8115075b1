"""`sslrecipe data convert|check|stats|dedup|leakage`: thin commands over sslrecipe.data."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import click

from sslrecipe.errors import DataError

_FORMATS_IN = ["auto", "coco", "yolo", "voc", "hit-uav"]


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def _pool_paths(pool: str) -> list[Path]:
    """A folder of images (recursive) or a text file listing one image path per line."""
    from sslrecipe.data.images import list_images

    p = Path(pool).expanduser()
    if p.is_file():
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]
        return [Path(ln) if Path(ln).is_absolute() else p.parent / ln for ln in lines]
    paths = list_images(p)
    if not paths:
        raise DataError(f"no images found in {p} (searched recursively for jpg/png/tif/tiff/bmp)")
    return paths


@click.command()
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path())
@click.option("--from", "from_", type=click.Choice(_FORMATS_IN), default="auto", show_default=True, help="Source format.")
@click.option("--to", "to", type=click.Choice(["coco", "yolo"]), default="coco", show_default=True, help="Output format.")
@click.option("--images", type=click.Path(exists=True, file_okay=False), default=None, help="Image folder of SRC (default: found next to it).")
@click.option("--split", default=None, help="Split to read (YOLO YAML / VOC ImageSets) and to write (YOLO images/<split>). Default train.")
@click.option("--link", is_flag=True, help="YOLO output: symlink the images instead of copying them.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def convert(src: str, dst: str, from_: str, to: str, images: Optional[str], split: Optional[str], link: bool, as_json: bool) -> None:
    """Convert a labeled set (COCO, YOLO, Pascal VOC, HIT-UAV) to COCO JSON or a YOLO dataset.

    \b
    DontCare / ignore regions become iscrowd:1 annotations in COCO (never a class);
    YOLO has no ignore regions, so they are left out there (the summary counts them).
    """
    from sslrecipe.data.formats import convert as do_convert

    summary = do_convert(src, dst, from_=from_, to=to, images=images, split=split, link=link)
    if as_json:
        _echo_json(summary)
        return
    click.echo(f"wrote {summary['output']} ({summary['to']}): {summary['images']} images, {summary['boxes']} boxes, "
               f"classes: {', '.join(map(str, summary['categories']))}")
    if summary.get("ignore_regions"):
        if to == "coco":
            click.echo(f"{summary['ignore_regions']} ignore region(s) kept as iscrowd:1 annotations (one per class)")
        else:
            click.echo(f"note: {summary['ignore_regions']} ignore region(s) left out (YOLO labels have no ignore regions)")
    if summary.get("clipped"):
        click.echo(f"note: {summary['clipped']} box(es) clipped to the image border, {summary.get('dropped_outside', 0)} dropped (entirely outside)")


@click.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--images", type=click.Path(exists=True, file_okay=False), default=None, help="Image folder of an annotation file.")
@click.option("--format", "fmt", type=click.Choice(_FORMATS_IN), default="auto", show_default=True)
@click.option("--split", default=None, help="Split of a YOLO YAML / VOC ImageSets.")
@click.option("--no-images", is_flag=True, help="Check the annotations only (do not decode the image files).")
@click.option("--json", "as_json", is_flag=True, help="Print the problems as JSON.")
@click.pass_context
def check(ctx: click.Context, path: str, images: Optional[str], fmt: str, split: Optional[str], no_images: bool, as_json: bool) -> None:
    """Check a dataset: an annotation file / dataset folder, or a plain folder of images.

    Names every problem with its file (missing, empty, truncated or unreadable images, boxes
    outside the image or without area, unknown category ids, duplicate ids, size mismatches).
    Exit status 1 when anything is found, 0 when clean.
    """
    from sslrecipe.data.check import check_dataset

    problems = check_dataset(path, image_root=images, format=fmt, split=split, images=not no_images)
    if as_json:
        _echo_json({"path": path, "count": len(problems), "problems": [p.to_dict() for p in problems]})
    else:
        for p in problems:
            click.echo(str(p))
        if problems:
            kinds: dict[str, int] = {}
            for p in problems:
                kinds[p.kind] = kinds.get(p.kind, 0) + 1
            summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
            click.secho(f"{len(problems)} problem(s) in {path}: {summary}", fg="red", err=True)
        else:
            click.secho(f"{path}: no problems found", fg="green")
    ctx.exit(1 if problems else 0)


def _format_stats(s: dict) -> str:
    lines = [f"images {s['images']}"]
    if "boxes" in s:
        lines[0] += f" ({s['images_without_boxes']} without boxes), boxes {s['boxes']}, ignore regions {s['ignore_regions']}"
        lines.append("per class: " + ", ".join(f"{c['name']} {c['boxes']} ({c['images']} images)" for c in s["categories"]))
        sz, fr = s["sizes"], s["size_fractions"]
        lines.append(f"sizes: small {sz['small']} ({fr['small']:.0%}), medium {sz['medium']} ({fr['medium']:.0%}), "
                     f"large {sz['large']} ({fr['large']:.0%}); tiny: area<8^2 {s['tiny']['lt8']}, area<16^2 {s['tiny']['lt16']}")
        b = s["box_size"]["sqrt_area"]
        lines.append(f"box side sqrt(area) px: median {b['median']}, p10 {b['p10']}, p90 {b['p90']}; "
                     f"relative to the image: {s['box_size']['median_relative']}")
        bpi = s["boxes_per_image"]
        dense = f"; {s['dense_images']} image(s) over COCO maxDets {s['max_dets']} (raise evaluate.max_dets)" if s["dense"] else ""
        lines.append(f"boxes per image: mean {bpi['mean']}, median {bpi['median']}, p95 {bpi['p95']}, max {bpi['max']}{dense}")
    if "image_sizes" in s:
        lines.append("image sizes: " + ", ".join(f"{k} ({v})" for k, v in list(s["image_sizes"].items())[:5]))
    if "channels" in s:
        lines.append(f"channels: {s['channels']} (effective {s.get('effective_channels')}), bit depth: {s['bit_depth']}")
    return "\n".join(lines)


@click.command()
@click.argument("annotations", type=click.Path(exists=True))
@click.option("--images", type=click.Path(exists=True, file_okay=False), default=None, help="Image folder.")
@click.option("--format", "fmt", type=click.Choice(_FORMATS_IN), default="auto", show_default=True)
@click.option("--split", default=None, help="Split of a YOLO YAML / VOC ImageSets.")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
def stats(annotations: str, images: Optional[str], fmt: str, split: Optional[str], as_json: bool) -> None:
    """Dataset statistics: boxes per class, object sizes (COCO buckets and tiny), density, channels, bit depth."""
    from sslrecipe.data.stats import dataset_stats

    s = dataset_stats(annotations, image_root=images, format=fmt, split=split)
    if as_json:
        _echo_json(s)
    else:
        click.echo(_format_stats(s))


@click.command()
@click.argument("pool", type=click.Path(exists=True))
@click.option("--threshold", type=click.IntRange(0, 63), default=None, help="Hamming distance (bits of 63) for near-duplicates [default: 8].")
@click.option("--write-list", type=click.Path(dir_okay=False), default=None, help="Write the deduplicated image list (one path a line).")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True, help="Processes for hashing.")
@click.option("--json", "as_json", is_flag=True, help="Print the groups as JSON.")
def dedup(pool: str, threshold: Optional[int], write_list: Optional[str], workers: int, as_json: bool) -> None:
    """Group near-duplicate frames of an image pool (perceptual hash), optionally writing a deduplicated list.

    POOL is a folder of images (searched recursively) or a text file listing images.
    """
    from sslrecipe.data import dedup as dd

    t = dd.DEDUP_THRESHOLD if threshold is None else threshold
    paths = _pool_paths(pool)
    start = time.perf_counter()
    errors: list = []
    groups = dd.dedup(paths, threshold=t, workers=workers, errors=errors)
    kept = dd.keep_list(paths, groups, drop=[p for p, _ in errors])
    seconds = time.perf_counter() - start
    if write_list:
        out = Path(write_list)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(f"{p}\n" for p in kept), encoding="utf-8")
    result = {
        "pool": pool,
        "images": len(paths),
        "threshold": t,
        "group_count": len(groups),
        "grouped_images": sum(len(g) for g in groups),
        "removed": sum(len(g) - 1 for g in groups),
        "kept": len(kept),
        "unreadable": [{"file": str(p), "message": m} for p, m in errors],
        "seconds": round(seconds, 3),
        "groups": [[str(p) for p in g] for g in groups],
    }
    if as_json:
        _echo_json(result)
        return
    for i, g in enumerate(groups, 1):
        click.echo(f"group {i} ({len(g)}): keep {g[0]}")
        for p in g[1:]:
            click.echo(f"    {p}")
    for p, m in errors:
        click.secho(f"warning: skipped {p}: {m}", fg="yellow", err=True)
    click.echo(f"{len(paths)} images, {len(groups)} group(s) of near-duplicates ({result['grouped_images']} images) at "
               f"threshold {t}; {len(kept)} kept, {result['removed']} removed; {seconds:.1f}s")
    if write_list:
        click.echo(f"wrote {write_list}")


@click.command()
@click.argument("pool", type=click.Path(exists=True))
@click.argument("annotations", type=click.Path(exists=True))
@click.option("--images", type=click.Path(exists=True, file_okay=False), default=None, help="Image folder of ANNOTATIONS.")
@click.option("--format", "fmt", type=click.Choice(_FORMATS_IN), default="auto", show_default=True)
@click.option("--split", default=None, help="Split of a YOLO YAML / VOC ImageSets.")
@click.option("--threshold", type=click.IntRange(0, 63), default=None, help="Hash distance of candidates verified on pixels [default: 12].")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True, help="Processes for hashing.")
@click.option("--json", "as_json", is_flag=True, help="Print the leaks as JSON.")
@click.pass_context
def leakage(ctx: click.Context, pool: str, annotations: str, images: Optional[str], fmt: str, split: Optional[str],
            threshold: Optional[int], workers: int, as_json: bool) -> None:
    """List POOL images that are copies (exact, re-encoded or resized) of the evaluation images of ANNOTATIONS.

    POOL is a folder of images or a text file listing images; ANNOTATIONS any labeled set
    (or a plain folder of evaluation images). Exit status 1 when a leak is found.
    """
    from sslrecipe.data import dedup as dd
    from sslrecipe.data.formats import detect_format, load_labeled

    ann = Path(annotations)
    plain = False
    if ann.is_dir() and fmt == "auto":
        try:
            detect_format(ann)
        except DataError:
            plain = True
    if plain:
        eval_paths = _pool_paths(annotations)
    else:
        coco, root = load_labeled(annotations, images=images, format=fmt, split=split)
        eval_paths = [root / img["file_name"] for img in coco["images"]]
    pool_paths = _pool_paths(pool)
    t = dd.LEAK_CANDIDATE_THRESHOLD if threshold is None else threshold
    start = time.perf_counter()
    errors: list = []
    leaks = dd.find_leakage(pool_paths, eval_paths, threshold=t, workers=workers, errors=errors)
    seconds = time.perf_counter() - start
    if as_json:
        _echo_json({
            "pool": pool, "annotations": annotations, "pool_images": len(pool_paths), "eval_images": len(eval_paths),
            "count": len(leaks), "seconds": round(seconds, 3),
            "leaks": [{"pool_path": str(x.pool_path), "eval_path": str(x.eval_path), "distance": x.distance, "kind": x.kind} for x in leaks],
            "unreadable": [{"file": str(p), "message": m} for p, m in errors],
        })
    else:
        for x in leaks:
            click.echo(f"{x.pool_path}  is a copy of  {x.eval_path}  ({x.kind}, hash distance {x.distance})")
        for p, m in errors:
            click.secho(f"warning: skipped {p}: {m}", fg="yellow", err=True)
        msg = f"{len(leaks)} leak(s): pool images that are copies of evaluation images" if leaks else "no leakage found"
        click.secho(f"{msg} ({len(pool_paths)} pool x {len(eval_paths)} evaluation images, {seconds:.1f}s)",
                    fg="red" if leaks else "green", err=bool(leaks))
    ctx.exit(1 if leaks else 0)


COMMANDS = [convert, check, stats, dedup, leakage]
