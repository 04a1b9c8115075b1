"""A fine-tuned detector as a user runs it on new images: ``sslrecipe.load_detector(path).predict(images)``.

``path`` is a run directory (its newest finished fine-tuning, found through ``events.jsonl``; a matrix cell's
stages live in the matrix's ``stages/``) or a detector directory (``finetune-<hash>/`` with ``detector.safetensors``
and ``detector.json``). Images are read exactly as training read them: :func:`sslrecipe.data.images.read_image`
(8/16-bit, 1/3 channels), the data's own normalisation (``data_normalization`` in ``detector.json``, e.g. the
16-bit percentiles), the channel count of the backbone; the detector itself then resizes to ``img_size`` and
applies the encoder's mean/std.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np

from sslrecipe.engine.rundir import run_layout
from sslrecipe.errors import SSLRecipeError

DETECTOR_JSON = "detector.json"
DETECTOR_WEIGHTS = "detector.safetensors"


# --------------------------------------------------------------------------- finding the detector


def _stage_events(run_dir: Path, stage: str) -> list[str]:
    """Directory names of a stage in the order the run's events started or reused them (newest last)."""
    from sslrecipe.engine.events import read_events

    names = []
    for ev in read_events(run_dir / "events.jsonl"):
        if ev.get("stage") == stage and ev.get("event") in ("stage_start", "stage_cached") and ev.get("dir"):
            names.append(str(ev["dir"]))
    return names


def _locate(run_dir: Path, recorded: str) -> Optional[Path]:
    """A stage directory recorded in events (absolute, or relative to where the run was started), or by its name
    in the run directory or a matrix's shared ``stages/`` (so a moved run directory still works)."""
    name = Path(recorded).name
    for candidate in (Path(recorded), run_dir / name, run_dir / "stages" / name, run_dir.parent / "stages" / name):
        if candidate.is_dir():
            return candidate
    return None


def find_stage_dir(run_dir: Path, stage: str, required: str) -> Optional[Path]:
    """The newest directory of ``stage`` in the run that holds ``required`` (a file name), or None."""
    for recorded in reversed(_stage_events(run_dir, stage)):
        found = _locate(run_dir, recorded)
        if found is not None and (found / required).is_file():
            return found
    return None


