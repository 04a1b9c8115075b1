"""Wall time and peak memory of the quickstart, end to end, as a user runs it.

    python benchmarks/quickstart.py [--threads N] [--omp-wait-policy unset] [--loaded] [--out FILE]

Runs `sslrecipe run recipes/quickstart.yaml` in a fresh run directory as a subprocess and writes
benchmarks/results/quickstart.json (wall seconds, peak RSS of the run, per-stage seconds, metrics,
machine). Target (issue 2): under 5 minutes and under 4 GB on a 2-core CPU machine.

`--omp-wait-policy unset` runs it through the library with OMP_WAIT_POLICY unset, as every run did before the
CLI chose the passive policy (issue 15); `--loaded` runs one other 2-thread training job beside it (the one
benchmarks/cpu_threads.py uses), with the same policy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the run (default: torch's choice)")
    ap.add_argument("--omp-wait-policy", choices=["cli", "unset"], default="cli",
                    help="cli: the command's own choice (passive unless exported); unset: as before issue 15")
    ap.add_argument("--loaded", action="store_true", help="run one other 2-thread training job beside it")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quickstart.json"))
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    load = None
    if args.loaded:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from cpu_threads import LOAD

        load_env = dict(env, OMP_NUM_THREADS="2", **({} if args.omp_wait_policy == "unset" else {"OMP_WAIT_POLICY": "PASSIVE"}))
        load = subprocess.Popen([sys.executable, "-c", LOAD], env=load_env)
        time.sleep(3)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "quickstart"
        if args.omp_wait_policy == "unset":
            code = ("import sys; from sslrecipe.engine.runner import run_recipe; "
                    "run_recipe(sys.argv[1], run_dir=sys.argv[2], progress='plain')")
            cmd = [sys.executable, "-c", code, str(REPO / "recipes" / "quickstart.yaml"), str(run_dir)]
        else:
            cmd = [sys.executable, "-m", "sslrecipe", "run", str(REPO / "recipes" / "quickstart.yaml"),
                   "--run-dir", str(run_dir), "--progress", "plain"]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        finally:
            if load is not None:
                load.kill()
                load.wait()
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"quickstart failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        stages = {}
        for line in (run_dir / "events.jsonl").read_text().splitlines():
            e = json.loads(line)
            if e["event"] == "stage_end":
                stages[e["stage"]] = e["seconds"]
            elif e["event"] == "run_start":
                run_start = {k: e.get(k) for k in ("threads", "workers", "omp_wait_policy")}
        metrics = json.loads((run_dir / "metrics.json").read_text())
    result = {
        "benchmark": "quickstart end to end (sslrecipe run recipes/quickstart.yaml)",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "omp_num_threads": env.get("OMP_NUM_THREADS")},
        "loaded": args.loaded,
        "run_start": run_start,
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "stage_s": stages,
        "metrics": metrics,
        "targets": {"wall_s": 300, "peak_rss_mb": 4096},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
