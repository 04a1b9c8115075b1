"""Export: each format loads into its target model and changes that model's weights to the encoder's."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner

from sslrecipe.errors import SSLRecipeError
from sslrecipe.models.backbone import export_encoder
from sslrecipe.weights.export import export_encoder_as, find_encoder


def _encoder(tmp_path: Path, name: str = "resnet18", in_chans: int = 3, seed: int = 0, sub: str = "enc", **kw) -> Path:
    """An encoder directory (encoder.safetensors + encoder.json) holding seeded random weights."""
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=0, in_chans=in_chans, **kw)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, t in model.state_dict().items():
        if not t.is_floating_point():
            sd[k] = torch.zeros(t.shape, dtype=t.dtype)
        elif k.endswith("running_var"):
            sd[k] = (torch.randn(t.shape, generator=g) * 0.05 + 1.0).abs()
        else:
            sd[k] = torch.randn(t.shape, generator=g) * 0.05
    model.load_state_dict(sd, strict=True, assign=True)
    out = tmp_path / sub
    export_encoder(model, out, name, {"in_chans": in_chans, **kw}, extra={"source": "test"})
    return out


def _encoder_sd(enc: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(enc / "encoder.safetensors"))


def _differs(a: dict, b: dict, keys) -> bool:
    return all(not torch.equal(a[k], b[k]) for k in keys)


def test_safetensors_export_is_self_describing(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    enc = _encoder(tmp_path)
    out = export_encoder_as(enc, "safetensors", tmp_path / "r18.safetensors")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["timm_name"] == "resnet18" and json.loads(meta["timm_kwargs"])["in_chans"] == 3
    target = timm.create_model(meta["timm_name"], **json.loads(meta["timm_kwargs"]))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    target.load_state_dict(load_file(str(out)), strict=True)
    after, ref = target.state_dict(), _encoder_sd(enc)
    assert all(torch.equal(after[k], ref[k]) for k in ref)
    assert _differs(before, after, ["conv1.weight", "layer4.1.conv2.weight"])


def test_timm_export_loads_with_create_model_local_dir(tmp_path):
    enc = _encoder(tmp_path, "vit_tiny_patch16_224", img_size=64)
    out = export_encoder_as(enc, "timm")
    assert out == enc / "export" / "timm-vit_tiny_patch16_224"
    assert {"model.safetensors", "pytorch_model.bin", "config.json"} <= {p.name for p in out.iterdir()}
    fresh = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=64).state_dict()
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).state_dict()
    ref = _encoder_sd(enc)
    assert loaded.keys() == ref.keys() and all(torch.equal(loaded[k], ref[k]) for k in ref)
    assert _differs(fresh, loaded, ["patch_embed.proj.weight", "blocks.11.mlp.fc2.weight"])


def test_torchvision_export_loads_into_a_resnet_fpn_backbone_body(tmp_path):
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    enc = _encoder(tmp_path)
    out = export_encoder_as(enc, "torchvision", tmp_path / "r18_tv.pth")
    sd = torch.load(out, weights_only=True)  # a plain file of tensors
    bb = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=torch.nn.BatchNorm2d, trainable_layers=5)
    before = {k: v.clone() for k, v in bb.body.state_dict().items()}
    bb.body.load_state_dict(sd, strict=True)
    after = bb.body.state_dict()
    assert all(torch.equal(after[k], v) for k, v in sd.items())
    assert _differs(before, after, ["conv1.weight", "layer3.0.downsample.0.weight"])
    assert json.loads(out.with_suffix(".json").read_text())["torchvision_name"] == "resnet18"

    # with a prefix, straight into a whole detector (strict=False: only the body's keys are given)
    pre = export_encoder_as(enc, "torchvision", tmp_path / "r18_det.pth", prefix="backbone.body.")
    with torch.device("meta"):  # the detector's structure is what matters here, not its random init
        det = FasterRCNN(resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5), num_classes=3)
    res = det.load_state_dict(torch.load(pre, weights_only=True), strict=False, assign=True)
    assert res.unexpected_keys == [] and not any(k.startswith("backbone.body.") for k in res.missing_keys)
    assert torch.equal(det.backbone.body.layer2[0].conv1.weight, sd["layer2.0.conv1.weight"])


def test_torchvision_export_refuses_backbones_without_a_counterpart(tmp_path):
    enc = _encoder(tmp_path, "resnet18d")  # deep stem: no torchvision model has these keys
    with pytest.raises(SSLRecipeError, match="no torchvision counterpart"):
        export_encoder_as(enc, "torchvision")
    with pytest.raises(SSLRecipeError, match="unknown export format"):
        export_encoder_as(enc, "onnx")


def test_ultralytics_export_without_the_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ultralytics", None)  # `import ultralytics` now raises ImportError
    enc = _encoder(tmp_path)
    with pytest.raises(SSLRecipeError, match=r"pip install sslrecipe\[yolo\]"):
        export_encoder_as(enc, "ultralytics")


def test_ultralytics_export_loads_and_survives_the_trainers_rebuild(tmp_path, monkeypatch):
    pytest.importorskip("ultralytics")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "ultra-cfg"))
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    enc = _encoder(tmp_path, in_chans=1)
    warned: list[str] = []
    out = export_encoder_as(enc, "ultralytics", tmp_path / "yolo-r18.pt", nc=2, warn=warned.append)
    ref = _encoder_sd(enc)
    yolo = YOLO(str(out))
    body = yolo.model.model[0].m  # TorchVision module: Sequential(conv1, bn1, relu, maxpool, layer1..4)
    assert torch.allclose(body[0].weight, (ref["conv1.weight"] / 3).repeat(1, 3, 1, 1))  # grey spread over RGB
    assert torch.equal(body[5][0].conv1.weight, ref["layer2.0.conv1.weight"])
    assert any("w/3" in w for w in warned) and any("AGPL" in w for w in warned)
    # the trainer rebuilds the model from the YAML and transfers matching weights from the checkpoint
    rebuilt = DetectionModel(str(out.with_suffix(".yaml")), nc=2, verbose=False)
    assert not torch.equal(rebuilt.model[0].m[5][0].conv1.weight, ref["layer2.0.conv1.weight"])
    rebuilt.load(torch.load(out, weights_only=False), verbose=False)
    assert torch.equal(rebuilt.model[0].m[5][0].conv1.weight, ref["layer2.0.conv1.weight"])
    with torch.no_grad():
        preds = yolo.model.eval()(torch.rand(1, 3, 64, 64))
    assert preds[0].shape[1] == 4 + 2  # boxes + 2 classes


def test_find_encoder_in_a_run_directory(tmp_path):
    run = tmp_path / "runs" / "r1"
    pre = _encoder(run, sub="pretrain-aaa", seed=1)
    old, new = shutil.copytree(pre, run / "weights-bbb"), shutil.copytree(pre, run / "weights-ccc")
    past = time.time() - 100
    os.utime(old / "encoder.safetensors", (past, past))
    assert find_encoder(run) == new
    assert find_encoder(pre / "encoder.safetensors") == pre
    assert find_encoder(tmp_path / "runs") == new  # a folder holding one run
    shutil.copytree(pre, tmp_path / "runs" / "r2" / "weights-ddd")
    with pytest.raises(SSLRecipeError, match="several runs"):
        find_encoder(tmp_path / "runs")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SSLRecipeError, match="no encoder"):
        find_encoder(tmp_path / "empty")


def test_cli_export(tmp_path):
    from sslrecipe.cli import main

    run = tmp_path / "run"
    enc = _encoder(run, sub="weights-x")
    res = CliRunner().invoke(main, ["weights", "export", str(run), "--format", "safetensors"])
    assert res.exit_code == 0, res.output
    path = Path(res.stdout.strip().splitlines()[-1])
    assert path == enc / "export" / "resnet18.safetensors" and path.is_file()
    res = CliRunner().invoke(main, ["weights", "export", str(enc), "--format", "torchvision", "--out",
                                    str(tmp_path / "tv.pth")])
    assert res.exit_code == 0 and (tmp_path / "tv.pth").is_file()
    res = CliRunner().invoke(main, ["weights", "export", str(tmp_path / "empty"), "--format", "timm"])
    assert res.exit_code == 2
