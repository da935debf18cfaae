"""Stage placement: a stage runs on a Prefect work pool's worker; DVC's remote and run-cache carry it back.

params.yaml `placement:` names a work pool per stage (PlacementConfig in stages/common/config.py). Each pool
has one deployment, `stage/<pool>` (prefect.yaml; the flow `stage` in flows/stage.py), deployed from the
clone its worker works in. For a placed stage the coordinating flow (flows/pipeline.py), in its workspace:

1. asks DVC for the stage without letting it run its command (`dvc repro --pull --single-item` with
   flows.repro's refusing shell): up to date -> skipped, in the run-cache -> restored; nothing is placed;
2. otherwise pushes the stage's deps to the DVC remote and triggers `stage/<pool>` with the git commit, the
   stage and its own dvc.lock (the hashes of the deps the worker pulls), then follows that flow run: its
   logs into this task's log, its worker's heartbeat; a worker that goes offline fails the stage;
3. restores the stage from the run-cache as in 1; anything but `restored` fails it (it never runs here).

Before any stage runs, `preflight` checks what a placed run needs and fails naming the first thing missing:
a Prefect server the workers can reach, stages the run-cache can carry, a commit on the git server with no
uncommitted change to what the placed stages run, a reachable default DVC remote, and per pool its
deployment and an online worker.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from flows.graph import StageGraph, lookup
from flows.repro import OUTCOME_OF_STATE, RESTORED, SKIPPED, WOULD_RUN, StageFailed, run_dvc, run_dvc_stage
from stages.common.config import PlacementConfig

FLOW = "stage"  # flows/stage.py's flow; pool P runs it as the deployment `stage/P`
WORKER_LABEL = "prefect.worker.name"  # the label a Prefect worker puts on each flow run it takes
POLL_S = 1.0


class PlacementError(RuntimeError):
    """The placement config, the workspace, the git server, the DVC remote or a pool is not fit to place."""


@dataclass(frozen=True)
class Placed:
    """What a placed stage came to: DVC's outcome in this workspace and, if it ran remotely, where."""

    outcome: str  # skipped | restored (nothing placed) | "ran on pool P" / "restored on pool P"
    pool: str | None = None
    worker: str | None = None
    flow_run: str | None = None  # the remote flow run's name
    url: str | None = None  # its page in the Prefect UI


def deployment_name(pool: str) -> str:
    return f"{FLOW}/{pool}"


# ---------------------------------------------------------------- config


