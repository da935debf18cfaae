"""flows/stage.py, the worker's side of placement: checkout of the commit, and the order of its DVC push.

The whole flow runs on real workers in tests/flows/test_placement.py.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest
from dvc_toy import dvc, make_toy_repo

from flows.placement import PlacementError
from flows.repro import DvcFailed
from flows.stage import checkout, push_result

log = logging.getLogger("test")


def sh(root: Path, *cmd: str) -> str:
    return subprocess.run(cmd, cwd=root, check=True, capture_output=True, text=True).stdout


def committed(root: Path) -> Path:
    sh(root, "git", "config", "user.email", "t@tuneforge.invalid")
    sh(root, "git", "config", "user.name", "t")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "toy")
    return root


@pytest.fixture
def worker_clone(tmp_path: Path) -> tuple[Path, Path]:
    """A bare origin with one commit, and a worker's clone of it."""
    origin = tmp_path / "origin.git"
    sh(tmp_path, "git", "init", "-q", "--bare", str(origin))
    project = committed(make_toy_repo(tmp_path / "project", {"a": {"cmd": "echo a > a.txt", "outs": ["a.txt"]}}))
    sh(project, "git", "push", "-q", str(origin), "HEAD:main")
    sh(tmp_path, "git", "clone", "-q", str(origin), str(tmp_path / "worker"))
    return project, tmp_path / "worker"


def test_checkout_fetches_the_commit_and_refuses_an_edited_clone(worker_clone) -> None:
    project, worker = worker_clone
    (project / "dvc.yaml").write_text((project / "dvc.yaml").read_text() + "# more\n")
    committed(project)
    new = sh(project, "git", "rev-parse", "HEAD").strip()
    with pytest.raises(PlacementError, match=f"commit {new[:12]} is not on the git server"):
        checkout(worker, new)  # not pushed yet
    sh(project, "git", "push", "-q", str(worker.parent / "origin.git"), "HEAD:main")

    (worker / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # the last run's lock: replaced, fine
    checkout(worker, new)
    assert sh(worker, "git", "rev-parse", "HEAD").strip() == new

    (worker / "dvc.yaml").write_text("stages: {}\n")
    with pytest.raises(PlacementError, match=r"has local changes \(dvc.yaml\)"):
        checkout(worker, new)


@pytest.mark.slow
def test_push_result_sends_the_run_cache_entry_only_after_the_outputs(tmp_path: Path) -> None:
    """A remote that takes run-cache entries but no data files: DVC's own `push --run-cache` leaves an entry
    whose outputs are missing; push_result leaves none."""
    stages = {"a": {"cmd": "cp seed.txt a.txt", "deps": ["seed.txt"], "outs": ["a.txt"]}}
    for name, push in (("dvc", None), ("ours", push_result)):
        root = make_toy_repo(tmp_path / name, stages)
        (root / "seed.txt").write_text("seed\n")
        remote = tmp_path / f"remote-{name}"
        remote.mkdir()
        (remote / "files").write_text("not a folder: every data upload fails\n")
        assert dvc(root, "remote", "add", "-d", "storage", str(remote)).returncode == 0
        assert dvc(root, "repro").returncode == 0
        if push is None:
            assert dvc(root, "push", "--run-cache", "a").returncode != 0
            assert list((remote / "runs").rglob("*")), "DVC pushed the entry before the outputs"
        else:
            with pytest.raises(DvcFailed, match="push a"):
                push(root, "a", log)
            assert not (remote / "runs").exists()
