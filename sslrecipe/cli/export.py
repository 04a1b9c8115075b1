"""`sslrecipe export`: a fine-tuned detector as ONNX or a torch.export program, for use without sslrecipe."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click


def _warn(message: str) -> None:
    click.secho(f"warning: {message}", fg="yellow", err=True)


@click.command("export")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--format", "fmt", required=True, type=click.Choice(["onnx", "pt2"]),
              help="onnx: runs with onnxruntime alone; pt2: torch.export program (torch + torchvision).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output file; default: DETECTOR_DIR/export/detector.<format>.")
def export_cmd(source: Path, fmt: str, out: Optional[Path]) -> None:
    """Export the fine-tuned Faster R-CNN of SOURCE (a run directory or RUN/finetune-<hash>) as ONNX or .pt2.

    \b
    The file takes one image, float32 [C, H, W] in [0, 1] after the data's own
    normalisation, and returns boxes (xyxy pixels), scores and labels; the
    encoder's mean/std and the resize are inside. <file>.json beside it says
    what the caller does (docs/predict.md). For an encoder alone: `sslrecipe
    weights export`.
    """
    from sslrecipe.detect.export import export_detector

    path = export_detector(source, fmt, out, warn=_warn)
    click.echo(str(path))
