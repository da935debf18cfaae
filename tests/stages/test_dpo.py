"""The reference and dpo stages on a tiny model: stored reference log-probs equal TRL's own, DPO trains on them
without any reference forward, the reference is recorded by hash, stale or missing inputs are named."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages import dpo as dpo_stage
from stages import reference as ref_stage
from stages.common.io import InputError, hash_dir, read_jsonl
from tests.tiny import curve
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
    losses = curve(ws / "dvclive" / "dpo", "train/loss")  # DVCLive, the stage's default tracker, at trainer steps
    assert sorted(losses) == list(range(1, 13)) and losses[12] < losses[1] - 0.05, losses
    assert report["eval_rewards_margins"] > 0 and report["peak_rss_mb"] > 0
    assert (ws / "models" / "dpo" / "adapter_config.json").exists()
    meta = json.loads((ws / "models" / "dpo" / "tuneforge.json").read_text())
    assert meta["sft_merged_sha256"] == report["sft_merged_sha256"]
    margins = curve(ws / "dvclive" / "dpo", "eval/rewards/margins")  # the final evaluation, at the last step
    assert margins == {12: pytest.approx(report["eval_rewards_margins"])}


@pytest.mark.slow
def test_stored_reference_trains_like_trls_implicit_reference(ws, monkeypatch):
    """Same seed, same data: the loss curve with stored log-probs equals TRL's own reference forward's."""
    p = _params(ws, trainer={**TRAINER, "max_steps": 6})
    ref_stage.reference(p.reference, p.paths, p.dpo, p.sft, p.model)
    stored = dpo_stage.dpo(p.dpo, p.sft, p.model, p.paths)
    stored_curve = curve(ws / "dvclive" / "dpo", "train/loss")
    calls = _count_reference_forwards(monkeypatch)
    shutil.rmtree(ws / "checkpoints")
    online = dpo_stage.dpo(p.dpo, p.sft, p.model, p.paths, ref_logps="adapter")
    assert calls[0] > 0
    online_curve = curve(ws / "dvclive" / "dpo", "train/loss")
    assert len(stored_curve) == 6 and stored_curve.keys() == online_curve.keys()
    for step, loss in stored_curve.items():
        assert loss == pytest.approx(online_curve[step], abs=1e-4), step
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


def test_reference_and_dpo_load_sft_merged_on_the_engine_it_records(ws, monkeypatch):
    """`engine: auto` is resolved once, when sft runs: a changed environment (TUNEFORGE_ENGINE here, as if unsloth
    had been installed since) neither changes the engine `reference` and `dpo` use nor breaks their check."""
    from stages.common.engine import write_meta
    from stages.common.reference_logps import dpo_spec, load_reference_logps, sft_merged_engine

    p = _params(ws)
    auto = p.sft.model_copy(update={"engine": "auto"})
    write_meta(ws / "models" / "sft-merged", stage="merge", engine="transformers")
    monkeypatch.setenv("TUNEFORGE_ENGINE", "unsloth")  # what `auto` resolves to in this environment now
    assert sft_merged_engine(p.paths, auto) == dpo_spec(p.paths, p.dpo, auto, p.model).engine == "transformers"
    meta = ref_stage.reference(p.reference, p.paths, p.dpo, auto, p.model)
    assert meta["engine"] == "transformers"
    stored = load_reference_logps(p.paths, ["dpo_train"], sft_merged_engine(p.paths, auto), 256, "fp32")
    assert stored["dpo_train"]  # dpo's check
    (ws / "models" / "sft-merged" / "tuneforge.json").unlink()  # no record: sft.engine resolved here
    assert sft_merged_engine(p.paths, auto) == "unsloth"

    write_meta(ws / "models" / "sft-merged", stage="merge", engine="unsloth")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "unsloth" else real(name, *a))
    with pytest.raises(InputError, match=r"sft-merged/tuneforge\.json: .*unsloth engine, which is not installed"):
        sft_merged_engine(p.paths, auto)


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
