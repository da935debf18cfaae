"""The whole DAG at reduced size: stages, caching, reruns, metrics and plots (slow: real training)."""

from __future__ import annotations

import json

import pytest

from tests.repo import dvc, make_repo, set_params, stages_run

ALL = ["base", "generate", "validate", "format", "sft", "merge", "reference", "dpo", "evaluate", "export"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A reduced copy of the project after one full `dvc repro`."""
    path = make_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    out = dvc("repro", cwd=path)
    assert sorted(stages_run(out.stdout)) == sorted(ALL), out.stdout
    return path


def test_default_ordering_base_below_sft_below_dpo(repo):
    metrics = json.loads((repo / "reports/eval.json").read_text())
    margins = [metrics[m]["reward_margin"] for m in ("base", "sft", "dpo")]
    assert margins[0] < margins[1] < margins[2], margins
    table = (repo / "reports/eval.md").read_text()
    assert "| base |" in table and "| dpo |" in table


def test_second_repro_runs_nothing(repo):
    out = dvc("repro", cwd=repo)
    assert stages_run(out.stdout) == []
    assert "up to date" in dvc("status", cwd=repo).stdout


def test_metrics_and_plots_are_declared(repo):
    shown = dvc("metrics", "show", "--json", cwd=repo).stdout
    assert "reward_margin" in shown and "best_eval_loss" in shown
    dvc("plots", "show", "--json", cwd=repo)
    assert (repo / "reports/sft_loss.csv").read_text().startswith("step,loss")
    assert (repo / "reports/dpo_loss.csv").read_text().startswith("step,loss")


def test_beta_change_reruns_only_dpo_evaluate_and_export(repo):
    set_params(repo, {"dpo": {"beta": 0.2}})
    assert sorted(stages_run(dvc("repro", "--dry", cwd=repo).stdout)) == ["dpo", "evaluate", "export"]


def test_export_ships_a_verified_model(repo):
    """models/final holds the HF model, both GGUFs, the Modelfile and the card; every format passed."""
    report = json.loads((repo / "reports/export.json").read_text())
    assert report["passed"] and {"hf-float32", "gguf-f16", "gguf-q8_0"} == set(report["formats"])
    final = repo / "models/final"
    assert {"model.safetensors", "Modelfile", "README.md", "cassius-f16.gguf", "cassius-q8_0.gguf"} <= {
        p.name for p in final.iterdir()}
    assert "| dpo |" in (final / "README.md").read_text()
    assert "export" in dvc("metrics", "show", "--json", cwd=repo).stdout


def test_template_change_reruns_format_and_everything_after(repo):
    """Runs for real: a dry run cannot know that format's new outputs will invalidate merge and evaluate."""
    set_params(repo, {"dpo": {"beta": 0.1}, "model": {"chat_template": "plain"}})
    ran = stages_run(dvc("repro", cwd=repo).stdout)
    assert set(ran) == set(ALL) - {"base", "generate"}, ran
    assert "Assistant:" in (repo / "models/dpo/chat_template.jinja").read_text()
