"""Converters, tested on checkpoints built here in each official layout (resnet18 / vit_tiny sized)."""

from __future__ import annotations

import argparse
import json
import os
import pickle

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from sslrecipe.errors import SSLRecipeError
from sslrecipe.weights.convert import (
    UnsafeCheckpointError,
    convert_file,
    convert_state,
    detect_layout,
    load_checkpoint,
    resolve_weights,
    select_state_dict,
)

VIT = "vit_tiny_patch16_224"


def _noise_for(ref: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Seeded noise shaped like ``ref`` (BN variances positive), so a swapped or missed tensor is detectable."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in ref.items():
        if not t.is_floating_point():
            out[k] = torch.zeros(t.shape, dtype=t.dtype)
        elif k.endswith("running_var"):
            out[k] = (torch.randn(t.shape, generator=g) * 0.05 + 1.0).abs()
        else:
            out[k] = torch.randn(t.shape, generator=g) * 0.05
    return out


def _randomised(build, seed: int) -> torch.nn.Module:
    """``build()`` on the meta device (no slow init), then filled with seeded noise; eval mode."""
    with torch.device("meta"):
        model = build()
    model.load_state_dict(_noise_for(model.state_dict(), seed), strict=True, assign=True)
    return model.eval()


def _random_sd(name: str, seed: int, **kw) -> dict[str, torch.Tensor]:
    """A seeded random state dict for a timm model (built on the meta device: no slow init)."""
    with torch.device("meta"):
        ref = timm.create_model(name, num_classes=0, **kw)
    return _noise_for(ref.state_dict(), seed)


def _model_with(name: str, sd: dict[str, torch.Tensor], **kw) -> torch.nn.Module:
    """The timm model holding exactly ``sd`` (strict), in eval mode."""
    with torch.device("meta"):
        m = timm.create_model(name, num_classes=0, **kw)
    m.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True, assign=True)
    return m.eval()


def _same(conv_sd: dict, ref: dict) -> bool:
    return set(ref) <= set(conv_sd) and all(torch.equal(conv_sd[k], ref[k]) for k in ref)


@pytest.fixture(scope="module")
def r18() -> dict[str, torch.Tensor]:
    return _random_sd("resnet18", 1)


@pytest.fixture(scope="module")
def vit() -> dict[str, torch.Tensor]:
    return _random_sd(VIT, 2)


def _noise_like(sd: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()) for k, v in sd.items()}


# --------------------------------------------------------------------------- layouts


def test_dino_resnet_backbone_in_torchvision_names_gives_the_same_features(tmp_path):
    import torchvision

    tv = _randomised(lambda: torchvision.models.resnet18(weights=None), 3)
    tv.fc = torch.nn.Identity()
    path = tmp_path / "dino_resnet18_pretrain.pth"
    torch.save(tv.state_dict(), path)  # DINO's R50 file: torchvision names, no fc
    conv = convert_file(path, "resnet18", 3, "dino")
    model = _model_with("resnet18", conv.state_dict)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), tv(x), atol=1e-5)
    assert conv.missing == [] and conv.unexpected == []


def test_dino_full_checkpoint_keeps_the_teacher(tmp_path, vit):
    student = _noise_like(vit, 10)
    head = {"head.mlp.0.weight": torch.randn(64, 192), "head.last_layer.weight_g": torch.ones(1000, 1)}
    ckpt = {
        "student": {**{f"module.backbone.{k}": v for k, v in student.items()}, **{f"module.{k}": v for k, v in head.items()}},
        "teacher": {**{f"backbone.{k}": v for k, v in vit.items()}, **head},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=16, out_dim=1000),  # plain data: allowed
        "dino_loss": {"center": torch.zeros(1, 1000)},
    }
    path = tmp_path / "dino_full_checkpoint.pth"
    torch.save(ckpt, path)
    conv = convert_file(path, VIT)  # layout detected
    assert conv.layout == "dino" and conv.prefix == "backbone."
    assert _same(conv.state_dict, vit)
    assert any("teacher" in n for n in conv.notes) and conv.dropped.get("classification / projection head") == 2


