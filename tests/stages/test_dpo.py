"""The reference and dpo stages on a tiny model: stored reference log-probs equal TRL's own, DPO trains on them
without any reference forward, the reference is recorded by hash, stale or missing inputs are named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages import dpo as dpo_stage
from stages import reference as ref_stage
from stages.common.io import InputError, hash_dir, read_jsonl
from tests.training_workspace import build, params

TRAINER = {"per_device_train_batch_size": 2, "per_device_eval_batch_size": 2, "gradient_accumulation_steps": 1,
           "max_steps": 12, "learning_rate": 5e-3, "lr_scheduler_type": "constant", "warmup_steps": 0,
           "logging_steps": 1, "eval_strategy": "no", "save_strategy": "no", "seed": 0}


@pytest.fixture
def ws(tmp_path):
    """The tiny workspace with models/sft-merged = a copy of the tiny base (the DPO reference)."""
    root = build(tmp_path)
    shutil.copytree(root / "models" / "base", root / "models" / "sft-merged")
    return root


def _params(root: Path, max_seq_length: int = 256, **dpo):
    return params(root, model={"max_seq_length": max_seq_length}, dpo={"beta": 0.1, "trainer": TRAINER, **dpo},
                  reference={"batch_size": 3})


def _count_reference_forwards(monkeypatch) -> list[int]:
    """TRL's implicit reference (adapter disabled) goes through trl.trainer.dpo_trainer.use_adapter: count it."""
    import trl.trainer.dpo_trainer as trl_dpo

    calls = [0]
    real = trl_dpo.use_adapter

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(trl_dpo, "use_adapter", counted)
    return calls


@pytest.mark.parametrize("max_length", [256, 36, 28])  # 36 truncates most pairs; 28: TRL drops 3 prompts
def test_stored_logps_equal_trls_own_precomputed(ws, tmp_path, max_length):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import DPOConfig, DPOTrainer

    from stages.common.engine import use_torch_logprob_without_cuda

    p = _params(ws, max_seq_length=max_length)
    ref_stage.reference(p.reference, p.paths, p.dpo, p.sft, p.model)
    stored = read_jsonl(ws / "data" / "reference_logps" / "dpo_train.jsonl")
    if max_length == 36:  # most pairs truncated (keep_start, in TRL's collator)
        assert sum(r["prompt_tokens"] + r["chosen_tokens"] > 36 for r in stored) >= 4

    use_torch_logprob_without_cuda()
    model = AutoModelForCausalLM.from_pretrained(ws / "models" / "sft-merged")
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    rows = read_jsonl(ws / "data" / "formatted" / "dpo_train.jsonl")
    ds = Dataset.from_list([{k: r[k] for k in ("id", "prompt", "chosen", "rejected")} for r in rows])
    args = DPOConfig(output_dir=str(tmp_path / "trl"), precompute_ref_log_probs=True, max_length=max_length,
                     per_device_train_batch_size=4, report_to=[], use_cpu=True, bf16=False)
    trainer = DPOTrainer(model=policy, args=args, train_dataset=ds,
                         processing_class=AutoTokenizer.from_pretrained(ws / "models" / "sft-merged"))
    trl_chosen = trainer.train_dataset["ref_chosen_logps"]
    trl_rejected = trainer.train_dataset["ref_rejected_logps"]
    assert [r["id"] for r in stored] == trainer.train_dataset["id"]  # the pairs TRL keeps, in order
    assert len(stored) == (3 if max_length == 28 else 6)
    for ours, c, r in zip(stored, trl_chosen, trl_rejected, strict=True):
        assert ours["ref_chosen_logps"] == pytest.approx(c, abs=1e-4)
        assert ours["ref_rejected_logps"] == pytest.approx(r, abs=1e-4)
    assert len({round(r["ref_chosen_logps"], 3) for r in stored}) > 1  # real, distinct numbers


