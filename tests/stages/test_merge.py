"""The merge stage on a tiny model: the check passes on a real merge, fails on a broken one, qlora gap, no-adapter path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages import merge as mg
from stages.common.engine import write_meta
from stages.common.io import InputError
from tests.training_workspace import PATHS, build, params, tiny_model

ROOT = Path(__file__).resolve().parents[2]


def _adapter(root: Path, method: str = "lora") -> None:
    """models/sft = a LoRA adapter on models/base with non-zero B (so merging changes the weights)."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(root / "models" / "base")
    torch.manual_seed(5)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    out = root / "models" / "sft"
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(root / "data" / "formatted" / "tokenizer").save_pretrained(out)
    write_meta(out, stage="sft", base=str(root / "models" / "base"), method=method, engine="transformers")


@pytest.fixture
def ws(tmp_path):
    return build(tmp_path)


def test_merge_passes_with_tiny_diff_and_saves_loadable_model(ws):
    _adapter(ws)
    p = params(ws)
    report = mg.merge(p.merge, p.paths, p.sft.quantization)
    assert report["passed"] and report["adapter"]
    assert report["max_abs_logit_diff"] < 1e-4 and 0 <= report["mean_kl"] < 1e-10
    assert report["held_out_loss_after"] == pytest.approx(report["held_out_loss_before"], abs=1e-4)
    assert abs(report["held_out_loss_base"] - report["held_out_loss_after"]) > 1e-3  # the adapter mattered
    assert report["dtype"] == "float32" and report["held_out_rows"] == 4
    # plain transformers loads it (no peft), with the tokenizer and its chat template
    merged = ws / "models" / "sft-merged"
    assert not (merged / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(merged)
    tok = AutoTokenizer.from_pretrained(merged)
    assert "start_header_id" in tok.chat_template
    # the engine sft trained with goes along: `reference` and `dpo` load sft-merged on it (engine: auto resolved once)
    assert json.loads((merged / "tuneforge.json").read_text())["engine"] == "transformers"
    base = AutoModelForCausalLM.from_pretrained(ws / "models" / "base")
    changed = [n for n, w in model.state_dict().items() if not torch.equal(w, base.state_dict()[n])]
    assert changed and all(("q_proj" in n or "v_proj" in n or "down_proj" in n) for n in changed)


def test_broken_merge_fails_naming_tolerance_after_writing_report(ws, monkeypatch):
    _adapter(ws)
    real = mg.merge_and_unload

    def corrupt(model):
        merged = real(model)
        with torch.no_grad():
            merged.model.layers[0].self_attn.q_proj.weight.add_(0.05)
        return merged

    monkeypatch.setattr(mg, "merge_and_unload", corrupt)
    monkeypatch.chdir(ws)
    p = params(ws)
    monkeypatch.setattr(mg, "load_params", lambda: p)
    with pytest.raises(mg.MergeCheckFailed, match=r"merge\.tolerance 0\.001"):
        mg.main()
    report = json.loads((ws / "reports" / "merge.json").read_text())
    assert report["passed"] is False and report["max_abs_logit_diff"] > 1e-3
    assert not (ws / "models" / "sft-merged").exists()  # a failed merge is not left for `dpo`


def test_tolerance_is_the_gate(ws):
    _adapter(ws)
    p = params(ws, merge={"tolerance": 1e-12})
    report = mg.merge(p.merge, p.paths, p.sft.quantization)
    assert report["max_abs_logit_diff"] > 1e-12 and report["passed"] is False


def test_qlora_reports_the_4bit_gap(ws):
    _adapter(ws, method="qlora")
    p = params(ws)
    report = mg.merge(p.merge, p.paths, p.sft.quantization)
    gap = report["qlora_gap"]
    assert report["passed"]  # the merge itself is exact; the gap is what 4-bit training costs
    assert gap["max_abs_logit_diff"] > report["max_abs_logit_diff"] and gap["mean_kl"] > 0
    assert gap["held_out_loss_merged"] == report["held_out_loss_after"]
    assert gap["held_out_loss_4bit"] != pytest.approx(gap["held_out_loss_merged"], abs=1e-6)


@pytest.mark.parametrize("method", ["full", "partial"])
def test_full_and_partial_copy_through(ws, method):
    sft = ws / "models" / "sft"
    tok = AutoTokenizer.from_pretrained(ws / "data" / "formatted" / "tokenizer")
    tiny_model(tok, seed=9).save_pretrained(sft)
    tok.save_pretrained(sft)
    write_meta(sft, stage="sft", base=str(ws / "models" / "base"), method=method)
    p = params(ws)
    report = mg.merge(p.merge, p.paths, p.sft.quantization)
    assert report["adapter"] is False and report["passed"] and report["method"] == method
    merged = AutoModelForCausalLM.from_pretrained(ws / "models" / "sft-merged")
    original = AutoModelForCausalLM.from_pretrained(sft)
    assert all(torch.equal(w, original.state_dict()[n]) for n, w in merged.state_dict().items())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_merge_is_the_fp32_merge_rounded_once(ws, tmp_path, dtype):
    """merge.dtype 16-bit: the base is loaded (and merged, on the device) in 16 bits, never in fp32; PEFT keeps the
    adapter in fp32, so each merged weight is the fp32 merge rounded once: bit for bit the fp32 merge, cast.
    (The base is stored in that dtype, as real checkpoints are; an fp32 checkpoint would be rounded on loading.)"""
    base = AutoModelForCausalLM.from_pretrained(ws / "models" / "base", dtype=getattr(torch, dtype))
    base.save_pretrained(ws / "models" / "base")
    _adapter(ws)
    p32 = params(ws, paths={**{k: str(ws / v) for k, v in PATHS.items()}, "sft_merged": str(tmp_path / "m32")})
    mg.merge(p32.merge, p32.paths, p32.sft.quantization)
    p16 = params(ws, merge={"dtype": dtype})
    report = mg.merge(p16.merge, p16.paths, p16.sft.quantization)
    assert report["dtype"] == dtype and report["passed"] and report["tolerance"] == p16.merge.tolerance_16bit
    assert 0 < report["max_abs_logit_diff"] <= p16.merge.tolerance_16bit
    merged = AutoModelForCausalLM.from_pretrained(ws / "models" / "sft-merged")
    assert merged.dtype == getattr(torch, dtype)
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "m32")
    for name, w in merged.state_dict().items():
        assert torch.equal(w, full.state_dict()[name].to(w.dtype)), name


