"""Ultralytics YOLO fine-tuning on the run's data (optional extra ``yolo``: ``pip install sslrecipe[yolo]``).

Ultralytics is AGPL-3.0; it is imported only here, only when ``finetune.detector: yolo`` is asked for.

- **Data**: the COCO train/val sets are exported to the YOLO layout (:func:`export_dataset`, through
  :func:`sslrecipe.data.formats.write_yolo`); ignore regions have no YOLO equivalent and are left out of
  training (they stay in our evaluation).
- **Model**: Ultralytics' own YOLO11 from scratch (``backbone=None``), or a YOLO whose backbone is a
  torchvision ResNet (Ultralytics' ``TorchVision`` module, split into its stages; P3/P4/P5 = ``layer2..4``)
  holding our encoder's weights — the ``encoder.safetensors`` of a timm ResNet, whose key names match
  torchvision's.
- **The trap** (ultralytics #8811, #17520): ``YOLO("model.yaml")`` followed by a manual
  ``load_state_dict`` trains *random* weights, because ``Model.train`` rebuilds the model from its YAML and
  transfers weights only from a checkpoint. So the SSL weights are written into an Ultralytics checkpoint
  (``.pt``) that is loaded with ``YOLO(path)``: the trainer then copies every matching tensor into the model
  it trains. :func:`train_yolo` records, from inside the trainer (``on_train_start`` callback), the
  backbone tensors that really train, and tests compare them with the encoder.
- **Metrics** come from our COCO evaluation of :func:`predict_yolo`'s results, never from Ultralytics'.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from sslrecipe.errors import SSLRecipeError

INSTALL_HINT = "finetune.detector: yolo needs the optional extra: pip install 'sslrecipe[yolo]' (Ultralytics, AGPL-3.0)"
# ResNet (timm == torchvision key names) -> output channels of layer2, layer3, layer4
_RESNETS = {"resnet18": (128, 256, 512), "resnet34": (128, 256, 512), "resnet50": (512, 1024, 2048),
            "resnet101": (512, 1024, 2048), "resnet152": (512, 1024, 2048)}
# index of each torchvision ResNet child inside Ultralytics' TorchVision(split=True) output list
# [input, conv1, bn1, relu, maxpool, layer1, layer2, layer3, layer4]
_P3, _P4, _P5 = 6, 7, 8
_CHILD = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
BACKBONE_PREFIX = "model.0.m."


def require_ultralytics():
    """Import Ultralytics (the optional `yolo` extra) without letting it change the rest of the process."""
    os.environ.setdefault("YOLO_OFFLINE", "1")  # no update checks, no downloads at import
    from PIL import Image

    pillow_open = Image.open
    try:
        import ultralytics  # noqa: F401
        import ultralytics.utils.patches  # noqa: F401  (the module that patches PIL, imported now to undo it)
    except ImportError:
        raise SSLRecipeError(INSTALL_HINT) from None
    finally:
        # Ultralytics replaces PIL.Image.open on import with a wrapper that, on any unidentified image, tries to
        # pip-install pi-heif: our readers must keep Pillow's own errors ("cannot identify image file")
        Image.open = pillow_open
    return ultralytics


def model_yaml(num_classes: int, backbone: Optional[str] = None, width: int = 64) -> dict[str, Any]:
    """An Ultralytics model definition: YOLO11-n (``backbone=None``) or a torchvision ResNet backbone with a
    YOLO11-style neck of base ``width`` channels and a ``Detect`` head on P3/P4/P5."""
    if backbone is None:
        import yaml

        ultra = require_ultralytics()
        cfg = Path(ultra.__file__).parent / "cfg" / "models" / "11" / "yolo11.yaml"
        doc = yaml.safe_load(cfg.read_text())
        doc["nc"] = int(num_classes)
        doc["scale"] = "n"
        return doc
    if backbone not in _RESNETS:
        raise SSLRecipeError(f"YOLO with an SSL backbone supports torchvision-compatible ResNets "
                             f"({', '.join(_RESNETS)}); got {backbone!r}. Use backbone: null for YOLO11 from scratch")
    c3, c4, c5 = _RESNETS[backbone]
    w = int(width)
    return {
        "nc": int(num_classes),
        "backbone": [
            [-1, 1, "TorchVision", [c5, backbone, None, True, 2, True]],  # 0: [x, conv1, ..., layer4]; no download
            [0, 1, "Index", [c3, _P3]],  # 1: P3/8
            [0, 1, "Index", [c4, _P4]],  # 2: P4/16
            [0, 1, "Index", [c5, _P5]],  # 3: P5/32
        ],
        "head": [
            [-1, 1, "Conv", [4 * w, 1, 1]],  # 4
            [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
            [[-1, 2], 1, "Concat", [1]],
            [-1, 1, "C3k2", [2 * w, False]],  # 7
            [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
            [[-1, 1], 1, "Concat", [1]],
            [-1, 1, "C3k2", [w, False]],  # 10: P3 out
            [-1, 1, "Conv", [w, 3, 2]],
            [[-1, 7], 1, "Concat", [1]],
            [-1, 1, "C3k2", [2 * w, False]],  # 13: P4 out
            [-1, 1, "Conv", [2 * w, 3, 2]],
            [[-1, 4], 1, "Concat", [1]],
            [-1, 1, "C3k2", [4 * w, True]],  # 16: P5 out
            [[10, 13, 16], 1, "Detect", ["nc"]],
        ],
    }


def encoder_to_yolo_state(encoder_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm/torchvision ResNet keys -> keys of the Ultralytics model's TorchVision backbone.

    A 1-channel encoder's first convolution is spread over 3 channels (weights / 3): Ultralytics reads
    images as 3-channel, and a gray image stored as 3 equal channels then gives the same activations.
    """
    out = {}
    for k, v in encoder_state.items():
        head, _, rest = k.partition(".")
        if head not in _CHILD:
            continue  # fc / global pool: not part of the detection backbone
        if k == "conv1.weight" and v.shape[1] == 1:
            v = v.repeat(1, 3, 1, 1) / 3.0
        out[f"{BACKBONE_PREFIX}{_CHILD[head]}.{rest}"] = v
    if "model.0.m.0.weight" not in out:
        raise SSLRecipeError("the encoder is not a ResNet with conv1/bn1/layer1..4 keys; it cannot fill the YOLO backbone")
    return out