def test_dpo_trains_on_stored_reference_without_reference_forward(ws, monkeypatch):
    p = _params(ws)
    ref_stage.reference(p.reference, p.paths, p.dpo, p.sft, p.model)
    calls = _count_reference_forwards(monkeypatch)
    report = dpo_stage.dpo(p.dpo, p.sft, p.model, p.paths)
    assert calls[0] == 0  # no reference forward: neither in training nor in the final evaluation
    assert report["sft_merged_sha256"] == hash_dir(ws / "models" / "sft-merged")
    assert report["sft_merged"] == str(ws / "models" / "sft-merged")
    assert report["ref_logps"].startswith("stored")
    assert report["quantization"] == "none" and report["gradient_checkpointing"] is True  # lora SFT: 16-bit DPO
    assert report["final_loss"] < report["first_loss"] - 0.05, report
    assert report["eval_rewards_margins"] > 0 and report["peak_rss_mb"] > 0
    assert (ws / "models" / "dpo" / "adapter_config.json").exists()
    meta = json.loads((ws / "models" / "dpo" / "tuneforge.json").read_text())
    assert meta["sft_merged_sha256"] == report["sft_merged_sha256"]
    history = (ws / "reports" / "dpo_loss.csv").read_text().splitlines()
    assert history[0].startswith("step,loss") and len(history) > 5


@pytest.mark.slow
def test_stored_reference_trains_like_trls_implicit_reference(ws, monkeypatch):
    """Same seed, same data: the loss curve with stored log-probs equals TRL's own reference forward's."""
    p = _params(ws, trainer={**TRAINER, "max_steps": 6})
    ref_stage.reference(p.reference, p.paths, p.dpo, p.sft, p.model)
    stored = dpo_stage.dpo(p.dpo, p.sft, p.model, p.paths)
    stored_curve = (ws / "reports" / "dpo_loss.csv").read_text()
    calls = _count_reference_forwards(monkeypatch)
    shutil.rmtree(ws / "checkpoints")
    online = dpo_stage.dpo(p.dpo, p.sft, p.model, p.paths, ref_logps="adapter")
    assert calls[0] > 0
    for a, b in zip(stored_curve.splitlines()[1:], (ws / "reports" / "dpo_loss.csv").read_text().splitlines()[1:],
                    strict=True):
        assert float(a.split(",")[1]) == pytest.approx(float(b.split(",")[1]), abs=1e-4)
    assert stored["eval_rewards_margins"] == pytest.approx(online["eval_rewards_margins"], abs=1e-4)


# TRL's precompute under bf16 autocast (fp32 weights, the model's matmuls and the LM head's projection in bf16, the
# log-softmax in fp32, as in TRL's kernel) differs from the fp32 oracle by at most 4.2e-4 nats per completion token on
# this workspace's model (fp32: below 1e-5); the tolerance is the bf16 one of tests/stages/test_logprobs.py.
def test_bf16_reference_logps_match_the_fp32_oracle(ws):
    """TRL's precompute under bf16 autocast (dpo.trainer.bf16; on CPU through engine.TorchLogProb, chunked) against
    the fp32 one-at-a-time oracle on the same weights."""
    from stages.common.logprobs import oracle_response_logprobs
    from tests.stages.test_logprobs import BF16_TOLERANCE_PER_TOKEN

    p = _params(ws, trainer={**TRAINER, "bf16": True})
    meta = ref_stage.reference(p.reference, p.paths, p.dpo, p.sft, p.model)
    assert meta["precision"] == "bf16"
    stored = {r["id"]: r for r in read_jsonl(ws / "data" / "reference_logps" / "dpo_train.jsonl")}
    rows = read_jsonl(ws / "data" / "formatted" / "dpo_train.jsonl")
    model = AutoModelForCausalLM.from_pretrained(ws / "models" / "sft-merged")
    tok = AutoTokenizer.from_pretrained(ws / "models" / "sft-merged")
    worst = 0.0
    for side in ("chosen", "rejected"):
        ref = oracle_response_logprobs(model, tok, [r["prompt"] for r in rows], [r[side] for r in rows])
        for r, logp, n in zip(rows, ref.logps, ref.n_tokens, strict=True):
            worst = max(worst, abs(stored[r["id"]][f"ref_{side}_logps"] - logp) / n)
    assert 2e-5 < worst < BF16_TOLERANCE_PER_TOKEN, worst  # > 2e-5: bf16 really ran


