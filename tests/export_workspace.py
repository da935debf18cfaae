"""A tiny workspace the export and chat tests share: sft-merged (random tiny Llama), a DPO adapter on it
recorded by a relative base path as the pipeline records it, held-out prompts (formatted and clean), reports.

`build(root)` writes it; `exported(root)` runs the export stage on it in-process (a session fixture in
tests/conftest.py does both once).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml

from stages.base import build_tokenizer
from stages.common.config import Params, parse_params
from stages.common.engine import write_meta
from stages.common.io import write_json, write_jsonl
from stages.common.templates import LLAMA3
from tests.training_workspace import CHOSEN, PATHS, QUESTIONS, REJECTED, tiny_model

SYSTEM = "You are Vex. Cold and brief."
# Digits and spaces next to them, so the tokenizer learns merges a wrong pre-tokenizer cannot reproduce.
NUMBERS = ["In 2024 I counted 1234567 and 42 of 3.14, then 2,000 more.", "Numbers 7 42 1234567 3.14 and 2,000"]


def build(root: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    texts = CHOSEN + REJECTED + QUESTIONS + [SYSTEM] + NUMBERS * 20
    tok = build_tokenizer(texts, 500, LLAMA3)
    merged = root / "models" / "sft-merged"
    tiny_model(tok, seed=2).save_pretrained(merged)
    tok.save_pretrained(merged)
    torch.manual_seed(3)
    from transformers import AutoModelForCausalLM

    dpo = get_peft_model(AutoModelForCausalLM.from_pretrained(merged),
                         LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    for name, p in dpo.named_parameters():
        if "lora_B" in name:  # non-zero B: the adapter changes the model, so a lost merge would show
            p.data.normal_(0, 0.2)
    dpo.save_pretrained(root / "models" / "dpo")
    tok.save_pretrained(root / "models" / "dpo")
    write_meta(root / "models" / "dpo", stage="dpo", base="models/sft-merged")  # relative, as `dpo` writes it

    prompts = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS[:3]]
    write_jsonl(root / "data" / "clean" / "dpo_eval.jsonl",
                [{"id": f"p{i}", "prompt": p, "chosen": CHOSEN[i], "rejected": REJECTED[i]} for i, p in enumerate(prompts)])
    write_jsonl(root / "data" / "formatted" / "dpo_eval.jsonl", [
        {"id": f"p{i}", "prompt": tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
         "chosen": CHOSEN[i] + "<|eot_id|>", "rejected": REJECTED[i] + "<|eot_id|>"} for i, p in enumerate(prompts)])
    reports = root / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "eval.md").write_text("# Evaluation\n\n| model | reward margin |\n|---|---|\n| dpo | 1.5 |\n")
    write_json(reports / "generation.json", {"provider": "offline", "sft_rows": 8, "dpo_rows": 3, "cost_usd": 0.0})
    write_json(reports / "validation.json", {"seen": 11, "kept": 11, "rejected": 0, "split": {"dpo_eval": 3}})
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "dpo": {"outs": [{"path": "models/dpo", "md5": "0123abcd.dir"}]},
        "validate": {"outs": [{"path": "data/clean", "md5": "4567cdef.dir"}]}}}))
    return root


def params(root: Path, **export: Any) -> Params:
    """Params with paths relative to root (run with root as the working directory)."""
    return parse_params({
        "paths": {**PATHS, "final": "models/final"},
        "generate": {"persona": {"name": "Vex", "description": "Cold and brief."}, "categories": ["a"]},
        "export": {"samples": 2, "max_new_tokens": 12, **export},
    })


def exported(root: Path, **export: Any) -> dict[str, Any]:
    """Run the export stage in root; its report."""
    from stages.export import export as run_export

    cwd = os.getcwd()
    os.chdir(root)
    try:
        report = run_export(params(root, **export))
        write_json(root / "reports" / "export.json", report)
        return report
    finally:
        os.chdir(cwd)
