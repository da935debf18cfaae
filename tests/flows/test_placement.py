"""Stage placement (flows/placement.py, flows/stage.py) proven on one machine, at tests.repo.MINIMAL size.

The module's `cluster` (tests/cluster.py) stands up what two machines would share — a bare git origin, a
local-folder DVC remote, a real `prefect server` on 127.0.0.1 — and three process work pools, each with a
worker in a fresh clone of its own: `cpu` and `gpu` (deployments stage/cpu, stage/gpu) and `tuneforge` (the
single-machine deployment pipeline/tuneforge). The coordinator is one more clone. In order:

1. the single-machine deployment runs the pipeline (every stage ran), beside 2.;
2. the coordinator runs the same commit with sft, merge, reference and dpo placed on gpu, evaluate on cpu and
   the rest in its own workspace. The gpu worker is killed during sft (machine lost): the flow fails naming
   stage, pool and worker. After the worker restarts, the rerun resumes sft from its checkpoint and completes:
   the coordinator ends with the single-machine run's dvc.lock and eval.json. A third run places nothing and
   runs nothing.
The toy-repo tests at the top check the preflight's refusals without a cluster.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dvc_toy import make_toy_repo
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    DeploymentFilter,
    DeploymentFilterName,
    LogFilter,
    LogFilterFlowRunId,
    LogFilterTaskRunId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from prefect.client.schemas.sorting import LogSort
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.graph import StageGraph, read_graph
from flows.pipeline import pipeline
from flows.placement import (
    LOG_LAG_S,
    PlacementError,
    _forward_logs,
    check_dvc_remote,
    check_on_git_server,
    check_pools,
    placed_stages,
    preflight,
    read_placement,
    uncommitted_inputs,
)
from flows.repro import WOULD_RUN, StageFailed
from stages.common.config import deep_merge
from tests.cluster import Cluster, local_cluster
from tests.repo import MINIMAL, dvc, git

GPU_STAGES = ("sft", "merge", "reference", "dpo")
CPU_STAGES = ("evaluate",)  # the rest run in the coordinator's own workspace (default: null)
PLACEMENT = {"stages": {**dict.fromkeys(GPU_STAGES, "gpu"), **dict.fromkeys(CPU_STAGES, "cpu")}}
POOLS = {"cpu": "cpu", "gpu": "gpu", "tuneforge": "tuneforge"}  # work pool -> its clone's deployment
SFT_STEPS = 4  # a checkpoint every 2 steps: the worker is lost after the first, the rerun resumes it
PROJECT = deep_merge(MINIMAL, {"placement": PLACEMENT, "sft": {"trainer": {"max_steps": SFT_STEPS, "save_steps": 2,
                                                                          "eval_steps": 2}}})
# Two runs of the same commit differ in these outputs and nowhere else (checked file by file below): what the
# reports say about the run itself (wall-clock and CPU figures; the resumed step), and in dvclive/sft, TRL's
# num_tokens, which a resumed run counts again from zero (its checkpoint does not keep it), so DVCLive's
# summary also lists its keys in another order. The workers share one PYTHONHASHSEED (tests/cluster.py), so
# the adapters compare byte for byte.
RUN_FACTS = {"reports/sft.json": {"runtime_s", "tokens_per_s", "resumed_from_step"},
             "reports/dpo.json": {"runtime_s", "peak_rss_mb"},
             "reports/export.json": {"seconds"}}
RESUMED_LIVE = "dvclive/sft"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("placement")
    with local_cluster(root, PROJECT, POOLS) as c:
        with temporary_settings({PREFECT_API_URL: c.env["PREFECT_API_URL"]}):
            yield c


# ---------------------------------------------------------------- without a cluster


def committed(root: Path) -> Path:
    for args in (("config", "user.email", "t@tuneforge.invalid"), ("config", "user.name", "t"), ("add", "-A"),
                 ("commit", "-qm", "toy")):
        git(*args, cwd=root)
    return root


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    """A committed toy DVC repo: `a` runs code.py with params a.*, `b` reads a's output."""
    stages = {"a": {"cmd": "python code.py", "deps": ["code.py"], "params": ["a"], "outs": ["a.txt"]},
              "b": {"cmd": "cp a.txt b.txt", "deps": ["a.txt"], "outs": ["b.txt"]}}
    root = make_toy_repo(tmp_path / "toy", stages, params={"a": {"n": 1}, "placement": {"stages": {"a": "gpu"}}})
    (root / "code.py").write_text("open('a.txt', 'w').write('a')\n")
    return committed(root)


