"""flows/repro.py: DVC's outcome per stage from its log lines, and a repro that may skip or restore, never run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from dvc_toy import dvc, make_toy_repo

from flows.repro import (
    RAN,
    RESTORED,
    SKIPPED,
    UNKNOWN,
    WOULD_RUN,
    StageFailed,
    parse_outcome,
    run_dvc_stage,
    terminal_line,
)

log = logging.getLogger("test")


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


@pytest.fixture
def counted(tmp_path: Path) -> Path:
    """A one-stage repo whose command appends to runs.log each time it really runs."""
    root = make_toy_repo(tmp_path / "r", {"a": {"cmd": "echo run >> runs.log && cp seed.txt a.txt",
                                                "deps": ["seed.txt"], "outs": ["a.txt"]}})
    (root / "seed.txt").write_text("one\n")
    return root


def runs(root: Path) -> int:
    return len((root / "runs.log").read_text().splitlines()) if (root / "runs.log").exists() else 0


@pytest.mark.slow
def test_refuse_to_run_skips_restores_or_says_it_would_run_but_never_runs(counted: Path) -> None:
    root = counted
    assert run_dvc_stage("a", root, False, log, refuse_to_run=True) == WOULD_RUN
    assert runs(root) == 0 and not (root / "a.txt").exists() and not (root / "dvc.lock").exists()

    assert run_dvc_stage("a", root, False, log) == RAN and runs(root) == 1
    assert run_dvc_stage("a", root, False, log, refuse_to_run=True) == SKIPPED

    (root / "seed.txt").write_text("two\n")  # a new input: no result for it anywhere
    assert run_dvc_stage("a", root, False, log, refuse_to_run=True) == WOULD_RUN
    assert runs(root) == 1 and not (root / "a.txt").exists()  # DVC clears outputs it is about to rebuild
    (root / "seed.txt").write_text("one\n")  # back to inputs the run-cache has seen
    assert run_dvc_stage("a", root, False, log, refuse_to_run=True) == RESTORED
    assert runs(root) == 1 and (root / "a.txt").read_text() == "one\n"
    assert "up to date" in dvc(root, "status").stdout


@pytest.mark.slow
def test_a_failing_stage_is_not_mistaken_for_a_refused_run(tmp_path: Path) -> None:
    root = make_toy_repo(tmp_path / "r", {"a": {"cmd": "exit 3", "deps": ["seed.txt"], "outs": ["a.txt"]}})
    (root / "seed.txt").write_text("x\n")
    with pytest.raises(StageFailed, match="stage 'a' failed"):
        run_dvc_stage("a", root, False, log)
