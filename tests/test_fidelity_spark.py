"""SparK against the official code (issue 14, item 8): loss, gradients and one LAMB step on fixed weights and inputs.

The numbers were recorded by ``benchmarks/fidelity/spark.py`` from keyu-tian/SparK (the commit is in
``tests/data/fidelity/spark.json``); this test needs only the recorded files. Tolerances: ``fidelity_common``
(measured agreement: the loss to the last bit, gradients and the step's change within 2e-5 relative).

The project's SparK is built as a recipe builds it: the optimizer keys the registry fills in for ``method: spark``
on a ResNet, at the official global batch 4096 (so ``blr x batch / 256`` is the official peak lr), the loop's
``build_optimizer`` and the method's optimizer pre-hook, which applies the official lr and weight-decay curves and
LAMB's clip. The step is iteration 400 of 1600, mid-curve for both. The official weights come in through the
project's converter (``weights/convert.py``, layout ``spark``) for the encoder; the densify layers and mask tokens
keep their names, ``dense_decoder.`` is ``decoder.``. The mask is the recorded official one, passed to ``forward``.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fidelity_common import assert_loss, assert_stats, assert_tensors, load_exact, load_record, section
from sslrecipe.engine.schedules import build_optimizer
from sslrecipe.recipe.loader import recipe_from_dict
from sslrecipe.ssl import sparse
from sslrecipe.ssl.registry import apply_method_defaults, create_method
from sslrecipe.weights.convert import convert_state

REC, T = load_record("spark")
OFFICIAL = section(T, "official")
MODEL = REC["model"]
SETTINGS = REC["official_settings"]


def official_name(ours: str) -> str:
    """Our parameter or buffer name -> the official one."""
    if ours.startswith("backbone."):
        return "sparse_encoder.sp_cnn." + ours[len("backbone."):]
    if ours.startswith("decoder."):
        return "dense_decoder." + ours[len("decoder."):]
    return ours


def build():
    """The project's SparK with the official weights, and the ``pretrain`` section a recipe resolves to."""
    recipe = apply_method_defaults(recipe_from_dict({
        "data": {"synthetic": {"images": 4}},
        "backbone": {"name": MODEL["timm_name"], "in_chans": MODEL["in_chans"], "kwargs": MODEL["timm_kwargs"]},
        "weights": {"source": "pretrain"},
        "pretrain": {"method": "spark", "batch_size": SETTINGS["glb_batch_size"], "img_size": MODEL["img_size"],
                     "options": {"spark": {"decoder_width": MODEL["decoder_width"]}}},
    }))
    p = recipe.pretrain
    torch.manual_seed(0)
    method = create_method("spark", MODEL["timm_name"], MODEL["in_chans"], p.img_size, p.options["spark"],
                           MODEL["timm_kwargs"])
    encoder = {k: v for k, v in OFFICIAL.items() if k.startswith("sparse_encoder.")}
    conv = convert_state(encoder, MODEL["timm_name"], MODEL["in_chans"], "spark", MODEL["timm_kwargs"])
    assert not conv.missing and not conv.unexpected, conv.summary()
    state = {f"backbone.{k}": v for k, v in conv.state_dict.items()}
    state.update({k: v for k, v in OFFICIAL.items() if k.startswith(("densify_", "mask_tokens."))})
    state.update({"decoder." + k[len("dense_decoder."):]: v for k, v in OFFICIAL.items() if k.startswith("dense_decoder.")})
    load_exact(method, state, "SparK", keep=lambda k: k not in ("iteration", "total_steps"))  # our schedule state
    method.train()
    return method, p


