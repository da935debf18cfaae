"""The pipeline flow: graph from DVC, one task per stage, parallel branches, retries, failures, artifacts.

Fast tests stub the stage runner; the `slow` ones run the real `dvc --wait-for-lock repro --single-item`.
All run against Prefect's test harness (a temporary server and database).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import yaml
from dvc_toy import TOY_STAGES, dvc, make_toy_repo, write_dvc_yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from prefect.settings import PREFECT_HOME, PREFECT_LOCAL_STORAGE_PATH, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from flows import pipeline as pl
from flows.pipeline import (
    RAN,
    RESTORED,
    SKIPPED,
    UNKNOWN,
    StageFailed,
    parse_outcome,
    pipeline,
    retry_options,
    terminal_line,
)


@pytest.fixture(scope="module", autouse=True)
def harness(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings({PREFECT_HOME: home, PREFECT_LOCAL_STORAGE_PATH: home / "storage"}):
        with prefect_test_harness(server_startup_timeout=90):
            yield


class StubRunner:
    """Stands in for `run_dvc_stage`: records calls and their times, fails where told."""

    def __init__(self, seconds: float = 0.0, fail: dict[str, int] | None = None, outcome: str = RAN) -> None:
        self.seconds, self.fail, self.outcome = seconds, dict(fail or {}), outcome
        self.calls: list[tuple[str, float, float, bool]] = []
        self._lock = threading.Lock()

    def __call__(self, stage: str, root: Path, force: bool, logger) -> str:
        start = time.perf_counter()
        time.sleep(self.seconds)
        with self._lock:
            self.calls.append((stage, start, time.perf_counter(), force))
            if self.fail.get(stage, 0) > 0:
                self.fail[stage] -= 1
                raise StageFailed(f"stage {stage!r} failed: dvc exited with 1")
        logger.info("stub ran %s", stage)
        return self.outcome

    @property
    def stages(self) -> list[str]:
        return [c[0] for c in self.calls]

    def interval(self, stage: str) -> tuple[float, float]:
        return next((s, e) for name, s, e, _ in self.calls if name == stage)


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> StubRunner:
    runner = StubRunner(seconds=0.4)
    monkeypatch.setattr(pl, "run_dvc_stage", runner)
    return runner


def _task_runs(flow_run_id) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id]))
        )
    return {r.name: r.state.name for r in runs}


def _artifacts(flow_run_id) -> dict[str, object]:
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a.data for a in arts}


# ---------------------------------------------------------------- stubbed runner


def test_one_task_run_per_stage_and_independent_stages_run_at_once(toy_repo: Path, stub: StubRunner) -> None:
    state = pipeline(repo=str(toy_repo), return_state=True)
    assert state.is_completed()
    assert state.result() == {"a": RAN, "b": RAN, "c": RAN, "d": RAN}
    assert _task_runs(state.state_details.flow_run_id) == dict.fromkeys("abcd", "Completed")
    order = stub.stages
    assert order.index("c") > max(order.index("a"), order.index("b")) and order.index("d") > order.index("c")
    (a0, a1), (b0, b1) = stub.interval("a"), stub.interval("b")
    assert a0 < b1 and b0 < a1, "independent stages a and b did not overlap"
    assert stub.interval("c")[0] >= max(a1, b1)


def test_adding_a_stage_to_dvc_yaml_adds_a_task_without_code_changes(
    toy_repo: Path, stub: StubRunner
) -> None:
    write_dvc_yaml(
        toy_repo, {**TOY_STAGES, "e": {"cmd": "cat a.txt > e.txt", "deps": ["a.txt"], "outs": ["e.txt"]}}
    )
    state = pipeline(repo=str(toy_repo), return_state=True)
    assert set(_task_runs(state.state_details.flow_run_id)) == {"a", "b", "c", "d", "e"}
    assert stub.stages.index("e") > stub.stages.index("a")


def test_a_failed_stage_fails_the_flow_by_name_and_its_descendants_do_not_run(
    toy_repo: Path, stub: StubRunner
) -> None:
    stub.fail = {"b": 1}
    state = pipeline(repo=str(toy_repo), return_state=True)
    assert state.is_failed()
    assert "stage(s) 'b' failed" in state.message and "not run: c, d" in state.message
    assert sorted(stub.stages) == ["a", "b"]  # no retry on a deterministic stage, c and d never start
    runs = _task_runs(state.state_details.flow_run_id)
    assert runs["b"] == "Failed" and runs["c"] == runs["d"] == "NotReady"
    rows = _artifacts(state.state_details.flow_run_id)["dvc-stages"]
    assert '"failed"' in rows and '"not run"' in rows


def test_targets_run_their_upstream_only_and_force_is_passed(toy_repo: Path, stub: StubRunner) -> None:
    assert pipeline(targets=["c"], force=True, repo=str(toy_repo)) == {"a": RAN, "b": RAN, "c": RAN}
    assert sorted(stub.stages) == ["a", "b", "c"] and all(c[3] for c in stub.calls)


def test_unknown_target_fails_naming_it(toy_repo: Path, stub: StubRunner) -> None:
    state = pipeline(targets=["nope"], repo=str(toy_repo), return_state=True)
    assert state.is_failed() and "unknown stage 'nope'" in state.message and not stub.calls


def test_generate_retries_when_it_calls_out_and_deterministic_stages_do_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stages = {
        "generate": {"cmd": "echo g > g.txt", "outs": ["g.txt"]},
        "x": {"cmd": "cat g.txt > x.txt", "deps": ["g.txt"], "outs": ["x.txt"]},
    }
    root = make_toy_repo(tmp_path / "r", stages, params={"generate": {"provider": "anthropic"}})
    monkeypatch.setitem(
        pl.RETRIES, "generate", pl.RetryPolicy(pl._generate_calls_out, retries=2, backoff_s=0)
    )
    runner = StubRunner(fail={"generate": 2})
    monkeypatch.setattr(pl, "run_dvc_stage", runner)
    assert pipeline(repo=str(root)) == {"generate": RAN, "x": RAN}
    assert runner.stages == ["generate", "generate", "generate", "x"]

    runner = StubRunner(fail={"generate": 3})  # one more failure than retries: the flow fails, x never runs
    monkeypatch.setattr(pl, "run_dvc_stage", runner)
    state = pipeline(repo=str(root), return_state=True)
    assert state.is_failed() and "'generate' failed; not run: x" in state.message
    assert runner.stages == ["generate"] * 3


def test_artifacts_from_reports_on_the_flow_run(tmp_path: Path, stub: StubRunner) -> None:
    stages = {
        "generate": {"cmd": "true", "outs": ["data"], "metrics": ["out/generation.json"]},
        "validate": {"cmd": "true", "deps": ["data"], "outs": ["clean"], "metrics": ["out/validation.json"]},
        "evaluate": {"cmd": "true", "deps": ["clean"], "outs": ["out/eval.md"]},
    }
    root = make_toy_repo(tmp_path / "r", stages, params={"paths": {"reports": "out"}})
    (root / "out").mkdir()
    (root / "out/generation.json").write_text(
        '{"provider": "offline", "cost_usd": 0.0, "counts": {"sft": 3}}'
    )
    (root / "out/validation.json").write_text('{"kept": 9, "rejected": 1}')
    (root / "out/eval.md").write_text("| model | margin |\n|---|---|\n| dpo | 0.64 |\n")

    state = pipeline(repo=str(root), return_state=True)
    arts = _artifacts(state.state_details.flow_run_id)
    assert set(arts) == {"dvc-stages", "eval-table", "validation-summary", "generation-cost"}
    assert "| dpo | 0.64 |" in arts["eval-table"]
    assert "counts.sft" in arts["generation-cost"] and "cost_usd" in arts["generation-cost"]
    assert '"kept"' in arts["validation-summary"]

    # a partial run does not vouch for reports of stages it did not run
    state = pipeline(targets=["validate"], repo=str(root), return_state=True)
    assert set(_artifacts(state.state_details.flow_run_id)) == {
        "dvc-stages",
        "validation-summary",
        "generation-cost",
    }


# ---------------------------------------------------------------- pure helpers


def test_parse_outcome_reads_dvc_messages() -> None:
    assert parse_outcome(["Running stage 'sft':", "> python -m stages.sft"]) == RAN
    assert (
        parse_outcome(["Stage 'sft' didn't change, skipping", "Data and pipelines are up to date."])
        == SKIPPED
    )
    assert parse_outcome(["Stage 'sft' is cached - skipping run, checking out outputs"]) == RESTORED
    assert parse_outcome(["something else"]) == UNKNOWN


def test_progress_bar_redraws_log_once() -> None:
    assert terminal_line(b"train:  10%|#  | 1/10\rtrain: 100%|###| 10/10\r\n") == "train: 100%|###| 10/10"
    assert terminal_line(b"Running stage 'a':\n") == "Running stage 'a':"
    assert terminal_line(b"caf\xc3\xa9 \xff\n") == "caf\u00e9 \ufffd"


@pytest.mark.parametrize(
    ("params", "env_key", "stage", "retries"),
    [
        ({"generate": {"provider": "offline"}}, None, "generate", 0),
        ({"generate": {"provider": "anthropic"}}, None, "generate", 3),
        ({"generate": {"provider": "auto"}}, "sk-test", "generate", 3),
        ({"generate": {"provider": "auto"}}, None, "generate", 0),
        ({}, None, "generate", 0),
        ({"evaluate": {"judge": "claude"}}, None, "evaluate", 3),
        ({"evaluate": {"judge": "none"}}, None, "evaluate", 0),
        ({"evaluate": {}}, None, "evaluate", 0),
        ({"generate": {"provider": "anthropic"}}, None, "sft", 0),
    ],
)
def test_retry_policy_table(params, env_key, stage, retries, monkeypatch: pytest.MonkeyPatch) -> None:
    if env_key:
        monkeypatch.setenv("ANTHROPIC_API_KEY", env_key)
    opts = retry_options(stage, params)
    assert opts["retries"] == retries
    if retries:
        assert opts["retry_delay_seconds"](3) == [30.0, 60.0, 120.0]


# ---------------------------------------------------------------- real DVC


@pytest.mark.slow
def test_real_dvc_runs_independent_stages_at_once_and_keeps_dvc_lock_consistent(tmp_path: Path) -> None:
    stamp = "python -c \"import time; open('{0}.t', 'a').write(str(time.time()) + '\\n')\""
    stages = {
        s: {
            "cmd": f"{stamp.format(s)} && sleep 1.5 && echo {s} > {s}.txt && {stamp.format(s)}",
            "deps": ["seed.txt"],
            "outs": [f"{s}.txt"],
        }
        for s in ("a", "b")
    }
    stages["c"] = {"cmd": "cat a.txt b.txt > c.txt", "deps": ["a.txt", "b.txt"], "outs": ["c.txt"]}
    root = make_toy_repo(tmp_path / "r", stages)
    (root / "seed.txt").write_text("seed\n")  # a stage without deps never uses the run-cache

    assert pipeline(repo=str(root)) == {"a": RAN, "b": RAN, "c": RAN}
    (a0, a1), (b0, b1) = ([float(x) for x in (root / f"{s}.t").read_text().split()] for s in ("a", "b"))
    assert a0 < b1 and b0 < a1, "a and b did not run at once"
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"a", "b", "c"}
    assert all(lock["stages"][s]["outs"][0]["md5"] for s in "abc")
    status = dvc(root, "status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr
    assert (root / "c.txt").read_text() == "a\nb\n"

    state = pipeline(repo=str(root), return_state=True)
    assert state.result() == {"a": SKIPPED, "b": SKIPPED, "c": SKIPPED}
    assert _task_runs(state.state_details.flow_run_id) == dict.fromkeys("abc", "Skipped")

    for s in "abc":  # outputs gone, lock unchanged: DVC restores them from the run-cache
        (root / f"{s}.txt").unlink()
    state = pipeline(repo=str(root), return_state=True)
    assert state.result() == {"a": RESTORED, "b": RESTORED, "c": RESTORED}
    assert _task_runs(state.state_details.flow_run_id) == dict.fromkeys("abc", "Restored")
    assert (root / "c.txt").read_text() == "a\nb\n"


@pytest.mark.slow
def test_real_dvc_failure_names_the_stage(tmp_path: Path) -> None:
    root = make_toy_repo(tmp_path / "r", {**TOY_STAGES, "b": {"cmd": "exit 3", "outs": ["b.txt"]}})
    state = pipeline(repo=str(root), return_state=True)
    assert state.is_failed() and "stage(s) 'b' failed" in state.message and "not run: c, d" in state.message
    assert (root / "a.txt").exists() and not (root / "c.txt").exists()


def test_model_card_artifact_from_the_export_folder(tmp_path: Path, stub: StubRunner) -> None:
    """The export stage's models/final/README.md (paths.final) is published as the `model-card` artifact."""
    stages = {"export": {"cmd": "true", "outs": ["final"]}}
    root = make_toy_repo(tmp_path / "r", stages, params={"paths": {"final": "final"}})
    (root / "final").mkdir()
    (root / "final/README.md").write_text("---\nlicense: apache-2.0\n---\n# Cassius\n")
    state = pipeline(repo=str(root), return_state=True)
    arts = _artifacts(state.state_details.flow_run_id)
    assert "# Cassius" in arts["model-card"]
