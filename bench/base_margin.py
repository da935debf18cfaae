"""Does the tiny base prefer the generic answer on `heldout`, per token too? Retrain it with other base params.

Trains the tiny base (`stages.base.base`, params.yaml's `base` section with the overrides given) into a
temporary folder, or scores an existing model folder, on the DPO pairs of a split that `validate` wrote
(data/clean/dpo_<split>.jsonl): the mean summed and per-token margin log P(persona) - log P(generic), the
share of pairs the persona wins per token, the mean log-prob per token of each side, and where the
per-token difference comes from (the first sentence, which names the subject, vs the rest; the first token).

    python -m bench.base_margin --set epochs=3 --set corpus_size=1500      # after `dvc repro validate`
    python -m bench.base_margin --set seed=1
    python -m bench.base_margin --model models/base --split eval
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.base import base
from stages.common.config import load_params
from stages.common.engine import load_for_inference
from stages.common.io import read_jsonl

_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")


def token_logps(model: Any, tokenizer: Any, prompt: str, response: str) -> tuple[np.ndarray, list[int]]:
    """Log-prob of each response token (end-of-turn included) and each token's start offset in response."""
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    full = tokenizer(prompt + response + tokenizer.eos_token, add_special_tokens=False, return_offsets_mapping=True)
    ids = full["input_ids"]
    with torch.no_grad():
        logps = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    out = np.array([logps[i - 1, ids[i]].item() for i in range(n_prompt, len(ids))])
    return out, [full["offset_mapping"][i][0] - len(prompt) for i in range(n_prompt, len(ids))]


def score(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Margins and where they come from, over DPO rows ({prompt: messages, chosen, rejected})."""
    parts: dict[str, dict[str, list[float]]] = {s: {"first_sentence": [], "rest": [], "first_token": []}
                                                for s in ("chosen", "rejected")}
    summed, per_token, mean = [], [], {"chosen": [], "rejected": []}
    model.eval()
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        side = {}
        for name in ("chosen", "rejected"):
            logps, starts = token_logps(model, tokenizer, prompt, row[name])
            m = _SENTENCE_END.search(row[name])
            end = m.end() if m else len(row[name])
            for lp, start in zip(logps[:-1], starts[:-1], strict=True):
                parts[name]["first_sentence" if start < end else "rest"].append(float(lp))
            parts[name]["first_token"].append(float(logps[0]))
            side[name] = logps
            mean[name].append(float(logps.mean()))
        summed.append(side["chosen"].sum() - side["rejected"].sum())
        per_token.append(side["chosen"].mean() - side["rejected"].mean())
    out = {"pairs": len(rows), "reward_margin": float(np.mean(summed)),
           "reward_margin_per_token": float(np.mean(per_token)),
           "reward_accuracy_per_token": float(np.mean(np.array(per_token) > 0)),
           "logp_per_token_chosen": float(np.mean(mean["chosen"])),
           "logp_per_token_rejected": float(np.mean(mean["rejected"]))}
    for part in ("first_sentence", "rest", "first_token"):
        out[f"{part}_difference"] = float(np.mean(parts["chosen"][part]) - np.mean(parts["rejected"][part]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override of params.yaml's base section (repeatable)")
    parser.add_argument("--model", type=Path, help="score this model folder instead of training one")
    parser.add_argument("--split", default="heldout", choices=("heldout", "eval"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    params = load_params()
    rows = read_jsonl(params.paths.clean / f"dpo_{args.split}.jsonl")
    overrides = {k: v for k, v in (s.split("=", 1) for s in args.set)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder is None:
            cfg = params.base.model_validate({**params.base.model_dump(), **overrides})
            folder = Path(tmp) / "base"
            base(params.model, cfg, folder, None, params.heldout, params.generate.persona.offline)
        model, tokenizer = load_for_inference(folder)
        out = {"model": str(args.model or "tiny base"), "overrides": overrides, "split": args.split,
               **score(model, tokenizer, rows)}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
