"""Export a fine-tuned Faster R-CNN for use without sslrecipe: ONNX (onnxruntime alone) or ``.pt2`` (torch.export;
torch + torchvision).

The exported graph takes one image, ``float32 [C, H, W]`` scaled to [0, 1] by the data's own normalisation, and
returns ``boxes`` (``[N, 4]`` xyxy in that image's pixels), ``scores`` (``[N]``) and ``labels`` (``[N]`` int64,
1..K). The encoder's mean/std and the resize to ``img_size`` are inside it (torchvision's transform); what stays
with the caller (reading the file, the dataset normalisation, the channel count, the score threshold, label ->
class name) is written beside it in ``<file>.json`` and in docs/predict.md.

torchvision's detectors contain data-dependent steps that ``torch.export`` cannot trace as written (the size test
in ``batched_nms``, ``len()`` of the proposals in multi-scale RoIAlign). While exporting, :func:`_exportable_ops`
swaps them for equivalents without Python branches on tensor sizes: per-class NMS by coordinate offsets (what
torchvision itself uses below 4000 boxes on CPU) and RoIAlign over every level with the level chosen per box by
``where`` (the same values, a few times the RoIAlign work), and the padding of the resized image to a multiple of
32 computed on symbolic sizes (torchvision's float arithmetic would fix it to the example image's size). The
model's weights and outputs are unchanged; the exported graph takes one image at a time. One eager pass before
tracing sets the RoI poolers' level scales, as the first prediction of any torchvision detector does.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any, Optional, Union

from sslrecipe.atomic import atomic_write_file, atomic_write_text
from sslrecipe.errors import SSLRecipeError

FORMATS = ("onnx", "pt2")
#: Smallest and largest image side the exported graph accepts (dynamic height and width in between).
MIN_SIDE, MAX_SIDE = 32, 8192


def _batched_nms_export(boxes, scores, idxs, iou_threshold: float):
    import torch
    from torchvision.ops import nms

    # torchvision's coordinate trick without its `numel() == 0` branch: an empty input gives max 0 here
    top = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()
    offsets = idxs.to(boxes) * (top + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def _multiscale_roi_align_export(x_filtered, boxes, output_size, sampling_ratio, scales=None, mapper=None):
    import torch
    from torchvision.ops import roi_align
    from torchvision.ops.poolers import _convert_to_roi_format

    if scales is None or mapper is None:
        raise ValueError("scales and mapper should not be None")
    rois = _convert_to_roi_format(boxes)
    if len(x_filtered) == 1:
        return roi_align(x_filtered[0], rois, output_size=output_size, spatial_scale=scales[0],
                         sampling_ratio=sampling_ratio)
    levels = mapper(boxes)
    result = None
    for level, (feature, scale) in enumerate(zip(x_filtered, scales)):
        pooled = roi_align(feature, rois, output_size=output_size, spatial_scale=scale, sampling_ratio=sampling_ratio)
        chosen = (levels == level)[:, None, None, None]
        result = pooled if result is None else torch.where(chosen, pooled, result)
    return result


def _batch_images_export(self, images, size_divisible: int = 32):
    """One image padded (bottom, right) to a multiple of ``size_divisible``, as a batch of one. torchvision computes
    the padded size with Python floats, which fixes it to the example's size in an exported graph."""
    import torch.nn.functional as F

    (image,) = images
    height, width = image.shape[-2], image.shape[-1]
    pad_h = (height + size_divisible - 1) // size_divisible * size_divisible - height
    pad_w = (width + size_divisible - 1) // size_divisible * size_divisible - width
    return F.pad(image, (0, pad_w, 0, pad_h)).unsqueeze(0)


@contextlib.contextmanager
def _exportable_ops():
    """torchvision's box NMS, multi-scale RoIAlign and image batching replaced by traceable equivalents while
    exporting."""
    import torchvision.ops.boxes as boxes_mod
    import torchvision.ops.poolers as poolers_mod
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    saved = boxes_mod.batched_nms, poolers_mod._multiscale_roi_align, GeneralizedRCNNTransform.batch_images
    boxes_mod.batched_nms = _batched_nms_export
    poolers_mod._multiscale_roi_align = _multiscale_roi_align_export
    GeneralizedRCNNTransform.batch_images = _batch_images_export
    try:
        yield
    finally:
        boxes_mod.batched_nms, poolers_mod._multiscale_roi_align, GeneralizedRCNNTransform.batch_images = saved


def _wrapper(model):
    import torch

    class OneImage(torch.nn.Module):
        """One [C, H, W] image in, (boxes, scores, labels) out: plain tensors instead of lists of dicts."""

        def __init__(self, detector):
            super().__init__()
            self.detector = detector

        def forward(self, image):
            out = self.detector([image])[0]
            return out["boxes"], out["scores"], out["labels"]

    return OneImage(model).eval()


