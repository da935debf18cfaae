"""Score the pipeline's base, SFT and DPO models on hand-written persona vs generic answers.

A proxy for answers written outside the project: 40 pairs (a question, an answer in the persona's
style, one in the generic assistant's) written by hand in ordinary English, not from the offline
grammar's frames or lexicon, and in no training source (tests/stages/test_handwritten.py checks
the longest n-gram they share with the grammar). Each prompt is rendered with and without the
persona's system prompt. Per model: mean summed and per-token margin log P(persona) - log P(generic)
and the share of pairs where the persona answer wins.

    python -m bench.handwritten                      # after `dvc repro`; models from params.yaml paths
    python -m bench.handwritten --json reports/handwritten.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from stages.common.config import load_params
from stages.common.engine import load_for_inference
from stages.common.io import read_jsonl
from stages.common.logprobs import pair_logprobs

PAIRS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "data" / "handwritten_pairs.jsonl"


def score(model: Any, tokenizer: Any, rows: list[dict[str, Any]], system: str | None) -> dict[str, float]:
    eot = tokenizer.eos_token
    prompts = [tokenizer.apply_chat_template(([{"role": "system", "content": system}] if system else [])
                                             + [{"role": "user", "content": r["question"]}],
                                             tokenize=False, add_generation_prompt=True) for r in rows]
    chosen, rejected = pair_logprobs(model, tokenizer, prompts, [r["persona"] + eot for r in rows],
                                     [r["generic"] + eot for r in rows], batch_size=16)
    c, r = np.array(chosen.logps), np.array(rejected.logps)
    per_token = c / np.array(chosen.n_tokens) - r / np.array(rejected.n_tokens)
    return {"reward_margin": float(np.mean(c - r)), "reward_accuracy": float(np.mean(c - r > 0)),
            "reward_margin_per_token": float(np.mean(per_token)),
            "reward_accuracy_per_token": float(np.mean(per_token > 0))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=Path, default=PAIRS)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    params = load_params()
    rows = read_jsonl(args.pairs)
    system = f"You are {params.generate.persona.name}. {params.generate.persona.description}"
    dirs = {"base": params.paths.base, "sft": params.paths.sft_merged, "dpo": params.paths.dpo}
    out: dict[str, Any] = {"pairs": len(rows), "file": str(args.pairs), "with_system_prompt": {},
                           "without_system_prompt": {}}
    for name, path in dirs.items():
        model, tokenizer = load_for_inference(path)
        out["with_system_prompt"][name] = score(model, tokenizer, rows, system)
        out["without_system_prompt"][name] = score(model, tokenizer, rows, None)
    print(f"{len(rows)} hand-written pairs ({args.pairs})")
    for mode in ("with_system_prompt", "without_system_prompt"):
        print(f"\n{mode.replace('_', ' ')}\n| model | margin | accuracy | margin / token | accuracy / token |")
        print("|---|---:|---:|---:|---:|")
        for name, m in out[mode].items():
            print(f"| {name} | {m['reward_margin']:.3f} | {m['reward_accuracy']:.2f} | "
                  f"{m['reward_margin_per_token']:.4f} | {m['reward_accuracy_per_token']:.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
