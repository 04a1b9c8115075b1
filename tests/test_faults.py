"""Runtime faults a user can hit: each ends in one clear message and the right exit status, without a traceback,
and nothing already computed is lost.

A hostile or broken checkpoint, a run directory under a file, a full disk, a read-only run directory, Ctrl-C twice,
NaN weights behind a finite loss, two runs on one directory. The full-disk and read-only cases use a small tmpfs
mounted by the test where the machine lets it (root); otherwise they are skipped with the reason, and the full
disk is also simulated at the real write call, which always runs.
"""

import argparse
import errno
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch import nn

from sslrecipe.cli import main
from sslrecipe.engine.events import EventLog, read_events

TINY = Path(__file__).with_name("tiny.yaml")
STEPS = ["--set", "finetune.steps=12", "--until", "finetune"]  # checkpoints at steps 2, 4, ... (tiny.yaml)


def run_cli(run_dir, *extra):
    res = CliRunner().invoke(main, ["run", str(TINY), "--run-dir", str(run_dir), *STEPS, *extra])
    assert "Traceback" not in res.output, res.output
    return res


def events_of(run_dir):
    return list(read_events(Path(run_dir) / "events.jsonl"))


def finetune_dir(run_dir) -> Path:
    [d] = Path(run_dir).glob("finetune-*")
    return d


