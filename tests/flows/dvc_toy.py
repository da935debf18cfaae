"""Toy DVC repositories with trivial shell stages, for the flow tests (helpers; fixtures in conftest)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

# diamond: a and b are independent; c needs both; d needs c.
TOY_STAGES: dict[str, dict] = {
    "a": {"cmd": "echo a > a.txt", "outs": ["a.txt"]},
    "b": {"cmd": "echo b > b.txt", "outs": ["b.txt"]},
    "c": {"cmd": "cat a.txt b.txt > c.txt", "deps": ["a.txt", "b.txt"], "outs": ["c.txt"]},
    "d": {"cmd": "cat c.txt > d.txt", "deps": ["c.txt"], "outs": ["d.txt"]},
}


def _run(args: list[str], cwd: Path) -> None:
    subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True)


def write_dvc_yaml(root: Path, stages: dict[str, dict]) -> None:
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))


def make_toy_repo(root: Path, stages: dict[str, dict] | None = None, params: dict | None = None) -> Path:
    """git + DVC repo at root with the given stages (default: the diamond)."""
    root.mkdir(parents=True, exist_ok=True)
    _run(["git", "init", "-q"], root)
    _run([sys.executable, "-m", "dvc", "init", "-q"], root)
    _run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], root)
    write_dvc_yaml(root, TOY_STAGES if stages is None else stages)
    if params is not None:
        (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True, env=os.environ.copy()
    )
