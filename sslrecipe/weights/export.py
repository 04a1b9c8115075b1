"""Export an encoder (``encoder.safetensors`` + ``encoder.json``) for use outside sslrecipe.

Formats:

``safetensors``  one self-describing file: timm key names, ``timm_name``/``timm_kwargs`` in the header.
``timm``         a folder with ``model.safetensors``, ``pytorch_model.bin`` and ``config.json`` (timm's hub
                 format): ``timm.create_model("local-dir:FOLDER", pretrained=True)`` or push it to the hub.
``torchvision``  ResNet-family encoders as torchvision key names (no ``fc``), a plain ``.pth`` of tensors that
                 ``resnet_fpn_backbone(...).body.load_state_dict(...)`` takes (``--prefix backbone.body.`` for a
                 whole Faster/Mask R-CNN with ``strict=False``).
``ultralytics``  ResNet-family encoders inside an Ultralytics YOLO detection model (its ``TorchVision`` module
                 plus a YOLOv8-style neck and head), saved as an Ultralytics ``.pt`` with the model YAML beside
                 it. The weights travel inside the checkpoint, so ``YOLO(pt).train(...)`` keeps them (loading them
                 by hand into a YOLO model is silently undone when training starts). Needs the optional
                 ``ultralytics`` package (AGPL-3.0): ``pip install sslrecipe[yolo]``.
"""

from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from sslrecipe.errors import SSLRecipeError

EXPORT_FORMATS = ("timm", "torchvision", "ultralytics", "safetensors")
Warn = Callable[[str], None]

# timm names whose ResNet key names and shapes equal torchvision's (checked again at export time)
TORCHVISION_NAMES = {
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "resnet50": "resnet50",
    "resnet101": "resnet101",
    "resnet152": "resnet152",
    "resnext50_32x4d": "resnext50_32x4d",
    "resnext101_32x8d": "resnext101_32x8d",
    "resnext101_64x4d": "resnext101_64x4d",
    "wide_resnet50_2": "wide_resnet50_2",
    "wide_resnet101_2": "wide_resnet101_2",
}


# --------------------------------------------------------------------------- finding the encoder


def find_encoder(path: Path | str) -> Path:
    """The directory holding ``encoder.safetensors`` + ``encoder.json`` for an encoder file/dir or a run dir.

    In a run directory the ``weights-*`` stage (the encoder fine-tuning starts from) is preferred, then
    ``pretrain-*``; among several, the most recently written.
    """
    from sslrecipe.models.backbone import ENCODER_WEIGHTS, encoder_paths

    p = Path(path).expanduser()
    if not p.exists():
        raise SSLRecipeError(
            f"{p} does not exist (give a run directory, an encoder directory or encoder.safetensors)"
        )
    if p.is_file() or (p / ENCODER_WEIGHTS).is_file():
        weights, _meta = encoder_paths(p)
        return weights.parent
    found = [f for f in p.glob(f"*/{ENCODER_WEIGHTS}") if (f.parent / "encoder.json").is_file()]
    if not found:
        found = [f for f in p.glob(f"*/*/{ENCODER_WEIGHTS}") if (f.parent / "encoder.json").is_file()]
        runs = {f.parent.parent for f in found}
        if len(runs) > 1:
            names = ", ".join(sorted(r.name for r in runs)[:8])
            raise SSLRecipeError(f"{p} holds several runs ({names}); export one of them")
    if not found:
        raise SSLRecipeError(f"no encoder.safetensors + encoder.json in {p} or its stage directories")

    def rank(f: Path) -> tuple[int, float]:
        stage = f.parent.name.split("-")[0]
        order = {"weights": 0, "pretrain": 1}.get(stage, 2)
        return order, -f.stat().st_mtime

    return sorted(found, key=rank)[0].parent


def _load(src: Path) -> tuple[torch.nn.Module, dict[str, Any], Path]:
    """The encoder as a timm model. Built on the meta device and given the file's tensors (no random init
    to throw away); a model with buffers that are not in the file is loaded the ordinary way instead."""
    from safetensors.torch import load_file

    from sslrecipe.models.backbone import create_backbone, encoder_paths, load_encoder

    enc_dir = find_encoder(src)
    weights, meta_path = encoder_paths(enc_dir)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        name, kwargs = meta["timm_name"], dict(meta["timm_kwargs"])
        kwargs = {k: v for k, v in kwargs.items() if k not in ("num_classes", "pretrained")}
        in_chans = int(kwargs.pop("in_chans", 3))
        with torch.device("meta"):
            model = create_backbone(name, in_chans=in_chans, **kwargs)
        model.load_state_dict(load_file(str(weights)), strict=True, assign=True)
        if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
            raise ValueError("buffers outside the state dict")
    except Exception:  # anything unusual: the strict, checked loader (clear errors included)
        model, meta = load_encoder(enc_dir)
    return model.eval(), meta, enc_dir