def read_placement(params: Mapping[str, Any], graph: StageGraph) -> PlacementConfig:
    """params.yaml's `placement` section, typed; an invalid key or a stage dvc.yaml lacks is a PlacementError."""
    try:
        cfg = PlacementConfig.model_validate(params.get("placement") or {})
    except ValidationError as err:
        lines = [f"params.yaml: {len(err.errors())} invalid placement parameter(s)"]
        lines += [f"  placement.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
        raise PlacementError("\n".join(lines)) from None
    unknown = sorted(set(cfg.stages) - set(graph.upstream))
    if unknown:
        raise PlacementError(f"params.yaml: placement.stages names {', '.join(map(repr, unknown))}, not in "
                             f"dvc.yaml (stages: {', '.join(graph.stages)})")
    return cfg


def placed_stages(cfg: PlacementConfig, stages: Iterable[str]) -> dict[str, str]:
    """stage -> work pool, for the stages that run on a pool."""
    return {s: pool for s in stages if (pool := cfg.pool(s))}


# ---------------------------------------------------------------- git


def git(root: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if proc.returncode:
        raise PlacementError(f"`git {' '.join(args)}` in {root} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def _git_yaml(root: Path, rev: str, path: str) -> dict[str, Any]:
    proc = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True)
    data = yaml.safe_load(proc.stdout) if proc.returncode == 0 else None
    return data if isinstance(data, dict) else {}


def uncommitted_inputs(root: Path, graph: StageGraph, stage: str) -> list[str]:
    """What the stage runs that differs from the commit: dvc.yaml, its git-tracked deps, its params values.

    Deps another stage produces travel through DVC, not git; dvc.lock is the coordinator's to change.
    """
    files = ["dvc.yaml", *(d for d in graph.deps.get(stage, ()) if graph.producer(d) is None)]
    status = git(root, "status", "--porcelain", "--untracked-files=all", "--", *files)
    changed = sorted({line[3:].strip() for line in status.splitlines() if line.strip()})
    params = graph.params.get(stage, ())
    versions = {}  # file -> (workspace, HEAD): each read once, however many of its keys the stage tracks
    for file in dict.fromkeys(f for f, _ in params):
        path = root / file
        versions[file] = (yaml.safe_load(path.read_text()) if path.exists() else None, _git_yaml(root, "HEAD", file))
    for file, key in params:
        here, committed = versions[file]
        if lookup(here, key) != lookup(committed, key):
            changed.append(f"{file}:{key or '(whole file)'}")
    return changed


def check_on_git_server(root: Path, commit: str, remote: str) -> None:
    """The commit must be on a branch or tag of the git remote the workers fetch from."""
    git(root, "fetch", "--quiet", remote)
    refs = git(root, "for-each-ref", "--contains", commit, "--format=%(refname)", f"refs/remotes/{remote}/")
    if not refs.strip():
        raise PlacementError(f"commit {commit[:12]} is not on the git server ({remote}): the workers check out "
                             f"commits from there; `git push {remote}` first")


# ---------------------------------------------------------------- DVC remote


def check_dvc_remote(root: Path) -> str:
    """The default DVC remote, reachable from here (a local folder must exist); returns 'name (url)'."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        name = repo.config["core"].get("remote")
        if not name:
            raise PlacementError(f"{root}: no default DVC remote; placement carries stage results through one "
                                 "(`dvc remote add -d storage <url>`, committed so every clone has it)")
        try:
            remote = repo.cloud.get_remote(name)
            url = repo.config["remote"][name].get("url", remote.path)
            exists = remote.fs.exists(remote.path)
        except Exception as err:  # any backend error: unreachable, credentials, bad URL
            raise PlacementError(f"DVC remote {name!r} is unreachable from {root}: {err}") from None
        if not exists and remote.fs.protocol == "local":
            raise PlacementError(f"DVC remote {name!r} ({url}) does not exist on this machine: mount or create "
                                 "the shared folder (dvc would silently create an unshared one)")
    return f"{name} ({url})"


# ---------------------------------------------------------------- Prefect pools


def _prefect_api() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise PlacementError("placement needs a Prefect server that the workers reach: set PREFECT_API_URL "
                             "(a flow without one starts a temporary server no worker can see)")
    return url


def check_pools(pools: Iterable[str]) -> None:
    """Each pool exists, has its deployment `stage/<pool>` and at least one online worker."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import WorkerStatus
    from prefect.exceptions import ObjectNotFound

    api = _prefect_api()
    with get_client(sync_client=True) as client:
        for pool in sorted(set(pools)):
            try:
                client.read_work_pool(pool)
            except ObjectNotFound:
                raise PlacementError(f"work pool {pool!r} does not exist on the Prefect server {api} "
                                     f"(`prefect work-pool create {pool} --type process`)") from None
            try:
                deployment = client.read_deployment_by_name(deployment_name(pool))
            except ObjectNotFound:
                raise PlacementError(f"work pool {pool!r} has no deployment {deployment_name(pool)!r}: run "
                                     f"`prefect --no-prompt deploy --name {pool}` in the clone its worker "
                                     "uses") from None
            if deployment.work_pool_name != pool:
                raise PlacementError(f"deployment {deployment_name(pool)!r} runs on work pool "
                                     f"{deployment.work_pool_name!r}, not {pool!r}")
            online = [w.name for w in client.read_workers_for_work_pool(pool) if w.status == WorkerStatus.ONLINE]
            if not online:
                raise PlacementError(f"work pool {pool!r} has no online worker (start one in its clone: "
                                     f"`prefect worker start --pool {pool} --limit 1`)")


def preflight(root: Path, graph: StageGraph, placed: Mapping[str, str], cfg: PlacementConfig) -> str:
    """Check everything a placed run needs before any stage runs; returns the commit the workers check out."""
    _prefect_api()
    for stage in placed:
        if why := graph.no_run_cache.get(stage):
            raise PlacementError(f"stage {stage!r} cannot be placed: {why}, so DVC's run-cache cannot bring its "
                                 "result back; run it here (placement.stages.<stage>: null)")
    commit = git(root, "rev-parse", "HEAD").strip()
    for stage in placed:
        if changed := uncommitted_inputs(root, graph, stage):
            raise PlacementError(f"stage {stage!r} is placed on pool {placed[stage]!r}, but the workspace has "
                                 f"uncommitted changes to what it runs: {', '.join(changed)}; commit and push "
                                 "them (a worker runs the commit, not this workspace)")
    check_on_git_server(root, commit, cfg.git_remote)
    check_dvc_remote(root)
    check_pools(placed.values())
    return commit


# ---------------------------------------------------------------- one placed stage


def _read_lock(root: Path) -> str:
    """dvc.lock as it is now ('' if none); re-read if another stage's DVC is mid-write."""
    path = root / "dvc.lock"
    for _ in range(20):
        if not path.exists():
            return ""
        text = path.read_text()
        try:
            yaml.safe_load(text)
            return text
        except yaml.YAMLError:
            time.sleep(0.1)
    raise PlacementError(f"{path} is not valid YAML")


def _worker_problem(client: Any, pool: str, worker: str | None) -> str | None:
    """Why the flow run can no longer finish: its worker went offline, or the pool has no online worker."""
    from prefect.client.schemas.objects import WorkerStatus

    workers = client.read_workers_for_work_pool(pool)
    if worker is None:
        if not any(w.status == WorkerStatus.ONLINE for w in workers):
            return f"work pool {pool!r} has no online worker to take it"
        return None
    mine = next((w for w in workers if w.name == worker), None)
    if mine is None or mine.status != WorkerStatus.ONLINE:
        seen = mine.last_heartbeat_time if mine else None
        age = f"last heartbeat {time.time() - seen.timestamp():.0f} s ago" if seen else "no heartbeat"
        return f"worker {worker!r} of work pool {pool!r} went offline ({age})"
    return None


LOG_LAG_S = 60.0  # how far behind the newest forwarded line a late-arriving remote log line may be dated


def _forward_logs(client: Any, flow_run_id: Any, seen: dict, logger: Any, prefix: str) -> bool:
    """Log the remote flow run's new log lines into this task's log, in their order; True once its last line
    (Prefect's "Finished in state ...") has come.

    `seen` maps forwarded line ids to their timestamps. Each poll reads only the lines dated after the newest
    one forwarded less LOG_LAG_S (a worker ships its lines in batches, so one can arrive after a later-dated
    one), not the whole log again: a long stage's log is read about once, not once per poll. Ids dated before
    that window are dropped from `seen` (the server no longer returns their lines), so it stays window-sized."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTimestamp
    from prefect.client.schemas.sorting import LogSort

    since = max(seen.values()) - datetime.timedelta(seconds=LOG_LAG_S) if seen else None
    for old in [i for i, stamp in seen.items() if stamp < since]:
        del seen[old]
    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]),
                           timestamp=LogFilterTimestamp(after_=since) if since else None)
    offset, finished = 0, False
    while True:
        logs = client.read_logs(log_filter=log_filter, limit=200, offset=offset, sort=LogSort.TIMESTAMP_ASC)
        for entry in logs:
            finished = finished or entry.message.startswith("Finished in state")
            if entry.id not in seen:
                seen[entry.id] = entry.timestamp
                logger.log(entry.level, "%s %s", prefix, entry.message)
        if len(logs) < 200:
            return finished
        offset += len(logs)


def follow(flow_run_id: Any, stage: str, pool: str, logger: Any) -> tuple[Any, str | None]:
    """Wait for the remote flow run to end, forwarding its logs; (final flow run, worker name).

    A worker that goes offline (Prefect marks it so after 3 missed heartbeats) fails the stage: the flow run
    is set Crashed, naming stage, pool and worker, so the dashboard shows it and nothing waits on it.
    """
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    seen: dict = {}
    worker = None
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            worker = run.labels.get(WORKER_LABEL) or worker
            _forward_logs(client, flow_run_id, seen, logger, f"[{pool}/{worker or '-'}]")
            if run.state is not None and run.state.is_final():
                deadline = time.monotonic() + 10  # the remote process ships its last logs as it exits
                while not _forward_logs(client, flow_run_id, seen, logger, f"[{pool}/{worker or '-'}]") and \
                        time.monotonic() < deadline:
                    time.sleep(POLL_S)
                return run, worker
            if problem := _worker_problem(client, pool, worker):
                message = f"stage {stage!r}: {problem} while flow run {run.name!r} was {run.state_name}"
                client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
                raise StageFailed(message)
            time.sleep(POLL_S)


def push_deps(root: Path, graph: StageGraph, stage: str, logger: Any) -> None:
    """Push the outputs of other stages this stage reads, so the worker can pull them.

    Whole declared outputs, never a file inside a directory output: `dvc push dir/file` sends the directory's
    .dir listing with that one file, and every later push of another file in it then finds the listing on the
    remote and takes the whole directory as pushed ("Everything is up to date", DVC 3.x), so the worker's pull
    of that file fails.
    """
    outs = dict.fromkeys(found[1] for d in graph.deps.get(stage, ())
                         if (found := graph.output(d)) and found[0] != stage)
    if outs:
        run_dvc(root, logger, "--wait-for-lock", "push", *outs)


def place_stage(stage: str, pool: str, root: Path, commit: str, graph: StageGraph, logger: Any) -> Placed:
    """Get the stage into this workspace without running it here: from DVC if it can, else from pool's worker."""
    from prefect.deployments import run_deployment
    from prefect.utilities.urls import url_for

    outcome = run_dvc_stage(stage, root, False, logger, pull=True, refuse_to_run=True)
    if outcome in (SKIPPED, RESTORED):
        logger.info("stage %r: %s here, nothing placed on pool %r", stage, outcome, pool)
        return Placed(outcome)
    if outcome != WOULD_RUN:
        raise StageFailed(f"stage {stage!r}: dvc said {outcome!r} where it should only skip or restore")

    push_deps(root, graph, stage, logger)
    name = f"{stage} @ {commit:.8}"  # as flows/stage.py names its runs
    flow_run = run_deployment(deployment_name(pool), parameters={"commit": commit, "stage": stage,
                                                                 "lock": _read_lock(root)},
                              flow_run_name=name, timeout=0)
    url = url_for(flow_run)
    logger.info("stage %r placed on work pool %r: flow run %r %s", stage, pool, name, url or "")
    run, worker = follow(flow_run.id, stage, pool, logger)
    where = f"on work pool {pool!r}" + (f" (worker {worker!r})" if worker else "")
    if not run.state.is_completed():
        raise StageFailed(f"stage {stage!r} {run.state.name.lower()} {where}: {run.state.message or ''} "
                          f"(flow run {name!r} {url or ''})")
    remote = OUTCOME_OF_STATE.get(run.state.name, run.state.name.lower())
    back = run_dvc_stage(stage, root, False, logger, pull=True, refuse_to_run=True)
    if back != RESTORED:
        raise StageFailed(f"stage {stage!r} {remote} {where}, but the DVC remote's run-cache has no complete "
                          f"entry for it (dvc: {back}): not trusted, and not run here")
    logger.info("stage %r %s %s; restored here from the run-cache", stage, remote, where)
    return Placed(f"{remote} on pool {pool}", pool, worker, name, url)


def worker_name() -> str:
    """This flow-run process's worker (Prefect passes it in the environment), else the host name."""
    return os.environ.get("PREFECT__WORKER_NAME") or os.uname().nodename
