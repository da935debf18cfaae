"""Two machines' worth of tuneforge on one: a git origin, a DVC remote, a Prefect server, pools with workers.

`local_cluster(root, overrides, pools)` builds the project (tests.repo.make_repo with the overrides), pushes it
to a bare git origin with a local-folder DVC remote as its committed default, clones it once per pool (its
worker's own clone, from which that pool's deployment is deployed) and once for the coordinator, starts a
real `prefect server` on 127.0.0.1, creates the process work pools and starts one worker per pool in its
clone. For tests/flows/test_placement.py and bench/flow_overhead.py.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from flows.server import local_server, prefect_cli, stop
from tests.repo import clone, dvc, git, make_repo, run
from tests.repo import env as repo_env


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]  # reaches the server: for workers, coordinator processes and the CLI
    remote: Path
    clones: dict[str, Path]  # pool -> its worker's clone; "coordinator" -> the coordinator's
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)

    def prefect(self, *args: str, cwd: Path) -> str:
        proc = subprocess.run([*prefect_cli(), *args], cwd=cwd, env=self.env, capture_output=True, text=True,
                              timeout=180)
        if proc.returncode:
            raise AssertionError(f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    def start_worker(self, pool: str) -> None:
        """`prefect worker start --pool POOL --limit 1` in the pool's clone, named `<pool>-worker`."""
        with (self.root / f"worker-{pool}.log").open("a") as log:
            self.workers[pool] = subprocess.Popen(
                [*prefect_cli(), "worker", "start", "--pool", pool, "--name", f"{pool}-worker", "--limit", "1"],
                cwd=self.clones[pool], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill_worker(self, pool: str) -> None:
        """The machine is gone: SIGKILL the worker and every process under it (the stage's flow run too)."""
        proc = psutil.Process(self.workers[pool].pid)
        for p in [*proc.children(recursive=True), proc]:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.workers[pool].wait(timeout=30)

    def stop_workers(self) -> None:
        for proc in self.workers.values():
            stop(proc)  # the worker stops on SIGINT, not SIGTERM

    def wait_online(self, pools: list[str], timeout: float = 180) -> None:
        """Until each pool has an online worker."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.objects import WorkerStatus
        from prefect.settings import PREFECT_API_URL, temporary_settings

        deadline = time.monotonic() + timeout
        with temporary_settings({PREFECT_API_URL: self.env["PREFECT_API_URL"]}):
            with get_client(sync_client=True) as client:
                while waiting := [p for p in pools if not any(
                        w.status == WorkerStatus.ONLINE for w in client.read_workers_for_work_pool(p))]:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no online worker in {waiting} after {timeout:.0f} s")
                    time.sleep(1)

    def log(self, pool: str) -> str:
        return (self.root / f"worker-{pool}.log").read_text()[-4000:]


@contextmanager
def local_cluster(root: Path, overrides: dict[str, Any], pools: Mapping[str, str],
                  clones: tuple[str, ...] = ("coordinator",)) -> Iterator[Cluster]:
    """pools: work pool -> the prefect.yaml deployment its clone deploys (e.g. {"gpu": "gpu"}); clones: more
    clones of the origin (the coordinator's). Yields once every pool has an online worker."""
    origin, remote = root / "origin.git", root / "dvc-remote"
    run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], cwd=root)
    remote.mkdir()
    project = make_repo(root / "project", overrides)
    dvc("remote", "add", "-d", "storage", str(remote), cwd=project)
    git("add", ".dvc/config", cwd=project)
    git("commit", "-qm", "DVC remote: the shared folder", cwd=project)
    git("remote", "add", "origin", str(origin), cwd=project)
    git("push", "-q", "-u", "origin", "main", cwd=project)
    paths = {name: clone(origin, root / name) for name in (*pools, *clones)}

    with local_server(root / "prefect-home") as server_env:
        env = {**repo_env(), **server_env, "PREFECT_WORKER_QUERY_SECONDS": "2",
               "PREFECT_WORKER_HEARTBEAT_SECONDS": "2",  # Prefect calls a worker offline after 3 missed: ~6 s
               # PEFT writes adapter_config.json's target_modules from a set: one string-hash order on every
               # worker, so two machines' adapters (and what export records of them) compare byte for byte
               "PYTHONHASHSEED": "0"}
        cluster = Cluster(root, env, remote, paths)
        try:
            for pool, deployment in pools.items():
                cluster.prefect("work-pool", "create", pool, "--type", "process", cwd=root)
                cluster.prefect("--no-prompt", "deploy", "--name", deployment, cwd=paths[pool])
                cluster.start_worker(pool)
            cluster.wait_online(list(pools))
            yield cluster
        finally:
            cluster.stop_workers()
