"""Two team members sharing data, models and experiments through a git server and a DVC remote.

Local folders stand in for both: a bare git repo (the git server) and a plain folder (the DVC remote,
configured as the default in the committed .dvc/config). Member A runs the pipeline once (module
fixture), member B clones and pulls; everything after that moves through git and DVC only.
(slow: one real pipeline run at a very small size, then dpo + evaluate once more as an experiment)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.claude_server import ClaudeServer
from tests.repo import MINIMAL, dvc, make_repo, run, set_params, stages_run

pytestmark = pytest.mark.slow

ALL = ["base", "generate", "validate", "format", "sft", "merge", "reference", "dpo", "evaluate", "export"]
EXP = "beta-half"  # member B's experiment: dpo.beta 0.1 -> 0.5

TEAM = MINIMAL


def git(*args: str, cwd: Path) -> str:
    return run(["git", *args], cwd=cwd).stdout


def clone(server: Path, dest: Path) -> Path:
    """A new member: `git clone` of the server with a committer identity."""
    run(["git", "clone", "-q", str(server), str(dest)], cwd=server.parent)
    git("config", "user.email", f"{dest.name}@tuneforge.invalid", cwd=dest)
    git("config", "user.name", dest.name, cwd=dest)
    return dest


def project(dest: Path, overrides: dict[str, Any]) -> Path:
    """make_repo, without any dvc.lock the working tree it copies from may hold at the moment."""
    repo = make_repo(dest, overrides)
    if (repo / "dvc.lock").exists():
        git("rm", "-q", "dvc.lock", cwd=repo)
        git("commit", "-qm", "no results yet", cwd=repo)
    return repo


def digest(root: Path, *rels: str) -> dict[str, str]:
    """sha256 of every file under the given paths, keyed by repo-relative path."""
    out = {}
    for rel in rels:
        for p in sorted((root / rel).rglob("*")) if (root / rel).is_dir() else [root / rel]:
            if p.is_file():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def outputs(repo: Path) -> list[str]:
    """Every DVC-tracked output path in a repo's dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return sorted(o["path"] for s in lock["stages"].values() for o in s.get("outs", []))


def lock_md5(repo: Path, path: str) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return next(o["md5"] for s in lock["stages"].values() for o in s.get("outs", []) if o["path"] == path)


def remote_object(remote: Path, md5: str) -> Path:
    """Where a DVC 3 remote keeps an object: files/md5/<2 chars>/<rest>."""
    return remote / "files" / "md5" / md5[:2] / md5[2:]


def dir_entry_md5(repo: Path, out: str, relpath: str) -> str:
    """md5 of one file inside a directory output, read from the .dir manifest in the local cache."""
    manifest = remote_object(repo / ".dvc" / "cache", lock_md5(repo, out))
    return next(e["md5"] for e in json.loads(manifest.read_text()) if e["relpath"] == relpath)


@pytest.fixture(scope="module")
def team(tmp_path_factory) -> dict[str, Path]:
    """A runs the pipeline and pushes git + DVC (with run-cache); B clones and pulls. Runs the DAG once."""
    root = tmp_path_factory.mktemp("team")
    server, remote = root / "server.git", root / "dvc-remote"
    run(["git", "init", "-q", "--bare", "-b", "main", str(server)], cwd=root)
    remote.mkdir()

    a = project(root / "a", TEAM)
    dvc("remote", "add", "-d", "storage", str(remote), cwd=a)
    dvc("remote", "modify", "storage", "verify", "true", cwd=a)  # re-hash what `dvc pull` downloads
    git("add", ".dvc/config", cwd=a)
    git("commit", "-qm", "DVC remote: the team's shared folder", cwd=a)
    git("remote", "add", "origin", str(server), cwd=a)

    out = dvc("repro", cwd=a)
    assert sorted(stages_run(out.stdout)) == sorted(ALL), out.stdout
    git("add", "-A", cwd=a)
    git("commit", "-qm", "pipeline results (dvc.lock)", cwd=a)
    git("push", "-q", "-u", "origin", "main", cwd=a)
    dvc("push", "--run-cache", cwd=a)

    b = clone(server, root / "b")
    dvc("pull", cwd=b)
    return {"root": root, "server": server, "remote": remote, "a": a, "b": b}


@pytest.fixture(scope="module")
def pulled(team) -> dict[str, Any]:
    """What B sees right after `git clone && dvc pull`, before anything else touches B's workspace."""
    b = team["b"]
    return {"status": dvc("status", cwd=b).stdout, "repro": dvc("repro", cwd=b).stdout,
            "files": digest(b, *outputs(b))}


