"""dvc.yaml's deps: each stage lists exactly the code it runs and every input it checks, so DVC reruns what a
change can affect and nothing else. No stage runs here: placeholder outputs are recorded with `dvc commit`."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

from tests.repo import ROOT, dvc, fake_outputs, make_repo, set_params

SPEC = yaml.safe_load((ROOT / "dvc.yaml").read_text())


def imported_modules(path: Path) -> set[str]:
    """stages/*.py files that `path` imports (at the top or inside functions), relative to the repository."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stages"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("stages")]
        found |= {f"{n.replace('.', '/')}.py" for n in names if (ROOT / f"{n.replace('.', '/')}.py").is_file()}
    return found


def code_closure(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        if (path := todo.pop()) not in seen:
            seen.add(path)
            todo += imported_modules(ROOT / path)
    return {p for p in seen if not p.endswith("__init__.py")}


@pytest.mark.parametrize("stage", sorted(SPEC["stages"]))
def test_each_stage_lists_exactly_the_code_it_runs(stage):
    """A module a stage imports (directly or through shared code) is a dep; a module it never imports is not."""
    listed = {d for d in SPEC["stages"][stage]["deps"] if d.endswith(".py")}
    assert listed == code_closure(f"stages/{stage}.py")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A copy of the project whose every stage is recorded as done (placeholder outputs, `dvc commit`)."""
    path = make_repo(tmp_path_factory.mktemp("deps") / "repo")
    fake_outputs(path)
    dvc("commit", "-f", cwd=path)
    assert changed_stages(path) == []
    return path


def changed_stages(repo: Path) -> list[str]:
    """The stages `dvc status` finds changed (what `dvc repro` would start with); a rewritten output also lists
    the stage that wrote it."""
    return sorted(json.loads(dvc("status", "--json", cwd=repo).stdout or "{}"))


def rerun_after(repo: Path, params: dict | None = None, files: dict[str, str] | None = None) -> list[str]:
    """Changed stages after overriding params and/or rewriting files; both are put back afterwards."""
    saved = {rel: (repo / rel).read_bytes() if (repo / rel).exists() else None
             for rel in ["params.yaml", *(files or {})]}
    try:
        if params:
            set_params(repo, params)
        for rel, text in (files or {}).items():
            (repo / rel).write_text(text)
        return changed_stages(repo)
    finally:
        for rel, data in saved.items():
            if data is None:
                (repo / rel).unlink()
            else:
                (repo / rel).write_bytes(data)


@pytest.mark.slow
@pytest.mark.parametrize(("change", "expected"), [
    # export reads the model, and the card records the recipe (model, sft, dpo): each of these reruns it too
    ({"params": {"dpo": {"beta": 0.05}}}, ["dpo", "evaluate", "export"]),  # the stored reference log-probs are reused
    ({"params": {"dpo": {"trainer": {"learning_rate": 1e-4}}}}, ["dpo", "export"]),
    # every setting dpo checks the stored log-probs against reruns `reference`: precision ...
    ({"params": {"dpo": {"trainer": {"bf16": True}}}}, ["dpo", "export", "reference"]),
    ({"params": {"dpo": {"trainer": {"fp16": True}}}}, ["dpo", "export", "reference"]),
    ({"params": {"model": {"max_seq_length": 128}}}, ["base", "dpo", "export", "format", "reference", "sft"]),  # truncation
    # ... and the engine: sft-merged records the one sft trained with (installing unsloth alone changes nothing)
    ({"files": {"models/sft-merged/tuneforge.json": '{"engine": "unsloth"}'}},
     ["dpo", "evaluate", "export", "merge", "reference"]),
    ({"params": {"sft": {"engine": "transformers"}}}, ["dpo", "export", "reference", "sft"]),
    # inputs a stage does not read are not its deps: new DPO pairs never retrain sft
    ({"files": {"data/formatted/dpo_train.jsonl": '{"id": "new"}\n'}}, ["dpo", "evaluate", "format", "reference"]),
    ({"files": {"data/formatted/sft_train.jsonl": '{"id": "new"}\n'}}, ["evaluate", "format", "sft"]),
], ids=["dpo.beta", "dpo.lr", "dpo.bf16", "dpo.fp16", "max_seq_length", "recorded-engine", "sft.engine",
        "dpo-data", "sft-data"])
def test_a_change_reruns_exactly_the_stages_it_affects(repo, change, expected):
    assert rerun_after(repo, **change) == expected
