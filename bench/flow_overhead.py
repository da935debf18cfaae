"""Overhead of the Prefect flow over plain `dvc repro`, on a no-op run (everything up to date).

A toy repo with the real dvc.yaml's graph shape (stages read from DVC, trivial commands) is
reproduced once; then each variant is timed as a fresh process (median of --reps):
  dvc repro                    plain DVC, one process
  flow, ephemeral server       `python -m flows.pipeline` with no server: Prefect starts a temporary one
  flow, running server         `python -m flows.pipeline` against `prefect server start`
  flow call, warm process      `pipeline()` called again in an already-warm process (server running)

With --placement: the cost of placing stages on work pools (flows/placement.py) against running them in the
flow's own workspace, on the real pipeline at tests.repo.MINIMAL size, both from scratch and then again with
nothing to do. A git origin, DVC remote, Prefect server and `cpu` / `gpu` pools with one worker each in its own
clone all run on this machine (tests/cluster.py), so the figures hold the orchestration cost and none of a
network's: every stage placed (`default: cpu`, the training stages on `gpu`) vs the same commit run locally.
CPU seconds = the flow process and everything it waited for, plus the workers and their flow runs; the Prefect
server's own CPU is in neither.

    python bench/flow_overhead.py [--reps 3]
    python -m bench.flow_overhead --placement
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
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


def cpu_seconds(proc: psutil.Process) -> float:
    """CPU time of a process and of the children it has waited for."""
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def timed_run(cmd: list[str], cwd: Path, env: dict[str, str], workers: list[psutil.Process]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and of the workers' work meanwhile) of one run."""
    before = sum(cpu_seconds(w) for w in workers)
    start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - usage.ru_utime + after.ru_stime - usage.ru_stime
    return wall, cpu + sum(cpu_seconds(w) for w in workers) - before


def placement_overhead() -> None:
    from tests.cluster import local_cluster
    from tests.repo import MINIMAL

    placement = {"default": "cpu", "stages": dict.fromkeys(("sft", "merge", "reference", "dpo"), "gpu")}
    with tempfile.TemporaryDirectory(prefix="placement-overhead-") as tmp:
        with local_cluster(Path(tmp), {**MINIMAL, "placement": placement}, {"cpu": "cpu", "gpu": "gpu"},
                           clones=("coordinator", "local")) as cluster:
            local = cluster.clones["local"]
            params = yaml.safe_load((local / "params.yaml").read_text())
            params.pop("placement")  # the same commit with every stage in the flow's own workspace
            (local / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            env = dict(cluster.env, PREFECT_LOGGING_LEVEL="WARNING")
            workers = [psutil.Process(w.pid) for w in cluster.workers.values()]
            n = len(read_graph(local).stages)
            rows = []
            for label, repo, ws in (("local", local, []), ("placed", cluster.clones["coordinator"], workers)):
                cmd = [sys.executable, "-m", "flows.pipeline", "--repo", str(repo)]
                rows.append((f"{label}, from scratch", *timed_run(cmd, repo, env, ws)))
                rows.append((f"{label}, nothing to do", *timed_run(cmd, repo, env, ws)))
    print(f"\nMINIMAL pipeline ({n} stages), flow against a running server; placed = all {n} stages on the cpu "
          "and gpu pools' workers, all on this machine (seconds)\n")
    print("| run | wall | CPU |\n|---|---|---|")
    for name, wall, cpu in rows:
        print(f"| {name} | {wall:.1f} | {cpu:.1f} |")
    for i, what in ((0, "from scratch"), (1, "nothing to do")):
        extra_wall, extra_cpu = rows[i + 2][1] - rows[i][1], rows[i + 2][2] - rows[i][2]
        print(f"\nplacement overhead, {what}: +{extra_wall:.1f} s wall, +{extra_cpu:.1f} CPU-s "
              f"({extra_wall / n:.1f} s, {extra_cpu / n:.1f} CPU-s per stage)")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--placement", action="store_true", help="measure placement on work pools instead")
    args = parser.parse_args()
    if args.placement:
        logging.getLogger("httpx").setLevel(logging.WARNING)
        placement_overhead()
        return

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