def _default_out(enc_dir: Path, fmt: str, timm_name: str) -> Path:
    base = enc_dir / "export"
    return {
        "safetensors": base / f"{timm_name}.safetensors",
        "timm": base / f"timm-{timm_name}",
        "torchvision": base / f"{timm_name}-torchvision.pth",
        "ultralytics": base / f"yolo-{timm_name}.pt",
    }[fmt]


# --------------------------------------------------------------------------- formats


def _export_safetensors(model, meta, out: Path, prefix: str) -> Path:
    from safetensors.torch import save_file

    sd = {prefix + k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    header = {
        "format": "pt",
        "timm_name": meta["timm_name"],
        "timm_kwargs": json.dumps(meta["timm_kwargs"], sort_keys=True),
        "key_prefix": prefix,
        "exported_by": "sslrecipe weights export",
    }
    for k in ("catalogue", "method", "licence"):
        if meta.get(k) is not None:
            header[k] = str(meta[k])
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out), metadata=header)
    return out


def _export_timm(model, meta, out: Path) -> Path:
    from timm.models import save_for_hf

    out.mkdir(parents=True, exist_ok=True)
    kwargs = dict(meta["timm_kwargs"])
    save_for_hf(model, str(out), model_args=kwargs, safe_serialization="both")
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architecture"] = meta["timm_name"]
    cfg.setdefault("model_args", {}).update(kwargs)
    cfg["num_classes"] = 0
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def _torchvision_state(model, meta) -> tuple[str, dict[str, torch.Tensor]]:
    import torchvision

    name = meta["timm_name"]
    tv_name = TORCHVISION_NAMES.get(name)
    if tv_name is None:
        fits = ", ".join(sorted(TORCHVISION_NAMES))
        raise SSLRecipeError(
            f"backbone {name} has no torchvision counterpart; torchvision export covers {fits}. "
            "Use --format timm or safetensors for other backbones."
        )
    with torch.device("meta"):
        ref = torchvision.models.get_model(tv_name, weights=None)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    in_chans = int(meta["timm_kwargs"].get("in_chans", 3))
    bad = [
        k for k in want
        if k not in sd or (tuple(sd[k].shape) != want[k] and not (k == "conv1.weight" and in_chans != 3))
    ]
    extra = [k for k in sd if k not in want]
    if bad or extra:
        raise SSLRecipeError(
            f"{name} does not map onto torchvision's {tv_name}: "
            f"{len(bad)} keys missing or reshaped ({', '.join(bad[:4])}), {len(extra)} extra ({', '.join(extra[:4])})"
        )
    return tv_name, sd