def assert_same_detector(run_dir, reference):
    a = load_file(str(finetune_dir(run_dir) / "detector.safetensors"))
    b = load_file(str(finetune_dir(reference) / "detector.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Fine-tuning of tiny.yaml for 12 steps, uninterrupted: what every recovered run must end with."""
    run_dir = tmp_path_factory.mktemp("faults") / "reference"
    res = run_cli(run_dir)
    assert res.exit_code == 0, res.output
    return run_dir


def unfinished_copy(reference, dest) -> Path:
    """The reference run with its fine-tuning unfinished (no done.json, no detector, no checkpoint)."""
    def ignore(folder, names):
        return [n for n in names if Path(folder).name.startswith("finetune-") or n == "run.lock"]

    shutil.copytree(reference, dest, ignore=ignore)
    return finetune_dir(dest)


# --------------------------------------------------------------------------- an unusable checkpoint.pt on resume


class _Touch:
    """A pickle that would create a file if it were ever unpickled with code execution."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def _garbage(path, ckpt, marker):
    path.write_bytes(b"this is not a checkpoint\n")


def _truncated(path, ckpt, marker):
    path.write_bytes(ckpt.read_bytes()[:100_000])


def _python_objects(path, ckpt, marker):
    torch.save({"model": _Touch(marker), "args": argparse.Namespace(lr=1)}, path)


def _wrong_layout(path, ckpt, marker):
    stage_hash = torch.load(ckpt, weights_only=True)["stage_hash"]
    torch.save({"stage_hash": stage_hash, "step": "four", "model": [1, 2]}, path)


def _wrong_weights(path, ckpt, marker):
    state = torch.load(ckpt, weights_only=True)
    key = next(iter(state["model"]))
    state["model"][key] = torch.zeros(3)  # loads, then fails half-way into the model: the stage must start clean
    torch.save(state, path)


def _nan_weights(path, ckpt, marker):
    state = torch.load(ckpt, weights_only=True)
    key = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][key] = state["model"][key] * float("nan")
    torch.save(state, path)


@pytest.mark.parametrize("make, reason", [
    (_garbage, "not a readable checkpoint"),
    (_truncated, "not a readable checkpoint (RuntimeError: PytorchStreamReader failed reading zip archive"),
    (_python_objects, "not a weights-only checkpoint"),
    (_wrong_layout, "'model' entry is missing or not a dict"),
    (_wrong_weights, "size mismatch"),
    (_nan_weights, "weights are not finite"),
], ids=["garbage", "truncated", "python-objects", "wrong-layout", "wrong-weights", "nan-weights"])
def test_unusable_checkpoint_is_set_aside_and_the_stage_restarts(reference, tmp_path, make, reason):
    run_dir = tmp_path / "run"
    ft = unfinished_copy(reference, run_dir)
    ckpt, marker = ft / "checkpoint.pt", tmp_path / "code-ran"
    ref_ckpt = finetune_dir(reference) / "checkpoint.pt"
    make(ckpt, ref_ckpt, marker)
    planted = ckpt.read_bytes()

    res = run_cli(run_dir)
    assert res.exit_code == 0, res.output
    corrupt = ft / "checkpoint.pt.corrupt"
    assert f"{ckpt} could not be resumed" in res.output and reason in res.output and str(corrupt) in res.output
    assert "restarting finetune from step 0" in res.output
    assert corrupt.read_bytes() == planted  # kept for inspection
    assert not marker.exists()  # no pickled code ran
    warnings = [e["message"] for e in events_of(run_dir) if e["event"] == "warning"]
    assert any(str(corrupt) in m for m in warnings)
    assert not any(e["event"] == "resume" for e in events_of(run_dir))
    assert_same_detector(run_dir, reference)  # from scratch, exactly as a fresh run


# --------------------------------------------------------------------------- a run directory that cannot be one


@pytest.mark.parametrize("where, expected", [
    ("somefile/run", "cannot create the run directory {run_dir}: {somefile} is a file, not a directory"),
    ("somefile/a/b", "cannot create the run directory {run_dir}: {somefile} is a file, not a directory"),
    ("somefile", "Invalid value for '--run-dir': Directory '{run_dir}' is a file"),  # click's own check
], ids=["under-a-file", "deeper-under-a-file", "is-a-file"])
def test_run_dir_that_is_or_is_under_a_regular_file(tmp_path, where, expected):
    somefile = tmp_path / "somefile"
    somefile.write_text("keep me\n")
    run_dir = tmp_path / where
    res = run_cli(run_dir)
    assert res.exit_code == 2, res.output
    assert expected.format(run_dir=run_dir, somefile=somefile) in res.output
    assert somefile.read_text() == "keep me\n"


# --------------------------------------------------------------------------- a full disk


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a size-limited tmpfs (root only); yields (mount point, remount(options))."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    def mount(*args):
        return subprocess.run(["mount", *args], capture_output=True, text=True)

    def remount(options):
        done = mount("-o", f"remount,{options}", str(mnt))
        assert done.returncode == 0, done.stderr

    def make(size):
        done = mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt))
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'}), so no real full or "
                        "read-only file system; the full disk is still simulated at the write call")
        return mnt

    yield make, remount
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)  # busy (a failed test's mmap): detach it


FULL_DISK = "free space, then rerun the same command to resume"


def test_full_disk_while_writing_a_checkpoint(reference, tmpfs):
    """A real full file system: room for the data, the encoder and one checkpoint, not for the next one beside it."""
    make, remount = tmpfs
    ref_ft = finetune_dir(reference)
    needed = sum(f.stat().st_size for f in reference.rglob("*") if f.is_file() and f.parent != ref_ft)
    mnt = make(f"{(needed + 1.5 * (ref_ft / 'checkpoint.pt').stat().st_size) // 1024:.0f}k")
    run_dir = mnt / "run"
    res = run_cli(run_dir)
    assert res.exit_code == 2, res.output
    ckpt = finetune_dir(run_dir) / "checkpoint.pt"
    assert f"no space left on the device to write {ckpt}" in res.output and FULL_DISK in res.output
    # the previous checkpoint is intact, no temp file is left, and the run resumes once there is space
    assert torch.load(ckpt, weights_only=True)["step"] == 2
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["checkpoint.pt"]
    assert events_of(run_dir)[-1]["status"] == "failed"
    remount(f"size={4 * needed // 1024 + 400_000}k")
    res = run_cli(run_dir)
    assert res.exit_code == 0, res.output
    assert "resuming finetune from step 2" in res.output
    assert_same_detector(run_dir, reference)


def test_full_disk_simulated_at_the_write_call(reference, tmp_path, monkeypatch):
    """Without a mountable small file system: the file object the atomic writer writes a checkpoint through
    fails with ENOSPC (as a full disk does) on the second checkpoint."""
    run_dir = tmp_path / "run"
    unfinished_copy(reference, run_dir)
    real_fdopen = os.fdopen
    opened = {"checkpoints": 0}

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fdopen(fd, mode="r", *args, **kwargs):
        f = real_fdopen(fd, mode, *args, **kwargs)
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith(".checkpoint.pt."):
            opened["checkpoints"] += 1
            if opened["checkpoints"] == 2:
                return FullDisk(f)
        return f

    monkeypatch.setattr(os, "fdopen", fdopen)
    res = run_cli(run_dir)
    monkeypatch.undo()
    assert res.exit_code == 2, res.output
    ckpt = finetune_dir(run_dir) / "checkpoint.pt"
    assert f"no space left on the device to write {ckpt}" in res.output and FULL_DISK in res.output
    assert torch.load(ckpt, weights_only=True)["step"] == 2
    assert not list(ckpt.parent.glob(".*.tmp"))
    res = run_cli(run_dir)
    assert res.exit_code == 0 and "resuming finetune from step 2" in res.output, res.output
    assert_same_detector(run_dir, reference)


# --------------------------------------------------------------------------- a read-only run directory


def _as_nobody(args):
    """Run the CLI in a forked child that has become `nobody`; returns (exit status, output)."""
    import pwd

    import sslrecipe.cli.run  # noqa: F401  (everything the refusal needs, imported while still root)
    import sslrecipe.engine.runner  # noqa: F401

    nobody = pwd.getpwnam("nobody")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            os.close(read)
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            res = CliRunner().invoke(main, args)
            os.write(write, (res.output + ("".join(__import__("traceback").format_exception(*res.exc_info)) if res.exit_code not in (0, 2) else "")).encode())
            code = res.exit_code
        finally:
            os._exit(code)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode()


@pytest.mark.parametrize("how", ["read-only-mount", "nobody"])
def test_read_only_run_dir_is_one_clear_message(reference, tmpfs, request, how):
    if how == "nobody":
        if os.geteuid() != 0:
            pytest.skip("becoming nobody needs root (root itself ignores permission bits)")
        # pytest's tmp_path is private to root: nobody must be able to reach (not write) the run directory
        base = Path(tempfile.mkdtemp(prefix="sslrecipe-faults-"))
        request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
        base.chmod(0o755)
        run_dir = base / "run"
        unfinished_copy(reference, run_dir)
        before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
        code, output = _as_nobody(["run", str(TINY), "--run-dir", str(run_dir), *STEPS])
        expected = f"permission denied on {run_dir / 'run.lock'}: make {run_dir} writable for this user"
    else:
        make, remount = tmpfs
        run_dir = make("200m") / "run"
        unfinished_copy(reference, run_dir)
        remount("ro")
        before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
        res = run_cli(run_dir)
        code, output = res.exit_code, res.output
        expected = f"cannot write {run_dir / 'run.lock'}: the file system is read-only. Make {run_dir} writable"
    assert code == 2, output
    assert expected in output and "Traceback" not in output
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before  # nothing touched


# --------------------------------------------------------------------------- Ctrl-C twice


def _start_run(run_dir, *extra):
    args = [sys.executable, "-m", "sslrecipe.cli", "run", str(TINY), "--run-dir", str(run_dir), *STEPS, *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, proc, what, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[0]}"
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("second", ["during-the-write", 0.05, 0.3])
def test_ctrl_c_twice_exits_130_and_leaves_a_checkpoint_that_resumes(reference, tmp_path, second):
    run_dir = tmp_path / "run"
    unfinished_copy(reference, run_dir)  # data and weights are done: fine-tuning starts at once
    proc = _start_run(run_dir, "--progress", "plain")
    ckpts = lambda: list(run_dir.glob("finetune-*/checkpoint.pt"))  # noqa: E731
    _wait_for(lambda: ckpts(), proc, "the first checkpoint")
    proc.send_signal(signal.SIGINT)
    if second == "during-the-write":  # the interrupt checkpoint is half written
        full = (finetune_dir(reference) / "checkpoint.pt").stat().st_size

        def half_written():
            for tmp in run_dir.glob("finetune-*/.checkpoint.pt.*.tmp"):
                try:
                    if 0 < tmp.stat().st_size < full:
                        return True
                except FileNotFoundError:  # renamed meanwhile
                    pass
            return False

        _wait_for(half_written, proc, "the interrupt checkpoint write")
    else:
        time.sleep(second)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert "Traceback" not in output and "interrupted" in output, output
    [ckpt] = ckpts()
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 2 <= step < 12
    assert not list(ckpt.parent.glob(".*.tmp")) and not (ckpt.parent / "detector.safetensors").exists()
    assert events_of(run_dir)[-1]["event"] == "run_end" and events_of(run_dir)[-1]["status"] == "interrupted"
    res = run_cli(run_dir)
    assert res.exit_code == 0 and f"resuming finetune from step {step}" in res.output, res.output
    assert_same_detector(run_dir, reference)


# --------------------------------------------------------------------------- NaN weights behind a finite loss


class _Regression(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, key):
        i, seed = key
        x = torch.randn(4, generator=torch.Generator().manual_seed(seed))
        return x, x.sum()


@pytest.mark.parametrize("poisoned, message, kept", [
    (10, "non-finite weights after step 10", 5),  # on a checkpoint step: caught before it is written
    (7, "non-finite loss at step 8", 5),  # between checkpoints: the loss shows it one step later
], ids=["on-a-checkpoint-step", "between-checkpoints"])
def test_nan_weights_never_reach_the_kept_checkpoint(tmp_path, poisoned, message, kept):
    from sslrecipe.engine.loop import LoopSettings, TrainLoop
    from sslrecipe.errors import StageError
    from sslrecipe.recipe.schema import OptimConfig

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    step = {"n": 0}

    def loss_fn(model, batch):
        step["n"] += 1
        x, y = batch
        loss = ((model(x).squeeze(-1) - y) ** 2).mean()
        if step["n"] == poisoned:  # a finite loss whose gradient is NaN: the optimizer step writes NaN weights
            loss.register_hook(lambda g: g * float("nan"))
        return {"loss": loss}

    settings = LoopSettings(stage="pretrain", stage_dir=tmp_path, stage_hash="h", optim=OptimConfig(lr=0.01),
                            batch_size=4, total_steps=20, seed=0, device=torch.device("cpu"), checkpoint_every=5)
    loop = TrainLoop(settings, model, [{"params": list(model.parameters())}], _Regression(), loss_fn,
                     EventLog(tmp_path / "events.jsonl"))
    with pytest.raises(StageError) as e:
        loop.run()
    assert message in str(e.value)
    assert f"last good checkpoint ({tmp_path / 'checkpoint.pt'}, step {kept}, finite weights) is kept" in str(e.value)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == kept
    assert all(torch.isfinite(v).all() for v in state["model"].values())


# --------------------------------------------------------------------------- two runs on one run directory


def test_second_run_on_a_held_directory_is_refused_and_kill_9_releases_it(reference, tmp_path):
    from sslrecipe.tui.runs import RunWatcher

    run_dir = tmp_path / "run"
    unfinished_copy(reference, run_dir)
    first = _start_run(run_dir, "--set", "finetune.steps=100000")
    _wait_for(lambda: any(e["event"] == "run_start" and e["pid"] == first.pid for e in events_of(run_dir)), first,
              "the first run to start")
    try:
        n_events = len(events_of(run_dir))
        second = run_cli(run_dir)
        assert second.exit_code == 2, second.output
        assert f"{run_dir} is in use by another sslrecipe run (pid {first.pid} on {socket.gethostname()}, since " in second.output
        assert "Wait for it to finish, or stop it" in second.output and "--run-dir" in second.output
        # the refused run wrote nothing into the directory it does not hold
        assert not [e for e in events_of(run_dir)[n_events:] if e["event"] in ("run_start", "run_end", "error")]
        # reading needs no lock: validate, and the TUI's view of the run
        assert CliRunner().invoke(main, ["validate", str(run_dir / "resolved.yaml")]).exit_code == 0
        watcher = RunWatcher(run_dir)
        watcher.poll()
        assert watcher.status()[0] == "running"
        holder = json.loads((run_dir / "run.lock").read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
    finally:
        first.kill()  # kill -9: the kernel releases the lock with the process
        first.wait()
    third = CliRunner().invoke(main, ["run", str(TINY), "--run-dir", str(run_dir), "--until", "data"])
    assert third.exit_code == 0, third.output
