"""Issue 14: the input normalisation travels with the weights (encoder.json, detector.json, pre-training views)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from sslrecipe.cli import main
from sslrecipe.errors import SSLRecipeError
from sslrecipe.models.backbone import create_backbone, export_encoder, load_encoder, normalization_of
from sslrecipe.models.normalization import IMAGENET_MEAN, IMAGENET_STD, Normalization

TINY = Path(__file__).with_name("tiny.yaml")
GREY_MEAN = sum(IMAGENET_MEAN) / 3  # 1 channel adapted from RGB: the means of the RGB means and stds
GREY_STD = sum(IMAGENET_STD) / 3


def _rgb_checkpoint(path: Path, name: str = "resnet18") -> Path:
    """A 3-channel timm state dict in a file that is not ours (no sslrecipe header): a public checkpoint."""
    torch.manual_seed(0)
    state = timm.create_model(name, num_classes=0).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_encoder_json_round_trip_and_old_files(tmp_path):
    enc = create_backbone("resnet18", in_chans=3)
    export_encoder(enc, tmp_path / "a", normalization=Normalization.imagenet())
    meta = json.loads((tmp_path / "a" / "encoder.json").read_text())
    assert meta["mean"] == list(IMAGENET_MEAN) and meta["std"] == list(IMAGENET_STD)
    with safe_open(str(tmp_path / "a" / "encoder.safetensors"), framework="pt") as f:  # the header repeats them
        assert json.loads(f.metadata()["mean"]) == list(IMAGENET_MEAN)
    model, _ = load_encoder(tmp_path / "a")
    assert normalization_of(model) == Normalization.imagenet()
    export_encoder(model, tmp_path / "b")  # re-exporting a loaded encoder keeps what it recorded
    assert json.loads((tmp_path / "b" / "encoder.json").read_text())["mean"] == list(IMAGENET_MEAN)

    # scratch: the project's 0.5 / 0.25 on every channel
    export_encoder(create_backbone("resnet18", in_chans=1), tmp_path / "c")
    assert json.loads((tmp_path / "c" / "encoder.json").read_text())["mean"] == [0.5]

    # an encoder.json written before the normalisation was recorded loads as 0.5 / 0.25, without error
    old = json.loads((tmp_path / "a" / "encoder.json").read_text())
    del old["mean"], old["std"]
    (tmp_path / "a" / "encoder.json").write_text(json.dumps(old))
    model, _ = load_encoder(tmp_path / "a")
    assert normalization_of(model) == Normalization((0.5,) * 3, (0.25,) * 3)

    old["mean"] = [0.4, 0.4]  # a damaged one is a clear error naming the file
    old["std"] = [0.2, 0.2]
    (tmp_path / "a" / "encoder.json").write_text(json.dumps(old))
    with pytest.raises(SSLRecipeError, match=r"encoder\.json.*3 input channel"):
        load_encoder(tmp_path / "a")


def test_adaptation_follows_the_first_layer():
    rgb = Normalization.imagenet()
    grey = rgb.adapted(1)
    assert grey.mean == pytest.approx((GREY_MEAN,)) and grey.std == pytest.approx((GREY_STD,))
    assert rgb.adapted(5).mean == (0.485, 0.456, 0.406, 0.485, 0.456)  # timm repeats the kernels cyclically
    assert Normalization((0.0,), (1.0,)).adapted(13).std == (1.0,) * 13
    assert rgb.adapted(3) == rgb
    with pytest.raises(SSLRecipeError, match="positive"):
        Normalization((0.5,), (0.0,))


@pytest.mark.parametrize("in_chans", [3, 1])
def test_converted_imagenet_encoder_gives_the_detector_imagenet_normalization(tmp_path, in_chans):
    from sslrecipe.detect.faster_rcnn import build_faster_rcnn
    from sslrecipe.weights import resolve_weights

    src = _rgb_checkpoint(tmp_path / "dino_resnet18.safetensors")
    out = resolve_weights("file", str(src), None, "timm", "resnet18", in_chans, tmp_path / "enc", warn=lambda m: None)
    meta = json.loads((out / "encoder.json").read_text())
    want_mean = list(IMAGENET_MEAN) if in_chans == 3 else [GREY_MEAN]
    want_std = list(IMAGENET_STD) if in_chans == 3 else [GREY_STD]
    assert meta["mean"] == pytest.approx(want_mean) and meta["std"] == pytest.approx(want_std)
    assert any("input normalization" in n for n in meta["conversion"]["notes"])
    encoder, _ = load_encoder(out)
    det = build_faster_rcnn(encoder, num_classes=1, img_size=64, in_chans=in_chans, fpn_channels=16)
    assert det.transform.image_mean == pytest.approx(want_mean) and det.transform.image_std == pytest.approx(want_std)

    # our own encoder.safetensors given as a file keeps what it records (here the scratch 0.5 / 0.25)
    export_encoder(create_backbone("resnet18", in_chans=in_chans), tmp_path / "ours")
    again = resolve_weights("file", str(tmp_path / "ours" / "encoder.safetensors"), None, None, "resnet18", in_chans,
                            tmp_path / "enc2", warn=lambda m: None)
    assert json.loads((again / "encoder.json").read_text())["mean"] == [0.5] * in_chans


def test_catalogue_entries_carry_their_normalization():
    from sslrecipe.weights.catalogue import get_entry, load_catalogue

    assert get_entry("dino-vits16").normalization == Normalization.imagenet()
    s12 = get_entry("ssl4eo-s12-resnet18-s2-all-moco")  # torchgeo: x / 10000, no mean/std on top
    assert s12.mean == (0.0,) * 13 and s12.std == (1.0,) * 13
    assert all(len(e.mean) == e.in_chans for e in load_catalogue())
    res = CliRunner().invoke(main, ["weights", "info", "mae-vitb16"])
    assert res.exit_code == 0 and "mean: [0.485, 0.456, 0.406]" in res.output


def test_weights_file_run_fine_tunes_with_the_weights_normalization(tmp_path):
    """weights.source: file with an RGB public checkpoint, 1-channel data: encoder.json and detector.json record
    the averaged ImageNet values and the detector that is trained and evaluated applies them; a scratch run keeps
    0.5 / 0.25 (its numbers do not change)."""
    from sslrecipe.engine.stages import load_finetuned

    src = _rgb_checkpoint(tmp_path / "dino_resnet18.safetensors")
    args = ["run", str(TINY), "--run-dir", str(tmp_path / "r"), "--set", "finetune.steps=1", "--until", "finetune"]
    res = CliRunner().invoke(main, args + ["--set", f"weights={{source: file, path: {src}, format: timm}}"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    [weights] = (tmp_path / "r").glob("weights-*")
    assert json.loads((weights / "encoder.json").read_text())["mean"] == pytest.approx([GREY_MEAN])
    [ft] = (tmp_path / "r").glob("finetune-*")
    spec = json.loads((ft / "detector.json").read_text())
    assert spec["mean"] == pytest.approx([GREY_MEAN]) and spec["std"] == pytest.approx([GREY_STD])
    model, _ = load_finetuned(ft)  # what evaluate and predict use
    assert model.transform.image_mean == pytest.approx([GREY_MEAN])
    res = CliRunner().invoke(main, ["weights", "info", str(weights)])
    assert res.exit_code == 0 and f"mean: [{GREY_MEAN}]" in res.output

    res = CliRunner().invoke(main, ["run", str(TINY), "--run-dir", str(tmp_path / "s"), "--set", "finetune.steps=1",
                                    "--until", "finetune"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    [ft] = (tmp_path / "s").glob("finetune-*")
    spec = json.loads((ft / "detector.json").read_text())
    assert (spec["mean"], spec["std"]) == ([0.5], [0.25])
    del spec["mean"], spec["std"]  # a detector.json from before issue 14
    (ft / "detector.json").write_text(json.dumps(spec))
    assert load_finetuned(ft)[0].transform.image_mean == [0.5]


def test_pretraining_from_an_init_encoder_uses_its_normalization(tmp_path):
    from sslrecipe.ssl.registry import create_method

    src = _rgb_checkpoint(tmp_path / "vit.safetensors", "vit_tiny_patch16_224")
    res = CliRunner().invoke(main, [
        "run", str(TINY), "--run-dir", str(tmp_path / "r"), "--set", "backbone={name: vit_tiny_patch16_224, in_chans: 1}",
        "--set", "weights.source=pretrain",
        "--set", f"pretrain={{method: mae, steps: 1, batch_size: 4, img_size: 64, init: {{source: file, path: {src}, format: timm}}}}",
        "--until", "weights"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    [pre] = (tmp_path / "r").glob("pretrain-*")
    # the init encoder (averaged ImageNet) and the pre-training's own export record the same values
    assert json.loads((pre / "init" / "encoder.json").read_text())["mean"] == pytest.approx([GREY_MEAN])
    meta = json.loads((pre / "encoder.json").read_text())
    assert meta["mean"] == pytest.approx([GREY_MEAN]) and meta["std"] == pytest.approx([GREY_STD])

    # the method's views apply it after the [0, 1] scaling; without an init they keep 0.5 / 0.25
    plain = create_method("mae", "vit_tiny_patch16_224", 1, 32, {}, {})
    imagenet = create_method("mae", "vit_tiny_patch16_224", 1, 32, {}, {})
    imagenet.set_input_normalization([GREY_MEAN], [GREY_STD])
    img = torch.rand(1, 40, 40, generator=torch.Generator().manual_seed(0))
    a = plain.views(img, np.random.default_rng(0))
    b = imagenet.views(img, np.random.default_rng(0))
    assert torch.allclose(a * 0.25 + 0.5, b * GREY_STD + GREY_MEAN, atol=1e-6)
    assert not torch.allclose(a, b, atol=1e-2)