def resolve_detector_dir(path: Union[str, Path]) -> tuple[Path, Optional[Path]]:
    """``(detector directory, run directory or None)`` for a detector or run directory; SSLRecipeError otherwise."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SSLRecipeError(f"{p}: not found — give a run directory (RUN) or a detector directory (RUN/finetune-<hash>)")
    if p.is_file() and p.name in (DETECTOR_JSON, DETECTOR_WEIGHTS):
        p = p.parent
    if not p.is_dir():
        raise SSLRecipeError(f"{p} is a file; give a run directory or a detector directory (with {DETECTOR_JSON})")
    if (p / DETECTOR_JSON).is_file():
        return p, None
    if (p / "yolo.json").is_file():
        raise SSLRecipeError(f"{p} holds a fine-tuned YOLO (yolo.json); predict and export here cover the Faster/Mask "
                             "R-CNN detectors — run Ultralytics' own `yolo predict` / `yolo export` on its best.pt")
    if (p / "events.jsonl").is_file():
        run_layout(p)  # a run directory of a newer layout is refused, never misread
        found = find_stage_dir(p, "finetune", DETECTOR_JSON)
        if found is not None:
            return found, p
        if find_stage_dir(p, "finetune", "yolo.json") is not None:
            raise SSLRecipeError(f"run {p} fine-tuned a YOLO; predict and export here cover the Faster/Mask R-CNN "
                                 "detectors — use Ultralytics' own `yolo predict` / `yolo export` on its best.pt")
        raise SSLRecipeError(f"run {p} has no finished fine-tuning yet (no finetune-*/{DETECTOR_JSON}); "
                             f"finish it with `sslrecipe run {p}`")
    cells = sorted(c.name for c in p.iterdir() if c.is_dir() and (c / "events.jsonl").is_file())
    if cells:
        raise SSLRecipeError(f"{p} is a matrix with {len(cells)} cells; give one cell's directory, e.g. {p / cells[0]} "
                             f"(cells: {', '.join(cells[:8])}{' ...' if len(cells) > 8 else ''})")
    raise SSLRecipeError(f"{p} is neither a run directory (events.jsonl) nor a detector directory ({DETECTOR_JSON})")


def detector_inputs(detector_dir: Path, run_dir: Optional[Path] = None,
                    warn=None) -> tuple[dict, Optional[dict], list[dict]]:
    """``(spec, data normalisation or None, categories [{id, name}] in label order)`` of a detector directory.

    ``detector.json`` records the data normalisation and class names since predict existed; for an older one they
    come from the run's data stage (``run_dir``, or the run the detector directory sits in)."""
    spec = json.loads((Path(detector_dir) / DETECTOR_JSON).read_text(encoding="utf-8"))
    labels = sorted(int(k) for k in spec["label_to_category"])
    if "categories" in spec and "data_normalization" in spec:
        return spec, spec["data_normalization"], list(spec["categories"])
    manifest = None
    candidates = [run_dir] if run_dir is not None else []
    candidates += [Path(detector_dir).parent, Path(detector_dir).parent.parent]
    for run in candidates:
        if run is not None and (run / "events.jsonl").is_file():
            data_dir = find_stage_dir(run, "data", "data.json")
            if data_dir is not None:
                manifest = json.loads((data_dir / "data.json").read_text(encoding="utf-8"))
                break
    if manifest is None:
        if warn is not None:
            warn(f"{detector_dir / DETECTOR_JSON} predates recorded inputs and its run's data stage was not found: "
                 "images are scaled by bit depth only (no dataset normalisation) and classes are named by id")
        names = {}
        norm = None
    else:
        names = {int(c["id"]): str(c.get("name", c["id"])) for c in manifest.get("categories", [])}
        norm = manifest.get("normalization")
    categories = []
    for label in labels:
        cid = int(spec["label_to_category"][str(label)])
        categories.append({"id": cid, "name": names.get(cid, str(cid))})
    return spec, norm, categories


# --------------------------------------------------------------------------- predictions


@dataclass
class Prediction:
    """One image's detections: ``boxes`` (N x 4, xyxy in the image's pixels), ``scores`` (N), ``category_ids``
    (N, the dataset's ids), ``names`` (N class names); best score first."""

    source: str
    width: int
    height: int
    boxes: np.ndarray
    scores: np.ndarray
    category_ids: np.ndarray
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to_coco(self, image_id: int) -> list[dict[str, Any]]:
        """COCO results ``{image_id, category_id, bbox: [x, y, w, h], score}``."""
        out = []
        for box, score, cid in zip(self.boxes.tolist(), self.scores.tolist(), self.category_ids.tolist()):
            x0, y0, x1, y1 = box
            out.append({"image_id": int(image_id), "category_id": int(cid),
                        "bbox": [round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3)],
                        "score": round(float(score), 5)})
        return out


ImageLike = Union[str, Path, np.ndarray]


