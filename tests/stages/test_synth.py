"""The anthropic provider of `generate` against the local test server, in-process and as the DVC stage."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.common.config import AnthropicConfig, GenerateConfig, load_params
from stages.common.synth import GenerationFailed, generate_with_claude, load_grid, load_template
from tests.claude_server import TEST_KEY as KEY
from tests.claude_server import ClaudeServer

ROOT = Path(__file__).resolve().parents[2]


def gen_cfg(sft: int = 12, dpo: int = 4, **anthropic: object) -> GenerateConfig:
    base = load_params(ROOT / "params.yaml").generate
    a = AnthropicConfig.model_validate({**base.anthropic.model_dump(), "concurrency": 4, "subtopics_per_category": 3,
                                        "questions_per_request": 5, **anthropic})
    return base.model_copy(update={"sft_count": sft, "dpo_count": dpo, "provider": "anthropic", "anthropic": a})


def test_templates_and_grid_load() -> None:
    for name in ("subtopics", "questions", "persona_answer", "generic_answer"):
        t = load_template(name)
        assert t.tag == f"{name}@{2 if name == 'persona_answer' else 1}" and t.tool.input_schema["type"] == "object"
    styles, askers, version = load_grid()
    assert len(styles) >= 4 and len(askers) >= 4 and version == "grid@1"


def test_rows_follow_the_data_contract(claude_server: ClaudeServer, tmp_path: Path) -> None:
    cfg = gen_cfg()
    sft, dpo, report = generate_with_claude(cfg, tmp_path)
    assert len(sft) == 12 and len(dpo) == 4
    assert len({r["id"] for r in sft + dpo}) == 16
    questions = [r["messages"][1]["content"] for r in sft] + [r["prompt"][-1]["content"] for r in dpo]
    assert len(set(questions)) == 16  # no question used twice, across SFT and DPO
    for r in sft:
        assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
        assert r["source"] == "anthropic:claude-sonnet-4-6" and r["messages"][2]["content"]
    for r in dpo:
        assert r["prompt"][-1]["role"] == "user" and r["chosen"] and r["rejected"] and r["chosen"] != r["rejected"]
    n_cat = len(cfg.categories)
    assert report["requests"] == claude_server.answered == n_cat + 3 + 1 + 12 + 4 * 2  # subtopics, questions, answers
    assert report["grid_cells"] == n_cat * 3 * 6 * 6 and report["failed"] == 0
    assert report["tokens"]["cache_read"] > 0 and report["cost_usd"] > 0
    # the persona card (style guide + worked examples) makes the persona prefix cacheable on Sonnet 4.6;
    # the other templates' short system blocks are not, and the report says so instead of claiming reads
    cache = report["prompt_cache"]
    assert cache["persona_answer@2"]["prefix_tokens"] >= 2048 and cache["persona_answer@2"]["cache_reads"] > 0
    for tag in ("generic_answer@1", "questions@1+grid@1", "subtopics@1"):
        assert cache[tag]["cache_reads"] == cache[tag]["cache_writes"] == 0
        assert cache[tag]["note"] == f"prefix below the model's caching minimum ({cache[tag]['prefix_tokens']} < 2048 tokens)"
    assert report["tokens"]["cache_read"] == sum(c["cache_read_tokens"] for c in cache.values())
    # the card goes to Claude only: the rows carry the short persona system prompt
    assert {r["messages"][0]["content"] for r in sft} == {f"You are {cfg.persona.name}. {cfg.persona.description}"}


def test_growing_the_count_pays_only_for_the_new_part(claude_server: ClaudeServer, tmp_path: Path) -> None:
    sft, dpo, _ = generate_with_claude(gen_cfg(sft=10), tmp_path)
    paid = claude_server.answered
    sft2, dpo2, report = generate_with_claude(gen_cfg(sft=15), tmp_path)
    assert len(sft2) == 15 and [r["id"] for r in sft2[:10]] == [r["id"] for r in sft] and dpo2 == dpo
    assert claude_server.answered - paid == 1 + 5  # one more question batch, five more answers
    assert report["requests_sent"] == 6 and claude_server.repeated_paid() == 0


def test_failed_answers_are_replaced_so_counts_stay_exact(claude_server: ClaudeServer, tmp_path: Path) -> None:
    claude_server.inject("refusal", times=2, match="record_answer")
    claude_server.inject("max_tokens", times=1, match="record_answer")
    sft, dpo, report = generate_with_claude(gen_cfg(max_failure_share=0.2), tmp_path)
    assert len(sft) == 12 and len(dpo) == 4
    assert report["failures"] == {"max_tokens": 1, "refusal": 2}


def test_batch_mode_gives_the_same_contract(claude_server: ClaudeServer, tmp_path: Path) -> None:
    claude_server.inject("batch_expired", times=2)
    sft, dpo, report = generate_with_claude(gen_cfg(sft=6, dpo=2, mode="batch", batch={"poll_interval": 0.02}),
                                            tmp_path)
    assert len(sft) == 6 and len(dpo) == 2 and report["mode"] == "batch"
    assert report["batches_submitted"] == claude_server.batch_creates == 3 + 1  # one per step, one retry
    assert claude_server.repeated_paid() == 0 and report["failed"] == 0


def test_too_many_failures_stop_the_run_with_a_report(claude_server: ClaudeServer, tmp_path: Path) -> None:
    claude_server.inject("refusal", times=None, match="record_answer")
    with pytest.raises(GenerationFailed, match="max_failure_share") as err:
        generate_with_claude(gen_cfg(max_failure_share=0.1), tmp_path)
    assert err.value.report["failures"]["refusal"] > 0 and err.value.report["failure_share"] > 0.1


# ---------------------------------------------------------------- the DVC stage, in a copy of the repo


def _repo_copy(dest: Path, **anthropic: object) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["generate"].update({"provider": "auto", "sft_count": 8, "dpo_count": 3})
    params["generate"]["anthropic"].update({"concurrency": 4, "subtopics_per_category": 2,
                                            "questions_per_request": 4, **anthropic})
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def _env(claude_server: ClaudeServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}
    env.update(ANTHROPIC_API_KEY=KEY, ANTHROPIC_BASE_URL=claude_server.url, TUNEFORGE_LOG_LEVEL="DEBUG",
               DVC_NO_ANALYTICS="1", PATH=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return env


def _stage(repo: Path, env: dict[str, str], log_name: str) -> subprocess.Popen:
    (repo / "logs").mkdir(exist_ok=True)
    log = (repo / "logs" / log_name).open("w")
    return subprocess.Popen([sys.executable, "-m", "stages.generate"], cwd=repo, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_stage_end_to_end_via_dvc_and_the_key_never_lands_on_disk(claude_server: ClaudeServer, tmp_path: Path) -> None:
    repo = _repo_copy(tmp_path / "repo")
    env = _env(claude_server)
    (repo / "logs").mkdir()
    subprocess.run(["dvc", "init", "--no-scm", "--force", "-q"], cwd=repo, env=env, check=True)
    with (repo / "logs" / "dvc.log").open("w") as log:
        done = subprocess.run(["dvc", "repro", "--single-item", "generate"], cwd=repo, env=env, stdout=log,
                              stderr=subprocess.STDOUT, timeout=300)
    assert done.returncode == 0, (repo / "logs" / "dvc.log").read_text()[-3000:]
    sft = [json.loads(line) for line in (repo / "data/raw/sft.jsonl").read_text().splitlines()]
    dpo = [json.loads(line) for line in (repo / "data/raw/dpo.jsonl").read_text().splitlines()]
    assert len(sft) == 8 and len(dpo) == 3 and sft[0]["source"].startswith("anthropic:")
    report = json.loads((repo / "reports/generation.json").read_text())
    assert report["provider"] == "anthropic" and report["sft_rows"] == 8 and report["requests_sent"] > 0
    assert {"cache_hits", "retries", "failures", "tokens", "cost_usd"} <= report.keys()
    assert (repo / "dvc.lock").exists() and list((repo / ".cache/tuneforge/claude").glob("*.jsonl"))

    paid = claude_server.answered  # a forced rerun answers everything from the request cache
    proc = _stage(repo, env, "rerun.log")
    assert proc.wait(timeout=120) == 0
    assert claude_server.answered == paid and json.loads((repo / "reports/generation.json").read_text())["requests_sent"] == 0

    assert KEY in claude_server.api_keys
    leaks = [str(p) for p in tmp_path.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert leaks == []


@pytest.mark.slow
def test_stage_killed_at_a_random_point_resumes_without_paying_twice(claude_server: ClaudeServer, tmp_path: Path) -> None:
    repo = _repo_copy(tmp_path / "repo")
    env = _env(claude_server)
    claude_server.latency = 0.02
    proc = _stage(repo, env, "killed.log")
    categories = len(yaml.safe_load((repo / "params.yaml").read_text())["generate"]["categories"])
    total = categories + 3 + 8 + 3 * 2  # requests: subtopics, question batches (4 a batch), answers
    claude_server.kill_at(random.Random().randint(3, total - 2), proc.pid)
    assert proc.wait(timeout=120) == -9, (repo / "logs" / "killed.log").read_text()[-2000:]
    assert not (repo / "data/raw/sft.jsonl").exists()
    claude_server._kill = None
    proc = _stage(repo, env, "resumed.log")
    assert proc.wait(timeout=120) == 0, (repo / "logs" / "resumed.log").read_text()[-2000:]
    sft = (repo / "data/raw/sft.jsonl").read_text().splitlines()
    dpo = (repo / "data/raw/dpo.jsonl").read_text().splitlines()
    assert len(sft) == 8 and len(dpo) == 3 and claude_server.repeated_paid() == 0
    report = json.loads((repo / "reports/generation.json").read_text())
    assert report["cache_hits"] > 0 and report["requests_sent"] + report["cache_hits"] == report["requests"]


@pytest.mark.slow
def test_stage_fails_clearly_above_the_failure_threshold(claude_server: ClaudeServer, tmp_path: Path) -> None:
    repo = _repo_copy(tmp_path / "repo")
    claude_server.inject("refusal", times=None, match="record_answer")
    env = _env(claude_server)
    env["TUNEFORGE_LOG_LEVEL"] = "INFO"
    proc = _stage(repo, env, "failed.log")
    assert proc.wait(timeout=120) == 2
    out = (repo / "logs" / "failed.log").read_text()
    assert "error:" in out and "max_failure_share" in out and "Traceback" not in out
    assert json.loads((repo / "reports/generation.json").read_text())["failures"]["refusal"] > 0
