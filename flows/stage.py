"""One DVC stage on a work pool's worker: the flow behind the deployments `stage/<pool>` (prefect.yaml).

The coordinating flow (flows/pipeline.py, flows/placement.py) triggers it with a git commit, a stage and its
dvc.lock. In the worker's own clone (the deployment's working directory) it:

1. checks out the commit (fetched from the git server; a clone with local edits is refused);
2. takes the coordinator's dvc.lock and pulls exactly the stage's deps that other stages produce;
3. runs `dvc repro --single-item <stage>` (the coordinator has just found no run-cache entry for it);
4. pushes the stage's outputs, and only after them its run-cache entry: an entry on the remote always has
   complete outputs (`dvc push --run-cache` alone sends the entries first, dvc/repo/push.py).

    prefect --no-prompt deploy --name gpu      # in the GPU machine's clone, once
    prefect worker start --pool gpu --limit 1  # one stage at a time per clone
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.states import Completed, State

from flows.graph import read_graph
from flows.placement import PlacementError, check_dvc_remote, git, worker_name
from flows.repro import STATE_NAMES, run_dvc, run_dvc_stage


def checkout(root: Path, commit: str) -> None:
    """Check out commit in the worker's clone; only dvc.lock (the last run's) may differ from its checkout."""
    dirty = [line[3:] for line in git(root, "status", "--porcelain", "--untracked-files=no").splitlines()
             if line[3:].strip() != "dvc.lock"]
    if dirty:
        raise PlacementError(f"worker clone {root} has local changes ({', '.join(dirty)}): a worker needs a clone "
                             "of its own that nobody edits")
    git(root, "fetch", "--quiet", "--all")
    try:
        git(root, "cat-file", "-e", f"{commit}^{{commit}}")
    except PlacementError:
        raise PlacementError(f"commit {commit[:12]} is not on the git server (after `git fetch --all` in "
                             f"{root})") from None
    git(root, "checkout", "--quiet", "--force", "--detach", commit)


def push_result(root: Path, stage: str, logger: Any) -> None:
    """Push the stage's outputs, then its run-cache entry: the entry never reaches the remote without them."""
    run_dvc(root, logger, "push", stage)
    run_dvc(root, logger, "push", "--run-cache", stage)


@flow(name="stage", flow_run_name="{stage} @ {commit:.8}")
def stage(commit: str, stage: str, lock: str = "") -> State:
    """Reproduce one DVC stage at a commit in this worker's clone and push its result to the DVC remote."""
    logger = get_run_logger()
    root = Path.cwd().resolve()
    logger.info("worker %s on %s, clone %s: stage %r at %s", worker_name(), socket.gethostname(), root, stage,
                commit[:12])
    checkout(root, commit)
    logger.info("DVC remote %s", check_dvc_remote(root))
    lock_file = root / "dvc.lock"
    if lock:
        lock_file.write_text(lock)
    else:
        lock_file.unlink(missing_ok=True)

    graph = read_graph(root)
    if stage not in graph.upstream:
        raise PlacementError(f"stage {stage!r} is not in dvc.yaml at {commit[:12]} (stages: {', '.join(graph.stages)})")
    deps = [d for d in graph.deps.get(stage, ()) if graph.producer(d) not in (None, stage)]
    if deps:  # --force: a dep left from an earlier run on this clone is replaced by the locked version
        run_dvc(root, logger, "pull", "--force", *deps)
    outcome = run_dvc_stage(stage, root, False, logger)
    push_result(root, stage, logger)
    message = f"DVC {outcome} stage {stage!r} at {commit[:12]} on worker {worker_name()!r} ({socket.gethostname()})"
    logger.info("%s", message)
    return Completed(name=STATE_NAMES.get(outcome, "Completed"), message=message)
