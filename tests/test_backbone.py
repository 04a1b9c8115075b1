"""Encoder exchange format: strict timm round trip through encoder.safetensors + encoder.json."""

import json

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from sslrecipe.errors import SSLRecipeError
from sslrecipe.models.backbone import (
    create_backbone,
    export_encoder,
    load_encoder,
    timm_kwargs_of,
    timm_spec_of,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The test machine is shared: one intra-op thread avoids oversubscription (10x faster here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _perturb(model: nn.Module) -> None:
    """Make weights and BN statistics differ from any fresh initialisation."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.add_(torch.randn(t.shape, generator=g) * 0.01)


@pytest.mark.parametrize("in_chans", [1, 3])
def test_export_load_round_trip_is_strict(tmp_path, in_chans):
    enc = create_backbone("resnet18", in_chans=in_chans)
    _perturb(enc)
    path = export_encoder(enc, tmp_path / "w", "resnet18", timm_kwargs_of(in_chans), extra={"method": "mae", "step": 7})
    assert path == tmp_path / "w" / "encoder.safetensors"
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["encoder.json", "encoder.safetensors"]

    meta = json.loads((tmp_path / "w" / "encoder.json").read_text())
    assert meta["timm_name"] == "resnet18"
    assert meta["timm_kwargs"] == {"in_chans": in_chans, "num_classes": 0}
    assert meta["method"] == "mae" and meta["step"] == 7

    # the contract, with nothing but timm + safetensors
    state = load_file(str(path))
    ref = timm.create_model(meta["timm_name"], **meta["timm_kwargs"])
    ref.load_state_dict(state, strict=True)
    assert set(state) == set(enc.state_dict())
    assert state["conv1.weight"].shape[1] == in_chans
    for k, v in enc.state_dict().items():
        assert torch.equal(state[k], v), k
        assert state[k].is_contiguous()

    loaded, meta2 = load_encoder(tmp_path / "w")
    assert meta2 == meta
    assert timm_spec_of(loaded) == ("resnet18", {"in_chans": in_chans, "num_classes": 0})
    for k, v in enc.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # either file of the pair names the encoder too
    loaded_b, _ = load_encoder(tmp_path / "w" / "encoder.json")
    assert torch.equal(loaded_b.conv1.weight, enc.conv1.weight)


def test_export_uses_recorded_spec_and_strips_wrapper_prefixes(tmp_path):
    enc = create_backbone("resnet18", in_chans=1)

    class Compiled(nn.Module):  # what torch.compile's wrapper looks like to state_dict()
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    path = export_encoder(Compiled(enc), tmp_path)
    state = load_file(str(path))
    assert "conv1.weight" in state and not any(k.startswith(("_orig_mod.", "module.")) for k in state)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["timm_name"] == "resnet18"
    assert json.loads((tmp_path / "encoder.json").read_text())["timm_kwargs"]["in_chans"] == 1


def test_export_refuses_weights_that_do_not_fit_the_spec(tmp_path):
    enc = create_backbone("resnet18", in_chans=3)
    with pytest.raises(SSLRecipeError, match="do not match timm model 'resnet34'.*missing keys"):
        export_encoder(enc, tmp_path, "resnet34", {"in_chans": 3})
    with pytest.raises(SSLRecipeError, match="shape mismatch"):
        export_encoder(enc, tmp_path, "resnet18", {"in_chans": 1})
    assert list(tmp_path.iterdir()) == []  # nothing (not even a temp file) left behind


def test_load_encoder_errors_are_clear(tmp_path):
    with pytest.raises(SSLRecipeError, match="encoder.safetensors not found"):
        load_encoder(tmp_path)
    enc = create_backbone("resnet18")
    export_encoder(enc, tmp_path)
    meta = json.loads((tmp_path / "encoder.json").read_text())
    meta["timm_name"] = "resnet34"
    (tmp_path / "encoder.json").write_text(json.dumps(meta))
    with pytest.raises(SSLRecipeError, match="does not fit timm model 'resnet34'"):
        load_encoder(tmp_path)


def test_unknown_backbone_suggests_timm_names():
    with pytest.raises(SSLRecipeError) as e:
        create_backbone("resnet_18")
    assert "unknown timm backbone 'resnet_18'" in str(e.value) and "resnet18" in str(e.value)


def test_timm_kwargs_of():
    assert timm_kwargs_of(1, drop_path_rate=0.1, pretrained=True) == {
        "drop_path_rate": 0.1, "in_chans": 1, "num_classes": 0,
    }
    with pytest.raises(SSLRecipeError, match="JSON"):
        timm_kwargs_of(3, act_layer=nn.ReLU)