class Detector:
    """A fine-tuned Faster/Mask R-CNN with everything needed to read new images as its training did.

    ``categories``: ``[{id, name}]`` in the model's label order (label ``i`` is ``categories[i - 1]``);
    ``data_normalization``: the data's intensity statistics (None: images scaled by bit depth only);
    ``in_chans``, ``img_size``: the backbone's input channels and the detector's input size.
    """

    def __init__(self, model, spec: dict, data_normalization: Optional[dict], categories: list[dict],
                 directory: Optional[Path] = None, device: Any = "cpu"):
        import torch

        self.model = model.eval().to(torch.device(device))
        self.device = torch.device(device)
        self.spec = spec
        self.data_normalization = data_normalization
        self.categories = categories
        self.directory = directory
        self.in_chans = int(spec["in_chans"])
        self.img_size = int(spec["img_size"])
        self.max_detections = int(spec.get("max_detections") or 100)

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.categories]

    def prepare(self, image: ImageLike, source: Optional[str] = None):
        """The ``C x H x W`` float tensor the detector takes, from a path or an ``H x W[ x C]`` array (uint8/uint16
        raw counts, or floats already in [0, 1] ``read_image`` units), as training prepared its images."""
        import torch

        from sslrecipe.data.images import read_image, to_channels
        from sslrecipe.data.normalize import apply_normalization

        if isinstance(image, (str, Path)):
            arr = read_image(image)
            source = source or str(image)
        else:
            arr = np.asarray(image)
            if np.issubdtype(arr.dtype, np.integer):
                arr = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
            arr = arr.astype(np.float32, copy=False)
            if arr.ndim == 2:
                arr = arr[:, :, None]
        if self.data_normalization is not None:
            arr = apply_normalization(arr, self.data_normalization)
        arr = to_channels(arr, self.in_chans, source=source)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32))

    def predict_tensor(self, tensor, score: float = 0.05, tile: Optional[int] = None, overlap: float = 0.2,
                       max_dets: Optional[int] = None) -> dict:
        """Raw detector output (``boxes`` xyxy, ``scores``, ``labels`` 1..K) of one prepared image, filtered."""
        import torch

        max_dets = int(max_dets or self.max_detections)
        heads = self.model.roi_heads
        kept = heads.detections_per_img
        heads.detections_per_img = max_dets  # more candidates than the training default when asked for
        try:
            with torch.inference_mode():
                x = tensor.to(self.device)
                if tile:
                    from sslrecipe.detect.tiling import predict_image_tiled

                    out = predict_image_tiled(self.model, x, int(tile), overlap, max_detections=max_dets)
                else:
                    out = self.model([x])[0]
        finally:
            heads.detections_per_img = kept
        keep = out["scores"] >= score
        return {k: out[k][keep][:max_dets].cpu() for k in ("boxes", "scores", "labels")}

    def predict(self, images: Union[ImageLike, Iterable[ImageLike]], score: float = 0.25, tile: Optional[int] = None,
                overlap: float = 0.2, max_dets: Optional[int] = None) -> list[Prediction]:
        """Detections of each image (paths, or arrays as :meth:`prepare` takes them), in order.

        ``score``: the lowest score kept; ``tile``: sliced inference with tiles of that many pixels overlapping by
        ``overlap`` (plus the whole image, merged by NMS); ``max_dets``: detections per image (default: the
        fine-tuning's ``max_detections``). An unreadable image raises ``sslrecipe.errors.DataError`` naming it.
        """
        if isinstance(images, (str, Path, np.ndarray)):
            images = [images]
        results = []
        for i, image in enumerate(images):
            source = str(image) if isinstance(image, (str, Path)) else f"array[{i}]"
            tensor = self.prepare(image, source)
            results.append(self.to_prediction(self.predict_tensor(tensor, score, tile, overlap, max_dets), source,
                                              int(tensor.shape[-1]), int(tensor.shape[-2])))
        return results

    def to_prediction(self, out: dict, source: str, width: int, height: int) -> Prediction:
        labels = out["labels"].numpy().astype(np.int64)
        cats = [self.categories[int(lab) - 1] for lab in labels]
        return Prediction(source, width, height, out["boxes"].numpy().astype(np.float32),
                          out["scores"].numpy().astype(np.float32),
                          np.asarray([c["id"] for c in cats], dtype=np.int64), [c["name"] for c in cats])


def load_detector(path: Union[str, Path], device: Any = "cpu", warn=None) -> Detector:
    """The fine-tuned detector of a run directory (its newest finished fine-tuning) or a detector directory."""
    from safetensors.torch import load_file

    from sslrecipe.engine.stages import build_detector_from

    detector_dir, run_dir = resolve_detector_dir(path)
    spec, norm, categories = detector_inputs(detector_dir, run_dir, warn)
    weights = detector_dir / DETECTOR_WEIGHTS
    if not weights.is_file():
        raise SSLRecipeError(f"{weights} is missing; rerun the fine-tuning (`sslrecipe run RUN --force finetune`)")
    model = build_detector_from(spec)
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except (RuntimeError, OSError) as e:
        raise SSLRecipeError(f"{weights} does not fit {detector_dir / DETECTOR_JSON}: {str(e)[:300]}") from None
    return Detector(model, spec, norm, categories, detector_dir, device)


__all__ = ["Detector", "Prediction", "load_detector", "resolve_detector_dir"]
