"""Prefect flow over tuneforge's DVC stages: one task per stage, graph read from DVC at run time.

DVC decides what is stale (lock file, run-cache); Prefect adds parallel independent stages,
retries, schedules, run history, logs and artifacts. With params.yaml `placement:`, stages named there
run on Prefect work pools' workers and come back through DVC's remote and run-cache (flows/placement.py).

    python -m flows.pipeline                  # the whole DAG
    python -m flows.pipeline sft --force      # `sft` and its upstream stages, forced
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.states import Completed, State
from prefect.tasks import exponential_backoff

from flows import placement
from flows.graph import GraphError, StageGraph, lookup, read_graph
from flows.placement import PlacementError
from flows.repro import STATE_NAMES, run_dvc_stage

FAILED, NOT_RUN = "failed", "not run"


class PipelineFailed(RuntimeError):
    """At least one stage failed; the message names it and the stages left not run."""


@dataclass(frozen=True)
class StageResult:
    stage: str
    outcome: str
    seconds: float
    pool: str | None = None  # a stage placed on a work pool: the pool, the worker, the remote flow run's URL
    worker: str | None = None
    flow_run: str | None = None


# ---------------------------------------------------------------- params (tolerant peeks)


def read_params(root: Path) -> dict[str, Any]:
    """params.yaml as a plain mapping; {} when absent. The flow only peeks at a few keys."""
    path = root / "params.yaml"
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    return data if isinstance(data, dict) else {}


def _is_off(value: Any) -> bool:
    return not value or (isinstance(value, str) and value.lower() in {"none", "off", "offline", "false"})


def _generate_calls_out(params: Mapping[str, Any]) -> bool:
    provider = str(lookup(params, "generate.provider", "auto"))
    return provider == "anthropic" or (provider == "auto" and bool(os.environ.get("ANTHROPIC_API_KEY")))


def _evaluate_has_judge(params: Mapping[str, Any]) -> bool:
    return not _is_off(lookup(params, "evaluate.judge"))


# ---------------------------------------------------------------- retry policy


@dataclass(frozen=True)
class RetryPolicy:
    applies: Callable[[Mapping[str, Any]], bool]  # from params: does the stage call an outside service?
    retries: int = 3
    backoff_s: float = 30.0  # first delay; doubles each retry


# Only stages that call outside services retry; deterministic stages fail fast.
RETRIES: dict[str, RetryPolicy] = {
    "generate": RetryPolicy(_generate_calls_out),
    "evaluate": RetryPolicy(_evaluate_has_judge),
}


def retry_options(stage: str, params: Mapping[str, Any]) -> dict[str, Any]:
    policy = RETRIES.get(stage)
    if policy is None or not policy.applies(params):
        return {"retries": 0}
    return {
        "retries": policy.retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=policy.backoff_s),
        "retry_jitter_factor": 0.2,
    }


# ---------------------------------------------------------------- one stage


@task(cache_policy=NO_CACHE)
def run_stage(
    stage: str, root: str, force: bool = False, pool: str | None = None, commit: str | None = None,
    graph: StageGraph | None = None,
) -> State[StageResult]:
    """Reproduce one DVC stage here, or on its work pool; report whether DVC ran, skipped or restored it."""
    logger = get_run_logger()
    start = time.perf_counter()
    placed = None
    if pool is None:
        outcome = run_dvc_stage(stage, Path(root), force, logger)
    else:
        assert commit is not None and graph is not None
        placed = placement.place_stage(stage, pool, Path(root), commit, graph, logger)
        outcome = placed.outcome
    seconds = round(time.perf_counter() - start, 2)
    logger.info("stage %r: %s (%.1f s)", stage, outcome, seconds)
    message = f"DVC {outcome} stage {stage!r}"
    if placed is not None and placed.pool:
        result = StageResult(stage, outcome, seconds, placed.pool, placed.worker, placed.url)
        message += f" (worker {placed.worker!r}, flow run {placed.flow_run!r} {placed.url or ''})"
    else:
        result = StageResult(stage, outcome, seconds)
    # A Completed state named after the outcome, so the dashboard shows Skipped / Restored / Ran on pool X.
    return Completed(name=STATE_NAMES.get(outcome, outcome[:1].upper() + outcome[1:]), message=message,
                     data=result)


# ---------------------------------------------------------------- artifacts


@dataclass(frozen=True)
class ReportArtifact:
    key: str
    files: tuple[str, ...]  # under `folder`; the first that exists is published
    description: str
    folder: tuple[str, str] = ("paths.reports", "reports")  # params key of the folder, its default


ARTIFACTS = (
    ReportArtifact("eval-table", ("eval.md",), "Evaluation table"),
    ReportArtifact("validation-summary", ("validation.md", "validation.json"), "Validation summary"),
    ReportArtifact("generation-cost", ("generation.json",), "Generation cost and counts"),
    ReportArtifact("model-card", ("README.md",), "Model card of the exported model", ("paths.final", "models/final")),
)


def _flatten(value: Any, prefix: str = "") -> list[dict[str, Any]]:
    if isinstance(value, Mapping):
        rows: list[dict[str, Any]] = []
        for key, item in value.items():
            rows += _flatten(item, f"{prefix}.{key}" if prefix else str(key))
        return rows
    shown = value if isinstance(value, int | float | str | bool) or value is None else json.dumps(value)
    return [{"key": prefix or "value", "value": shown}]


def publish_artifacts(root: Path, graph: StageGraph, done: set[str], params: Mapping[str, Any]) -> list[str]:
    """Publish the report files this run vouches for; returns the artifact keys created.

    A report is published when it exists and the stage that declares it in dvc.yaml completed in
    this run (ran, skipped or restored), so a partial run never shows a stale downstream report.
    """
    logger = get_run_logger()
    created = []
    for art in ARTIFACTS:
        folder = Path(str(lookup(params, *art.folder)))
        rel = [(folder / name).as_posix() for name in art.files]
        producer = next((p for f in rel if (p := graph.producer(f))), None)
        if producer is not None and producer not in done:
            continue
        path = next((root / f for f in rel if (root / f).is_file()), None)
        if path is None:
            continue
        description = f"{art.description} ({path.relative_to(root).as_posix()})"
        if path.suffix == ".json":
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                logger.warning("%s is not valid JSON (%s); not published", path, err)
                continue
            create_table_artifact(_flatten(data), key=art.key, description=description)
        else:
            create_markdown_artifact(path.read_text(), key=art.key, description=description)
        created.append(art.key)
    return created


# ---------------------------------------------------------------- the flow


@flow(name="pipeline")
def pipeline(targets: list[str] | None = None, force: bool = False, repo: str = ".") -> dict[str, str]:
    """Reproduce the DVC pipeline (or `targets` and their upstreams), independent stages at once."""
    logger = get_run_logger()
    root = Path(repo).resolve()
    full = read_graph(root)
    graph = full.subgraph(targets)
    params = read_params(root)
    logger.info("stages: %s", ", ".join(graph.stages))
    cfg = placement.read_placement(params, full)
    placed = placement.placed_stages(cfg, graph.stages)
    commit = None
    if placed:
        if force:
            raise PlacementError("--force reruns stages in this workspace; it cannot be combined with placement "
                                 f"({', '.join(f'{s} on {p}' for s, p in placed.items())})")
        commit = placement.preflight(root, full, placed, cfg)
        logger.info("placement at commit %s: %s", commit[:12], ", ".join(f"{s} -> {p}" for s, p in placed.items()))

    futures = {}
    for stage in graph.stages:
        task_ = run_stage.with_options(task_run_name=stage, **retry_options(stage, params))
        upstream = [futures[u] for u in sorted(graph.upstream[stage])]
        where = {"pool": placed[stage], "commit": commit, "graph": full} if stage in placed else {}
        futures[stage] = task_.submit(stage, str(root), force, wait_for=upstream, **where)
    wait(list(futures.values()))

    outcomes: dict[str, str] = {}
    rows = []
    errors = {}
    for stage, future in futures.items():
        state = future.state
        row: dict[str, Any] = {"stage": stage}
        if state.is_completed():
            result: StageResult = future.result()
            outcomes[stage], seconds = result.outcome, result.seconds
            if placed:
                row |= {"pool": result.pool, "worker": result.worker, "flow_run": result.flow_run}
        elif state.is_failed() or state.is_crashed():
            outcomes[stage], seconds = FAILED, None
            exc = future.result(raise_on_failure=False)
            message = str(exc) if isinstance(exc, BaseException) else (state.message or state.name)
            errors[stage] = message.splitlines()[0]
        else:
            outcomes[stage], seconds = NOT_RUN, None
        rows.append({**row, "outcome": outcomes[stage], "seconds": seconds})
    create_table_artifact(rows, key="dvc-stages", description="What DVC did with each stage in this run")

    done = {s for s, o in outcomes.items() if o not in (FAILED, NOT_RUN)}
    publish_artifacts(root, full, done, params)

    if errors:
        not_run = [s for s, o in outcomes.items() if o == NOT_RUN]
        detail = "; ".join(f"{s}: {m}" for s, m in errors.items())
        raise PipelineFailed(
            f"stage(s) {', '.join(repr(s) for s in errors)} failed"
            + (f"; not run: {', '.join(not_run)}" if not_run else "")
            + f" ({detail})"
        )
    return outcomes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("targets", nargs="*", help="stages to run with their upstreams (default: all)")
    parser.add_argument("--force", action="store_true", help="rerun the selected stages even if unchanged")
    parser.add_argument("--repo", default=".", help="DVC repository root (default: .)")
    args = parser.parse_args(argv)
    try:
        pipeline(targets=args.targets or None, force=args.force, repo=args.repo)
    except (PipelineFailed, GraphError, PlacementError) as err:
        sys.exit(f"pipeline failed: {err}")


if __name__ == "__main__":
    main()