@pytest.fixture(scope="module")
def experiment(team, pulled) -> dict[str, Any]:
    """B runs `dvc exp run -S dpo.beta=0.5` and pushes it to the git server (and its data to the remote)."""
    b = team["b"]
    out = dvc("exp", "run", "-n", EXP, "-S", "dpo.beta=0.5", cwd=b)
    eval_json = (b / "reports/eval.json").read_bytes()
    dvc("exp", "push", "origin", EXP, cwd=b)
    return {"ran": stages_run(out.stdout), "eval": eval_json}


def test_b_gets_every_output_and_reruns_nothing(team, pulled):
    a = team["a"]
    assert "Data and pipelines are up to date" in pulled["status"], pulled["status"]
    assert stages_run(pulled["repro"]) == [], pulled["repro"]
    assert pulled["files"] == digest(a, *outputs(a))
    assert (team["b"] / "reports/eval.json").read_bytes() == (a / "reports/eval.json").read_bytes()
    needed = {"data/raw", "data/clean", "data/formatted", "data/reference_logps", "models/base", "models/sft",
              "models/sft-merged", "models/dpo", "reports/eval.json"}
    assert needed <= set(outputs(a))


def test_experiment_reruns_only_dpo_evaluate_and_export(experiment):
    assert sorted(experiment["ran"]) == ["dpo", "evaluate", "export"]


def test_a_pulls_b_experiment_then_returns_via_the_run_cache(team, experiment):
    a = team["a"]
    original = (a / "reports/eval.json").read_bytes()
    dvc("exp", "pull", "origin", EXP, cwd=a)

    shown = json.loads(dvc("exp", "show", "--json", cwd=a).stdout)
    exps = {e["name"]: e for row in shown for x in row.get("experiments") or [] for e in x["revs"]}
    assert EXP in exps, shown
    data = exps[EXP]["data"]
    assert data["params"]["params.yaml"]["data"]["dpo"]["beta"] == 0.5
    assert "reward_margin" in data["metrics"]["reports/eval.json"]["data"]["eval"]["dpo"]
    table = dvc("exp", "show", "--csv", cwd=a).stdout
    assert EXP in table and "dpo.reward_margin" in table.splitlines()[0]

    dvc("exp", "apply", EXP, cwd=a)  # promote B's experiment into A's workspace
    assert (a / "reports/eval.json").read_bytes() == experiment["eval"] != original

    set_params(a, {"dpo": {"beta": 0.1}})  # back to the committed value
    shutil.rmtree(a / "checkpoints", ignore_errors=True)  # training would recreate it
    out = dvc("repro", cwd=a).stdout
    assert stages_run(out) == [], out
    for stage in ("dpo", "evaluate", "export"):
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in out, out
    assert not (a / "checkpoints").exists()
    assert (a / "reports/eval.json").read_bytes() == original
    assert "Data and pipelines are up to date" in dvc("status", cwd=a).stdout


def test_run_cache_travels_from_a_to_b(team, experiment):
    """B never ran beta 0.1: `dvc pull --run-cache` brings A's run entries, so going back is a checkout."""
    b = team["b"]
    set_params(b, {"dpo": {"beta": 0.1}})
    shutil.rmtree(b / "checkpoints", ignore_errors=True)
    dvc("pull", "--run-cache", cwd=b)
    out = dvc("repro", cwd=b).stdout
    assert stages_run(out) == [], out
    assert "Stage 'dpo' is cached - skipping run" in out
    assert not (b / "checkpoints").exists()
    assert (b / "reports/eval.json").read_bytes() == (team["a"] / "reports/eval.json").read_bytes()


# ---------------------------------------------------------------- a damaged remote is reported, not trained over


def damaged_clone(team, name: str) -> tuple[Path, Path]:
    """A copy of the remote (to damage) and a fresh clone pointed at it."""
    remote = team["root"] / f"remote-{name}"
    shutil.copytree(team["remote"], remote)
    member = clone(team["server"], team["root"] / name)
    dvc("remote", "modify", "--local", "storage", "url", str(remote), cwd=member)
    return remote, member