def write_checkpoint(num_classes: int, path: Path, backbone: Optional[str] = None,
                     encoder_state: Optional[Mapping[str, torch.Tensor]] = None, width: int = 64,
                     names: Optional[Sequence[str]] = None) -> Path:
    """An Ultralytics checkpoint (``{"model": DetectionModel, ...}``) whose backbone holds ``encoder_state``."""
    require_ultralytics()
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel(model_yaml(num_classes, backbone, width), ch=3, nc=num_classes, verbose=False)
    if encoder_state is not None:
        mapped = encoder_to_yolo_state(encoder_state)
        current = model.state_dict()
        bad = [k for k, v in mapped.items() if k not in current or current[k].shape != v.shape]
        if bad:
            raise SSLRecipeError(f"encoder tensors do not fit the YOLO {backbone} backbone: {bad[:5]}")
        missing = [k for k in current if k.startswith(BACKBONE_PREFIX) and k not in mapped and not k.endswith("num_batches_tracked")]
        if missing:
            raise SSLRecipeError(f"the encoder lacks backbone tensors {missing[:5]}")
        model.load_state_dict(mapped, strict=False)
    if names is not None:
        model.names = {i: str(n) for i, n in enumerate(names)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model, "train_args": {}, "date": None, "version": "sslrecipe"}, path)
    return path


def export_dataset(train: tuple[dict, Path], val: Optional[tuple[dict, Path]], out_dir: Path, link: bool = True) -> Path:
    """COCO train (and val) sets -> YOLO layout under ``out_dir``; returns ``data.yaml``."""
    import yaml

    from sslrecipe.data.formats import write_yolo

    out_dir = Path(out_dir)
    write_yolo(train[0], train[1], out_dir, split="train", link=link)
    if val is not None:
        write_yolo(val[0], val[1], out_dir, split="val", link=link)
    data_yaml = out_dir / "data.yaml"
    doc = yaml.safe_load(data_yaml.read_text()) or {}
    doc["path"] = str(out_dir.resolve())
    doc["train"] = "images/train"
    doc["val"] = "images/val" if val is not None else "images/train"
    data_yaml.write_text(yaml.safe_dump(doc, sort_keys=False))
    return data_yaml


