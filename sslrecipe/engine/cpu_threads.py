"""CPU threads, data-loading workers and OpenMP's wait policy, chosen together and before torch loads.

Torch-free on purpose: OpenMP (libgomp in torch's wheels) reads `OMP_WAIT_POLICY` once, when torch is
first imported, so the CLI must set it before anything imports torch. With the default policy idle
OpenMP threads spin, and on a busy machine spinning threads steal the cores from the threads doing
work: measured 2-3x slower steps on a 2-core machine (docs/results.md, "CPU threads").
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
_UNSET = object()
_user_policy: object = _UNSET  # what the user exported before sslrecipe touched the variable
_warned = False


def _remember_user_policy() -> Optional[str]:
    global _user_policy
    if _user_policy is _UNSET:
        _user_policy = os.environ.get(WAIT_POLICY_ENV)
    return _user_policy  # type: ignore[return-value]


def torch_loaded() -> bool:
    return "torch" in sys.modules


def set_default_wait_policy() -> None:
    """Passive unless the user exported OMP_WAIT_POLICY. Call before torch is imported (the CLI does)."""
    if _remember_user_policy() is None and not torch_loaded():
        os.environ[WAIT_POLICY_ENV] = "PASSIVE"


def apply_wait_policy(choice: str) -> str:
    """Apply `runtime.omp_wait_policy` (auto | passive | active); returns the policy in effect.

    auto = the user's exported OMP_WAIT_POLICY, else passive. Once torch is loaded the policy is fixed:
    an explicit choice that differs from it then gets one warning naming what to export instead.
    """
    global _warned
    user = _remember_user_policy()
    want = (user or "PASSIVE").upper() if choice == "auto" else choice.upper()
    if not torch_loaded():
        os.environ[WAIT_POLICY_ENV] = want
        return want
    current = os.environ.get(WAIT_POLICY_ENV)
    if choice != "auto" and (current or "").upper() != want and not _warned:
        _warned = True
        warnings.warn(
            f"runtime.omp_wait_policy: {choice} cannot apply: torch was imported before the recipe was read, "
            f"and OpenMP reads OMP_WAIT_POLICY only when torch loads. Export OMP_WAIT_POLICY={want} before "
            "starting Python (the sslrecipe command does this for you).",
            stacklevel=2,
        )
    return current.upper() if current else "default"


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> Optional[float]:
    """The CPU quota of this process's cgroup in cores (v2 `cpu.max`, v1 `cpu.cfs_quota_us`), None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for folder in (root / "cpu", root / "cpu,cpuacct"):
        try:
            quota_us = int((folder / "cpu.cfs_quota_us").read_text())
            period_us = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by the cgroup quota; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, max(1, math.floor(limit)))
    return max(1, cores)


def local_processes() -> int:
    """Processes sharing this machine's cores in one launch (torchrun sets LOCAL_WORLD_SIZE)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


@dataclass(frozen=True)
class ThreadPlan:
    threads: int
    workers: int
    cores: int  # usable cores for this process (its share under torchrun)
    source: str  # where the thread count came from: recipe | OMP_NUM_THREADS | cores


def plan_threads(threads: Optional[int], workers: Optional[int], device_type: str) -> ThreadPlan:
    """Threads for torch and DataLoader workers; `None` picks from the cores this process may use.

    Threads: the recipe's value, else an exported OMP_NUM_THREADS (torchrun sets one per process), else this
    process's share of the usable cores. Workers on a CPU device: none below 4 cores, because a worker
    process takes a core away from the compute threads (measured fastest on 2 cores, docs/results.md);
    above that one worker per 4 cores, at most 4. On a GPU the CPU only feeds it: one worker per spare
    core, at most 8.
    """
    cores = max(1, usable_cores() // local_processes())
    source = "recipe"
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        if env.isdigit() and int(env) >= 1:
            threads, source = int(env), "OMP_NUM_THREADS"
        else:
            threads, source = cores, "cores"
    if workers is None:
        if device_type == "cpu":
            workers = 0 if cores < 4 else min(4, cores // 4)
        else:
            workers = min(8, max(0, cores - 1))
    return ThreadPlan(threads=max(1, threads), workers=workers, cores=cores, source=source)