def test_placement_names_a_pool_per_stage_and_rejects_what_dvc_yaml_lacks(toy: Path) -> None:
    graph = read_graph(toy)
    cfg = read_placement({"placement": {"default": "cpu", "stages": {"a": "gpu", "b": None}}}, graph)
    assert placed_stages(cfg, graph.stages) == {"a": "gpu"}  # b: null = here
    assert placed_stages(read_placement({}, graph), graph.stages) == {}  # no placement: all here
    with pytest.raises(PlacementError, match="placement.stages names 'sft', not in dvc.yaml"):
        read_placement({"placement": {"stages": {"sft": "gpu"}}}, graph)
    with pytest.raises(PlacementError, match=r"placement.default: String should match pattern"):
        read_placement({"placement": {"default": "g/pu"}}, graph)
    with pytest.raises(PlacementError, match=r"placement.pools: Extra inputs are not permitted"):
        read_placement({"placement": {"pools": {}}}, graph)


def test_uncommitted_changes_to_what_a_stage_runs_are_named(toy: Path) -> None:
    graph = read_graph(toy)
    assert uncommitted_inputs(toy, graph, "a") == []
    params = yaml.safe_load((toy / "params.yaml").read_text())
    (toy / "params.yaml").write_text(yaml.safe_dump({**params, "placement": {}}))  # not what `a` runs
    (toy / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # the coordinator's own, as it runs
    (toy / "a.txt").write_text("an output: DVC carries it, not git")
    assert uncommitted_inputs(toy, graph, "a") == []
    (toy / "code.py").write_text("open('a.txt', 'w').write('A')\n")
    (toy / "params.yaml").write_text(yaml.safe_dump({**params, "a": {"n": 2}}))
    assert uncommitted_inputs(toy, graph, "a") == ["code.py", "params.yaml:a"]
    assert uncommitted_inputs(toy, graph, "b") == []


def test_the_commit_must_be_on_the_git_server(toy: Path, tmp_path: Path) -> None:
    origin = tmp_path / "origin.git"
    git("init", "-q", "--bare", str(origin), cwd=tmp_path)
    git("remote", "add", "origin", str(origin), cwd=toy)
    head = git("rev-parse", "HEAD", cwd=toy).strip()
    with pytest.raises(PlacementError, match=f"commit {head[:12]} is not on the git server \\(origin\\)"):
        check_on_git_server(toy, head, "origin")
    git("push", "-q", "origin", "HEAD:main", cwd=toy)
    check_on_git_server(toy, head, "origin")
    with pytest.raises(PlacementError, match="git fetch --quiet upstream"):
        check_on_git_server(toy, head, "upstream")


def test_the_dvc_remote_must_be_set_and_reachable(toy: Path, tmp_path: Path) -> None:
    with pytest.raises(PlacementError, match="no default DVC remote"):
        check_dvc_remote(toy)
    dvc("remote", "add", "-d", "storage", str(tmp_path / "absent"), cwd=toy)
    with pytest.raises(PlacementError, match=r"DVC remote 'storage' \(.*absent\) does not exist on this machine"):
        check_dvc_remote(toy)
    (tmp_path / "absent").mkdir()
    assert check_dvc_remote(toy).startswith("storage (")


def test_preflight_needs_a_prefect_server_and_stages_the_run_cache_can_carry(toy: Path) -> None:
    graph = read_graph(toy)
    cfg = read_placement({"placement": {"stages": {"a": "gpu"}}}, graph)
    with temporary_settings({PREFECT_API_URL: None}):
        with pytest.raises(PlacementError, match="needs a Prefect server that the workers reach"):
            preflight(toy, graph, {"a": "gpu"}, cfg)
    persisted = StageGraph(upstream=graph.upstream, outs=graph.outs,
                           no_run_cache={"a": "output a.txt is persist: true"})
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        with pytest.raises(PlacementError, match="stage 'a' cannot be placed: output a.txt is persist: true"):
            preflight(toy, persisted, {"a": "gpu"}, cfg)
        (toy / "code.py").write_text("changed\n")
        with pytest.raises(PlacementError, match="uncommitted changes to what it runs: code.py"):
            preflight(toy, graph, {"a": "gpu"}, cfg)


def test_a_placed_result_missing_from_the_run_cache_fails_and_is_never_run_here(toy, monkeypatch) -> None:
    """The worker reported success but DVC finds no complete run-cache entry: the stage fails; the only dvc
    calls made here are the two that refuse to run it."""
    from prefect.states import Completed

    from flows import placement

    calls = []

    def dvc_stage(stage, root, force, logger, pull=False, refuse_to_run=False):
        calls.append((stage, refuse_to_run))
        return WOULD_RUN

    class Run:
        id, name, state = "id", "a @ 0123abcd", Completed(name="Completed")

    monkeypatch.setattr(placement, "run_dvc_stage", dvc_stage)
    monkeypatch.setattr(placement, "push_deps", lambda *a: None)
    monkeypatch.setattr("prefect.deployments.run_deployment", lambda *a, **k: Run())
    monkeypatch.setattr("prefect.utilities.urls.url_for", lambda run: "http://ui/runs/flow-run/id")
    monkeypatch.setattr(placement, "follow", lambda *a: (Run(), "gpu-worker"))
    with pytest.raises(StageFailed, match="stage 'a' ran on work pool 'gpu' \\(worker 'gpu-worker'\\), but the "
                                          "DVC remote's run-cache has no complete entry for it"):
        placement.place_stage("a", "gpu", toy, "0123abcd" * 5, read_graph(toy), logging.getLogger("t"))
    assert calls == [("a", True), ("a", True)]


def test_push_deps_sends_whole_directory_outputs_so_each_file_in_them_can_be_pulled(tmp_path: Path) -> None:
    """Two stages read different files of one directory output. Pushed file by file (`dvc push dir/one`),
    the second push finds the directory's listing on the remote and sends nothing; push_deps pushes the
    directory, so a clone can pull either file."""
    from flows.placement import push_deps

    stages = {"fmt": {"cmd": "mkdir -p out && echo 1 > out/one && echo 2 > out/two", "deps": ["s.txt"],
                      "outs": ["out"]},
              "x": {"cmd": "cp out/one x.txt", "deps": ["out/one"], "outs": ["x.txt"]},
              "y": {"cmd": "cp out/two y.txt", "deps": ["out/two"], "outs": ["y.txt"]}}
    root = make_toy_repo(tmp_path / "r", stages)
    (root / "s.txt").write_text("s\n")
    dvc("repro", "fmt", cwd=root)
    granular, whole = tmp_path / "granular", tmp_path / "whole"
    for remote in (granular, whole):
        remote.mkdir()
    dvc("remote", "add", "-d", "granular", str(granular), cwd=root)
    dvc("push", "out/one", cwd=root)
    assert "Everything is up to date" in dvc("push", "out/two", cwd=root).stdout  # DVC's shortcut: out/two
    assert sum(1 for p in granular.rglob("*") if p.is_file()) == 2  # is not there (the listing and `one`)

    dvc("remote", "add", "-f", "-d", "whole", str(whole), cwd=root)
    graph = read_graph(root)
    push_deps(root, graph, "x", logging.getLogger("t"))
    push_deps(root, graph, "y", logging.getLogger("t"))
    assert sum(1 for p in whole.rglob("*") if p.is_file()) == 3  # the listing, one and two


def test_the_index_graph_says_which_stages_the_run_cache_cannot_carry(tmp_path: Path) -> None:
    stages = {"p": {"cmd": "true", "deps": ["s.txt"], "outs": [{"p.txt": {"persist": True}}]},
              "m": {"cmd": "true", "deps": ["s.txt"], "outs": ["o.txt"], "metrics": [{"m.json": {"cache": False}}]},
              "n": {"cmd": "true", "outs": ["n.txt"]},
              "ok": {"cmd": "true", "deps": ["s.txt"], "outs": ["ok.txt"]}}
    graph = read_graph(make_toy_repo(tmp_path / "r", stages))
    assert graph.no_run_cache == {"p": "output p.txt is persist: true",
                                  "m": "output m.json is cache: false (not restorable in another clone)",
                                  "n": "no deps"}


class FakeLogs:
    """A Prefect client's read_logs over a list of lines that grows, honouring the timestamp filter and paging."""

    def __init__(self) -> None:
        self.lines: list[Any] = []
        self.read = 0  # lines returned, over all calls

    def add(self, message: str, at: float) -> None:
        import datetime as dt
        from types import SimpleNamespace

        stamp = dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=at)
        self.lines.append(SimpleNamespace(id=len(self.lines), level=logging.INFO, message=message, timestamp=stamp))

    def read_logs(self, log_filter, limit, offset, sort):
        after = log_filter.timestamp.after_ if log_filter.timestamp else None
        rows = sorted((x for x in self.lines if after is None or x.timestamp >= after), key=lambda x: x.timestamp)
        page = rows[offset : offset + limit]
        self.read += len(page)
        return page