def test_moco_keeps_the_query_encoder_and_drops_key_encoder_queue_and_head(tmp_path, r18):
    sd = {f"module.encoder_q.{k}": v for k, v in r18.items()}
    sd.update({f"module.encoder_k.{k}": v for k, v in _noise_like(r18, 11).items()})
    sd.update({
        "module.encoder_q.fc.0.weight": torch.randn(512, 512), "module.encoder_q.fc.0.bias": torch.randn(512),
        "module.encoder_q.fc.2.weight": torch.randn(128, 512), "module.encoder_q.fc.2.bias": torch.randn(128),
        "module.queue": torch.randn(128, 256), "module.queue_ptr": torch.zeros(1, dtype=torch.long),
    })
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save({"epoch": 800, "arch": "resnet18", "state_dict": sd, "optimizer": {"state": {}}}, path)
    conv = convert_file(path, "resnet18")
    assert conv.layout == "moco" and conv.prefix == "module.encoder_q."
    assert _same(conv.state_dict, r18) and conv.missing == [] and conv.unexpected == []
    assert conv.dropped["momentum (key) encoder"] == len(r18)
    assert conv.dropped["negative queue"] == 2 and conv.dropped["classification / projection head"] == 4


def test_resim_drops_the_in_backbone_fpn(tmp_path, r18):
    sd = {f"module.encoder_q.{k}": v for k, v in r18.items()}
    sd.update({f"module.encoder_k.{k}": v for k, v in _noise_like(r18, 12).items()})
    for lvl, c in ((5, 512), (4, 256), (3, 128)):
        sd[f"module.encoder_q.fpn_lateral{lvl}.weight"] = torch.randn(256, c, 1, 1)
        sd[f"module.encoder_k.fpn_lateral{lvl}.weight"] = torch.randn(256, c, 1, 1)
    sd["module.encoder_q.fpn_output4.weight"] = torch.randn(256, 256, 3, 3)
    sd["module.queue"] = torch.randn(128, 64)
    path = tmp_path / "resim_fpn_200ep.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": sd}, path)
    conv = convert_file(path, "resnet18")
    assert conv.layout == "resim" and _same(conv.state_dict, r18)
    assert conv.dropped["in-backbone FPN (ReSim)"] == 4 and conv.unexpected == []


def _to_detectron2(sd: dict) -> dict:
    """torchvision/timm ResNet names -> detectron2's (as ReSim's convert-pretrain-to-detectron2.py writes them)."""
    out = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        if not k.startswith("layer"):
            k = "stem." + k.replace("bn1.", "conv1.norm.")
        else:
            stage, rest = k.split(".", 1)
            k = f"res{int(stage[5:]) + 1}.{rest}"
            for i in (1, 2, 3):
                k = k.replace(f".bn{i}.", f".conv{i}.norm.")
            k = k.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
        out[k] = v.numpy()
    return out


def test_detectron2_backbone_with_numpy_arrays(tmp_path, r18):
    model = _to_detectron2(r18)
    model["backbone.fpn_lateral5.weight"] = np.zeros((256, 512, 1, 1), dtype=np.float32)
    path = tmp_path / "resim_fpn_backbone_200ep.pth.tar"
    torch.save({"model": model, "__author__": "MOCO", "matching_heuristics": True}, path)
    conv = convert_file(path, "resnet18")
    assert conv.layout == "detectron2"
    assert all(torch.equal(conv.state_dict[k], r18[k]) for k in r18 if not k.endswith("num_batches_tracked"))
    assert conv.dropped == {"in-backbone FPN (ReSim)": 1} and conv.unexpected == []


def test_mae_drops_decoder_and_resamples_the_position_embedding(tmp_path, vit):
    model = dict(vit)
    model.update({
        "mask_token": torch.randn(1, 1, 192), "decoder_embed.weight": torch.randn(128, 192),
        "decoder_pos_embed": torch.randn(1, 197, 128), "decoder_blocks.0.norm1.weight": torch.randn(128),
        "decoder_norm.weight": torch.randn(128), "decoder_pred.weight": torch.randn(768, 128),
    })
    path = tmp_path / "mae_pretrain_vit_tiny_full.pth"
    torch.save({"model": model, "args": argparse.Namespace(norm_pix_loss=True), "epoch": 799}, path)
    conv = convert_file(path, VIT)
    assert conv.layout == "mae" and _same(conv.state_dict, vit) and conv.dropped["decoder and mask token"] == 6
    # a smaller input size: the position embedding is resampled (cls slot kept) and the model runs
    small = convert_file(path, VIT, timm_kwargs={"img_size": 112})
    assert small.state_dict["pos_embed"].shape == (1, 1 + 7 * 7, 192)
    assert torch.equal(small.state_dict["pos_embed"][:, :1], vit["pos_embed"][:, :1])
    m = _model_with(VIT, small.state_dict, img_size=112)
    with torch.no_grad():
        assert m(torch.randn(1, 3, 112, 112)).shape == (1, 192)


