"""The deployment against a real `prefect server start`: process work pool, worker, two runs, API checks.

Deploys this checkout's flows/ and prefect.yaml over a copy of the project running the real
pipeline at its smallest size (tests.repo.MINIMAL: every stage, a couple of training steps each).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.server import local_server, prefect_cli, stop
from tests.repo import MINIMAL, make_repo


def _cli(env: dict[str, str], cwd: Path, *args: str) -> str:
    proc = subprocess.run(
        [*prefect_cli(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _run_and_inspect(flow_run_name: str) -> tuple[object, dict[str, str], dict[str, object]]:
    flow_run = run_deployment("pipeline/tuneforge", timeout=1200, poll_interval=1, flow_run_name=flow_run_name)
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run.id]))
        )
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
        )
    return flow_run, {t.name: t.state.name for t in tasks}, {a.key: a.data for a in arts}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_deployment_runs_on_a_real_server_with_a_worker(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "checkout", MINIMAL)
    stages = set(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])

    with local_server(tmp_path / "prefect-home") as env:
        env = dict(env, PREFECT_WORKER_QUERY_SECONDS="1")
        _cli(env, repo, "work-pool", "create", "tuneforge", "--type", "process")
        _cli(env, repo, "--no-prompt", "deploy", "--all")
        log = open(tmp_path / "worker.log", "w")  # noqa: SIM115
        worker = subprocess.Popen(
            [*prefect_cli(), "worker", "start", "--pool", "tuneforge"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
                with get_client(sync_client=True) as client:
                    deployment = client.read_deployment_by_name("pipeline/tuneforge")
                assert deployment.global_concurrency_limit.limit == 1
                assert deployment.schedules and deployment.schedules[0].schedule.cron == "0 3 * * *"

                flow_run, tasks, arts = _run_and_inspect("first")
                assert flow_run.state.is_completed(), (
                    flow_run.state,
                    (tmp_path / "worker.log").read_text()[-3000:],
                )
                assert tasks == dict.fromkeys(stages, "Completed")
                assert {"dvc-stages", "eval-table", "validation-summary", "generation-cost"} <= set(arts)
                assert "| dpo |" in arts["eval-table"]
                assert {r["stage"]: r["outcome"] for r in json.loads(arts["dvc-stages"])} == dict.fromkeys(
                    stages, "ran"
                )

                flow_run, tasks, arts = _run_and_inspect("nothing-changed")
                assert flow_run.state.is_completed()
                assert tasks == dict.fromkeys(stages, "Skipped")  # the task run states the dashboard shows
                outcomes = {r["stage"]: r["outcome"] for r in json.loads(arts["dvc-stages"])}
                assert outcomes == dict.fromkeys(stages, "skipped")
        finally:
            stop(worker)  # the worker stops on SIGINT, not SIGTERM
            log.close()
    assert worker.returncode is not None
