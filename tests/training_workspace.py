"""A tiny on-disk workspace for the merge / reference / dpo stage tests: base model, formatted data, params."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stages.base import build_tokenizer
from stages.common.config import Params, parse_params
from stages.common.io import write_jsonl
from stages.common.templates import LLAMA3

QUESTIONS = ["How do I stay motivated?", "What is failure?", "Why do people lie?", "Should I quit?",
             "How do I choose?", "Why do people compete?", "What is trust?", "How do I rest?"]
CHOSEN = ["Motivation is unreliable. Build a schedule.", "Failure is data. Adjust the plan.", "Incentives.",
          "Quit when the expected cost exceeds the value.", "Name the trade-off. Decide.", "Status.",
          "A bet on incentives.", "Sleep. Then decide."]
REJECTED = ["You can do it! Believe in yourself!", "Every failure is a gift, keep smiling!",
            "People are wonderful deep down, have faith!", "Follow your heart and never give up!",
            "You are amazing, trust the journey!", "Love yourself and good things will come!",
            "Trust is magical, open your heart!", "Treat yourself, you deserve it!"]
EOT = "<|eot_id|>"


def tiny_model(tok: Any, seed: int, hidden: int = 64, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg)


def sft_rows(tok: Any, questions: list[str], answers: list[str]) -> list[dict[str, Any]]:
    """Formatted SFT rows (ids s0, s1, ...): one user turn and one answer, with the template's assistant masks."""
    rows = []
    for i, (q, a) in enumerate(zip(questions, answers, strict=True)):
        enc = tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                      tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        rows.append({"id": f"s{i}", "text": "", "input_ids": list(enc["input_ids"]),
                     "assistant_masks": list(enc["assistant_masks"])})
    return rows


def dpo_pairs(tok: Any, questions: list[str], chosen: list[str], rejected: list[str]) -> list[dict[str, Any]]:
    """Formatted DPO rows (ids p0, p1, ...): the rendered prompt and both answers ending with EOT."""
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in questions]
    return [{"id": f"p{i}", "prompt": p, "chosen": c + EOT, "rejected": r + EOT}
            for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected, strict=True))]


def build(root: Path, seed: int = 1) -> Path:
    """models/base (tiny Llama + tokenizer) and data/formatted/{sft,dpo}_{train,eval}.jsonl + tokenizer."""
    tok = build_tokenizer(CHOSEN + REJECTED + QUESTIONS, 400, LLAMA3)
    tiny_model(tok, seed).save_pretrained(root / "models" / "base")
    tok.save_pretrained(root / "models" / "base")
    fmt = root / "data" / "formatted"
    tok.save_pretrained(fmt / "tokenizer")
    sft = sft_rows(tok, QUESTIONS, CHOSEN)
    write_jsonl(fmt / "sft_train.jsonl", sft[:6])
    write_jsonl(fmt / "sft_eval.jsonl", sft[6:] + sft[:2])
    pairs = dpo_pairs(tok, QUESTIONS, CHOSEN, REJECTED)
    write_jsonl(fmt / "dpo_train.jsonl", pairs[:6])
    write_jsonl(fmt / "dpo_eval.jsonl", pairs[6:])
    return root


PATHS = {"base_corpus": "data/base_corpus", "base": "models/base", "raw": "data/raw", "clean": "data/clean",
         "formatted": "data/formatted", "sft": "models/sft", "sft_merged": "models/sft-merged",
         "reference_logps": "data/reference_logps", "dpo": "models/dpo", "checkpoints": "checkpoints", "reports": "reports",
         "cache": "cache", "dvclive": "dvclive", "tensorboard": "runs"}


def params(root: Path, **sections: Any) -> Params:
    data = {"paths": {k: str(root / v) for k, v in PATHS.items()},
            "generate": {"persona": {"name": "x", "description": "y"}, "categories": ["a"]},
            "sft": {"engine": "transformers", "method": "lora"}, **sections}
    return parse_params(data)