def test_after_qlora_reference_and_dpo_load_sft_merged_in_4bit(ws, monkeypatch):
    """dpo.quantization auto: a QLoRA SFT's DPO scores and trains the 4-bit model (NF4, sft.quantization's
    settings), with gradient checkpointing; stored log-probs of the 16-bit model are refused."""
    import bitsandbytes as bnb

    from stages.common import engine

    loaded = []
    real = engine.load_for_training

    def spy(spec):
        model, tok, name = real(spec)
        loaded.append((spec.method, sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())))
        return model, tok, name

    monkeypatch.setattr(ref_stage, "load_for_training", spy)
    monkeypatch.setattr(dpo_stage, "load_for_training", spy)
    p = params(ws, model={"max_seq_length": 256}, sft={"engine": "transformers", "method": "qlora"},
               dpo={"beta": 0.1, "trainer": {**TRAINER, "max_steps": 2}}, reference={"batch_size": 3})
    meta = ref_stage.reference(p.reference, p.paths, p.dpo, p.sft, p.model)
    report = dpo_stage.dpo(p.dpo, p.sft, p.model, p.paths)
    assert meta["quantization"] == report["quantization"] == "nf4" and report["gradient_checkpointing"] is True
    assert [m for m, _ in loaded] == ["qlora", "qlora"] and all(n == 7 * 2 for _, n in loaded)  # 7 linears x 2 blocks
    sixteen = p.dpo.model_copy(update={"quantization": "none"})
    with pytest.raises(InputError, match="another quantization"):
        dpo_stage.dpo(sixteen, p.sft, p.model, p.paths)


def test_stale_reference_is_refused(ws):
    p = _params(ws)
    ref_stage.reference(p.reference, p.paths, p.dpo, p.sft, p.model)
    other = AutoModelForCausalLM.from_pretrained(ws / "models" / "sft-merged")
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)
    other.save_pretrained(ws / "models" / "sft-merged")
    with pytest.raises(InputError, match=r"tuneforge\.json: .*another sft_merged_sha256.*dvc repro reference"):
        dpo_stage.dpo(p.dpo, p.sft, p.model, p.paths)
    # another truncation length = other numbers
    ref_stage.reference(p.reference, p.paths, p.dpo, p.sft, p.model)
    q = _params(ws, max_seq_length=32)
    with pytest.raises(InputError, match="another max_length"):
        dpo_stage.dpo(q.dpo, q.sft, q.model, q.paths)
    unsloth = p.sft.model_copy(update={"engine": "unsloth"})  # another engine computes other numbers
    with pytest.raises(InputError, match="another engine"):
        dpo_stage.dpo(p.dpo, unsloth, p.model, p.paths)


def test_missing_inputs_name_the_file(ws):
    p = _params(ws)
    with pytest.raises(InputError, match="data/reference_logps: stored DPO reference log-probs not found"):
        dpo_stage.dpo(p.dpo, p.sft, p.model, p.paths)
    (ws / "data" / "formatted" / "dpo_eval.jsonl").unlink()
    with pytest.raises(InputError, match="dpo_eval.jsonl"):
        ref_stage.reference(p.reference, p.paths, p.dpo, p.sft, p.model)
    shutil.rmtree(ws / "models" / "sft-merged")
    with pytest.raises(InputError, match="models/sft-merged: merged SFT model"):
        ref_stage.reference(p.reference, p.paths, p.dpo, p.sft, p.model)


# -- DVC: the stored log-probs are their own output, so a beta change reruns dpo but not reference ---------------

def _fake_outputs(repo: Path) -> None:
    """Placeholder files for every declared output, so `dvc commit` can record a finished pipeline."""
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())
    paths = yaml.safe_load((repo / "params.yaml").read_text())["paths"]
    for stage in spec["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for out in stage.get(kind, []):
                name = next(iter(out)) if isinstance(out, dict) else out
                for key, value in paths.items():
                    name = name.replace("${paths." + key + "}", value)
                target = repo / name
                if target.suffix:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text("{}\n")
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    (target / "placeholder").write_text("x\n")
    for name in ("dpo_train.jsonl", "dpo_eval.jsonl", "sft_eval.jsonl"):
        (repo / paths["formatted"] / name).write_text("{}\n")


@pytest.mark.slow
def test_beta_change_reruns_dpo_not_reference(tmp_path):
    from tests.repo import dvc, make_repo, set_params, stages_run

    repo = make_repo(tmp_path / "repo")
    _fake_outputs(repo)
    dvc("commit", "-f", cwd=repo)
    assert stages_run(dvc("repro", "--dry", cwd=repo).stdout) == []
    set_params(repo, {"dpo": {"beta": 0.05}})
    assert sorted(stages_run(dvc("repro", "--dry", cwd=repo).stdout)) == ["dpo", "evaluate"]
    set_params(repo, {"dpo": {"beta": 0.1}, "model": {"max_seq_length": 128}})  # truncation: reference reruns
    assert "reference" in stages_run(dvc("repro", "--dry", cwd=repo).stdout)