def _export_torchvision(model, meta, out: Path, prefix: str, say: Warn) -> Path:
    tv_name, sd = _torchvision_state(model, meta)
    in_chans = int(meta["timm_kwargs"].get("in_chans", 3))
    if in_chans != 3:
        say(
            f"the encoder takes {in_chans} input channels: replace the body's conv1 with "
            f"nn.Conv2d({in_chans}, {sd['conv1.weight'].shape[0]}, 7, 2, 3, bias=False) before loading"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({prefix + k: v for k, v in sd.items()}, str(out))
    side = {
        "torchvision_name": tv_name, "timm_name": meta["timm_name"], "in_chans": in_chans, "key_prefix": prefix,
        "load": f"resnet_fpn_backbone(backbone_name='{tv_name}', weights=None, norm_layer=torch.nn.BatchNorm2d, "
                f"trainable_layers=5).body.load_state_dict(torch.load(PATH, weights_only=True))",
    }
    out.with_suffix(".json").write_text(json.dumps(side, indent=2) + "\n")
    return out


def _yolo_yaml(tv_name: str, chans: tuple[int, int, int], nc: int) -> dict[str, Any]:
    c3, c4, c5 = chans
    w3, w4, w5 = 128, 256, 512
    return {
        "nc": nc,
        "backbone": [
            # the torchvision ResNet without avgpool/fc; split=True returns [input, conv1, bn1, relu, maxpool,
            # layer1, layer2, layer3, layer4]
            [-1, 1, "TorchVision", [c5, tv_name, None, True, 2, True]],  # 0
            [0, 1, "Index", [c3, 6]],  # 1: layer2, P3/8
            [0, 1, "Index", [c4, 7]],  # 2: layer3, P4/16
            [0, 1, "Index", [c5, 8]],  # 3: layer4, P5/32
        ],
        "head": [
            [-1, 1, "nn.Upsample", [None, 2, "nearest"]],  # 4
            [[-1, 2], 1, "Concat", [1]],  # 5
            [-1, 1, "C2f", [w4]],  # 6
            [-1, 1, "nn.Upsample", [None, 2, "nearest"]],  # 7
            [[-1, 1], 1, "Concat", [1]],  # 8
            [-1, 1, "C2f", [w3]],  # 9: P3
            [-1, 1, "Conv", [w3, 3, 2]],  # 10
            [[-1, 6], 1, "Concat", [1]],  # 11
            [-1, 1, "C2f", [w4]],  # 12: P4
            [-1, 1, "Conv", [w4, 3, 2]],  # 13
            [[-1, 3], 1, "Concat", [1]],  # 14
            [-1, 1, "C2f", [w5]],  # 15: P5
            [[9, 12, 15], 1, "Detect", ["nc"]],  # 16
        ],
    }


def _export_ultralytics(model, meta, out: Path, nc: int, say: Warn) -> Path:
    from sslrecipe.detect.yolo import require_ultralytics

    try:
        ultralytics = require_ultralytics()
        from ultralytics.nn.tasks import DetectionModel
    except SSLRecipeError:
        raise SSLRecipeError(
            "--format ultralytics needs the optional `ultralytics` package (AGPL-3.0): pip install sslrecipe[yolo]"
        ) from None
    import yaml

    tv_name, sd = _torchvision_state(model, meta)
    in_chans = int(meta["timm_kwargs"].get("in_chans", 3))
    if in_chans != 3:
        w = sd["conv1.weight"]
        # Ultralytics feeds 3-channel images (grey images are replicated): spread the filter over 3 channels so a
        # replicated grey image gives exactly the encoder's response; other channel counts cannot be mapped
        if in_chans != 1:
            raise SSLRecipeError(
                f"the encoder takes {in_chans} input channels; Ultralytics' TorchVision backbone takes 3 "
                "(only 1- and 3-channel encoders can be exported to Ultralytics)"
            )
        sd["conv1.weight"] = (w / 3.0).repeat(1, 3, 1, 1)
        say("the 1-channel first layer was spread over 3 channels (w/3 each): "
            "exact for grey images replicated to RGB")
    # output channels of layer2..4 (the stride-8/16/32 features the neck takes)
    outs = tuple(int(sd[f"layer{i}.0.downsample.0.weight"].shape[0]) for i in (2, 3, 4))
    cfg = _yolo_yaml(tv_name, outs, nc)
    det = DetectionModel(deepcopy(cfg), ch=3, nc=nc, verbose=False)
    tv_module = det.model[0].m  # nn.Sequential(conv1, bn1, relu, maxpool, layer1..layer4)
    import torchvision

    order = [n for n, _ in torchvision.models.get_model(tv_name, weights=None).named_children()][:-2]
    index = {n: str(i) for i, n in enumerate(order)}
    mapped = {}
    for k, v in sd.items():
        head, rest = k.split(".", 1)
        mapped[f"{index[head]}.{rest}"] = v
    tv_module.load_state_dict(mapped, strict=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    yaml_path = out.with_suffix(".yaml")
    yaml_path.write_text(
        f"# Ultralytics YOLO detection model on a {meta['timm_name']} encoder exported by sslrecipe\n"
        + yaml.safe_dump(cfg, sort_keys=False)
    )
    det.yaml_file = str(yaml_path)
    from datetime import datetime

    ckpt = {
        "date": datetime.now().isoformat(),
        "version": getattr(ultralytics, "__version__", "?"),
        "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        "epoch": -1,
        "best_fitness": None,
        "model": det.float(),
        "ema": None,
        "updates": None,
        "optimizer": None,
        "train_args": {"task": "detect", "model": str(yaml_path)},
        "train_metrics": None,
        "train_results": None,
        "sslrecipe": {"timm_name": meta["timm_name"], "torchvision_name": tv_name, "encoder_in_chans": in_chans},
    }
    torch.save(ckpt, str(out))
    say(
        f"Ultralytics is AGPL-3.0; the YOLO neck and head of {out.name} are randomly initialised "
        "(train with YOLO(path).train(data=...))"
    )
    return out


def export_encoder_as(
    src: Path | str,
    fmt: str,
    out: Optional[Path | str] = None,
    *,
    prefix: str = "",
    nc: int = 80,
    warn: Optional[Warn] = None,
) -> Path:
    """Export the encoder found at ``src`` (run dir, encoder dir or file) in ``fmt``; returns what was written."""
    if fmt not in EXPORT_FORMATS:
        raise SSLRecipeError(f"unknown export format {fmt!r}; one of {', '.join(EXPORT_FORMATS)}")
    say = warn or (lambda msg: None)
    model, meta, enc_dir = _load(Path(src))
    if meta.get("non_commercial"):
        say(f"licence: these weights derive from {meta.get('catalogue', 'a')} checkpoint licensed "
            f"{meta.get('licence')} (NON-COMMERCIAL use only); so does the export")
    target = Path(out).expanduser() if out is not None else _default_out(enc_dir, fmt, meta["timm_name"])
    if fmt == "safetensors":
        return _export_safetensors(model, meta, target, prefix)
    if fmt == "timm":
        return _export_timm(model, meta, target)
    if fmt == "torchvision":
        return _export_torchvision(model, meta, target, prefix, say)
    return _export_ultralytics(model, meta, target, nc, say)
