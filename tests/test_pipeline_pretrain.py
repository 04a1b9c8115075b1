"""Pre-training inside a run: the method's official optimizer keys resolved, strict export, caching
that never redoes pre-training for fine-tuning or few-shot changes, and starting from given weights."""

import json
from pathlib import Path

import timm
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from sslrecipe.cli import main
from sslrecipe.engine.events import read_events
from sslrecipe.ssl.registry import create_method

TINY = Path(__file__).with_name("tiny.yaml")
MAE = ["--set", "backbone={name: vit_tiny_patch16_224, in_chans: 1}", "--set", "weights.source=pretrain",
       "--set", "pretrain={method: mae, steps: 2, batch_size: 4, img_size: 64}", "--until", "weights"]


def run(run_dir, *args):
    res = CliRunner().invoke(main, ["run", str(TINY), "--run-dir", str(run_dir), *MAE, *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def test_mae_pretrain_exports_strict_encoder_with_official_optimizer_keys(tmp_path):
    run(tmp_path / "r")
    resolved = yaml.safe_load((tmp_path / "r" / "resolved.yaml").read_text())
    assert resolved["pretrain"]["betas"] == [0.9, 0.95] and resolved["pretrain"]["blr"] == 1.5e-4  # MAE's, not the generic
    [weights] = (tmp_path / "r").glob("weights-*")
    meta = json.loads((weights / "encoder.json").read_text())
    assert meta["timm_kwargs"]["img_size"] == 64 and meta["timm_kwargs"]["in_chans"] == 1
    model = timm.create_model(meta["timm_name"], **meta["timm_kwargs"])
    model.load_state_dict(load_file(str(weights / "encoder.safetensors")), strict=True)

    # an explicit key wins over the method's default
    res = CliRunner().invoke(main, ["validate", str(TINY), *MAE[:-2], "--set", "pretrain.betas=[0.8, 0.9]", "--print"])
    assert yaml.safe_load(res.output)["pretrain"]["betas"] == [0.8, 0.9]

    # fine-tuning and few-shot changes keep the pre-training
    n = len(list(read_events(tmp_path / "r" / "events.jsonl")))
    run(tmp_path / "r", "--set", "finetune.lr=0.001", "--set", "data.shots=3")
    later = list(read_events(tmp_path / "r" / "events.jsonl"))[n:]
    assert [e["stage"] for e in later if e["event"] == "stage_cached"] == ["pretrain", "weights"]
    assert [e["stage"] for e in later if e["event"] == "stage_start"] == ["data"]


def test_pretrain_init_starts_student_and_teacher_from_the_file(tmp_path):
    torch.manual_seed(5)
    state = timm.create_model("vit_tiny_patch16_224", num_classes=0, in_chans=1).state_dict()
    path = tmp_path / "init.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    res = CliRunner().invoke(main, [
        "run", str(TINY), "--run-dir", str(tmp_path / "r"), *MAE[:-4],
        "--set", f"pretrain={{method: mae, steps: 1, batch_size: 4, img_size: 64, lr: 1.0e-12, init: {{source: file, path: {path}, format: timm}}}}",
        "--until", "weights"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    [weights] = (tmp_path / "r").glob("weights-*")
    exported = load_file(str(weights / "encoder.safetensors"))
    # the 224-px grid was resampled to 64 px; everything else is the file's (an lr of 1e-12 barely moves it)
    assert torch.allclose(exported["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"], atol=1e-6)
    assert exported["pos_embed"].shape[1] == 1 + 16

    dino = create_method("dino", "vit_tiny_patch16_224", 1, 64, {"out_dim": 256, "local_crops_number": 2}, {})
    dino.load_encoder_weights({k: v for k, v in exported.items()})
    for (name, s), t in zip(dino.encoder().state_dict().items(), dino.teacher_encoder().state_dict().values()):
        assert torch.equal(s, t), name


def test_resim_pretrain_then_finetune_starts_from_its_fpn(tmp_path):
    """ReSim's in-backbone FPN is exported beside the encoder and seeds the detector's FPN (the official transfer)."""
    res = CliRunner().invoke(main, [
        "run", str(TINY), "--run-dir", str(tmp_path / "r"), "--set", "weights.source=pretrain",
        "--set", "pretrain={method: resim, steps: 2, batch_size: 4, img_size: 96, options: {resim: {queue_size: 64, fpn_dim: 32}}}",
        "--set", "finetune.steps=1", "--until", "finetune"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    resolved = yaml.safe_load((tmp_path / "r" / "resolved.yaml").read_text())
    assert resolved["pretrain"]["optimizer"] == "sgd"  # ReSim's official recipe filled in
    [weights] = (tmp_path / "r").glob("weights-*")
    assert (weights / "encoder_fpn.safetensors").is_file()
    seeded = [e for e in read_events(tmp_path / "r" / "events.jsonl") if e.get("name") == "finetune/pretrained_fpn_tensors"]
    assert seeded and seeded[0]["value"] > 0


def test_method_on_an_unsupported_family_names_the_alternatives():
    from sslrecipe.errors import SSLRecipeError

    import pytest

    with pytest.raises(SSLRecipeError) as e:
        create_method("spark", "vit_tiny_patch16_224", 3, 64, {}, {})
    assert "supports cnn" in str(e.value) and "mae" in str(e.value) and "dino" in str(e.value)
    with pytest.raises(SSLRecipeError, match="unknown pretrain.method 'simclr'"):
        create_method("simclr", "resnet18", 3, 64, {}, {})


LEOPART_AFTER_DINO = [
    "--set", "backbone={name: vit_tiny_patch16_224, in_chans: 1}", "--set", "weights.source=pretrain",
    "--set", "pretrain={method: leopart, steps: 1, batch_size: 2, img_size: 64, lr: 1.0e-12, "
             "options: {leopart: {num_prototypes: 8, local_crops_number: 1}}, "
             "first: {method: dino, steps: 2, batch_size: 2, img_size: 64, options: {dino: {out_dim: 64, local_crops_number: 2}}}}",
    "--until", "weights",
]


def test_dino_then_leopart_in_one_recipe(tmp_path):
    """pretrain.first runs as its own cached stage and the main pre-training starts from its encoder."""
    res = CliRunner().invoke(main, ["run", str(TINY), "--run-dir", str(tmp_path / "r"), *LEOPART_AFTER_DINO],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "random" not in res.output  # no "starts from random initialisation" warning
    resolved = yaml.safe_load((tmp_path / "r" / "resolved.yaml").read_text())
    assert resolved["pretrain"]["first"]["blr"] == 5e-4  # DINO's official keys filled into pretrain.first too
    [first] = (tmp_path / "r").glob("pretrain_first-*")
    [main_stage] = (tmp_path / "r").glob("pretrain-*")
    assert json.loads((first / "encoder.json").read_text())["method"] == "dino"
    done = json.loads((main_stage / "done.json").read_text())
    assert done["method"] == "leopart" and done["start"] == "pretrain.first (dino)"
    dino = load_file(str(first / "encoder.safetensors"))
    leopart = load_file(str(main_stage / "encoder.safetensors"))
    assert dino.keys() == leopart.keys()
    for k in dino:  # Leopart started from DINO's encoder (its lr of 1e-12 barely moves it)
        assert torch.allclose(dino[k], leopart[k], atol=1e-5), k

    # changing only the second pre-training reuses the first
    n = len(list(read_events(tmp_path / "r" / "events.jsonl")))
    args = [a.replace("steps: 1, batch_size: 2, img_size: 64, lr", "steps: 2, batch_size: 2, img_size: 64, lr")
            for a in LEOPART_AFTER_DINO]
    res = CliRunner().invoke(main, ["run", str(TINY), "--run-dir", str(tmp_path / "r"), *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    later = list(read_events(tmp_path / "r" / "events.jsonl"))[n:]
    assert [e["stage"] for e in later if e["event"] == "stage_cached"] == ["data", "pretrain_first"]
    assert [e["stage"] for e in later if e["event"] == "stage_start"] == ["pretrain", "weights"]


def test_pretrain_first_and_init_together_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(main, ["validate", str(TINY), "--set", "weights.source=pretrain", "--set",
                                    "pretrain={method: leopart, init: {source: file, path: x.pt}, first: {method: dino}}"])
    assert res.exit_code != 0
    assert "pretrain.first.init" in res.output and "Traceback" not in res.output
