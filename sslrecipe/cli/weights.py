"""`sslrecipe weights`: the catalogue of public SSL checkpoints, checksummed fetch, conversion, export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import click

from sslrecipe.errors import SSLRecipeError


def _warn(msg: str) -> None:
    click.secho(f"warning: {msg}", fg="yellow", err=True)


def _parse_kwargs(items: tuple[str, ...]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SSLRecipeError(f"--kwarg {item!r} must be KEY=VALUE (e.g. img_size=112)")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


@click.group()
def weights() -> None:
    """Public SSL checkpoints: list, fetch (checksummed, cached), convert to timm, export.

    \b
    list     the catalogue (name, method, backbone, licence; the source on wide terminals)
    info     everything the catalogue knows about one entry, and whether it is cached
    fetch    download (or find in the cache) and verify; prints the local path
    convert  any supported SSL checkpoint layout -> encoder.safetensors + encoder.json (timm keys)
    export   an encoder or a run's encoder -> timm / torchvision / ultralytics / safetensors
    cache    what the download cache holds; --clear empties it
    """


@weights.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@click.option("--method", default=None, help="Only entries of this SSL method (dino, mae, spark, ...).")
@click.option("--backbone", default=None, help="Only entries for this timm backbone.")
def list_cmd(as_json: bool, method: Optional[str], backbone: Optional[str]) -> None:
    """List the catalogue of public SSL checkpoints."""
    from sslrecipe.weights.catalogue import load_catalogue

    entries = [
        e for e in load_catalogue()
        if (method is None or e.method == method) and (backbone is None or e.backbone == backbone)
    ]
    if as_json:
        click.echo(json.dumps([e.row() for e in entries], indent=2))
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    # the columns that fit the terminal: the source (a long URL) only on wide ones, the method (in every name)
    # from 100 columns; `weights info NAME` and --json show everything
    wide, medium = console.width >= 150, console.width >= 100
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("name", overflow="fold")
    if medium:
        table.add_column("method", no_wrap=True)
    table.add_column("backbone", overflow="fold")
    table.add_column("in", justify="right")
    table.add_column("licence", no_wrap=True)
    if wide:
        table.add_column("source", overflow="fold")
    for e in entries:
        lic = f"[red]{e.licence}*[/red]" if e.non_commercial else e.licence
        row = [e.name] + ([e.method] if medium else []) + [e.backbone, str(e.in_chans), lic]
        table.add_row(*row + ([e.source.key] if wide else []))
    console.print(table)
    if any(e.non_commercial for e in entries):
        click.echo("* non-commercial use only.")
    click.echo(f"{len(entries)} entries. Use a name as `weights.id` with `weights.source: fetch`;\n"
               "`sslrecipe weights info NAME` shows its source.")


@weights.command("info")
@click.argument("name")
def info_cmd(name: str) -> None:
    """Show one catalogue entry (with the input mean/std its weights expect) and whether it is in the cache.

    NAME may also be an encoder (a directory holding encoder.json, or that file): then its timm model, input
    channels, mean/std and origin are shown."""
    from sslrecipe.weights.catalogue import get_entry
    from sslrecipe.weights.fetch import local_path

    if Path(name).expanduser().exists():
        _encoder_info(Path(name).expanduser())
        return
    e = get_entry(name)
    row = e.row()
    row["manual_path"] = str(local_path(e.source, e.cache_filename))
    for k, v in row.items():
        if v not in (None, ""):
            click.echo(f"{k:>15}: {v}")
    lic = e.licence_warning()
    if lic:
        _warn(lic)


def _encoder_info(path: Path) -> None:
    from sslrecipe.models.backbone import encoder_paths
    from sslrecipe.models.normalization import Normalization

    _weights, meta_path = encoder_paths(path)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SSLRecipeError(f"cannot read {meta_path}: {e}") from None
    if not isinstance(meta, dict):
        raise SSLRecipeError(f"{meta_path} must hold a JSON object (an encoder.json)")
    in_chans = (meta.get("timm_kwargs") or {}).get("in_chans")
    norm = Normalization.from_meta(meta, in_chans, str(meta_path))
    rows = {"encoder": str(meta_path.parent), "timm_name": meta.get("timm_name"), "in_chans": in_chans,
            "mean": list(norm.mean), "std": list(norm.std)}
    if "mean" not in meta:
        rows["normalization"] = "not recorded (written before issue 14): the project's 0.5 / 0.25"
    for k in ("catalogue", "method", "start", "source", "id", "licence"):
        if meta.get(k) not in (None, ""):
            rows[k] = meta[k]
    for k, v in rows.items():
        click.echo(f"{k:>15}: {v}")


@weights.command("fetch")
@click.argument("spec")
@click.option("--sha256", default=None, help="Expected SHA-256 (overrides the catalogue's).")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar (default: on a terminal, for large files).")
def fetch_cmd(spec: str, sha256: Optional[str], progress: Optional[bool]) -> None:
    """Download SPEC (a catalogue NAME, a URL or hf://REPO/FILE[@REV]) into the cache, verify it, print its path.

    The cache is $SSLRECIPE_CACHE (default ~/.cache/sslrecipe); hub files use the Hugging Face cache
    (HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE are honoured). With SSLRECIPE_OFFLINE=1 or HF_HUB_OFFLINE=1 only
    cached files are used.
    """
    from sslrecipe.weights.fetch import fetch

    got = fetch(spec, sha256, progress=progress, warn=_warn)
    if got.recorded:
        click.secho(f"recorded sha256 {got.sha256} (verified on every later use)", err=True)
    elif not got.downloaded:
        click.secho(f"cached, sha256 {got.sha256} verified", err=True)
    click.echo(str(got.path))


@weights.command("convert")
@click.argument("src")
@click.argument("dst", type=click.Path(file_okay=False, path_type=Path))
@click.option("--from", "layout", default="auto", show_default=True,
              type=click.Choice(["auto", "dino", "moco", "resim", "mae", "spark", "leopart", "timm", "torchvision",
                                 "detectron2"]),
              help="The checkpoint's key layout.")
@click.option("--backbone", default=None, help="timm model name to convert to (default: the catalogue entry's).")
@click.option("--in-chans", type=int, default=None,
              help="Input channels of the converted encoder (default: the checkpoint's); the first layer is adapted.")
@click.option("--kwarg", "kwargs", multiple=True, help="Extra timm.create_model argument KEY=VALUE (repeatable).")
@click.option("--sha256", default=None, help="Expected SHA-256 of SRC.")
@click.option("--json", "as_json", is_flag=True, help="Print the conversion report as JSON.")
def convert_cmd(src: str, dst: Path, layout: str, backbone: Optional[str], in_chans: Optional[int],
                kwargs: tuple[str, ...], sha256: Optional[str], as_json: bool) -> None:
    """Convert SRC into DST/encoder.safetensors + DST/encoder.json with timm key names.

    SRC is a checkpoint file, or a catalogue name / URL / hf:// path (fetched first). Reports the tensors
    loaded, missing and unexpected, and what was dropped (heads, momentum encoders, queues, decoders).
    """
    from sslrecipe.weights.catalogue import find_entry
    from sslrecipe.weights.convert import resolve_weights
    from sslrecipe.weights.fetch import parse_spec

    source = "file" if Path(src).expanduser().is_file() else "fetch"
    entry = parse_spec(src).entry if source == "fetch" else find_entry(src)
    name = backbone or (entry.backbone if entry else None)
    if name is None:
        raise SSLRecipeError("--backbone is required (a timm model name such as resnet50 or vit_small_patch16_224)")
    _require_timm_model(name)  # before anything is read or downloaded
    chans = in_chans if in_chans is not None else (entry.in_chans if entry else None)
    if chans is None:
        chans = _checkpoint_in_chans(src, name, layout) if source == "file" else 3
    out = resolve_weights(source, src, sha256, None if layout == "auto" else layout, name, chans, dst,
                          timm_kwargs=_parse_kwargs(kwargs), warn=_warn)
    meta = json.loads((out / "encoder.json").read_text())
    report = meta.get("conversion", {})
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"layout {report.get('layout')}: {report.get('loaded')} of {report.get('total')} tensors of "
                   f"{name} (in_chans={chans}) loaded")
        for reason, n in (report.get("dropped") or {}).items():
            click.echo(f"  dropped {n:4d} x {reason}")
        if report.get("missing_keys"):
            click.echo(f"  missing ({len(report['missing_keys'])}): {', '.join(report['missing_keys'][:10])}")
        if report.get("unexpected_keys"):
            unexpected = report["unexpected_keys"]
            click.echo(f"  unexpected ({len(unexpected)}): {', '.join(unexpected[:10])}")
        for n in report.get("notes", []):
            click.echo(f"  note: {n}")
    click.echo(str(out / "encoder.safetensors"))


def _require_timm_model(name: str) -> None:
    """An unknown --backbone is one message with the closest timm names, not timm's traceback."""
    import timm

    if not timm.is_model(name):
        import torch

        from sslrecipe.models.backbone import create_backbone

        with torch.device("meta"):
            create_backbone(name)  # raises SSLRecipeError naming the closest models


def _checkpoint_in_chans(path: str, timm_name: str, layout: str) -> int:
    """The input channels of the checkpoint's first layer (so a 13-band file converts to a 13-band encoder)."""
    import torch

    from sslrecipe.models.backbone import create_backbone
    from sslrecipe.weights.convert import detect_layout, load_checkpoint, select_state_dict

    sd, implied = select_state_dict(load_checkpoint(path), None, [])
    lay = layout if layout != "auto" else (implied or detect_layout(sd))
    with torch.device("meta"):
        ref = create_backbone(timm_name)
    first = (ref.pretrained_cfg or {}).get("first_conv") or ""
    first = first if isinstance(first, str) else first[0]
    if lay == "torchvision" and first == "patch_embed.proj":
        first = "conv_proj"
    if lay == "detectron2":
        first = "stem.conv1"
    for k, v in sd.items():
        if k.endswith(f"{first}.weight") and v.ndim == 4:
            return int(v.shape[1])
    return 3


@weights.command("export")
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.option("--format", "fmt", required=True,
              type=click.Choice(["timm", "torchvision", "ultralytics", "safetensors"]),
              help="Target format.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output file (folder for timm); default: ENCODER_DIR/export/...")
@click.option("--prefix", default="", help="Key prefix for torchvision/safetensors (e.g. backbone.body.).")
@click.option("--nc", type=int, default=80, show_default=True, help="Number of classes of the Ultralytics model.")
def export_cmd(src: Path, fmt: str, out: Optional[Path], prefix: str, nc: int) -> None:
    """Export SRC (a run directory, an encoder directory or encoder.safetensors) for timm, torchvision detection,
    Ultralytics YOLO (optional extra: pip install sslrecipe[yolo]) or as a plain safetensors file."""
    from sslrecipe.weights.export import export_encoder_as

    path = export_encoder_as(src, fmt, out, prefix=prefix, nc=nc, warn=_warn)
    click.echo(str(path))


@weights.command("cache")
@click.argument("names", nargs=-1)
@click.option("--clear", is_flag=True, help="Delete the listed files (the checksum registry is kept).")
@click.option("--json", "as_json", is_flag=True, help="Print the files as JSON.")
def cache_cmd(names: tuple[str, ...], clear: bool, as_json: bool) -> None:
    """List the downloaded checkpoints (all, or these catalogue NAMES) with their sizes; --clear deletes them.

    URL downloads live in $SSLRECIPE_CACHE/files (default ~/.cache/sslrecipe/files), hub files in the Hugging
    Face cache; only the catalogue's hub files are listed and cleared there. checksums.json, which later
    downloads are verified against, is kept.
    """
    from sslrecipe.engine.clean import human
    from sslrecipe.weights.cache import cached_files, checksum_registry, clear_cached
    from sslrecipe.weights.fetch import cache_root

    files = cached_files(names)
    if as_json and not clear:
        click.echo(json.dumps([{"name": f.name, "kind": f.kind, "bytes": f.bytes, "path": str(f.path)}
                               for f in files], indent=2))
        return
    if not files:
        click.echo(f"the cache holds no {'such ' if names else ''}checkpoints ({cache_root()})")
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("name", overflow="fold")
    table.add_column("kind")
    table.add_column("size", justify="right")
    table.add_column("file", overflow="fold")
    for f in files:
        table.add_row(f.name or "(not in the catalogue)", f.kind, human(f.bytes), f.path.name)
    Console(highlight=False).print(table)
    total = sum(f.bytes for f in files)
    if not clear:
        click.echo(f"{len(files)} files, {human(total)}; delete them with --clear.\nin {cache_root()}")
        return
    freed = clear_cached(files)
    click.echo(f"deleted {len(files)} files, {human(freed)} freed (kept {checksum_registry()})")