def test_remote_logs_are_forwarded_once_and_read_about_once(caplog) -> None:
    import uuid

    client, seen, logger, run = FakeLogs(), {}, logging.getLogger("placement-logs"), uuid.uuid4()
    for i in range(450):  # three pages
        client.add(f"line {i}", at=i)
    with caplog.at_level(logging.INFO, logger="placement-logs"):
        assert not _forward_logs(client, run, seen, logger, "[gpu/w]")
        first = client.read
        client.add("late line", at=449 - LOG_LAG_S / 2)  # shipped after a later-dated line, within the lag
        client.add("Finished in state Completed()", at=451)
        assert _forward_logs(client, run, seen, logger, "[gpu/w]")
        assert _forward_logs(client, run, seen, logger, "[gpu/w]")  # the last line stays in the window
    forwarded = [r.getMessage() for r in caplog.records if r.name == "placement-logs"]
    assert forwarded[:450] == [f"[gpu/w] line {i}" for i in range(450)]
    assert forwarded[450:] == ["[gpu/w] late line", "[gpu/w] Finished in state Completed()"]
    assert first == 450 and client.read - first < 2 * (LOG_LAG_S + 3)  # later polls read the window, not all
    assert len(seen) < LOG_LAG_S + 3  # only the window's ids are remembered