def test_missing_object_is_reported_by_status_and_pull(team):
    remote, c = damaged_clone(team, "c-missing")
    remote_object(remote, lock_md5(team["a"], "reports/eval.json")).unlink()

    status = dvc("status", "-c", cwd=c)
    assert "missing" in status.stdout and "reports/eval.json" in status.stdout, status.stdout
    pulled = dvc("pull", cwd=c, check=False)
    assert pulled.returncode != 0
    assert lock_md5(team["a"], "reports/eval.json") in pulled.stderr and "reports/eval.json" in pulled.stderr
    assert not (c / "reports/eval.json").exists() and (c / "models/dpo").is_dir()
    assert "evaluate" in dvc("status", cwd=c).stdout  # the stage shows as changed; nothing hidden

    # the member who has it pushes again; the next pull is complete
    dvc("remote", "add", "--local", "repair", str(remote), cwd=team["a"])
    dvc("push", "-r", "repair", cwd=team["a"])
    dvc("pull", cwd=c)
    assert (c / "reports/eval.json").read_bytes() == (team["a"] / "reports/eval.json").read_bytes()


def test_corrupted_object_fails_the_pull_and_never_reaches_the_workspace(team):
    """Same size, other bytes: `dvc status -c` only sees that the object exists; `dvc pull` re-hashes it
    (remote `verify = true`, committed with the remote) and refuses it. Without verify DVC would check the
    damaged adapter out and report the workspace as up to date."""
    remote, c = damaged_clone(team, "c-corrupt")
    weights = "adapter_model.safetensors"
    obj = remote_object(remote, dir_entry_md5(team["a"], "models/dpo", weights))
    obj.chmod(0o644)
    obj.write_bytes(obj.read_bytes()[:-16] + b"\0" * 16)

    pulled = dvc("pull", cwd=c, check=False)
    assert pulled.returncode != 0 and "models/dpo" in pulled.stderr, pulled.stderr
    assert not (c / "models/dpo").exists()
    assert (c / "reports/eval.json").read_bytes() == (team["a"] / "reports/eval.json").read_bytes()
    status = dvc("status", cwd=c).stdout
    assert "dpo:" in status and "models/dpo" in status, status  # shown as missing: a repro would say so


# ---------------------------------------------------------------- the Claude request cache travels too


def test_request_cache_is_shared_so_b_never_pays_again(tmp_path):
    """A pays for generation and shares `.cache/tuneforge/claude` via DVC; B's generate sends nothing."""
    server_git, remote = tmp_path / "server.git", tmp_path / "dvc-remote"
    run(["git", "init", "-q", "--bare", "-b", "main", str(server_git)], cwd=tmp_path)
    remote.mkdir()
    a = project(tmp_path / "a", {"generate": {
        "provider": "anthropic", "sft_count": 6, "dpo_count": 2,
        "anthropic": {"concurrency": 4, "subtopics_per_category": 2, "questions_per_request": 4}}})
    dvc("remote", "add", "-d", "storage", str(remote), cwd=a)
    git("remote", "add", "origin", str(server_git), cwd=a)

    with ClaudeServer() as claude:
        env = {**os.environ, "ANTHROPIC_API_KEY": "sk-ant-test-team", "ANTHROPIC_BASE_URL": claude.url}
        gen = [sys.executable, "-m", "stages.generate"]
        subprocess.run(gen, cwd=a, env=env, check=True, capture_output=True, timeout=300)
        paid = claude.answered
        assert paid > 0
        dvc("add", ".cache/tuneforge/claude", cwd=a)
        git("add", ".dvc/config", ".cache/tuneforge/claude.dvc", cwd=a)
        staged = git("status", "--porcelain", "--untracked-files=all", cwd=a).splitlines()
        assert sorted(staged) == ["A  .cache/tuneforge/claude.dvc", "M  .dvc/config"]  # the answers stay out of git
        git("commit", "-qm", "share the Claude request cache", cwd=a)
        git("push", "-q", "-u", "origin", "main", cwd=a)
        dvc("push", cwd=a)

        b = clone(server_git, tmp_path / "b")
        dvc("pull", ".cache/tuneforge/claude.dvc", cwd=b)  # (plain `dvc pull` needs a dvc.lock: none here)
        assert digest(b, ".cache/tuneforge/claude") == digest(a, ".cache/tuneforge/claude")
        subprocess.run(gen, cwd=b, env=env, check=True, capture_output=True, timeout=300)
        assert claude.answered == paid
        assert json.loads((b / "reports/generation.json").read_text())["requests_sent"] == 0
        assert (b / "data/raw/sft.jsonl").read_bytes() == (a / "data/raw/sft.jsonl").read_bytes()
