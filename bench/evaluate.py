"""Throughput of evaluation log-probs: batched (what `evaluate` runs) vs one example at a time.

Scores the chosen and rejected answers of N held-out preference pairs, built as the default pipeline builds
them (the offline provider's DPO rows with the persona system prompt, rendered by `format.render_dpo`), on
the default tiny model (params `base:` shape, random weights: speed does not depend on training). Prints
pairs/second for

- `pair`: `logprobs.pair_logprobs`, what the `evaluate` stage runs (batched, each prompt once);
- `separate`: `logprobs.response_logprobs` on chosen, then on rejected (batched, each prompt twice);
- `one_at_a_time`: `logprobs.oracle_response_logprobs`, one unpadded sequence per forward pass;

the speed-ups, and a roofline bound: the time the pair path's matrix multiplies alone would take at this
machine's measured fp32 GEMM rate (2048x2048), i.e. the most any fp32 implementation computing the same
model can gain over the one-at-a-time oracle here. The goal of the evaluation issue is >= 4x.

    python -m bench.evaluate [--pairs 64] [--batch-size 16] [--threads N] [--repeats 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from stages.base import build_model, build_tokenizer
from stages.common import offline
from stages.common.config import load_params
from stages.common.logprobs import (
    common_prefix,
    encode_pairs,
    oracle_response_logprobs,
    pair_logprobs,
    response_logprobs,
)
from stages.common.templates import LLAMA3
from stages.format import render_dpo
from stages.generate import generate_offline


def held_out_pairs(n: int, tokenizer: Any) -> tuple[list[str], list[str], list[str]]:
    """N DPO pairs as the default pipeline renders them, every one with the persona system prompt (the
    pipeline gives it to generate.system_prompt_share of them): (prompts, chosen, rejected) texts."""
    cfg = load_params().generate.model_copy(update={"sft_count": 0, "dpo_count": n, "system_prompt_share": 1.0})
    _, dpo, _ = generate_offline(cfg, load_params().heldout)
    rows = [render_dpo(tokenizer, row, "<|eot_id|>") for row in dpo]
    return [r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows]


def timed(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Best wall time of each, interleaved run by run (the machine is shared: the minimum is the least
    disturbed run, and interleaving spreads any slow spell over all of them)."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def gemm_flops_per_s(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def pair_path_matmul_flops(model: Any, tokenizer: Any, prompts, chosen, rejected) -> float:
    """Multiply-add FLOPs of the linear layers the pair path cannot avoid: the shared prompt prefix once,
    every other prompt token once, every answer token but the last as input, and the LM head at scored
    positions only (attention and padding not counted, so the bound is generous)."""
    lm_head = model.get_output_embeddings().weight
    linear = sum(m.weight.numel() for m in model.modules()
                 if isinstance(m, torch.nn.Linear) and m.weight is not lm_head)
    c, r = encode_pairs(tokenizer, prompts, chosen), encode_pairs(tokenizer, prompts, rejected)
    n_prompt = [x.mask.index(1) for x in c]
    shared = min(common_prefix([x.input_ids[:p] for x, p in zip(c, n_prompt, strict=True)]), min(n_prompt) - 1)
    inputs = shared + sum(len(x.input_ids) + len(y.input_ids) - p - shared - 2
                          for x, y, p in zip(c, r, n_prompt, strict=True))
    scored = sum(sum(x.mask) + sum(y.mask) for x, y in zip(c, r, strict=True))
    return 2.0 * (linear * inputs + lm_head.numel() * scored)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)

    cfg = load_params().base
    corpus = offline.base_corpus(300, 0, load_params().heldout, offline.builtin_persona())
    tokenizer = build_tokenizer(offline.corpus_texts(corpus), cfg.vocab_size, LLAMA3)
    model = build_model(cfg, tokenizer, 1024).to(device).eval()
    prompts, chosen, rejected = held_out_pairs(args.pairs, tokenizer)
    bs = args.batch_size

    fns = {
        "pair": lambda: pair_logprobs(model, tokenizer, prompts, chosen, rejected, batch_size=bs),
        "separate": lambda: (response_logprobs(model, tokenizer, prompts, chosen, batch_size=bs),
                             response_logprobs(model, tokenizer, prompts, rejected, batch_size=bs)),
        "one_at_a_time": lambda: (oracle_response_logprobs(model, tokenizer, prompts, chosen),
                                  oracle_response_logprobs(model, tokenizer, prompts, rejected)),
    }
    results = {name: fn() for name, fn in fns.items()}  # warm-up, and the numbers to compare
    best = timed(fns, args.repeats)

    ref_c, ref_r = results["one_at_a_time"]
    pair_c, pair_r = results["pair"]
    diffs = [abs(a - b) for a, b in zip(pair_c.logps + pair_r.logps, ref_c.logps + ref_r.logps, strict=True)]
    prompt_tokens = [e.mask.index(1) for e in encode_pairs(tokenizer, prompts, chosen)]
    gemm = gemm_flops_per_s(device)
    floor_s = pair_path_matmul_flops(model, tokenizer, prompts, chosen, rejected) / gemm
    result = {
        "pairs": args.pairs,
        "batch_size": bs,
        "device": str(device),
        "threads": args.threads,
        "parameters": model.num_parameters(),
        "mean_prompt_tokens": round(sum(prompt_tokens) / len(prompt_tokens), 1),
        "response_tokens": sum(ref_c.n_tokens) + sum(ref_r.n_tokens),
        **{f"{name}_pairs_per_s": round(args.pairs / t, 1) for name, t in best.items()},
        "speedup_pair": round(best["one_at_a_time"] / best["pair"], 2),
        "speedup_separate": round(best["one_at_a_time"] / best["separate"], 2),
        "gemm_gflop_per_s": round(gemm / 1e9, 1),
        "roofline_max_speedup": round(best["one_at_a_time"] / floor_s, 2),
        "max_abs_logp_diff": max(diffs),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