# ---------------------------------------------------------------- API helpers


def task_runs(flow_run_id) -> dict[str, Any]:
    """The flow run's own task runs by name (run_deployment's stand-in tasks for remote flow runs left out)."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])))
    return {t.name: t for t in runs if not t.task_key.startswith("prefect.deployments.flow_runs.run_deployment")}


def artifacts(flow_run_id) -> dict[str, Any]:
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a.data for a in arts}


def remote_runs(pool: str) -> list[Any]:
    """Flow runs of the pool's deployment stage/<pool>, oldest first."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[pool])))
    return sorted(runs, key=lambda r: r.created)


def logs(flow_run_id=None, task_run_id=None) -> str:
    """Every log line of a flow run (or of one task run), in order."""
    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])) if flow_run_id else \
        LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id]))
    lines: list[str] = []
    with get_client(sync_client=True) as client:
        while batch := client.read_logs(log_filter=log_filter, limit=200, offset=len(lines),
                                        sort=LogSort.TIMESTAMP_ASC):
            lines += [e.message for e in batch]
    return "\n".join(lines)


def stages_of(repo: Path) -> list[str]:
    return list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])


# ---------------------------------------------------------------- 1. one machine


@pytest.fixture(scope="module")
def single_started(cluster: Cluster) -> Any:
    """The single-machine deployment's run, started at once: it runs beside the coordinator's, as two machines
    would. Its clone drops `placement` from params.yaml (uncommitted: no stage reads that section and dvc.lock
    does not record it), so it runs every stage itself, on the same commit."""
    repo = cluster.clones["tuneforge"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params.pop("placement")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return run_deployment("pipeline/tuneforge", timeout=0, flow_run_name="single")


@pytest.fixture(scope="module")
def single(cluster: Cluster, single_started, placed) -> dict[str, Any]:
    """The single-machine run, finished."""
    deadline = time.monotonic() + 1800
    with get_client(sync_client=True) as client:
        while not (flow_run := client.read_flow_run(single_started.id)).state.is_final():
            assert time.monotonic() < deadline, cluster.log("tuneforge")
            time.sleep(1)
        deployment = client.read_deployment_by_name("pipeline/tuneforge")
    return {"run": flow_run, "tasks": task_runs(flow_run.id), "artifacts": artifacts(flow_run.id),
            "deployment": deployment}


@pytest.mark.slow
def test_the_single_machine_deployment_runs_every_stage(cluster: Cluster, single) -> None:
    stages = stages_of(cluster.clones["tuneforge"])
    assert single["run"].state.is_completed(), (single["run"].state, cluster.log("tuneforge"))
    assert {n: t.state.name for n, t in single["tasks"].items()} == dict.fromkeys(stages, "Completed")
    assert {"dvc-stages", "eval-table", "validation-summary", "generation-cost"} <= set(single["artifacts"])
    assert re.search(r"^\| dpo +\|", single["artifacts"]["eval-table"], re.M)
    rows = json.loads(single["artifacts"]["dvc-stages"])
    assert {r["stage"]: r["outcome"] for r in rows} == dict.fromkeys(stages, "ran")
    assert single["deployment"].global_concurrency_limit.limit == 1
    assert single["deployment"].schedules and single["deployment"].schedules[0].schedule.cron == "0 3 * * *"


# ---------------------------------------------------------------- 2. placed, with a worker lost mid-sft


def kill_at_first_checkpoint(cluster: Cluster, pool: str, done: threading.Event, out: dict[str, Any]) -> None:
    """Once the pool's clone holds a complete SFT checkpoint, lose that machine (its worker and everything
    under it); out["step"] = the checkpoint's step."""
    folder = cluster.clones[pool] / "checkpoints/sft"
    while not done.is_set():
        found = sorted(folder.glob("*/checkpoint-*/trainer_state.json"))
        if found:
            cluster.kill_worker(pool)
            out["step"] = json.loads(found[0].read_text())["global_step"]
            return
        time.sleep(0.05)


def coordinator_run(repo: Path) -> dict[str, Any]:
    """pipeline() in the coordinator's clone, and what the server holds about it afterwards."""
    before = {pool: len(remote_runs(pool)) for pool in ("cpu", "gpu")}
    state = pipeline(repo=str(repo), return_state=True)
    flow_run_id = state.state_details.flow_run_id
    tasks = task_runs(flow_run_id)
    return {"state": state, "tasks": tasks, "artifacts": artifacts(flow_run_id),
            "remote": {pool: remote_runs(pool)[before[pool]:] for pool in before},
            "logs": {n: logs(task_run_id=t.id) for n, t in tasks.items()}}


@pytest.fixture(scope="module")
def placed(cluster: Cluster, single_started) -> dict[str, Any]:
    """Three coordinator runs of PLACEMENT: the gpu worker is killed during the first one's sft; it restarts
    and the second run completes; the third has nothing to do."""
    repo = cluster.clones["coordinator"]
    done, killed = threading.Event(), {}
    killer = threading.Thread(target=kill_at_first_checkpoint, args=(cluster, "gpu", done, killed))
    killer.start()
    try:
        out = {"killed": coordinator_run(repo)}
    finally:
        done.set()
        killer.join()
    out["killed"]["step"] = killed.get("step")
    out["killed"]["models_sft"] = (repo / "models/sft").exists()
    try:
        check_pools(["gpu"])
    except PlacementError as err:
        out["killed"]["preflight"] = str(err)  # what a run started now would stop at
    cluster.start_worker("gpu")
    cluster.wait_online(["gpu"])
    out["placed"] = coordinator_run(repo)
    out["again"] = coordinator_run(repo)
    return out


@pytest.mark.slow
def test_a_worker_lost_mid_sft_fails_the_stage_naming_pool_and_worker(cluster: Cluster, placed) -> None:
    run_ = placed["killed"]
    assert run_["step"], ("the gpu worker was never killed", run_["state"].message)
    message = run_["state"].message
    assert run_["state"].is_failed() and "stage(s) 'sft' failed" in message, message
    # which side sees the loss first is a race: the coordinator's heartbeat watch (offline), or the worker itself
    # reporting its killed flow-run process (crashed) just before it dies; both must name the pool and the worker
    assert ("worker 'gpu-worker' of work pool 'gpu' went offline" in message
            or "crashed on work pool 'gpu' (worker 'gpu-worker')" in message), message
    stages = stages_of(cluster.clones["coordinator"])
    assert f"not run: {', '.join(stages[stages.index('sft') + 1:])}" in message, message
    assert run_["tasks"]["sft"].state.is_failed() and not run_["models_sft"]
    [crashed] = run_["remote"]["gpu"]
    assert crashed.parameters["stage"] == "sft" and crashed.state.is_crashed(), crashed.state
    assert run_["preflight"] == "work pool 'gpu' has no online worker (start one in its clone: " \
        "`prefect worker start --pool gpu --limit 1`)"


@pytest.mark.slow
def test_after_the_restart_sft_resumes_from_the_lost_run_checkpoint(cluster: Cluster, placed) -> None:
    step = placed["killed"]["step"]
    report = json.loads((cluster.clones["coordinator"] / "reports/sft.json").read_text())  # restored here
    assert report["resumed_from_step"] == step and report["steps"] == SFT_STEPS > step
    [sft] = [r for r in placed["placed"]["remote"]["gpu"] if r.parameters["stage"] == "sft"]
    text = logs(sft.id)  # the worker's log: its clone kept the lost run's checkpoint
    assert "resuming from checkpoints/sft/" in text and f"checkpoint-{step} (step {step})" in text, text[-3000:]
    assert not list((cluster.clones["gpu"] / "checkpoints/sft").glob("*/checkpoint-*"))  # the finished run's gone


@pytest.mark.slow
def test_each_stage_ran_once_on_its_pool_by_that_pool_worker(cluster: Cluster, placed) -> None:
    run_ = placed["placed"]
    assert run_["state"].is_completed(), (run_["state"].message, cluster.log("cpu"), cluster.log("gpu"))
    where = {}
    for runs in run_["remote"].values():
        for r in runs:
            assert r.state.is_completed(), (r.name, r.state)
            where.setdefault(r.parameters["stage"], []).append((r.work_pool_name, r.labels["prefect.worker.name"]))
    assert where == {s: [(p, f"{p}-worker")] for s, p in PLACEMENT["stages"].items()}


@pytest.mark.slow
def test_the_dashboard_shows_where_each_stage_ran(cluster: Cluster, placed) -> None:
    run_ = placed["placed"]  # the stages left here before sft ran in the first (killed) run, those after it here
    pools = {s: PLACEMENT["stages"].get(s) for s in stages_of(cluster.clones["coordinator"])}
    after_sft = read_graph(cluster.clones["coordinator"]).descendants("sft")
    here = {s: ("Completed", "ran") if s in after_sft else ("Skipped", "skipped") for s in pools}
    assert {n: t.state.name for n, t in run_["tasks"].items()} == {
        s: f"Ran on pool {p}" if p else here[s][0] for s, p in pools.items()}
    rows = {r["stage"]: r for r in json.loads(run_["artifacts"]["dvc-stages"])}
    assert {s: (r["outcome"], r["pool"], r["worker"]) for s, r in rows.items()} == {
        s: (f"ran on pool {p}", p, f"{p}-worker") if p else (here[s][1], None, None) for s, p in pools.items()}
    remote_ids = {str(r.id) for runs in run_["remote"].values() for r in runs}
    assert {r["flow_run"].rsplit("/", 1)[-1] for r in rows.values() if r["pool"]} == remote_ids
    assert re.search(r"^\| dpo +\|", run_["artifacts"]["eval-table"], re.M)
    sft_log = run_["logs"]["sft"]  # the worker's own output, carried into the coordinator's task log
    assert "[gpu/gpu-worker]" in sft_log and "Running stage 'sft'" in sft_log and "sft done" in sft_log
    coordinator_run_id = run_["state"].state_details.flow_run_id
    with get_client(sync_client=True) as client:  # each remote flow run is a subflow of the coordinator's run
        for r in (r for runs in run_["remote"].values() for r in runs):
            assert client.read_task_run(r.parent_task_run_id).flow_run_id == coordinator_run_id, r.name


def _digest(path: Path) -> dict[str, str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p.relative_to(path)) if path.is_dir() else p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def _without(data: Any, key: str) -> Any:
    return {k: _without(v, key) for k, v in data.items() if k != key} if isinstance(data, dict) else data


def _same_output(a: Path, b: Path, rel: str) -> bool:
    """Equal bytes, or for the known run-to-run differences (RUN_FACTS, RESUMED_LIVE) equal apart from them."""
    if rel in RUN_FACTS:
        ja, jb = (json.loads((r / rel).read_text()) for r in (a, b))
        return {k: v for k, v in ja.items() if k not in RUN_FACTS[rel]} == \
            {k: v for k, v in jb.items() if k not in RUN_FACTS[rel]}
    if rel == RESUMED_LIVE:
        da, db = _digest(a / rel), _digest(b / rel)
        summary = "metrics.json"
        return da.keys() == db.keys() and all(da[p] == db[p] for p in da if not p.endswith("num_tokens.tsv")
                                              and p != summary) and \
            _without(json.loads((a / rel / summary).read_text()), "num_tokens") == \
            _without(json.loads((b / rel / summary).read_text()), "num_tokens")
    return _digest(a / rel) == _digest(b / rel)


@pytest.mark.slow
def test_the_coordinator_ends_as_a_single_machine_run_of_the_same_commit(cluster: Cluster, single) -> None:
    coordinator, single = cluster.clones["coordinator"], cluster.clones["tuneforge"]
    assert (coordinator / "reports/eval.json").read_bytes() == (single / "reports/eval.json").read_bytes()
    lock_c, lock_s = (yaml.safe_load((r / "dvc.lock").read_text())["stages"] for r in (coordinator, single))
    assert lock_c.keys() == lock_s.keys() == set(stages_of(coordinator))
    varying = {*RUN_FACTS, RESUMED_LIVE}
    for stage in lock_c:
        c, s = lock_c[stage], lock_s[stage]
        assert (c["cmd"], c.get("params")) == (s["cmd"], s.get("params")), stage
        for kind in ("deps", "outs"):
            assert [e["path"] for e in c.get(kind, [])] == [e["path"] for e in s.get(kind, [])], (stage, kind)
            for ec, es in zip(c.get(kind, []), s.get(kind, []), strict=True):
                if ec["md5"] != es["md5"]:
                    assert ec["path"] in varying, (stage, kind, ec["path"])
                    assert _same_output(coordinator, single, ec["path"]), (stage, ec["path"])
                else:
                    assert ec == es, (stage, kind, ec["path"])
    status = dvc("status", cwd=coordinator).stdout
    assert "Data and pipelines are up to date" in status, status


@pytest.mark.slow
def test_a_second_run_places_nothing_and_runs_nothing(cluster: Cluster, placed) -> None:
    again = placed["again"]
    assert again["state"].is_completed(), again["state"].message
    assert again["remote"] == {"cpu": [], "gpu": []}
    stages = stages_of(cluster.clones["coordinator"])
    assert {n: t.state.name for n, t in again["tasks"].items()} == dict.fromkeys(stages, "Skipped")


# ---------------------------------------------------------------- fail fast


@pytest.mark.slow
def test_a_missing_remote_or_an_unreachable_pool_fails_fast_naming_it(cluster: Cluster, placed, tmp_path) -> None:
    coordinator = cluster.clones["coordinator"]
    with pytest.raises(PlacementError, match="work pool 'tpu' does not exist"):
        check_pools(["tpu"])
    cluster.prefect("work-pool", "create", "idle", "--type", "process", cwd=cluster.root)
    with pytest.raises(PlacementError, match="work pool 'idle' has no deployment 'stage/idle'"):
        check_pools(["idle"])
    dvc("remote", "modify", "--local", "storage", "url", str(tmp_path / "not-mounted"), cwd=coordinator)
    try:
        with pytest.raises(PlacementError, match=r"DVC remote 'storage' \(.*not-mounted\) does not exist"):
            check_dvc_remote(coordinator)
        started = time.monotonic()
        state = pipeline(repo=str(coordinator), return_state=True)
        assert state.is_failed() and "not-mounted" in state.message and time.monotonic() - started < 60
    finally:
        (coordinator / ".dvc/config.local").unlink()