def train_yolo(checkpoint: Path, data_yaml: Path, out_dir: Path, *, epochs: int, imgsz: int, batch: int,
               lr: Optional[float] = None, device: str = "cpu", workers: int = 0, seed: int = 0,
               extra: Optional[Mapping[str, Any]] = None, record_into: Optional[dict] = None,
               callbacks: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Fine-tune the checkpoint's model with Ultralytics' trainer (its validation off: we evaluate ourselves).

    Returns ``{"weights": last.pt, "trained_state": backbone tensors as the trainer held them at
    on_train_start, "model": the trained YOLO}``. ``record_into`` (a dict) receives those tensors as soon as
    training starts; ``callbacks`` (event -> function) are added after the recording one.
    """
    require_ultralytics()
    from ultralytics import YOLO

    yolo = YOLO(str(checkpoint))
    seen: dict[str, torch.Tensor] = record_into if record_into is not None else {}

    def _record(trainer) -> None:  # the model that really trains, after the trainer rebuilt it
        model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
        seen.update({k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k.startswith(BACKBONE_PREFIX)})

    yolo.add_callback("on_train_start", _record)
    for event, fn in (callbacks or {}).items():
        yolo.add_callback(event, fn)
    args = dict(data=str(data_yaml), epochs=int(epochs), imgsz=int(imgsz), batch=int(batch), device=device,
                workers=int(workers), seed=int(seed), deterministic=True, project=str(Path(out_dir).resolve()),
                name="train", exist_ok=True, val=False, plots=False, verbose=False, amp=False, pretrained=True)
    if lr is not None:
        args.update(lr0=float(lr), optimizer="AdamW")
    args.update(dict(extra or {}))
    yolo.train(**args)
    weights = Path(yolo.trainer.last)
    return {"weights": weights, "trained_state": seen, "model": yolo}


def predict_yolo(model, coco: Mapping[str, Any], image_root: Path, imgsz: int, label_to_category: Mapping[int, int],
                 score_threshold: float = 0.001, max_det: int = 300, device: str = "cpu") -> list[dict[str, Any]]:
    """COCO results for every image of ``coco`` (boxes in original pixels); YOLO class k -> category
    ``label_to_category[k + 1]`` (classes 0..K-1 in ascending category id, as :func:`export_dataset` wrote)."""
    require_ultralytics()
    results: list[dict[str, Any]] = []
    for im in coco["images"]:
        res = model.predict(source=str(Path(image_root) / im["file_name"]), imgsz=int(imgsz), conf=score_threshold,
                            max_det=int(max_det), device=device, verbose=False)[0]
        boxes = res.boxes
        for (x0, y0, x1, y1), score, cls in zip(boxes.xyxy.tolist(), boxes.conf.tolist(), boxes.cls.tolist()):
            results.append({"image_id": im["id"], "category_id": int(label_to_category[int(cls) + 1]),
                            "bbox": [round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3)],
                            "score": float(score)})
    return results


YOLO_SPEC = "yolo.json"


def finetune_yolo(out_dir: Path, train: tuple[dict, Path], val: Optional[tuple[dict, Path]], encoder_dir: Optional[Path],
                  *, epochs: int, img_size: int, batch_size: int, lr: Optional[float] = None, seed: int = 0,
                  device: str = "cpu", workers: int = 0, width: int = 64) -> dict[str, Any]:
    """The finetune stage for ``finetune.detector: yolo``: export the data, build the checkpoint from the
    encoder in ``encoder_dir`` (a timm ResNet; None = Ultralytics' YOLO11-n from scratch), train, and write
    ``yolo.json`` (what :func:`load_finetuned_yolo` needs) beside Ultralytics' ``weights/last.pt``.

    Returns the spec, including ``backbone_verified``: how many encoder tensors were found, unchanged, in
    the model at the start of training (all of them, or an error is raised).
    """
    import json

    out_dir = Path(out_dir)
    coco = train[0]
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    names = [str(c.get("name", c["id"])) for c in cats]
    backbone, state = None, None
    if encoder_dir is not None:
        from safetensors.torch import load_file

        meta = json.loads((Path(encoder_dir) / "encoder.json").read_text())
        backbone = meta["timm_name"]
        state = load_file(str(Path(encoder_dir) / "encoder.safetensors"))
    ckpt = write_checkpoint(len(cats), out_dir / "init.pt", backbone, state, width=width, names=names)
    data_yaml = export_dataset(train, val, out_dir / "yolo_data")
    result = train_yolo(ckpt, data_yaml, out_dir, epochs=epochs, imgsz=img_size, batch=batch_size, lr=lr,
                        device=device, workers=workers, seed=seed)
    verified = 0
    if state is not None:
        expected = encoder_to_yolo_state(state)
        for k, v in expected.items():
            got = result["trained_state"].get(k)
            if got is None or not torch.equal(got.float(), v.float()):
                raise SSLRecipeError(f"Ultralytics did not train with the encoder's weights ({k} differs at the start "
                                     "of training); refusing to report a YOLO result that would be from random weights")
            verified += 1
    spec = {"detector": "yolo", "weights": str(result["weights"].resolve()), "img_size": int(img_size),
            "label_to_category": {str(i + 1): int(c["id"]) for i, c in enumerate(cats)}, "backbone": backbone,
            "backbone_verified": verified}
    (out_dir / YOLO_SPEC).write_text(json.dumps(spec, indent=1))
    return spec


def load_finetuned_yolo(finetune_dir: Path):
    """(Ultralytics YOLO model, spec) of a finished :func:`finetune_yolo`."""
    import json

    require_ultralytics()
    from ultralytics import YOLO

    spec = json.loads((Path(finetune_dir) / YOLO_SPEC).read_text())
    return YOLO(spec["weights"]), spec
