"""The whole DAG at reduced size: stages, caching, reruns, metrics, plots and experiments (slow: real training)."""

from __future__ import annotations

import json

import pytest

from tests.browser import colour_share, marks, render
from tests.repo import dvc, make_repo, run, set_params, stages_run

ALL = ["base", "generate", "validate", "format", "sft", "merge", "reference", "dpo", "evaluate", "export"]
SPLITS = ("eval", "heldout")  # evaluate scores both; margins.csv has a row per split and model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A reduced copy of the project after one full `dvc repro`."""
    path = make_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    out = dvc("repro", cwd=path)
    assert sorted(stages_run(out.stdout)) == sorted(ALL), out.stdout
    run(["git", "add", "dvc.lock"], cwd=path)  # the baseline experiments compare against
    run(["git", "commit", "-qm", "baseline run"], cwd=path)
    return path


@pytest.fixture(scope="module")
def experiment(repo):
    """`dvc exp run` of another chat template on top of the baseline: format and everything after it rerun."""
    run(["git", "checkout", "--", "params.yaml"], cwd=repo)
    out = dvc("exp", "run", "-n", "plain-template", "-S", "model.chat_template=plain", cwd=repo)
    return repo, out


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


CURVES = ["SFT loss", "SFT learning rate", "SFT grad norm", "DPO loss", "DPO reward margin",
          "DPO preference accuracy"]


def test_dvclive_metrics_are_dvc_metrics_and_experiment_columns(repo):
    """DVCLive's metrics.json of sft and dpo (the last logged values) are DVC metrics beside the reports."""
    shown = json.loads(dvc("metrics", "show", "--json", cwd=repo).stdout)
    [metrics] = [rev["data"] for rev in shown.values()]
    assert "reward_margin" in json.dumps(metrics["reports/eval.json"])
    for stage in ("sft", "dpo"):
        live = metrics[f"dvclive/{stage}/metrics.json"]["data"]
        assert live["step"] > 0 and live["train"]["loss"] > 0 and live["eval"]["loss"] > 0
    assert "rewards" in metrics["dvclive/dpo/metrics.json"]["data"]["eval"]  # margins, accuracies ...
    table = dvc("exp", "show", "--md", "--drop", ".*", "--keep", r"Experiment|.*:(train|eval)\.loss|eval\.rewards\.margins",
                cwd=repo).stdout
    for column in ("dvclive/sft/metrics.json:train.loss", "dvclive/dpo/metrics.json:eval.loss", "eval.rewards.margins"):
        assert column in table, table


def plot_data(shown: dict, name: str) -> list[dict]:
    [plot] = shown["data"][name]
    return plot["content"]["data"]["values"]


def test_plots_show_draws_every_curve_offline_in_chromium(repo, tmp_path):
    """`dvc plots show` as a user runs it, then the page in a headless browser with no network: every chart drew
    its marks (SVG paths), the curves at trainer steps, the bars at the evaluated margins."""
    shown = json.loads(dvc("plots", "show", "--json", cwd=repo).stdout)
    assert set(CURVES) <= set(shown["data"]) and "reports/margins.csv" in shown["data"]
    sft_loss = plot_data(shown, "SFT loss")
    split = [row["filename"].split("/")[-2] for row in sft_loss]  # .../train/loss.tsv, .../eval/loss.tsv
    assert set(split) == {"train", "eval"}  # both on one chart
    steps = [int(row["step"]) for row, s in zip(sft_loss, split, strict=True) if s == "train"]
    assert steps == sorted(steps) and len(steps) >= 10
    margins = {(row["split"], row["model"]): float(row["reward_margin"])
               for row in plot_data(shown, "reports/margins.csv")}
    evaluated = json.loads((repo / "reports/eval.json").read_text())
    assert margins == pytest.approx({(split, m): evaluated[split][m]["reward_margin"]
                                     for split in SPLITS for m in ("base", "sft", "dpo")}, abs=1e-5)

    dvc("plots", "show", cwd=repo)  # the page, from .dvc/config's plots.html_template
    page = repo / "dvc_plots" / "index.html"
    assert "cdn.jsdelivr" not in page.read_text()
    dom, shot = render(page, tmp_path)
    drawn = marks(dom)
    assert len(drawn) == len(CURVES) + 1 and all(drawn.values()), {k: len(v) for k, v in drawn.items()}
    bars = drawn["reports_margins_csv"]
    assert sorted(b["label"].split("model: ")[1].split(";")[0] for b in bars) == sorted(
        ["base", "dpo", "sft"] * len(SPLITS))  # one bar per model in each split's row
    for chart, found in drawn.items():
        if chart != "reports_margins_csv":
            assert any(m["mark"] == "line" for m in found), chart
    assert colour_share(shot, (0x94, 0x5D, 0xD6)) > 0.002  # DVC's colour of the first revision, on screen


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


def test_template_change_reruns_format_and_everything_after(experiment):
    """Runs for real (as an experiment): a dry run cannot know that format's new outputs will invalidate merge and
    evaluate."""
    repo, out = experiment
    ran = stages_run(out.stdout)
    assert set(ran) == set(ALL) - {"base", "generate"}, ran
    assert "Assistant:" in (repo / "models/dpo/chat_template.jinja").read_text()


def test_plots_diff_of_two_experiments_shows_both_curves(experiment, tmp_path):
    repo, _ = experiment
    diff = json.loads(dvc("plots", "diff", "main", "plain-template", "--json", cwd=repo).stdout)
    for name in ("SFT loss", "DPO reward margin", "reports/margins.csv"):
        [plot] = diff["data"][name]
        revs = {row["rev"] for row in plot["content"]["data"]["values"]}
        assert revs == {"main", "plain-template"} == set(plot["revisions"]), name
    dvc("plots", "diff", "main", "plain-template", "-o", str(tmp_path / "diff"), cwd=repo)
    drawn = marks(render(tmp_path / "diff" / "index.html", tmp_path / "chromium")[0])
    assert all(drawn.values()) and len(drawn) == len(CURVES) + 1
    bars = [b["label"] for b in drawn["reports_margins_csv"]]
    # 3 models x 2 splits x 2 experiments
    assert len(bars) == 12 and sum("rev: plain-template" in b for b in bars) == 6