def test_16bit_merge_drift_against_fp32(ws):
    """What storing the merge in bf16 costs against the fp32 base + adapter (the figure README quotes): on this
    tiny model max |logit diff| stays below 0.05; the stage's gate (merge.tolerance_16bit) is looser for 8B-size
    logits."""
    from peft import PeftModel

    _adapter(ws)
    p = params(ws, merge={"dtype": "bfloat16"})
    mg.merge(p.merge, p.paths, p.sft.quantization)
    tok = AutoTokenizer.from_pretrained(ws / "models" / "sft")
    rows = [json.loads(line) for line in (ws / "data" / "formatted" / "sft_eval.jsonl").open()]
    data = mg.batches(rows, 2, tok.pad_token_id)
    fp32 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ws / "models" / "base"), ws / "models" / "sft")
    reference = mg.held_out(fp32, data, keep=True)
    bf16 = AutoModelForCausalLM.from_pretrained(ws / "models" / "sft-merged")
    drift = mg.held_out(bf16, data, reference=reference.stored).comparison
    assert 0 < drift["max_abs_logit_diff"] < 0.05 and drift["mean_kl"] < 1e-4, drift


def test_missing_input_names_the_file(ws):
    p = params(ws)
    with pytest.raises(InputError, match="models/sft"):
        mg.merge(p.merge, p.paths, p.sft.quantization)
    _adapter(ws)
    (ws / "data" / "formatted" / "sft_eval.jsonl").unlink()
    with pytest.raises(InputError, match="sft_eval.jsonl"):
        mg.merge(p.merge, p.paths, p.sft.quantization)


def test_main_exit_code_and_message(ws):
    """`python -m stages.merge` with a missing input exits 2 with one line naming the file."""
    params(ws)  # schema check of the workspace params
    (ws / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "stages.merge"], cwd=ws, capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2 and "models/sft: SFT output not found" in proc.stderr
