"""The run report: ``report.md`` with the metrics tables, ``loss_curve.png`` (loss and lr per step),
``pr_curves.png`` (precision/recall), ``ap_by_size.png`` (AP per object size, with and without sliced
inference when it ran) and ``detections.png`` (ground truth and predictions in different colours, the
smallest object of each image enlarged in an inset).

Plots use matplotlib's object API on the Agg canvas (no pyplot global state, no display needed).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from sslrecipe.atomic import atomic_write_file, atomic_write_text
from sslrecipe.engine.events import read_events

REPORT_MD = "report.md"
LOSS_PNG = "loss_curve.png"
DETECTIONS_PNG = "detections.png"
PR_PNG = "pr_curves.png"
SIZES_PNG = "ap_by_size.png"

# (column header, metric key) of the main table; the AR key is found by pattern (bbox/AR<maxDets>).
_MAIN_COLUMNS = (
    ("mAP", "bbox/mAP"),
    ("AP50", "bbox/AP50"),
    ("AP75", "bbox/AP75"),
    ("AP_S", "bbox/AP_small"),
    ("AP_M", "bbox/AP_medium"),
    ("AP_L", "bbox/AP_large"),
)
_GT_COLOUR = "#00e676"
_DET_COLOUR = "#ff3d00"


# ---------------------------------------------------------------------------------------------- io


def _save_figure(fig, path: Path) -> None:
    atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


_write_text = atomic_write_text


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def load_display_image(path: Path) -> np.ndarray:
    """An image as float [0, 1], HxW (gray) or HxWx3, for display.

    8-bit images are divided by 255; 16-bit / 32-bit / float images (thermal) are stretched between their
    0.5th and 99.5th percentiles so that their contrast is visible.
    """
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "1"):
            im = im.convert("RGB" if im.mode != "LA" and im.mode != "1" else "L")
        arr = np.asarray(im)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[2] > 3:
        arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    arr = arr.astype(np.float32)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return np.zeros(arr.shape, dtype=np.float32)
    lo, hi = np.percentile(finite, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.float32)
    return np.clip((np.nan_to_num(arr, nan=lo) - lo) / (hi - lo), 0.0, 1.0)


# ------------------------------------------------------------------------------------------ metrics


_NA = "n/a[^na]"


def _fmt(value: Any) -> str:
    """One table cell: percentages with one decimal; None / non-finite as n/a with the footnote mark."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return _NA
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _ar_key(metrics: Mapping[str, Any]) -> Optional[str]:
    keys = [k for k in metrics if re.fullmatch(r"bbox/AR\d+", k)]
    return sorted(keys, key=lambda k: int(k[len("bbox/AR"):]))[-1] if keys else None


