"""Throwaway copies of this repository for tests that run DVC: a reduced pipeline in a temp git repo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from stages.common.config import deep_merge

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# Small enough for CI (the whole DAG in a couple of minutes on 2 cores), large enough that the
# ordering base < SFT < DPO still shows.
REDUCED: dict[str, Any] = {
    "base": {"corpus_size": 300, "epochs": 2},
    "generate": {"sft_count": 120, "dpo_count": 40},
    "validate": {"eval_fraction": 0.2},
    "sft": {"trainer": {"num_train_epochs": 2, "eval_steps": 10, "save_steps": 10, "logging_steps": 2}},
    "dpo": {"trainer": {"num_train_epochs": 1, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                        "eval_steps": 5, "save_steps": 5, "logging_steps": 1}},
    "evaluate": {"max_pairs": 8, "max_sft_examples": 16, "samples": 2, "style_prompts": 4,
                 "max_new_tokens": 24,
                 # a few optimizer steps on ~100 rows: the margin ordering shows, the generation gates
                 # (4 answers of 24 tokens) would be noise
                 "gates": {"style_above_base": False, "dpo_max_style_drop": None, "mention_at_least_base": False,
                           "dpo_max_repetition_rise": None, "base_margin_below_zero": False}},
    "export": {"samples": 2, "max_new_tokens": 24},
}
NO_GATES: dict[str, Any] = {"dpo_margin_above_sft": False, "sft_margin_above_base": False,
                            "base_margin_below_zero": False, "sft_max_ppl_ratio": None, "dpo_max_ppl_ratio": None,
                            "min_dpo_accuracy": None, "style_above_base": False, "dpo_max_style_drop": None,
                            "mention_at_least_base": False, "dpo_max_repetition_rise": None}


# Smaller still, for tests that prove where bytes and runs go rather than what training achieves:
# a couple of optimizer steps per stage and no quality gates.
MINIMAL: dict[str, Any] = deep_merge(REDUCED, {
    "base": {"corpus_size": 100, "documents": 10, "epochs": 1},
    "generate": {"sft_count": 40, "dpo_count": 16},
    "sft": {"trainer": {"max_steps": 2, "eval_steps": 2, "save_steps": 2, "logging_steps": 1}},
    "dpo": {"beta": 0.1, "trainer": {"max_steps": 2, "eval_steps": 2, "save_steps": 2, "logging_steps": 1}},
    "export": {"samples": 1, "max_new_tokens": 8, "gguf": ["q8_0"]},
    "evaluate": {"max_pairs": 4, "max_sft_examples": 4, "samples": 1, "style_prompts": 0,
                 "embedding": "tfidf", "max_new_tokens": 8, "gates": NO_GATES},
})


def env() -> dict[str, str]:
    """The test process's environment with the venv first on PATH (dvc.yaml calls `python`)."""
    out = dict(os.environ)
    out["PATH"] = f"{VENV_BIN}{os.pathsep}{out.get('PATH', '')}"
    out.pop("ANTHROPIC_API_KEY", None)
    out.setdefault("HF_HUB_OFFLINE", "1")
    out.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    return out


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def dvc(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run([str(VENV_BIN / "dvc"), *args], cwd=cwd, check=check)


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    return [f for f in out if (ROOT / f).is_file() and not f.startswith((".venv/", "tests/")) and f != "dvc.lock"]


def set_params(repo: Path, overrides: dict[str, Any]) -> None:
    path = repo / "params.yaml"
    path.write_text(yaml.safe_dump(deep_merge(yaml.safe_load(path.read_text()), overrides), sort_keys=False))


# Files `make install` builds into the checkout (git-ignored), which a copy of the project needs as well
INSTALLED = [".dvc/plots/offline.html"]


def make_repo(dest: Path, overrides: dict[str, Any] | None = REDUCED) -> Path:
    """Copy the project's files (not tests, not outputs) into dest as a fresh git repo with one commit."""
    dest.mkdir(parents=True, exist_ok=True)
    for rel in tracked_files() + [f for f in INSTALLED if (ROOT / f).is_file()]:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((ROOT / rel).read_bytes())
    if overrides:
        set_params(dest, overrides)
    run(["git", "init", "-q", "-b", "main"], cwd=dest)
    run(["git", "config", "user.email", "test@tuneforge.invalid"], cwd=dest)
    run(["git", "config", "user.name", "tuneforge test"], cwd=dest)
    run(["git", "add", "-A"], cwd=dest)
    run(["git", "commit", "-qm", "reduced pipeline"], cwd=dest)
    return dest


def stages_run(output: str) -> list[str]:
    """Names of the stages a `dvc repro` log says it ran."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def fake_outputs(repo: Path) -> None:
    """Placeholder files for every declared output (and the files stages read inside them), so `dvc commit` can
    record a finished pipeline without running it: for tests of what DVC reruns."""
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())
    paths = yaml.safe_load((repo / "params.yaml").read_text())["paths"]

    def resolve(name: str) -> str:
        for key, value in paths.items():
            name = name.replace("${paths." + key + "}", str(value))
        return name

    outs = [resolve(next(iter(o)) if isinstance(o, dict) else o) for stage in spec["stages"].values()
            for kind in ("outs", "metrics", "plots") for o in stage.get(kind, [])]
    inside = [resolve(d) for stage in spec["stages"].values() for d in stage.get("deps", [])
              if any(resolve(d).startswith(out + "/") for out in outs)]
    for name in outs + inside:
        target = repo / name
        if Path(name).suffix:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("{}\n")
        else:
            target.mkdir(parents=True, exist_ok=True)
            (target / "placeholder").write_text("x\n")
