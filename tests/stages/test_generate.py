"""The offline provider: exact counts, distinct questions, persona vs generic style, labelled output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stages.common import offline
from stages.common.config import ParamsError, load_params
from stages.generate import generate_offline, resolve_provider
from tests.repo import ROOT, env, make_repo


@pytest.fixture
def cfg():
    return load_params(ROOT / "params.yaml").generate.model_copy(update={"sft_count": 30, "dpo_count": 10})


def test_offline_counts_schema_and_labels(cfg):
    sft, dpo, report = generate_offline(cfg)
    assert len(sft) == 30 and len(dpo) == 10
    assert all(r["source"] == "offline" for r in sft + dpo)
    assert report["provider"] == "offline" and "not real model output" in report["note"]
    assert [m["role"] for m in sft[0]["messages"]] == ["system", "user", "assistant"]
    assert dpo[0]["prompt"][-1]["role"] == "user"
    questions = [r["messages"][1]["content"] for r in sft] + [r["prompt"][-1]["content"] for r in dpo]
    assert len(set(questions)) == len(questions), "SFT and DPO questions must be distinct"


def test_chosen_is_persona_style_and_rejected_generic(cfg):
    _, dpo, _ = generate_offline(cfg)
    for row in dpo:
        assert any(s.split("{")[0] in row["chosen"] for s in offline.PERSONA_CLOSE)
        assert any(s in row["rejected"] for s in offline.GENERIC_CLOSE)
        assert row["chosen"] != row["rejected"]


def test_deterministic_and_growing_the_count_keeps_the_prefix(cfg):
    first, _, _ = generate_offline(cfg)
    again, _, _ = generate_offline(cfg)
    assert first == again
    bigger, _, _ = generate_offline(cfg.model_copy(update={"sft_count": 40}))
    assert bigger[:30] == first


def test_too_many_rows_for_the_grid_names_the_keys(cfg):
    with pytest.raises(ParamsError, match="generate.sft_count"):
        generate_offline(cfg.model_copy(update={"sft_count": 10**6}))


def test_auto_provider_follows_the_api_key(cfg, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    assert resolve_provider(cfg) == "offline"
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    assert resolve_provider(cfg) == "anthropic"
    assert resolve_provider(cfg.model_copy(update={"provider": "offline"})) == "offline"


def test_stage_main_writes_raw_data_and_report(tmp_path):
    repo = make_repo(tmp_path / "repo", {"generate": {"sft_count": 12, "dpo_count": 4}})
    subprocess.run([sys.executable, "-m", "stages.generate"], cwd=repo, env=env(), check=True, capture_output=True)
    assert len((repo / "data/raw/sft.jsonl").read_text().splitlines()) == 12
    report = json.loads((repo / "reports/generation.json").read_text())
    assert report["sft_rows"] == 12 and report["dpo_rows"] == 4


def test_stage_main_with_a_params_typo_exits_naming_the_key(tmp_path):
    repo = make_repo(tmp_path / "repo", {"generate": {"sft_cuont": 12}})
    out = subprocess.run([sys.executable, "-m", "stages.generate"], cwd=repo, env=env(), capture_output=True,
                         text=True)
    assert out.returncode == 2
    assert "generate.sft_cuont: unknown key" in out.stderr
    assert not (repo / "data/raw").exists()
