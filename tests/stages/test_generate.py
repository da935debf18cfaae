"""The offline provider: exact counts, distinct questions, persona vs generic register, labelled output, and
refusal of a persona its register was not written for."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stages.common import offline
from stages.common.config import HeldoutConfig, load_params
from stages.common.io import InputError
from stages.generate import generate_offline, resolve_provider
from tests.repo import ROOT, env, make_repo

HELDOUT = HeldoutConfig()


@pytest.fixture
def cfg():
    return load_params(ROOT / "params.yaml").generate.model_copy(update={"sft_count": 30, "dpo_count": 10})


def test_offline_counts_schema_and_labels(cfg):
    sft, dpo, report = generate_offline(cfg, HELDOUT)
    assert len(sft) == 30 and len(dpo) == 10
    assert all(r["source"] == "offline" for r in sft + dpo)
    assert report["provider"] == "offline" and "not real model output" in report["note"]
    roles = [tuple(m["role"] for m in r["messages"]) for r in sft]
    assert set(roles) == {("system", "user", "assistant"), ("user", "assistant")}  # system_prompt_share 0.5
    assert all(r["prompt"][-1]["role"] == "user" for r in dpo)
    everyone = generate_offline(cfg.model_copy(update={"system_prompt_share": 1.0}), HELDOUT)[0]
    assert all(r["messages"][0]["role"] == "system" for r in everyone)
    questions = [r["messages"][1]["content"] for r in sft] + [r["prompt"][-1]["content"] for r in dpo]
    assert len(set(questions)) == len(questions), "SFT and DPO questions must be distinct"


def test_chosen_is_persona_register_and_rejected_generic(cfg):
    _, dpo, _ = generate_offline(cfg, HELDOUT)
    persona, generic = offline.builtin_persona(), offline.generic_register()
    ids = {r.name: {f.id for kind in offline.FRAME_KINDS for f in r.frames[kind]} for r in (persona, generic)}
    for row in dpo:
        frames = set(row["meta"]["frames"][1:])
        assert frames & ids["cassius"] and frames & ids["generic"] and frames <= ids["cassius"] | ids["generic"]
        assert row["chosen"].count("!") < row["rejected"].count("!")  # exclamations: the generic register's
        assert row["chosen"] != row["rejected"]
        assert row["meta"]["subtopic"].lower() in row["chosen"].lower()
        assert row["meta"]["subtopic"].lower() in row["rejected"].lower()


def test_deterministic_and_growing_the_count_keeps_the_prefix(cfg):
    first, _, _ = generate_offline(cfg, HELDOUT)
    again, _, _ = generate_offline(cfg, HELDOUT)
    assert first == again
    bigger, _, _ = generate_offline(cfg.model_copy(update={"sft_count": 40}), HELDOUT)
    assert bigger[:30] == first


def test_too_many_rows_for_the_grammar_names_the_keys(cfg):
    with pytest.raises(InputError, match="generate.sft_count"):
        generate_offline(cfg.model_copy(update={"sft_count": 10**6}), HELDOUT)


def test_a_persona_without_its_own_register_is_refused(cfg):
    """Changing generate.persona offline must not silently write the built-in persona's answers."""
    pirate = cfg.persona.model_copy(update={"name": "Captain Jolly",
                                            "description": "A cheerful pirate who answers in sea shanties."})
    with pytest.raises(InputError, match=r"ANTHROPIC_API_KEY.*built-in persona") as err:
        generate_offline(cfg.model_copy(update={"persona": pirate}), HELDOUT)
    assert "Captain Jolly" in str(err.value) and "cassius.yaml" in str(err.value)
    reworded = cfg.persona.model_copy(update={"description": cfg.persona.description + " Also warm."})
    with pytest.raises(InputError, match="was written for"):
        generate_offline(cfg.model_copy(update={"persona": reworded}), HELDOUT)
    none = cfg.persona.model_copy(update={"offline": None})
    with pytest.raises(InputError, match="no offline register"):
        generate_offline(cfg.model_copy(update={"persona": none}), HELDOUT)


def test_a_register_written_for_a_new_persona_is_used(cfg, tmp_path):
    """The other way out: describe the new persona's style offline, in its own register file."""
    import yaml

    data = yaml.safe_load(offline.BUILTIN_PERSONA.read_text())
    data["register"] = "jolly"
    data["persona"] = {"name": "Captain Jolly", "description": "A cheerful pirate."}
    data["openings"] = [f"Arr, {{subject}} be a fine {w} for a pirate!" for w in ("voyage", "storm", "treasure",
                                                                                  "tide", "map", "cove", "port")]
    path = tmp_path / "jolly.yaml"
    path.write_text(yaml.safe_dump(data))
    pirate = cfg.persona.model_copy(update={"name": "Captain Jolly", "description": "A cheerful  pirate.",
                                            "offline": path})
    sft, _, report = generate_offline(cfg.model_copy(update={"persona": pirate}), HELDOUT)
    assert all(r["messages"][-1]["content"].startswith("Arr, ") for r in sft)
    assert report["register"] == str(path)


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


def test_stage_main_refuses_a_persona_without_a_register(tmp_path):
    repo = make_repo(tmp_path / "repo", {"generate": {"sft_count": 4, "dpo_count": 2, "persona": {
        "name": "Captain Jolly", "description": "A cheerful pirate."}}})
    out = subprocess.run([sys.executable, "-m", "stages.generate"], cwd=repo, env=env(), capture_output=True,
                         text=True)
    assert out.returncode == 2 and "Captain Jolly" in out.stderr and "ANTHROPIC_API_KEY" in out.stderr
    assert not (repo / "data/raw").exists()


def test_stage_main_with_a_params_typo_exits_naming_the_key(tmp_path):
    repo = make_repo(tmp_path / "repo", {"generate": {"sft_cuont": 12}})
    out = subprocess.run([sys.executable, "-m", "stages.generate"], cwd=repo, env=env(), capture_output=True,
                         text=True)
    assert out.returncode == 2
    assert "generate.sft_cuont: unknown key" in out.stderr
    assert not (repo / "data/raw").exists()