def test_the_optimizer_settings_a_recipe_gets_are_the_official_ones():
    method, p = build()
    assert (p.optimizer, tuple(p.betas)) == (SETTINGS["opt"], tuple(SETTINGS["betas"]))
    assert math.isclose(p.peak_lr(p.batch_size), SETTINGS["peak_lr"]) and math.isclose(p.weight_decay, SETTINGS["wd"])
    o = method.opts
    assert (o.weight_decay_end, o.clip_grad, o.mask_ratio) == (SETTINGS["wde"], SETTINGS["max_grad_norm"], SETTINGS["mask_ratio"])
    assert math.isclose(o.warmup_fraction, SETTINGS["wp_ep"] / SETTINGS["ep"])
    assert method.densify_norm_kind == SETTINGS["densify_norm"] and method.drop_path_rate == SETTINGS["drop_path_rate"]
    # the parameter groups: the official no-weight-decay rule (1-D, biases, mask tokens) gives the same split
    optimizer = build_optimizer(method.param_groups(p.weight_decay), p, p.peak_lr(p.batch_size))
    names = {id(t): official_name(n) for n, t in method.named_parameters()}
    ours = {g["weight_decay"] > 0: sorted(names[id(t)] for t in g["params"]) for g in optimizer.param_groups}
    assert ours == {g["weight_decay_scale"] > 0: sorted(g["params"]) for g in SETTINGS["param_groups"]}


def test_loss_gradients_and_one_lamb_step_equal_the_official_training_step():
    method, p = build()
    optimizer = build_optimizer(method.param_groups(p.weight_decay), p, p.peak_lr(p.batch_size))
    step = REC["step"]
    method.iteration.fill_(step["iteration"])  # what the training loop's after_step leaves before this iteration
    method.total_steps.fill_(step["iterations"])
    before = {n: t.detach().clone() for n, t in method.named_parameters()}

    loss = method(T["input/x"], T["input/active"])["loss"]
    assert_loss(float(loss.detach()), REC["loss"], "SparK loss")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: t.grad.detach().clone() for n, t in method.named_parameters()}
    assert_loss(float(torch.sqrt(sum(g.double().pow(2).sum() for g in grads.values()))), REC["global_grad_norm"],
                "SparK global gradient norm (what LAMB clips)")
    assert_stats(grads, REC["grad_norm"], REC["grad_fingerprint"], "SparK gradients", rename=official_name)
    assert_tensors(grads, section(T, "grad"), "SparK gradients (stored whole)", rename=official_name)

    optimizer.step()  # the method's pre-hook sets this iteration's official lr and weight decay, and LAMB's clip
    assert math.isclose(optimizer.param_groups[0]["lr"], step["lr"], rel_tol=1e-12)
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == pytest.approx([0.0, step["weight_decay"]], rel=1e-12)
    delta = {n: t.detach().double() - before[n].double() for n, t in method.named_parameters()}
    assert_stats(delta, REC["delta_norm"], REC["delta_fingerprint"], "SparK change after one step", rename=official_name)
    assert_tensors(delta, section(T, "delta"), "SparK change after one step (stored whole)", rename=official_name)
    # sparse BatchNorm: running statistics from the visible positions only, as the official BatchNorm1d over them
    buffers = {k: v for k, v in method.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    assert_stats(buffers, REC["buffer_norm"], REC["buffer_fingerprint"], "SparK BatchNorm running statistics",
                 rename=official_name)


def test_the_comparison_notices_batchnorm_statistics_taken_over_masked_positions(monkeypatch):
    """Control: a sparse BatchNorm that let the masked zeros into its statistics (an easy refactoring slip) changes the
    loss far beyond the tolerance; the official code and ours agree to the last bit."""

    def dense_statistics(bn, x, m):
        y = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.training, bn.momentum or 0.1, bn.eps)
        return y * m.to(y.dtype)

    monkeypatch.setattr(sparse, "sparse_batch_norm", dense_statistics)
    method, _ = build()
    loss = float(method(T["input/x"], T["input/active"])["loss"].detach())
    with pytest.raises(AssertionError, match="SparK loss"):
        assert_loss(loss, REC["loss"], "SparK loss")
