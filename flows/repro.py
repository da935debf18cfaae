"""DVC from the flows: `dvc repro` of one stage (or any dvc command) with its output streamed to a logger.

What DVC did with a stage is read from its own log lines (dvc/stage/__init__.py, run.py, cache.py).
`refuse_to_run=True` lets DVC skip a stage or restore it from the run-cache but never run its command:
DVC runs every stage command through `$SHELL -c CMD` (dvc/stage/run.py `get_executable`), so a `SHELL`
that exits with NO_RUN_EXIT stops it there, and the outcome is WOULD_RUN.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from flows.graph import dvc_command

RAN, SKIPPED, RESTORED, UNKNOWN = "ran", "skipped", "restored", "unknown"
WOULD_RUN = "would run"  # refuse_to_run: DVC had neither an up-to-date result nor a run-cache entry
STATE_NAMES = {RAN: "Completed", SKIPPED: "Skipped", RESTORED: "Restored"}  # Prefect state name per outcome
OUTCOME_OF_STATE = {name: outcome for outcome, name in STATE_NAMES.items()}
_OUTCOMES = (
    (re.compile(r"Stage '.+' is cached - skipping run, checking out outputs"), RESTORED),
    (re.compile(r"Running stage '.+'"), RAN),
    (re.compile(r"Stage '.+' didn't change, skipping"), SKIPPED),
)
NO_RUN_EXIT = 97
NO_RUN_MARK = "tuneforge: refused to run stage"


class StageFailed(RuntimeError):
    """`dvc repro` of one stage exited non-zero (or its stage failed elsewhere)."""


class DvcFailed(RuntimeError):
    """A dvc command other than a stage's repro exited non-zero."""


def parse_outcome(lines: list[str]) -> str:
    """Ran, skipped or restored-from-run-cache, from DVC's output for one stage."""
    for line in lines:
        for pattern, outcome in _OUTCOMES:
            if pattern.search(line):
                return outcome
    return UNKNOWN


def terminal_line(raw: bytes) -> str:
    """What a terminal shows for one output line: progress bars redraw with \\r, keep the last one."""
    return raw.decode(errors="replace").rstrip("\r\n").split("\r")[-1].rstrip()


def stage_env(**extra: str) -> dict[str, str]:
    """Stage commands say `python -m ...`: put this interpreter's bin dir first so they use the venv."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@functools.cache
def refusing_shell() -> str:
    """An executable that DVC, given it as $SHELL, runs instead of a stage command: it says so and fails."""
    path = Path(tempfile.mkdtemp(prefix="tuneforge-")) / "refuse-to-run"
    path.write_text(f'#!/bin/sh\necho "{NO_RUN_MARK} \'$DVC_STAGE\' here ($2)" >&2\nexit {NO_RUN_EXIT}\n')
    path.chmod(0o755)
    return str(path)


def stream(cmd: list[str], root: Path, logger: Any, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Run cmd in root, logging each output line as it comes; (exit code, lines)."""
    lines: list[str] = []
    with subprocess.Popen(
        cmd, cwd=root, env=env or stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            if line := terminal_line(raw):
                lines.append(line)
                logger.info("%s", line)
        return proc.wait(), lines


def run_dvc(root: Path, logger: Any, *args: str) -> list[str]:
    """`dvc ARGS` in root, streamed to logger; DvcFailed (with the output's tail) when it fails."""
    cmd = dvc_command(*args)
    logger.info("$ %s", " ".join(["dvc", *args]))
    code, lines = stream(cmd, root, logger)
    if code:
        raise DvcFailed(f"`dvc {' '.join(args)}` in {root} exited with {code}\n" + "\n".join(lines[-15:]))
    return lines


def run_dvc_stage(
    stage: str, root: Path, force: bool, logger: Any, *, pull: bool = False, refuse_to_run: bool = False
) -> str:
    """Run `dvc --wait-for-lock repro --single-item [--pull] STAGE` from root, streaming its output to logger.

    pull: fetch the run-cache and missing deps from the DVC remote first. refuse_to_run: return WOULD_RUN
    where DVC would have to run the stage's command (nothing up to date, no run-cache entry for it).
    """
    flags = [*(["--force"] if force else []), *(["--pull"] if pull else [])]
    cmd = dvc_command("--wait-for-lock", "repro", "--single-item", *flags, stage)
    logger.info("$ %s", " ".join(["dvc", *cmd[3:]]))
    env = stage_env(SHELL=refusing_shell()) if refuse_to_run else stage_env()
    code, lines = stream(cmd, root, logger, env)
    if code and refuse_to_run and any(NO_RUN_MARK in line for line in lines):
        return WOULD_RUN  # (dvc exits with its own status, not the command's NO_RUN_EXIT)
    if code:
        tail = "\n".join(lines[-15:])
        raise StageFailed(f"stage {stage!r} failed: dvc exited with {code}\n{tail}")
    return parse_outcome(lines)
