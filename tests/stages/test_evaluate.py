"""The evaluate stage on tiny random models: TRL agreement, reports, gates, style score, bad input."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from stages import evaluate as ev
from stages.base import build_tokenizer
from stages.common.config import load_params, parse_params
from stages.common.engine import load_for_inference
from stages.common.io import InputError, read_jsonl, write_jsonl
from stages.common.logprobs import oracle_response_logprobs
from stages.common.templates import LLAMA3
from tests.training_workspace import dpo_pairs, sft_rows, tiny_model

CHOSEN = ["Motivation is unreliable. Build a schedule.", "Failure is data. Adjust the plan.", "Incentives.",
          "Quit when the expected cost exceeds the value.", "Name the trade-off. Decide.", "Status. Nothing more."]
REJECTED = ["You can do it! Believe in yourself!", "Every failure is a gift, keep smiling!",
            "People are wonderful deep down, have faith!", "Follow your heart and never give up!",
            "You are amazing, trust the journey!", "Love yourself and good things will come!"]
QUESTIONS = ["How do I stay motivated?", "What is failure?", "Why do people lie?", "Should I quit?",
             "How do I choose?", "Why do people compete?"]
SUBJECTS = ["competition", "a choice", "quitting", "lies", "failure", "motivation"]
BETA = 0.1


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """models/{base,sft-merged,dpo} (dpo = random LoRA on sft-merged) + data/formatted eval files."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("eval")
    tok = build_tokenizer(CHOSEN + REJECTED + QUESTIONS, 400, LLAMA3)
    for name, seed in (("base", 1), ("sft-merged", 2)):
        tiny_model(tok, seed).save_pretrained(root / "models" / name)
        tok.save_pretrained(root / "models" / name)
    sft = AutoModelForCausalLM.from_pretrained(root / "models" / "sft-merged")
    torch.manual_seed(3)
    dpo = get_peft_model(sft, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    for n, p in dpo.named_parameters():
        if "lora_B" in n:  # non-zero B, so the adapter changes the model
            p.data.normal_(0, 0.2)
    dpo.save_pretrained(root / "models" / "dpo")
    tok.save_pretrained(root / "models" / "dpo")

    fmt = root / "data" / "formatted"
    write_jsonl(fmt / "dpo_eval.jsonl", dpo_pairs(tok, QUESTIONS, CHOSEN, REJECTED))
    rows = sft_rows(tok, QUESTIONS, CHOSEN)
    assert sum(rows[0]["assistant_masks"]) > 0
    write_jsonl(fmt / "sft_eval.jsonl", rows)
    # heldout: other pairs, with the subject the rows' metadata names (for the subject-mention share)
    held = dpo_pairs(tok, QUESTIONS[::-1], CHOSEN[::-1], REJECTED[::-1])
    write_jsonl(fmt / "dpo_heldout.jsonl", [{**p, "meta": {"subtopic": s}} for p, s in zip(held, SUBJECTS, strict=True)])
    write_jsonl(fmt / "sft_heldout.jsonl", rows[::-1])
    return root


def _params(root: Path, **evaluate):
    data = {
        "paths": {k: str(root / v) for k, v in {
            "base_corpus": "data/base_corpus", "base": "models/base", "raw": "data/raw", "clean": "data/clean",
            "formatted": "data/formatted", "sft": "models/sft", "sft_merged": "models/sft-merged",
            "dpo": "models/dpo", "checkpoints": "checkpoints", "reports": "reports", "cache": "cache"}.items()},
        "generate": {"persona": {"name": "x", "description": "y"}, "categories": ["a"]},
        "dpo": {"beta": BETA},
        "evaluate": {"batch_size": 4, "samples": 2, "style_prompts": 4, "max_new_tokens": 8, "embedding": "tfidf",
                     **evaluate},
    }
    return parse_params(data)


NO_GATES = {"dpo_margin_above_sft": False, "sft_margin_above_base": False, "sft_max_ppl_ratio": None,
            "base_margin_below_zero": False, "style_above_base": False, "dpo_max_style_drop": None,
            "mention_at_least_base": False, "dpo_max_repetition_rise": None}


TRL_EVAL = """
import json, sys
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer
from stages.common.engine import load_for_inference
from stages.common.io import read_jsonl
root, out, beta = sys.argv[1], sys.argv[2], float(sys.argv[3])
model, tok = load_for_inference(root + "/models/dpo")
# TRL's reference for a PeftModel without ref_model is a copy of that adapter: pass SFT-merged explicitly
ref, _ = load_for_inference(root + "/models/sft-merged")
rows = read_jsonl(root + "/data/formatted/dpo_eval.jsonl")
ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
args = DPOConfig(output_dir=out, beta=beta, per_device_eval_batch_size=len(rows), report_to=[], max_length=None,
                 use_cpu=not torch.cuda.is_available())
trainer = DPOTrainer(model=model, ref_model=ref, args=args, processing_class=tok, train_dataset=ds, eval_dataset=ds)
print("TRL " + json.dumps(trainer.evaluate()))
"""


@pytest.mark.slow
def test_implicit_reward_matches_trl_dpo_evaluate(workspace, tmp_path):
    """Our implicit-reward margin/accuracy for DPO (ref = SFT-merged) equals TRL's eval_rewards/*."""
    params = _params(workspace, style_prompts=0, samples=0, gates=NO_GATES)
    report = ev.run(params, loader=load_for_inference)
    ours = report.metrics["eval"]["dpo"]

    # TRL 1.15 computes DPO log-probs with a Triton kernel; without a GPU, Triton's interpreter runs it.
    # A subprocess, because Triton reads TRITON_INTERPRET when the kernels are first imported.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", TRL_EVAL, str(workspace), str(tmp_path / "trl"), str(BETA)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trl = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("TRL "))[4:])
    assert abs(ours["implicit_reward_margin"]) > 1e-3  # the adapter does change the model
    assert ours["implicit_reward_margin"] == pytest.approx(trl["eval_rewards/margins"], abs=1e-3)
    assert ours["implicit_reward_accuracy"] == pytest.approx(trl["eval_rewards/accuracies"], abs=1e-3)
    assert ours["logp_chosen"] == pytest.approx(trl["eval_logps/chosen"], abs=1e-3)
    assert ours["logp_rejected"] == pytest.approx(trl["eval_logps/rejected"], abs=1e-3)
    assert report.metrics["eval"]["sft"]["implicit_reward_margin"] == 0.0  # SFT measured against itself


def test_reports_nested_by_split_and_model_and_margins_match_oracle(workspace, tmp_path):
    params = _params(workspace, gates=NO_GATES)
    report = ev.run(params, loader=load_for_inference)
    reports = workspace / "reports"
    data = json.loads((reports / "eval.json").read_text())
    assert set(data) == {"eval", "heldout", "run", "gates"}
    for split in ("eval", "heldout"):
        assert set(data[split]) == set(ev.MODELS)
        for name in ev.MODELS:
            for key in ("reward_margin", "reward_accuracy", "reward_margin_per_token", "implicit_reward_margin",
                        "perplexity", "style_score", "repeated_4gram_share"):
                assert np.isfinite(data[split][name][key]), (split, name, key)
    assert "subject_mention_share" in data["heldout"]["dpo"] and "subject_mention_share" not in data["eval"]["dpo"]
    assert data["run"]["style_backend"] == "tfidf" and data["run"]["gates_split"] == "heldout"
    assert data["run"]["splits"]["heldout"]["with_subject"] == 4  # style_prompts=4 of the 6 pairs
    with (reports / "margins.csv").open() as fh:
        got = {(r["split"], r["model"]): float(r["reward_margin"]) for r in csv.DictReader(fh)}
    assert got.keys() == {(s, m) for s in ("eval", "heldout") for m in ev.MODELS}
    table = (reports / "eval.md").read_text()
    assert table.count("| model | reward margin |") == 2 and "## held out" in table and "## in-distribution" in table
    assert "6 pairs, 6 SFT conversations" in table
    samples = (reports / "samples.md").read_text()
    assert samples.count("## Prompt") == 4 and "(heldout)" in samples and "**dpo:**" in samples

    # the summed margin is the slow oracle's, per pair, averaged
    rows = read_jsonl(workspace / "data" / "formatted" / "dpo_heldout.jsonl")
    model, tok = load_for_inference(workspace / "models" / "base")
    prompts = [r["prompt"] for r in rows]
    c = oracle_response_logprobs(model, tok, prompts, [r["chosen"] for r in rows])
    r = oracle_response_logprobs(model, tok, prompts, [r["rejected"] for r in rows])
    margins = np.array(c.logps) - np.array(r.logps)
    base = report.metrics["heldout"]["base"]
    assert base["reward_margin"] == pytest.approx(margins.mean(), abs=1e-4)
    assert base["reward_accuracy"] == pytest.approx((margins > 0).mean())
    per_tok = np.array(c.logps) / np.array(c.n_tokens) - np.array(r.logps) / np.array(r.n_tokens)
    assert base["reward_margin_per_token"] == pytest.approx(per_tok.mean(), abs=1e-4)
    assert got[("heldout", "base")] == pytest.approx(margins.mean(), abs=1e-4)


def test_generation_metrics():
    assert ev.repeated_ngram_share("a b c d a b c d") == pytest.approx(1 / 5)  # 5 four-grams, one repeat
    assert ev.repeated_ngram_share("Cost is cost. Risk is risk.") == 0.0
    assert ev.repeated_ngram_share("too short") == 0.0
    assert ev.mentions("Treat A Breakup as a decision.", "a breakup")
    assert ev.mentions("The breakup is data.", "a breakup")  # the article does not count
    assert not ev.mentions("Breaking up is data.", "a breakup")
    assert not ev.mentions("Most confusion about falling in love comes from definitions.", "public criticism")


def test_generations_are_deterministic(workspace):
    model, tok = load_for_inference(workspace / "models" / "dpo")
    cfg = _params(workspace).evaluate
    prompts = [r["prompt"] for r in read_jsonl(workspace / "data" / "formatted" / "dpo_eval.jsonl")][:3]
    assert ev.generate(model, tok, prompts, cfg) == ev.generate(model, tok, prompts, cfg)
    # batching (left padding) does not change greedy answers
    one = [ev.generate(model, tok, [p], cfg).texts[0] for p in prompts]
    assert one == ev.generate(model, tok, prompts, cfg).texts


def test_generations_that_hit_max_new_tokens_are_counted(workspace):
    model, tok = load_for_inference(workspace / "models" / "dpo")
    prompts = [r["prompt"] for r in read_jsonl(workspace / "data" / "formatted" / "dpo_eval.jsonl")][:3]
    cut = ev.generate(model, tok, prompts, _params(workspace, max_new_tokens=2).evaluate)
    assert cut.at_limit == 3  # a random model does not end its answer within 2 tokens
    # a model that always emits end-of-turn first never hits the limit
    eot = SimpleNamespace(parameters=model.parameters, eval=model.eval, generate=lambda input_ids, **kw: torch.cat(
        [input_ids, torch.full((len(input_ids), 1), tok.eos_token_id)], dim=1))
    assert ev.generate(eot, tok, prompts, _params(workspace, max_new_tokens=2).evaluate).at_limit == 0


def test_max_new_tokens_default_is_the_95th_percentile_of_held_out_answers():
    rows = [ev.SftRow("a", [0] * 9, [0, 0, 1, 1, 1, 0, 0, 1, 1]), ev.SftRow("b", [0] * 4, [0, 1, 1, 1])]
    assert ev.answer_lengths(rows) == [3, 2, 3]  # one length per assistant turn, end-of-turn included
    assert ev.default_max_new_tokens(list(range(1, 101))) == 96  # ceil of the 95th percentile
    assert ev.default_max_new_tokens([7]) == 7
    with pytest.raises(InputError, match="evaluate.max_new_tokens"):
        ev.default_max_new_tokens([])


def test_gate_failure_names_gate_after_writing_reports(workspace):
    reports = workspace / "reports"
    for f in reports.glob("*"):
        f.unlink()
    params = _params(workspace, style_prompts=0, samples=0,
                     gates={**NO_GATES, "sft_max_ppl_ratio": 1e-9})
    with pytest.raises(ev.GateError, match="sft_max_ppl_ratio"):
        ev.run(params, loader=load_for_inference)
    assert (reports / "eval.json").exists() and (reports / "eval.md").exists()
    assert json.loads((reports / "eval.json").read_text())["gates"] == {"sft_max_ppl_ratio": False}
    assert "Gates, on `heldout`" in (reports / "eval.md").read_text()
    assert "| sft_max_ppl_ratio | FAIL |" in (reports / "eval.md").read_text()


def test_check_gates():
    cfg = _params(Path("/x")).evaluate.gates
    m = {"base": {"reward_margin": -0.7, "reward_margin_per_token": -0.02, "perplexity": 10.0, "reward_accuracy": 0.2,
                  "style_score": -0.2, "subject_mention_share": 0.5, "repeated_4gram_share": 0.0},
         "sft": {"reward_margin": 0.1, "reward_margin_per_token": 0.01, "perplexity": 8.0, "reward_accuracy": 0.6,
                 "style_score": 0.3, "subject_mention_share": 0.5, "repeated_4gram_share": 0.02},
         "dpo": {"reward_margin": 0.05, "reward_margin_per_token": 0.03, "perplexity": 9.0, "reward_accuracy": 0.7,
                 "style_score": 0.2, "subject_mention_share": 0.4, "repeated_4gram_share": 0.1}}
    res = {g.name: g.passed for g in ev.check_gates(m, cfg)}
    assert res == {"dpo_margin_above_sft": False, "sft_margin_above_base": True, "base_margin_below_zero": True,
                   "sft_max_ppl_ratio": True, "style_above_base": True, "dpo_max_style_drop": False,
                   "mention_at_least_base": False, "dpo_max_repetition_rise": False}
    m["dpo"].update(reward_margin=0.2, style_score=0.28, subject_mention_share=0.5, repeated_4gram_share=0.06)
    assert all(g.passed for g in ev.check_gates(m, cfg))
    m["base"]["reward_margin"] = 0.001  # the base must prefer the generic answer
    assert {g.name for g in ev.check_gates(m, cfg) if not g.passed} == {"base_margin_below_zero"}
    strict = cfg.model_copy(update={"dpo_max_ppl_ratio": 1.1, "min_dpo_accuracy": 0.8})
    res = {g.name: g.passed for g in ev.check_gates(m, strict)}
    assert res["dpo_max_ppl_ratio"] is False and res["min_dpo_accuracy"] is False


def test_missing_input_names_the_file(workspace, tmp_path):
    params = _params(tmp_path)
    with pytest.raises(InputError, match=r"dpo_eval\.jsonl"):
        ev.run(params, loader=load_for_inference)
    bad = tmp_path / "data" / "formatted"
    write_jsonl(bad / "dpo_eval.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p"}])
    write_jsonl(bad / "sft_eval.jsonl", [{"input_ids": [1], "assistant_masks": [1]}])
    with pytest.raises(InputError, match=r"dpo_eval\.jsonl:2: key 'chosen'"):
        ev.run(params, loader=load_for_inference)
    write_jsonl(bad / "dpo_eval.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    with pytest.raises(InputError, match=r"dpo_heldout\.jsonl"):  # written by format, even when empty
        ev.run(params, loader=load_for_inference)
    write_jsonl(bad / "dpo_heldout.jsonl", [])
    write_jsonl(bad / "sft_heldout.jsonl", [])
    with pytest.raises(InputError, match=r"models/base"):
        ev.run(params, loader=load_for_inference)


class FakeEmbedder:
    name = "fake"

    def fit(self, texts):
        pass

    def encode(self, texts):
        return np.array([[1.0, 0.0] if "calm" in t else [0.0, 1.0] if "hype" in t else [1.0, 1.0] for t in texts])


def test_style_score_definition():
    e = FakeEmbedder()
    assert ev.style_score(e, ["calm a"], ["calm x", "calm y"], ["hype z"]) == pytest.approx(1.0)
    assert ev.style_score(e, ["hype a"], ["calm x"], ["hype z"]) == pytest.approx(-1.0)
    assert ev.style_score(e, ["neutral"], ["calm x"], ["hype z"]) == pytest.approx(0.0)
    assert ev.style_score(e, ["calm", "hype"], ["calm x"], ["hype z"]) == pytest.approx(0.0)


def test_minilm_loads_offline_and_separates_styles(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    emb = ev.load_embedder("minilm")
    assert emb.name == "all-MiniLM-L6-v2"
    score = ev.style_score(emb, ["Decide. Cost is irrelevant."], CHOSEN, REJECTED)
    assert score > ev.style_score(emb, ["Believe in yourself, you are amazing!"], CHOSEN, REJECTED)


def test_embedder_falls_back_to_tfidf_with_warning(monkeypatch, caplog):
    def broken():
        raise OSError("no model files")

    monkeypatch.setattr(ev, "MiniLMEmbedder", broken)
    with caplog.at_level(logging.WARNING):
        emb = ev.load_embedder("minilm")
    assert emb.name == "tfidf" and "falling back to TF-IDF" in caplog.text


def test_params_yaml_evaluate_section_loads():
    cfg = load_params(Path(__file__).resolve().parents[2] / "params.yaml").evaluate
    assert cfg.gates.dpo_margin_above_sft and cfg.embedding in ("minilm", "tfidf")


# --------------------------------------------------------------------------- judge

class ScriptedClient:
    """Stands in for ClaudeClient: the verdict for a request comes from a function of its tag."""

    def __init__(self, verdict):
        self.verdict = verdict

    def request(self, system, messages, tool, template_version, tag=""):
        return SimpleNamespace(key=tag, tag=tag, text=messages[0]["content"])

    def run(self, reqs):
        out = {}
        for r in reqs:
            w = self.verdict(r.tag)
            out[r.key] = SimpleNamespace(ok=w is not None, data={"winner": w, "reason": "r"}, failure="refusal")
        return out

    def report(self):
        return {"model": "m", "requests": 0, "cache_hits": 0, "cost_usd": 0.0}


def test_judge_counts_only_order_consistent_verdicts():
    # prompt 0: candidate is answer 1 in "ab" and answer 2 in "ba" -> consistent win
    # prompt 1: baseline wins in both orders; prompt 2: position bias (always 1) -> tie
    # prompt 3: a failed request -> failed, not a tie, and left out of the win-rate
    table = {0: {"ab": 1, "ba": 2}, 1: {"ab": 2, "ba": 1}, 2: {"ab": 1, "ba": 1}, 3: {"ab": None, "ba": 1}}

    def verdict(tag):
        name, i, order = tag.split(":")
        return table[int(i)][order] if name == "dpo_vs_sft" else 0

    judge = ev.ClaudeJudge(ScriptedClient(verdict), "cold")
    answers = {m: [f"{m} answer {i}" for i in range(4)] for m in ev.MODELS}
    out = judge(["q0", "q1", "q2", "q3"], answers)
    d = out["dpo_vs_sft"]
    assert (d["wins"], d["losses"], d["ties"], d["failed"], d["disagreements"], d["judged"]) == (1, 1, 1, 1, 1, 3)
    assert d["win_rate"] == pytest.approx((1 + 0.5 * 1) / 3)
    s = out["sft_vs_base"]
    assert (s["wins"], s["losses"], s["ties"], s["disagreements"]) == (0, 0, 4, 0)
    assert (out["requests"], out["failed_requests"], out["failures"]) == (16, 1, {"refusal": 1})
    assert out["failure_share"] == pytest.approx(1 / 16, abs=1e-4)


def test_judge_with_every_request_failed_has_no_win_rate():
    out = ev.ClaudeJudge(ScriptedClient(lambda tag: None), "cold")(["q0", "q1"], {m: ["a", "b"] for m in ev.MODELS})
    for name in ("dpo_vs_sft", "sft_vs_base"):
        assert out[name]["failed"] == 2 and out[name]["judged"] == 0 and out[name]["win_rate"] is None
    assert out["failure_share"] == 1.0


def test_judge_request_puts_candidate_first_then_second():
    seen = []
    client = ScriptedClient(lambda tag: 0)
    orig = client.request

    def record(system, messages, tool, template_version, tag=""):
        seen.append((tag, messages[0]["content"]))
        return orig(system, messages, tool, template_version, tag)

    client.request = record
    ev.ClaudeJudge(client, "cold")(["q"], {"dpo": ["D"], "sft": ["S"]})
    texts = dict(seen)
    assert texts["dpo_vs_sft:0:ab"].index("D") < texts["dpo_vs_sft:0:ab"].index("S")
    assert texts["dpo_vs_sft:0:ba"].index("S") < texts["dpo_vs_sft:0:ba"].index("D")


def test_judge_through_claude_client_and_test_server(workspace, tmp_path, claude_server):
    params = _params(workspace, style_prompts=0, samples=1, judge="claude", judge_prompts=3, gates=NO_GATES,
                     max_new_tokens=None)
    params = params.model_copy(update={"paths": params.paths.model_copy(update={"cache": tmp_path / "cache"})})
    bodies = []
    answer = claude_server.answer
    claude_server.answer = lambda body, fault: (bodies.append(body), answer(body, fault))[1]
    report = ev.run(params, loader=load_for_inference)
    judged = report.info["judge"]
    # the test server always answers "1": the two orders disagree, so every verdict is a tie
    for name in ("dpo_vs_sft", "sft_vs_base"):
        assert judged[name]["prompts"] == 3 and judged[name]["ties"] == 3 and judged[name]["disagreements"] == 3
        assert judged[name]["win_rate"] == 0.5
    assert report.metrics["heldout"]["dpo"]["judge_win_rate_vs_sft"] == 0.5
    assert report.metrics["heldout"]["sft"]["judge_win_rate_vs_base"] == 0.5
    assert judged["cost"]["requests"] == 12 and judged["cost"]["cost_usd"] > 0
    assert claude_server.answered == 12 and len(bodies) == 12
    # judge_temperature defaults to null: the model's default, no temperature sent
    assert all("temperature" not in b and b["tool_choice"]["name"] == "record_verdict" for b in bodies)
    assert "persona:\nYou are x. y" in bodies[0]["system"][0]["text"]  # the persona card is the rubric
    table = (workspace / "reports" / "eval.md").read_text()
    assert "judge win-rate vs SFT" in table and "Judge cost:" in table
    # evaluate.max_new_tokens: null is derived from the held-out answers, and cut-off answers are counted
    rows = [r for split in ("eval", "heldout")
            for r in ev.read_sft_rows(workspace / "data" / "formatted" / f"sft_{split}.jsonl", 200, allow_empty=True)]
    run_info = json.loads((workspace / "reports" / "eval.json").read_text())["run"]
    gen = run_info["generation"]
    assert gen["max_new_tokens"] == ev.default_max_new_tokens(ev.answer_lengths(rows))
    assert f"quantile of {len(ev.answer_lengths(rows))} held-out answers" in gen["max_new_tokens_from"]
    for split in run_info["splits"].values():
        assert set(split["at_limit"]) == set(ev.MODELS)
        assert all(0 <= n <= split["prompts"] for n in split["at_limit"].values())
    # a rerun pays for nothing: every verdict comes from the request cache
    again = ev.run(params, loader=load_for_inference).info["judge"]
    assert again["cost"]["cache_hits"] == 12 and claude_server.repeated_paid() == 0


@pytest.mark.slow
def test_main_exit_codes_name_the_file_and_the_gate(workspace, tmp_path):
    """`python -m stages.evaluate`: a missing input exits 2 naming the file; a failed gate exits 1 naming it."""
    import yaml

    from stages.common.config import deep_merge, read_yaml

    root = Path(__file__).resolve().parents[2]
    data = read_yaml(root / "params.yaml")
    paths = {k: str(v) for k, v in _params(workspace).paths.model_dump().items()}
    evaluate = {"batch_size": 4, "samples": 1, "style_prompts": 0, "max_new_tokens": 4,
                "gates": {**NO_GATES, "sft_max_ppl_ratio": 1e-9}}
    env = {**os.environ, "PYTHONPATH": str(root)}

    def main(paths):
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(deep_merge(data, {"paths": paths,
                                                                                 "evaluate": evaluate})))
        return subprocess.run([sys.executable, "-m", "stages.evaluate"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    proc = main({**paths, "formatted": str(tmp_path / "nowhere")})
    assert proc.returncode == 2 and "nowhere/dpo_eval.jsonl" in proc.stderr
    proc = main({**paths, "reports": str(tmp_path / "reports")})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "sft_max_ppl_ratio" in proc.stderr.splitlines()[-1]
    assert (tmp_path / "reports" / "eval.json").exists()


def test_judge_failures_are_counted_from_the_api_not_as_ties(tmp_path, claude_server):
    from stages.common.claude import ClaudeClient
    from stages.common.config import AnthropicConfig

    claude_server.inject("refusal", times=None, match="refused-question")
    client = ClaudeClient(AnthropicConfig(concurrency=2), tmp_path, progress=False)
    out = ev.ClaudeJudge(client, "cold")(["q0", "refused-question", "q2"],
                                         {m: [f"{m} {i}" for i in range(3)] for m in ev.MODELS})
    assert (out["requests"], out["failed_requests"], out["failures"]) == (12, 4, {"refusal": 4})
    d = out["dpo_vs_sft"]
    assert (d["prompts"], d["failed"], d["judged"], d["ties"]) == (3, 1, 2, 2)  # q1 is failed, not a tie
    assert d["win_rate"] == 0.5  # the server answers "1" in both orders: ties over the 2 judged prompts


def test_run_writes_the_reports_then_fails_above_judge_max_failure_share(workspace, tmp_path, monkeypatch):
    judged = {"requests": 12, "failed_requests": 12, "failures": {"refusal": 12}, "failure_share": 1.0,
              "dpo_vs_sft": {"prompts": 3, "judged": 0, "wins": 0, "losses": 0, "ties": 0, "failed": 3,
                             "disagreements": 0, "win_rate": None, "verdicts": []},
              "cost": {"model": "m", "requests": 12, "cache_hits": 0, "cost_usd": 0.0}}
    canned = ev.EvalReport(
        metrics={"heldout": {m: {"reward_margin": 0.0, "reward_margin_per_token": 0.0, "perplexity": 1.0}
                             for m in ev.MODELS}},
        gates=[], samples=[],
        info={"beta": BETA, "gates_split": "heldout", "judge": judged, "generation": {"max_new_tokens": 8},
              "splits": {"heldout": {"pairs": 1, "sft_examples": 1, "prompts": 0, "with_subject": 0,
                                     "at_limit": {}}}})
    monkeypatch.setattr(ev, "evaluate", lambda *a, **kw: canned)
    params = _params(workspace, gates=NO_GATES)
    params = params.model_copy(update={"paths": params.paths.model_copy(update={"reports": tmp_path})})
    with pytest.raises(ev.JudgeFailed, match=r"12 of 12 Claude requests failed .*judge_max_failure_share 5.0%"):
        ev.run(params, loader=lambda d: None)
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["run"]["judge"]["failures"] == {"refusal": 12} and "judge_win_rate_vs_sft" not in written["heldout"]["dpo"]


def test_judge_failure_share_threshold():
    judged = {"failure_share": 0.05, "failed_requests": 1, "requests": 20, "failures": {"timeout": 1}}
    ev.check_judge_failures(judged, 0.05, Path("eval.json"))  # at the limit: passes
    with pytest.raises(ev.JudgeFailed, match=r"1 of 20 .*\{'timeout': 1\}"):
        ev.check_judge_failures(judged, 0.04, Path("eval.json"))


def test_judge_stops_at_once_on_a_rejected_parameter(tmp_path, claude_server):
    from stages.common.claude import ClaudeClient, ClaudeFatalError
    from stages.common.config import AnthropicConfig

    claude_server.reject_param("temperature")
    client = ClaudeClient(AnthropicConfig(temperature=0.0, concurrency=2), tmp_path, progress=False)
    judge = ev.ClaudeJudge(client, "cold")
    with pytest.raises(ClaudeFatalError, match="deprecated for this model.*judge_temperature"):
        judge([f"q{i}" for i in range(5)], {m: [f"{m} {i}" for i in range(5)] for m in ev.MODELS})
    assert claude_server.arrivals <= 3 and claude_server.answered == 0  # not all 20, nothing retried
