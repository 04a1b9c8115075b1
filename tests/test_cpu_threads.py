"""OpenMP's wait policy, threads and workers: chosen before torch loads, from the cores this process may use."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from sslrecipe.engine import cpu_threads
from sslrecipe.engine.cpu_threads import cgroup_cpu_limit, plan_threads

TINY = Path(__file__).with_name("tiny.yaml")


def _run_start(tmp_path: Path, env_policy: str | None, *overrides: str) -> dict:
    """`python -m sslrecipe run` as a user starts it; returns its run_start event."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_policy is not None:
        env["OMP_WAIT_POLICY"] = env_policy
    run_dir = tmp_path / "run"
    sets = [a for o in overrides for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "sslrecipe", "run", str(TINY), "--run-dir", str(run_dir), "--until", "data", *sets],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return next(e for e in events if e["event"] == "run_start")


@pytest.mark.parametrize(
    ("exported", "key", "expected"),
    [
        (None, "auto", "PASSIVE"),  # the CLI's default on a shared machine
        ("ACTIVE", "auto", "ACTIVE"),  # the user's own export is kept
        (None, "active", "ACTIVE"),  # a dedicated machine chooses spinning in the recipe
        ("ACTIVE", "passive", "PASSIVE"),  # the recipe is more specific than the environment
    ],
)
def test_cli_sets_the_wait_policy_before_torch_loads(tmp_path, exported, key, expected):
    start = _run_start(tmp_path, exported, f"runtime.omp_wait_policy={key}")
    assert start["omp_wait_policy"] == expected
    assert start["threads"] >= 1 and start["workers"] == 0  # tiny.yaml sets workers: 0


def test_run_start_records_threads_from_omp_num_threads(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    start = _run_start(tmp_path, None)
    assert (start["threads"], start["threads_from"]) == (1, "OMP_NUM_THREADS")


def test_library_caller_with_torch_loaded_gets_one_warning(monkeypatch):
    import torch  # noqa: F401  (loaded, as in a library caller's process)

    monkeypatch.setattr(cpu_threads, "_warned", False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    with pytest.warns(UserWarning, match="export OMP_WAIT_POLICY=ACTIVE|Export OMP_WAIT_POLICY=ACTIVE"):
        assert cpu_threads.apply_wait_policy("active") == "PASSIVE"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cpu_threads.apply_wait_policy("active")  # once only
        assert cpu_threads.apply_wait_policy("passive") == "PASSIVE"  # already in effect: nothing to say


def test_threads_follow_torchrun_and_exported_counts(monkeypatch):
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert plan_threads(None, None, "cpu").threads == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nproc_per_node 4
    plan = plan_threads(None, None, "cuda")
    assert (plan.threads, plan.cores, plan.workers) == (4, 4, 3)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # what torchrun or the user exported wins
    assert plan_threads(None, None, "cpu").threads == 2
    assert plan_threads(3, 1, "cpu") == cpu_threads.ThreadPlan(threads=3, workers=1, cores=4, source="recipe")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")  # more processes than cores: never fewer than one thread
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert plan_threads(None, None, "cpu").threads == 1


def test_cpu_workers_rule(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cores, workers in [(1, 0), (2, 0), (3, 0), (8, 2), (64, 4)]:
        monkeypatch.setattr(cpu_threads, "usable_cores", lambda cores=cores: cores)
        assert plan_threads(None, None, "cpu").workers == workers, cores


@pytest.mark.parametrize(
    ("files", "cores"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_cgroup_quota_v1_and_v2(tmp_path, files, cores):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(tmp_path) == cores


def test_usable_cores_is_capped_by_the_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(cpu_threads, "cgroup_cpu_limit", lambda: 1.5)
    assert cpu_threads.usable_cores() == 1
    monkeypatch.setattr(cpu_threads, "cgroup_cpu_limit", lambda: None)
    assert cpu_threads.usable_cores() == 4


def test_python_dash_m_sslrecipe_is_the_cli():
    proc = subprocess.run([sys.executable, "-m", "sslrecipe", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.startswith("Usage: sslrecipe ")

