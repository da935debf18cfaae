"""Overhead of the Prefect flow over plain `dvc repro`, on a no-op run (everything up to date).

A toy repo with the real dvc.yaml's graph shape (stages read from DVC, trivial commands) is
reproduced once; then each variant is timed as a fresh process (median of --reps):
  dvc repro                    plain DVC, one process
  flow, ephemeral server       `python -m flows.pipeline` with no server: Prefect starts a temporary one
  flow, running server         `python -m flows.pipeline` against `prefect server start`
  flow call, warm process      `pipeline()` called again in an already-warm process (server running)

    python bench/flow_overhead.py [--reps 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from flows.graph import dvc_command, read_graph
from flows.server import local_server

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]


def make_repo(root: Path) -> int:
    """Toy repo mirroring this checkout's stage graph; returns the stage count."""
    graph = read_graph(ROOT)
    stages = {
        s: {
            "cmd": f"echo {s} > {s}.txt",
            "deps": ["seed.txt", *sorted(f"{u}.txt" for u in graph.upstream[s])],
            "outs": [f"{s}.txt"],
        }
        for s in graph.stages
    }
    root.mkdir(parents=True)
    (root / "seed.txt").write_text("seed\n")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    for cmd in (["git", "init", "-q"], dvc_command("init", "-q"), dvc_command("repro", "-q")):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    return len(stages)


def timed(cmd: list[str], cwd: Path, env: dict[str, str], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return statistics.median(times)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="flow-overhead-") as tmp:
        repo = Path(tmp) / "repo"
        n = make_repo(repo)
        home = Path(tmp) / "prefect-home"
        base_env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env = dict(
            base_env,
            PREFECT_HOME=str(home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            DVC_NO_ANALYTICS="1",
            PREFECT_LOGGING_LEVEL="WARNING",
        )
        flow_cmd = [sys.executable, "-m", "flows.pipeline", "--repo", str(repo)]
        rows = [("dvc repro", timed(dvc_command("repro"), repo, env, args.reps))]
        rows.append(("flow, ephemeral server", timed(flow_cmd, repo, env, args.reps)))
        with local_server(Path(tmp) / "server-home") as server_env:
            env = dict(server_env, PREFECT_LOGGING_LEVEL="WARNING")
            rows.append(("flow, running server", timed(flow_cmd, repo, env, args.reps)))
            warm = [
                sys.executable,
                "-c",
                "import sys, time; from flows.pipeline import pipeline; pipeline(repo=sys.argv[1]); "
                "t = time.perf_counter(); [pipeline(repo=sys.argv[1]) for _ in range(int(sys.argv[2]))]; "
                "print((time.perf_counter() - t) / int(sys.argv[2]))",
                str(repo),
                str(args.reps),
            ]
            out = subprocess.run(warm, cwd=repo, env=env, capture_output=True, text=True, check=True).stdout
            rows.append(("flow call, warm process", float(out.split()[-1])))

    print(f"\nNo-op run, {n} stages up to date, median of {args.reps} (seconds, wall clock)\n")
    print("| variant | seconds |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