def _example(detector) -> Any:
    import torch

    g = torch.Generator().manual_seed(0)
    size = max(MIN_SIDE, int(detector.img_size))
    return torch.rand(detector.in_chans, size * 3 // 4, size, generator=g)


def _dynamic_shapes():
    from torch.export import Dim

    return ({1: Dim("height", min=MIN_SIDE, max=MAX_SIDE), 2: Dim("width", min=MIN_SIDE, max=MAX_SIDE)},)


def export_program(detector):
    """The ``torch.export.ExportedProgram`` of the detector (one image in, boxes/scores/labels out)."""
    import torch

    if detector.spec.get("detector", "faster_rcnn") != "faster_rcnn":
        raise SSLRecipeError(
            f"export covers the Faster R-CNN; this detector is a {detector.spec.get('detector')} (its mask head pastes "
            "masks with a loop over detections that torch.export cannot trace) — fine-tune with finetune.detector: "
            "faster_rcnn to export, or use `sslrecipe predict` for masks")
    model = _wrapper(detector.model.to("cpu").eval())
    with _exportable_ops(), torch.no_grad(), warnings.catch_warnings():
        # torchvision 0.29's fake kernel of nms calls a torch API that 2.14 renamed; it is theirs, and harmless
        warnings.filterwarnings("ignore", message=".*create_unbacked_symint.* is deprecated", category=FutureWarning)
        example = _example(detector)
        # one eager pass fixes the RoI poolers' level scales (1/4 ... 1/32), which torchvision otherwise infers from
        # the feature sizes with Python floats while tracing, fixing the graph to the example's size
        model(example)
        try:
            return torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(), strict=False)
        except Exception as e:  # noqa: BLE001 - tracing failures are long; the user needs the gist and the way out
            raise SSLRecipeError(f"torch.export could not trace this detector ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:300]}); use `sslrecipe predict` instead, or report it") from e


def _sidecar(detector, fmt: str, file: Path) -> dict:
    return {
        "format": fmt,
        "file": file.name,
        "input": {"name": "image", "layout": "CHW", "dtype": "float32", "channels": detector.in_chans,
                  "min_side": MIN_SIDE, "max_side": MAX_SIDE,
                  "scaling": "read_image units: 8-bit / 255, 16-bit / 65535, then data_normalization when not null"},
        "outputs": ["boxes (N x 4, xyxy pixels of the input)", "scores (N)", "labels (N, 1..K; categories[label - 1])"],
        "inside": f"the encoder's mean/std {detector.spec.get('mean')} / {detector.spec.get('std')} and the resize "
                  f"of the longer side to img_size {detector.img_size}",
        "data_normalization": detector.data_normalization,
        "categories": detector.categories,
        "score_threshold_inside": float(detector.model.roi_heads.score_thresh),
        "max_detections": detector.max_detections,
    }


def export_detector(path: Union[str, Path], fmt: str, out: Optional[Union[str, Path]] = None, warn=None) -> Path:
    """Write the detector of a run or detector directory as ``fmt`` (onnx | pt2) to ``out`` (default:
    ``<detector dir>/export/detector.<fmt>``) and its input description to ``<out>.json``; returns ``out``."""
    from sslrecipe.detect.detector import load_detector

    if fmt not in FORMATS:
        raise SSLRecipeError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    detector = load_detector(path, warn=warn)
    target = Path(out) if out is not None else detector.directory / "export" / f"detector.{fmt}"
    target.parent.mkdir(parents=True, exist_ok=True)
    program = export_program(detector)
    def write_to(tmp: str) -> None:
        if fmt == "pt2":
            import torch

            torch.export.save(program, tmp)
        else:
            _export_onnx(program, Path(tmp))

    atomic_write_file(target, write_to, suffix=f".{fmt}")
    atomic_write_text(target.with_name(target.name + ".json"), json.dumps(_sidecar(detector, fmt, target), indent=1))
    return target


def _export_onnx(program, file: Path) -> None:
    import torch

    try:
        import onnx  # noqa: F401  (torch.onnx's dynamo exporter needs both)
        import onnxscript  # noqa: F401
    except ImportError:
        raise SSLRecipeError("ONNX export needs the packages onnx and onnxscript: pip install onnx onnxscript "
                             "(onnxruntime to run the file)") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        onnx_program = torch.onnx.export(program, dynamo=True, input_names=["image"],
                                         output_names=["boxes", "scores", "labels"], report=False, verbose=False)
    onnx_program.save(str(file))