def test_spark_withdecoder_and_timm_style(tmp_path, r18):
    module = {f"sparse_encoder.sp_cnn.{k}": v for k, v in r18.items()}
    module.update({
        "dense_decoder.dec.0.up_sample.weight": torch.randn(768, 384, 4, 4),
        "densify_norms.0.weight": torch.randn(512), "densify_projs.0.weight": torch.randn(768, 512, 1, 1),
        "mask_tokens.0": torch.randn(1, 512, 1, 1), "imn_m": torch.zeros(1, 3, 1, 1), "norm_black": torch.zeros(1, 3, 8, 8),
        "config": {"mask_ratio": 0.6, "densify_norm_str": "bn"},  # SparK stores its config inside the state dict
    })
    full = tmp_path / "res18_withdecoder_1kpretrained_spark_style.pth"
    torch.save({"args": "Namespace(...)", "arch": "resnet18", "epoch": 1599, "module": module, "optimizer": {},
                "is_pretrain": True}, full)
    conv = convert_file(full, "resnet18")
    assert conv.layout == "spark" and _same(conv.state_dict, r18) and conv.unexpected == []
    assert conv.dropped["SparK densify layers"] == 5
    plain = tmp_path / "resnet18_1kpretrained_timm_style.pth"
    torch.save(r18, plain)
    assert _same(convert_file(plain, "resnet18", layout="spark").state_dict, r18)


def _leopart_checkpoint(student: dict, teacher: dict) -> dict:
    """Keys as the official Leopart module's state_dict: ``teacher`` is registered before ``model`` (``self.teacher``
    is set inside ``init_model``), each a ViT plus ``projection_head`` (MLP) and ``prototypes``."""
    out = {}
    for prefix, vit_sd, seed in (("teacher.", teacher, 21), ("model.", student, 22)):
        g = torch.Generator().manual_seed(seed)
        out.update({f"{prefix}{k}": v for k, v in vit_sd.items()})
        out.update({f"{prefix}projection_head.0.weight": torch.randn(2048, 192, generator=g),
                    f"{prefix}projection_head.0.bias": torch.randn(2048, generator=g),
                    f"{prefix}projection_head.2.weight": torch.randn(256, 2048, generator=g),
                    f"{prefix}prototypes.weight": torch.randn(300, 256, generator=g)})
    return out


@pytest.mark.parametrize("lightning", [False, True])
def test_leopart_keeps_the_student_as_the_official_evaluation(tmp_path, vit, lightning):
    """Leopart's evaluation (``get_backbone_weights(..., 'ours')``: keys starting with 'model') and its README
    snippet (first key component stripped, so ``model.*`` written last wins) use the student, not the EMA teacher."""
    teacher = _noise_like(vit, 13)
    sd = _leopart_checkpoint(student=vit, teacher=teacher)
    # the released file is flat (the README loads it directly); a training checkpoint is Lightning's
    obj = {"epoch": 49, "global_step": 1000, "state_dict": sd, "optimizer_states": [], "lr_schedulers": []} if lightning else sd
    path = tmp_path / "leopart_vits16.ckpt"
    torch.save(obj, path)
    conv = convert_file(path, VIT)
    assert conv.layout == "leopart" and conv.prefix == "model."
    assert _same(conv.state_dict, vit) and not _same(conv.state_dict, teacher) and conv.unexpected == []
    assert conv.dropped["EMA teacher (student kept)"] == len(teacher)
    assert conv.dropped["projection head / prototypes"] == 8  # both heads and both prototype layers
    assert any("kept the student" in n for n in conv.notes)
    # the README's own loading gives the same tensors
    readme = {".".join(k.split(".")[1:]): v for k, v in sd.items()}
    assert all(torch.equal(conv.state_dict[k], readme[k]) for k in vit)


