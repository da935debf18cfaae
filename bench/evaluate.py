"""Throughput of evaluation log-probs: batched (stages.common.logprobs) vs one pair at a time.

Scores chosen and rejected answers of N pairs on the default tiny model (params `base:` shape, random weights:
speed does not depend on training) and prints pairs/second for both and the speed-up. Goal: >= 4x.

    python -m bench.evaluate [--pairs 64] [--batch-size 16] [--threads N] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from stages.base import build_model, build_tokenizer
from stages.common import offline
from stages.common.config import BaseConfig
from stages.common.logprobs import reference_response_logprobs, response_logprobs
from stages.common.templates import LLAMA3


def pairs(n: int, tokenizer) -> tuple[list[str], list[str], list[str]]:
    convs = offline.generic_corpus(n, seed=1)
    persona = offline.persona_text_sample(n, seed=1)
    prompts = [
        tokenizer.apply_chat_template(c[:-1], tokenize=False, add_generation_prompt=True) for c in convs
    ]
    chosen = [p + "<|eot_id|>" for p in persona]
    rejected = [c[-1]["content"] + "<|eot_id|>" for c in convs]
    return prompts, chosen, rejected


def timed(fn, repeats: int) -> tuple[float, object]:
    """Best wall time of `repeats` runs (the machine is shared: the minimum is the least disturbed run)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = BaseConfig()
    corpus = [m["content"] for c in offline.generic_corpus(300, seed=0) for m in c]
    tokenizer = build_tokenizer(corpus + offline.persona_text_sample(100, seed=0), cfg.vocab_size, LLAMA3)
    model = build_model(cfg, tokenizer, 256).eval()
    prompts, chosen, rejected = pairs(args.pairs, tokenizer)

    def batched():
        c = response_logprobs(model, tokenizer, prompts, chosen, batch_size=args.batch_size)
        r = response_logprobs(model, tokenizer, prompts, rejected, batch_size=args.batch_size)
        return c, r

    def one_at_a_time():
        return (
            reference_response_logprobs(model, tokenizer, prompts, chosen),
            reference_response_logprobs(model, tokenizer, prompts, rejected),
        )

    batched()  # warm-up
    t_batched, (bc, br) = timed(batched, args.repeats)
    t_single, (sc, sr) = timed(one_at_a_time, args.repeats)
    diffs = [(abs(a - b), abs(a - b) / abs(b)) for a, b in zip(bc.logps + br.logps, sc.logps + sr.logps, strict=True)]
    tokens = sum(bc.n_tokens) + sum(br.n_tokens)
    result = {
        "pairs": args.pairs,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "parameters": model.num_parameters(),
        "response_tokens": tokens,
        "batched_pairs_per_s": round(args.pairs / t_batched, 1),
        "one_at_a_time_pairs_per_s": round(args.pairs / t_single, 1),
        "speedup": round(t_single / t_batched, 2),
        "max_abs_logp_diff": max(d for d, _ in diffs),
        "max_rel_logp_diff": max(r for _, r in diffs),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