_SURVEY_COLUMNS = (
    ("AP (no cls)", "agnostic/mAP"),
    ("AP50 (no cls)", "agnostic/AP50"),
    ("AP_S (no cls)", "agnostic/AP_small"),
    ("AP_S@0.3 (no cls)", "agnostic/AP_small@0.3"),
    ("AP@0.05 (no cls)", "agnostic/AP@0.05"),
    ("AP@0.05", "bbox/AP@0.05"),
    ("F1", "F1"),
    ("F1@0.05", "F1@0.05"),
)
_F1_ROWS = (("IoU 0.5", ""), ("IoU 0.05", "@0.05"))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align_first_left: bool = False) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(("---" if (i == 0 and align_first_left) else "---:") for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def survey_table(metrics: Mapping[str, Any]) -> Optional[str]:
    """The survey's class-agnostic / low-IoU / F1 metrics as one markdown row (None when absent)."""
    cols = [(name, key) for name, key in _SURVEY_COLUMNS if key in metrics]
    if not cols:
        return None
    return _table([n for n, _ in cols], [[_fmt(metrics[k]) for _, k in cols]])


def f1_table(metrics: Mapping[str, Any]) -> Optional[str]:
    rows = []
    for label, suffix in _F1_ROWS:
        if f"F1{suffix}" not in metrics:
            continue
        t = metrics.get(f"F1{suffix}_threshold")
        rows.append([label, _fmt(metrics.get(f"F1{suffix}")), "n/a" if t is None else f"{t:.3f}",
                     _fmt(metrics.get(f"precision{suffix}")), _fmt(metrics.get(f"recall{suffix}"))])
    if not rows:
        return None
    return _table(["matching", "best F1", "score threshold", "precision", "recall"], rows, align_first_left=True)


def per_class_table(metrics: Mapping[str, Any]) -> Optional[str]:
    classes: dict[str, dict[str, Any]] = {}
    for k, v in metrics.items():
        if k.startswith("per_class/"):
            name, metric = k[len("per_class/"):].rsplit("/", 1)
            classes.setdefault(name, {})[metric] = v
    if not classes:
        return None
    rows = [[name, _fmt(v.get("AP")), _fmt(v.get("AP50")), _fmt(v.get("AP_small"))] for name, v in classes.items()]
    return _table(["class", "AP", "AP50", "AP_S"], rows, align_first_left=True)


def tiling_table(metrics: Mapping[str, Any]) -> Optional[str]:
    """AP with and without sliced inference, side by side (None when tiling did not run)."""
    keys = [k for k in ("bbox/mAP", "bbox/AP50", "bbox/AP_small", "agnostic/AP_small@0.3", "agnostic/AP@0.05", "F1")
            if f"tiled/{k}" in metrics]
    if not keys:
        return None
    rows = [["whole image"] + [_fmt(metrics.get(k)) for k in keys],
            ["tiles + whole image"] + [_fmt(metrics.get(f"tiled/{k}")) for k in keys]]
    return _table(["inference"] + keys, rows, align_first_left=True)


def metrics_table(metrics: Mapping[str, Any]) -> tuple[str, bool]:
    """(markdown table, whether any cell is n/a)."""
    columns = list(_MAIN_COLUMNS)
    ar = _ar_key(metrics)
    columns.append((ar.split("/", 1)[1] if ar else "AR100", ar or "bbox/AR100"))
    values = [metrics.get(key) for _, key in columns]
    header = "| " + " | ".join(name for name, _ in columns) + " |"
    rule = "|" + "|".join("---:" for _ in columns) + "|"
    row = "| " + " | ".join(_fmt(v) for v in values) + " |"
    return "\n".join((header, rule, row)), _NA in row


# ------------------------------------------------------------------------------------------ losses


def progress_by_stage(events: Iterable[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Stage -> progress events of its latest attempt, one per step (the last written), sorted by step.

    "Latest attempt" is the stage hash of the last ``stage_start`` / ``stage_cached`` for that stage, so a
    rerun with changed settings shows the new curve, and a resumed stage (same hash) keeps the steps
    from before the interruption.
    """
    current_hash: dict[Any, Any] = {}
    latest_hash: dict[Any, Any] = {}
    by_key: dict[tuple[Any, Any], dict[int, dict[str, Any]]] = defaultdict(dict)
    for ev in events:
        kind, stage = ev.get("event"), ev.get("stage")
        if kind in ("stage_start", "stage_cached"):
            current_hash[stage] = ev.get("hash")
            latest_hash[stage] = ev.get("hash")
        elif kind == "progress" and isinstance(ev.get("step"), (int, float)):
            by_key[(stage, current_hash.get(stage))][int(ev["step"])] = dict(ev)
    out: dict[str, list[dict[str, Any]]] = {}
    for (stage, h), steps in by_key.items():
        if stage in latest_hash and latest_hash[stage] != h:
            continue
        out[str(stage)] = [steps[s] for s in sorted(steps)]
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot_loss_curve(events_path: Path, out_path: Path) -> Path:
    stages = progress_by_stage(read_events(events_path))
    stages = {s: evs for s, evs in stages.items() if any(_finite(e.get("loss")) for e in evs)}
    n = max(1, len(stages))
    fig = _new_figure(8.0, 3.2 * n)
    if not stages:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no training progress recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    for i, (stage, evs) in enumerate(stages.items()):
        ax = fig.add_subplot(n, 1, i + 1)
        pts = [(e["step"], e["loss"]) for e in evs if _finite(e.get("loss"))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="#1565c0", lw=1.6, label="loss")
        parts = sorted({k for e in evs for k, v in (e.get("losses") or {}).items() if _finite(v)})
        if len(parts) > 1:
            for part in parts:
                pp = [(e["step"], e["losses"][part]) for e in evs if _finite((e.get("losses") or {}).get(part))]
                ax.plot([p[0] for p in pp], [p[1] for p in pp], lw=0.8, alpha=0.6, label=part)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(stage)
        ax.grid(alpha=0.3)
        lines, labels = ax.get_legend_handles_labels()
        lrs = [(e["step"], e["lr"]) for e in evs if _finite(e.get("lr"))]
        if lrs:
            ax2 = ax.twinx()
            (lr_line,) = ax2.plot([p[0] for p in lrs], [p[1] for p in lrs], color="#ef6c00", lw=1.0, ls="--")
            top = max(p[1] for p in lrs)
            if top > 0:
                ax2.set_ylim(0, top * 1.1)
            ax2.set_ylabel("lr", color="#ef6c00")
            ax2.tick_params(axis="y", colors="#ef6c00")
            ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
            lines, labels = lines + [lr_line], labels + ["lr"]
        ax.legend(lines, labels, fontsize=7, loc="upper right")
    fig.tight_layout()
    _save_figure(fig, out_path)
    return out_path


# ------------------------------------------------------------------------------- curves and sizes

_PR_SERIES = (
    ("bbox@0.5", "class-aware, IoU 0.5", "#1565c0", "-"),
    ("agnostic@0.5", "class-agnostic, IoU 0.5", "#2e7d32", "-"),
    ("agnostic_small@0.3", "class-agnostic, small, IoU 0.3", "#ef6c00", "-"),
    ("bbox@0.05", "class-aware, IoU 0.05", "#6a1b9a", "--"),
    ("tiled/bbox@0.5", "tiled: class-aware, IoU 0.5", "#1565c0", ":"),
    ("tiled/agnostic_small@0.3", "tiled: class-agnostic, small, IoU 0.3", "#ef6c00", ":"),
)


def plot_pr_curves(curves: Mapping[str, Any], out_path: Path) -> Path:
    """Precision against recall (COCO's 101 recall points): overall curves left, one per class right."""
    recall = curves.get("recall") or []
    fig = _new_figure(11.0, 4.4)
    ax = fig.add_subplot(1, 2, 1)
    drawn = 0
    for key, label, colour, style in _PR_SERIES:
        prec = curves.get(key)
        if prec and len(prec) == len(recall):
            ax.plot(recall, prec, color=colour, ls=style, lw=1.6, label=label)
            drawn += 1
    ax.set_title("precision / recall")
    ax2 = fig.add_subplot(1, 2, 2)
    per_class = curves.get("per_class@0.5") or {}
    cmap = None
    try:
        from matplotlib import colormaps

        cmap = colormaps["tab10"]
    except Exception:  # pragma: no cover - old matplotlib
        pass
    n_cls = 0
    for i, (name, prec) in enumerate(per_class.items()):
        if prec and len(prec) == len(recall):
            ax2.plot(recall, prec, lw=1.4, label=str(name), color=cmap(i % 10) if cmap else None)
            n_cls += 1
    ax2.set_title("per class, IoU 0.5")
    for a, n in ((ax, drawn), (ax2, n_cls)):
        a.set_xlim(0, 1)
        a.set_ylim(0, 1.02)
        a.set_xlabel("recall")
        a.set_ylabel("precision")
        a.grid(alpha=0.3)
        if n:
            a.legend(fontsize=7, loc="lower left")
        else:
            a.text(0.5, 0.5, "no curve (no ground truth)", ha="center", va="center", transform=a.transAxes)
    fig.tight_layout()
    _save_figure(fig, out_path)
    return out_path


_SIZE_BARS = (("small", "bbox/AP_small"), ("medium", "bbox/AP_medium"), ("large", "bbox/AP_large"),
              ("all", "bbox/mAP"))


def plot_ap_by_size(metrics: Mapping[str, Any], out_path: Path) -> Path:
    """AP@[.5:.95] per COCO size bucket, class-aware and class-agnostic, with sliced inference beside
    when it ran; empty buckets are marked n/a instead of drawn as 0."""
    series = [("class-aware", "", "#1565c0"), ("class-agnostic", "agnostic", "#2e7d32")]
    if any(k.startswith("tiled/") for k in metrics):
        series += [("tiled, class-aware", "tiled", "#90caf9")]
    fig = _new_figure(7.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(series)
    for j, (label, kind, colour) in enumerate(series):
        for i, (bucket, key) in enumerate(_SIZE_BARS):
            if kind == "agnostic":
                key = {"bbox/AP_small": "agnostic/AP_small", "bbox/mAP": "agnostic/mAP"}.get(key)
            elif kind == "tiled":
                key = "tiled/" + key
            value = metrics.get(key) if key else None
            x = i + (j - (len(series) - 1) / 2) * width
            if _finite(value):
                ax.bar(x, value, width, color=colour, label=label if i == 0 or not ax.get_legend_handles_labels()[1].count(label) else None)
                ax.text(x, value + 0.8, f"{value:.1f}", ha="center", va="bottom", fontsize=6)
            else:
                ax.text(x, 1.0, "n/a", ha="center", va="bottom", fontsize=6, rotation=90, color="#555555")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    if uniq:
        ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="upper left")
    ax.set_xticks(range(len(_SIZE_BARS)))
    ax.set_xticklabels([f"{b}" for b, _ in _SIZE_BARS])
    ax.set_ylabel("AP@[.5:.95] (%)")
    ax.set_ylim(0, 105)
    ax.set_title("AP by object size (small < 32², medium < 96²)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, out_path)
    return out_path


# -------------------------------------------------------------------------------------- detections


def _pick_images(gt: Mapping[str, Any], n: int) -> list[Mapping[str, Any]]:
    counts: dict[Any, int] = defaultdict(int)
    for a in gt.get("annotations", []):
        counts[a["image_id"]] += 1
    images = list(gt.get("images", []))
    with_objects = [im for im in images if counts[im["id"]] > 0]
    without = [im for im in images if counts[im["id"]] == 0]
    return (with_objects + without)[:n]


def _small_object_inset(ax, pixels: np.ndarray, gts: Sequence[Mapping[str, Any]], dets: Sequence[Mapping[str, Any]]) -> None:
    from matplotlib.patches import Rectangle

    small = [a for a in gts if not a.get("iscrowd") and a["bbox"][2] * a["bbox"][3] < 32 * 32]
    if not small:
        return
    x, y, w, h = min(small, key=lambda a: a["bbox"][2] * a["bbox"][3])["bbox"]
    height, width = pixels.shape[:2]
    side = max(16.0, 3 * max(w, h))
    cx, cy = x + w / 2, y + h / 2
    x0, y0 = max(0.0, min(cx - side / 2, width - side)), max(0.0, min(cy - side / 2, height - side))
    # the inset spans 30 % of the image width: the region is enlarged by (0.3 * width) / side
    zoom = (width * 0.3) / side
    if zoom < 2:
        return
    ins = ax.inset_axes([0.69, 0.01, 0.3, 0.3])
    ins.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
    for a in gts:
        bx, by, bw, bh = a["bbox"]
        ins.add_patch(Rectangle((bx, by), bw, bh, fill=False, ec=_GT_COLOUR, lw=1.2, ls="-" if not a.get("iscrowd") else ":"))
    for d in dets:
        bx, by, bw, bh = d["bbox"]
        ins.add_patch(Rectangle((bx, by), bw, bh, fill=False, ec=_DET_COLOUR, lw=1.2))
    ins.set_xlim(x0, x0 + side)
    ins.set_ylim(y0 + side, y0)
    ins.set_xticks([])
    ins.set_yticks([])
    for spine in ins.spines.values():
        spine.set_edgecolor("#ffeb3b")
        spine.set_linewidth(1.5)
    ins.set_title(f"x{zoom:.0f}", fontsize=6, color="#ffeb3b", pad=1)
    ax.add_patch(Rectangle((x0, y0), side, side, fill=False, ec="#ffeb3b", lw=0.8, ls="--"))


def plot_detections(
    gt: Mapping[str, Any],
    detections: Sequence[Mapping[str, Any]],
    image_root: Path,
    out_path: Path,
    n_images: int = 4,
    score_threshold: float = 0.5,
    inset: bool = True,
) -> Path:
    """Images with ground truth (green) and detections (red); with ``inset``, the smallest object of each
    image (area < 32², not a crowd region) is shown enlarged 4x or more in a corner, boxes included."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    chosen = _pick_images(gt, n_images)
    names = {c["id"]: str(c.get("name", c["id"])) for c in gt.get("categories", [])}
    gt_by_image: dict[Any, list] = defaultdict(list)
    for a in gt.get("annotations", []):
        gt_by_image[a["image_id"]].append(a)
    det_by_image: dict[Any, list] = defaultdict(list)
    for d in detections:
        if d.get("score", 0.0) >= score_threshold:
            det_by_image[d["image_id"]].append(d)

    n = max(1, len(chosen))
    cols = min(2, n)
    rows = math.ceil(n / cols)
    fig = _new_figure(5.2 * cols, 5.0 * rows + 0.4)
    for i, im in enumerate(chosen):
        ax = fig.add_subplot(rows, cols, i + 1)
        path = Path(image_root) / im["file_name"]
        pixels = None
        try:
            pixels = load_display_image(path)
            ax.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
        except (OSError, ValueError) as e:
            ax.text(0.5, 0.5, f"cannot read\n{path.name}\n{e}", ha="center", va="center", fontsize=7, transform=ax.transAxes)
            w, h = im.get("width", 1), im.get("height", 1)
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
        for a in gt_by_image[im["id"]]:
            x, y, w, h = a["bbox"]
            ax.add_patch(Rectangle((x, y), w, h, fill=False, ec=_GT_COLOUR, lw=1.0, ls="-" if not a.get("iscrowd") else ":"))
        dets = sorted(det_by_image[im["id"]], key=lambda d: -d["score"])
        for d in dets:
            x, y, w, h = d["bbox"]
            ax.add_patch(Rectangle((x, y), w, h, fill=False, ec=_DET_COLOUR, lw=1.0))
            label = f"{names.get(d['category_id'], d['category_id'])} {d['score']:.2f}"
            ax.text(x, y - 1, label, color="white", fontsize=5, va="bottom",
                    bbox={"facecolor": _DET_COLOUR, "alpha": 0.7, "pad": 0.5, "lw": 0})
        if inset and pixels is not None:
            _small_object_inset(ax, pixels, gt_by_image[im["id"]], dets)
        ax.set_title(f"{Path(im['file_name']).name}: {len(gt_by_image[im['id']])} GT, {len(dets)} det", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if not chosen:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no test images", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    handles = [
        Line2D([], [], color=_GT_COLOUR, lw=2, label="ground truth"),
        Line2D([], [], color=_DET_COLOUR, lw=2, label=f"detection (score >= {score_threshold:g})"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    _save_figure(fig, out_path)
    return out_path


# ------------------------------------------------------------------------------------------ report


def write_report(
    run_dir: Path,
    metrics: Mapping[str, Any],
    events_path: Path,
    gt: Mapping[str, Any],
    detections: Sequence[Mapping[str, Any]],
    image_root: Path,
    n_images: int = 4,
    score_threshold: float = 0.5,
    title: str = "",
    curves: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write ``run_dir/report.md`` and its PNGs (loss/lr curves, PR curves, AP by size and, when
    ``n_images`` > 0, detections); returns the path of ``report.md``.

    ``metrics`` are the evaluation's flat keys in percent (None = undefined, e.g. no ground truth in that
    bucket; ``tiled/...`` keys when sliced inference ran); ``events_path`` is the run's ``events.jsonl``;
    ``gt`` / ``detections`` are the evaluated COCO ground truth and results, with images under
    ``image_root``; ``curves`` are :func:`sslrecipe.evaluate.coco_eval.evaluate_full`'s precision/recall
    curves (``curves.json`` of the evaluate stage) — None recomputes them from ``gt`` and ``detections``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plot_loss_curve(Path(events_path), run_dir / LOSS_PNG)
    if curves is None and gt.get("images"):
        from sslrecipe.evaluate.coco_eval import evaluate_full

        ar = _ar_key(metrics)
        curves = evaluate_full(gt, list(detections), int(ar[len("bbox/AR"):]) if ar else 100).curves
    if curves:
        plot_pr_curves(curves, run_dir / PR_PNG)
    plot_ap_by_size(metrics, run_dir / SIZES_PNG)
    if n_images > 0:
        plot_detections(gt, detections, Path(image_root), run_dir / DETECTIONS_PNG, n_images, score_threshold)

    table, has_na = metrics_table(metrics)
    lines = [f"# {title or 'sslrecipe run report'}", ""]
    n_img = len(gt.get("images", []))
    n_ann = sum(1 for a in gt.get("annotations", []) if not a.get("iscrowd"))
    lines += [
        f"Evaluated on {n_img} image(s) with {n_ann} ground-truth box(es); {len(detections)} detection(s). "
        "COCO box metrics in percent (pycocotools).",
        "",
        table,
        "",
    ]
    shown: set = {k for _, k in _MAIN_COLUMNS} | ({_ar_key(metrics)} if _ar_key(metrics) else set())
    survey = survey_table(metrics)
    if survey:
        lines += ["The survey's metrics: class-agnostic (\"no cls\", all classes merged), AP_S at IoU 0.3, AP at "
                  "IoU 0.05 (its VEDAI protocol) and the best F1 over score thresholds:", "", survey, ""]
        shown |= {k for _, k in _SURVEY_COLUMNS}
        has_na = has_na or _NA in survey
    f1 = f1_table(metrics)
    if f1:
        lines += ["F1 with COCO's class-aware matching (ignore regions ignored):", "", f1, ""]
        shown |= {f"{m}{sfx}" for _, sfx in _F1_ROWS for m in ("F1", "F1_threshold", "precision", "recall")}
    tiled = tiling_table(metrics)
    if tiled:
        lines += ["Sliced inference (overlapping tiles plus the whole image, merged by NMS) against the whole image "
                  "alone:", "", tiled, ""]
        has_na = has_na or _NA in tiled
    classes = per_class_table(metrics)
    if classes:
        lines += ["## Per class", "", classes, ""]
        has_na = has_na or _NA in classes
    others = [(k, v) for k, v in metrics.items()
              if k not in shown and not k.startswith(("per_class/", "tiled/"))]
    if others:
        lines += ["All other metrics:", "", "| metric | value |", "|---|---:|"]
        lines += [f"| `{k}` | {_fmt(v)} |" for k, v in others]
        has_na = has_na or any(_fmt(v) == _NA for _, v in others)
        lines.append("")
    lines += ["## Training", "", f"![Loss and learning rate per step]({LOSS_PNG})", ""]
    lines += ["## Precision, recall and object sizes", ""]
    if curves:
        lines += [f"![Precision/recall curves]({PR_PNG})", ""]
    lines += [f"![AP by object size]({SIZES_PNG})", ""]
    if n_images > 0:
        lines += [
            "## Detections",
            "",
            f"Ground truth in green, detections with score >= {score_threshold:g} in red; the smallest object of "
            f"each image is enlarged in the yellow inset ([{DETECTIONS_PNG}]({DETECTIONS_PNG})).",
            "",
            f"![Detections on test images]({DETECTIONS_PNG})",
            "",
        ]
    if has_na:
        lines += [
            "[^na]: n/a: undefined — no ground-truth object in that size bucket or class (COCO: small < 32², "
            "medium < 96², large above; pycocotools prints -1), or no detection at all.",
            "",
        ]
    path = run_dir / REPORT_MD
    _write_text(path, "\n".join(lines))
    return path