def test_timm_safetensors_with_wrapper_prefix(tmp_path, vit):
    path = tmp_path / "model.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in vit.items()}, str(path))
    conv = convert_file(path, VIT)
    assert conv.layout == "timm" and conv.prefix == "module." and _same(conv.state_dict, vit)


def test_torchvision_vit_gives_the_same_features(tmp_path):
    from torchvision.models.vision_transformer import VisionTransformer

    # vit_tiny's widths at a 64-pixel input (a 4x4 grid), to keep the forward passes cheap
    tv = _randomised(lambda: VisionTransformer(image_size=64, patch_size=16, num_layers=12, num_heads=3,
                                               hidden_dim=192, mlp_dim=768), 4)
    path = tmp_path / "tv_vit.pth"
    torch.save(tv.state_dict(), path)
    conv = convert_file(path, VIT, timm_kwargs={"img_size": 64})
    assert conv.layout == "torchvision" and conv.missing == [] and conv.unexpected == []
    assert conv.dropped == {"classification / projection head": 2}
    model = _model_with(VIT, conv.state_dict, img_size=64)
    tv.heads = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), tv(x), atol=1e-4)


def test_single_channel_adaptation_matches_timm_and_grey_inputs(tmp_path, r18):
    from timm.models import adapt_input_conv

    conv = convert_state({"state_dict": r18}, "resnet18", in_chans=1)
    w = conv.state_dict["conv1.weight"]
    assert w.shape == (64, 1, 7, 7)
    assert torch.allclose(w, r18["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.allclose(w, adapt_input_conv(1, r18["conv1.weight"]))
    rgb = _model_with("resnet18", r18)
    grey = _model_with("resnet18", conv.state_dict, in_chans=1)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():  # a 1-channel image gives what the RGB model gives for that image replicated
        assert torch.allclose(grey(x), rgb(x.repeat(1, 3, 1, 1)), atol=1e-4)
    assert any("3 to 1 input channels" in n for n in conv.notes)

    # 13 Sentinel-2 bands -> 1: summed, with a warning to check the band semantics
    multi = dict(r18)
    multi["conv1.weight"] = torch.randn(64, 13, 7, 7)
    c13 = convert_state(multi, "resnet18", in_chans=1)
    assert torch.allclose(c13.state_dict["conv1.weight"], multi["conv1.weight"].sum(1, keepdim=True))
    assert any("13 channels" in w for w in c13.warnings)


def test_checkpoint_for_another_backbone_is_refused(tmp_path, r18, vit):
    with pytest.raises(SSLRecipeError, match="does not fit resnet34: only"):
        convert_state(r18, "resnet34")  # every tensor fits, but resnet34's extra blocks would stay random
    with pytest.raises(SSLRecipeError, match="other shapes"):
        convert_state(r18, "resnet50")
    with pytest.raises(SSLRecipeError, match="does not fit resnet18"):
        convert_state(vit, "resnet18")
    with pytest.raises(SSLRecipeError, match="unknown checkpoint layout"):
        convert_state(r18, "resnet18", layout="simclr")


def test_missing_tensors_are_reported(r18):
    partial = {k: v for k, v in r18.items() if not k.startswith("layer4.1.")}
    conv = convert_state(partial, "resnet18")
    assert conv.missing and all(k.startswith("layer4.1.") for k in conv.missing)
    assert any("random initialisation" in w for w in conv.warnings)


def test_detect_layout_from_keys():
    assert detect_layout(["module.encoder_q.conv1.weight", "module.queue"]) == "moco"
    assert detect_layout(["module.encoder_q.fpn_lateral5.weight"]) == "resim"
    assert detect_layout(["sparse_encoder.sp_cnn.conv1.weight"]) == "spark"
    assert detect_layout(["blocks.0.norm1.weight", "mask_token", "decoder_embed.weight"]) == "mae"
    assert detect_layout(["stem.conv1.weight", "res2.0.conv1.weight"]) == "detectron2"
    assert detect_layout(["conv_proj.weight", "encoder.layers.encoder_layer_0.ln_1.weight"]) == "torchvision"
    assert detect_layout(["teacher.blocks.0.norm1.weight", "model.prototypes.weight"]) == "leopart"
    assert detect_layout(["conv1.weight", "layer1.0.conv1.weight"]) == "timm"
    with pytest.raises(SSLRecipeError, match="no tensors"):
        select_state_dict({"epoch": 1, "args": "x"}, None, [])


# --------------------------------------------------------------------------- safe loading


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, r18):
    marker = tmp_path / "pwned"
    zipped = tmp_path / "evil.pth"
    torch.save({"state_dict": r18, "extra": _Evil(str(marker))}, zipped)
    with pytest.raises(UnsafeCheckpointError) as e:
        load_checkpoint(zipped)
    assert "system" in str(e.value) and "arbitrary code" in str(e.value)
    assert not marker.exists()

    raw = tmp_path / "evil.pkl"  # a bare pickle (not torch's zip format)
    with open(raw, "wb") as f:
        pickle.dump({"state_dict": {"w": 1}, "x": _Evil(str(marker))}, f, protocol=2)
    with pytest.raises(SSLRecipeError):
        load_checkpoint(raw)
    assert not marker.exists()

    # the conversion entry points refuse the same way
    with pytest.raises(UnsafeCheckpointError):
        resolve_weights("file", str(zipped), None, None, "resnet18", 3, tmp_path / "out", warn=lambda m: None)
    assert not marker.exists() and not (tmp_path / "out" / "encoder.safetensors").exists()


def test_pickled_module_is_refused_with_advice(tmp_path):
    path = tmp_path / "whole_model.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True.*safetensors|safetensors"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_a_clear_error(tmp_path, r18):
    path = tmp_path / "cut.pth"
    torch.save(r18, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(SSLRecipeError, match="cannot read"):
        load_checkpoint(path)


# --------------------------------------------------------------------------- resolve_weights (file) and CLI


def test_resolve_weights_file_writes_a_loadable_encoder(tmp_path, vit):
    from sslrecipe.models.backbone import load_encoder
    from sslrecipe.weights.fetch import ChecksumError, sha256_file

    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": {**vit, "mask_token": torch.zeros(1, 1, 192)}}, path)
    warned: list[str] = []
    out = resolve_weights("file", str(path), sha256_file(path), None, VIT, 1, tmp_path / "enc", warn=warned.append)
    model, meta = load_encoder(out)
    assert meta["timm_name"] == VIT and meta["timm_kwargs"]["in_chans"] == 1
    assert meta["conversion"]["layout"] == "mae" and meta["file_sha256"] == sha256_file(path)
    assert torch.equal(model.state_dict()["blocks.3.mlp.fc1.weight"], vit["blocks.3.mlp.fc1.weight"])
    assert any("NON-COMMERCIAL" in w for w in warned)  # an MAE-layout file: the licence is named
    with pytest.raises(ChecksumError, match="expected sha256"):
        resolve_weights("file", str(path), "0" * 64, None, VIT, 1, tmp_path / "enc2", warn=warned.append)
    with pytest.raises(SSLRecipeError, match="does not exist"):
        resolve_weights("file", str(tmp_path / "nope.pth"), None, None, VIT, 3, tmp_path / "enc3")


def test_cli_convert_reports_drops(tmp_path, r18):
    from sslrecipe.cli import main

    sd = {f"module.encoder_q.{k}": v for k, v in r18.items()}
    sd.update({f"module.encoder_k.{k}": v for k, v in r18.items()})
    sd["module.queue"] = torch.randn(128, 16)
    src = tmp_path / "moco.pth.tar"
    torch.save({"state_dict": sd}, src)
    res = CliRunner().invoke(main, ["weights", "convert", str(src), str(tmp_path / "out"), "--from", "moco",
                                    "--backbone", "resnet18"])
    assert res.exit_code == 0, res.output
    assert "momentum (key) encoder" in res.output and "negative queue" in res.output
    assert (tmp_path / "out" / "encoder.safetensors").is_file()
    res = CliRunner().invoke(main, ["weights", "convert", str(src), str(tmp_path / "out2"), "--backbone", "resnet18",
                                    "--in-chans", "1", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout[: res.stdout.rindex("}") + 1])
    assert report["layout"] == "moco" and report["missing_keys"] == []
    res = CliRunner().invoke(main, ["weights", "convert", str(src), str(tmp_path / "out3")])
    assert res.exit_code == 2 and "--backbone is required" in res.output
