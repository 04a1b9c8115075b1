"""The one training loop: checkpoints, resume on the same trajectory, NaN guard, graceful stop, events."""

import json

import pytest
import torch
from torch import nn

from sslrecipe import signals
from sslrecipe.engine.checkpoint import atomic_torch_save, load_checkpoint
from sslrecipe.engine.events import EVENT_NAMES, EventLog, read_events
from sslrecipe.engine.loop import EpochBatchSampler, Interrupted, LoopSettings, TrainLoop
from sslrecipe.errors import StageError
from sslrecipe.recipe.schema import OptimConfig


class NoisyRegression(torch.utils.data.Dataset):
    """Items addressed by (index, sample_seed): the 'augmentation' noise comes from the sample seed."""

    def __init__(self, n=37):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, key):
        i, seed = key
        noise = torch.randn(4, generator=torch.Generator().manual_seed(seed)) * 0.1
        return self.x[i] + noise, self.y[i]


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 1))  # dropout uses the global RNG

    def forward(self, x):
        return self.net(x).squeeze(-1)


def mse(model, batch):
    x, y = batch
    loss = ((model(x) - y) ** 2).mean()
    return {"loss": loss, "mse": loss}


def make_loop(tmp_path, total=30, after_step=None, loss_fn=mse, **optim):
    torch.manual_seed(0)
    model = Model()
    settings = LoopSettings(
        stage="finetune", stage_dir=tmp_path, stage_hash="h1", optim=OptimConfig(lr=0.05, schedule="step", warmup_steps=3, **optim),
        batch_size=8, total_steps=total, seed=3, device=torch.device("cpu"), checkpoint_every=5,
    )
    events = EventLog(tmp_path / "events.jsonl")
    return TrainLoop(settings, model, [{"params": list(model.parameters())}], NoisyRegression(), loss_fn, events, after_step), model


def test_epoch_sampler_is_seeded_and_resumable():
    full = EpochBatchSampler(37, 8, seed=1, epoch=2).batches()
    assert full == EpochBatchSampler(37, 8, seed=1, epoch=2).batches()
    assert full[2:] == EpochBatchSampler(37, 8, seed=1, epoch=2, start_batch=2).batches()
    assert full != EpochBatchSampler(37, 8, seed=1, epoch=3).batches()
    assert sorted(i for b in full for i, _ in b) == list(range(37))


def test_resume_after_stop_continues_the_same_trajectory(tmp_path):
    ref_loop, ref_model = make_loop(tmp_path / "ref")
    ref_loop.run()

    loop, _ = make_loop(tmp_path / "cut")
    stopped_at = []

    def stop_at_12(step, total):
        if step == 12:
            signals.request_stop()
            stopped_at.append(step)

    loop.after_step = stop_at_12
    with pytest.raises(Interrupted) as e:
        loop.run()
    signals._stop.clear()
    assert e.value.step == 12 and stopped_at == [12]
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step"] == 12

    # a fresh process would build everything again: a new loop over the same stage dir resumes
    torch.manual_seed(123)  # whatever the global RNG holds now, the checkpoint restores it
    resumed, model = make_loop(tmp_path / "cut")
    result = resumed.run()
    assert result.resumed_from == 12 and result.steps == 30
    for a, b in zip(ref_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    kinds = [e["event"] for e in read_events(tmp_path / "cut" / "events.jsonl")]
    assert "resume" in kinds


def test_resume_from_periodic_checkpoint_matches(tmp_path):
    """What a SIGKILL leaves: only the periodic checkpoint (step 10 of 30); the rest is replayed."""
    ref_loop, ref_model = make_loop(tmp_path / "ref")
    ref_loop.run()
    loop, _ = make_loop(tmp_path / "killed", total=30)
    loop.s.total_steps = 30
    # run to step 10 only by stopping there, then delete nothing: checkpoint at 10 is the periodic one
    loop.after_step = lambda step, total: signals.request_stop() if step == 10 else None
    with pytest.raises(Interrupted):
        loop.run()
    signals._stop.clear()
    resumed, model = make_loop(tmp_path / "killed")
    resumed.run()
    for a, b in zip(ref_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_gradient_accumulation_and_clipping_run(tmp_path):
    loop, _ = make_loop(tmp_path, total=6, accumulate=2, clip_grad=1.0)
    result = loop.run()
    assert result.steps == 6 and result.last_loss == result.last_loss


def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
    calls = {"n": 0}

    def explodes(model, batch):
        calls["n"] += 1
        out = mse(model, batch)
        if calls["n"] > 7:
            out["loss"] = out["loss"] * float("nan")
        return out

    loop, _ = make_loop(tmp_path, total=20, loss_fn=explodes)
    with pytest.raises(StageError) as e:
        loop.run()
    assert "non-finite loss at step 8" in str(e.value)
    assert "last good checkpoint" in str(e.value)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 5  # the last good one, untouched


def test_atomic_save_never_leaves_a_torn_file(tmp_path):
    path = tmp_path / "ck.pt"
    atomic_torch_save({"step": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"step": 2, "bad": Boom()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left behind


def test_progress_events_schema(tmp_path):
    loop, _ = make_loop(tmp_path, total=10)
    loop.run()
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    assert all({"ts", "event", "stage"} <= set(e) and e["event"] in EVENT_NAMES for e in events)
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["step"] == 10
    for e in progress:
        assert {"step", "total", "epoch", "epochs", "loss", "losses", "lr", "images_per_s", "eta_s", "run_eta_s"} <= set(e)
        assert "mse" in e["losses"]
        # 37 items in batches of 8: 5 batches an epoch, so 10 steps are 2 epochs; `epoch` counts from 0
        assert e["epochs"] == 2 and e["epoch"] == (e["step"] - 1) // 5
        assert e["run_eta_s"] == e["eta_s"] and e["run_eta_covers"] == [] and e["run_eta_excludes"] == []


def test_run_eta_adds_later_training_stages_and_names_the_unknown_ones():
    from sslrecipe.engine.loop import run_eta

    later = [("weights", None), ("finetune", 40), ("evaluate", None), ("report", None)]
    # 10 s left here, then 40 images at this stage's 0.5 s/image; evaluate has no planned work, so it is named
    assert run_eta(10.0, 0.5, later) == {"run_eta_s": 30.0, "run_eta_covers": ["finetune"], "run_eta_excludes": ["evaluate"]}
    assert run_eta(10.0, 0.5, [])["run_eta_s"] == 10.0
    assert run_eta(float("inf"), 0.5, later)["run_eta_s"] is None  # nothing measured yet: no number


def test_plain_console_shows_epoch_and_run_eta():
    import io

    from sslrecipe.engine.console import ConsoleReporter

    out = io.StringIO()
    ConsoleReporter("plain", out)({
        "event": "progress", "stage": "pretrain", "step": 4, "total": 12, "epoch": 0, "epochs": 3, "loss": 1.0,
        "lr": 1e-3, "images_per_s": 8.0, "eta_s": 180.0, "run_eta_s": 725.0, "run_eta_covers": ["finetune"],
        "run_eta_excludes": ["evaluate"]})
    line = out.getvalue()
    assert "step 4/12 epoch 1/3 " in line and "eta 180s, run ETA ~12m05s + evaluate" in line
