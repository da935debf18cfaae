"""The whole DAG at reduced size: stages, caching, reruns, metrics and plots (slow: real training)."""

from __future__ import annotations

import json

import pytest

from tests.repo import dvc, make_repo, set_params, stages_run

ALL = ["base", "generate", "validate", "format", "sft", "merge", "reference", "dpo", "evaluate"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A reduced copy of the project after one full `dvc repro`."""
    path = make_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    out = dvc("repro", cwd=path)
    assert sorted(stages_run(out.stdout)) == sorted(ALL), out.stdout
    return path


def test_default_ordering_base_below_sft_below_dpo_on_heldout(repo):
    metrics = json.loads((repo / "reports/eval.json").read_text())
    margins = [metrics["heldout"][m]["reward_margin"] for m in ("base", "sft", "dpo")]
    assert margins[0] < margins[1] < margins[2], margins
    assert set(metrics) == {"eval", "heldout", "run", "gates"} and all(metrics["gates"].values())
    table = (repo / "reports/eval.md").read_text()
    assert table.count("| base |") == 2 and "## held out" in table
    for name in ("sft", "dpo"):  # every split file is written, heldout named as such
        assert {p.name for p in (repo / "data/clean").glob(f"{name}_*.jsonl")} == {
            f"{name}_train.jsonl", f"{name}_eval.jsonl", f"{name}_heldout.jsonl"}
    assert (repo / "data/base_corpus/corpus.jsonl").stat().st_size > 0
    report = json.loads((repo / "reports/validation.json").read_text())
    assert report["contamination"]["splits"]["heldout"]["flagged"] == 0


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


def test_beta_change_reruns_only_dpo_and_evaluate(repo):
    set_params(repo, {"dpo": {"beta": 0.2}})
    assert sorted(stages_run(dvc("repro", "--dry", cwd=repo).stdout)) == ["dpo", "evaluate"]


def test_template_change_reruns_format_and_everything_after(repo):
    """Runs for real: a dry run cannot know that format's new outputs will invalidate merge and evaluate."""
    set_params(repo, {"dpo": {"beta": 0.1}, "model": {"chat_template": "plain"}})
    ran = stages_run(dvc("repro", cwd=repo).stdout)
    assert set(ran) == set(ALL) - {"base", "generate"}, ran
    assert "Assistant:" in (repo / "models/dpo/chat_template.jinja").read_text()
