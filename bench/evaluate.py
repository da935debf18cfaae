"""Throughput of evaluation log-probs: batched (what `evaluate` runs) vs one example at a time.

Scores the chosen and rejected answers of N held-out preference pairs, built as the default pipeline builds
them (the offline provider's DPO rows with the persona system prompt, rendered by `format.render_dpo`), on
the default tiny model (params `base:` shape, random weights: speed does not depend on training). Prints
pairs/second for

- `pair`: `logprobs.pair_logprobs`, what the `evaluate` stage runs (batched, each prompt once);
- `separate`: `logprobs.response_logprobs` on chosen, then on rejected (batched, each prompt twice);
- `one_at_a_time`: `logprobs.oracle_response_logprobs`, one unpadded sequence per forward pass;

- `trl_evaluate`: TRL's own `DPOTrainer.evaluate()` on the same pairs and model with precomputed reference
  log-probs (what a user would otherwise run), its per-pair policy log-probs recorded from the values it logs;

the speed-ups, how much each path raises the process's peak RSS (Linux VmHWM, reset before each run), and a
roofline bound: the time the pair path's matrix multiplies alone would take at this machine's measured fp32
GEMM rate (2048x2048), i.e. the most any fp32 implementation computing the same model can gain over the
one-at-a-time oracle here. The goal of the evaluation issue is >= 4x.
`--shape rehearsal` builds the model of presets/rehearsal-8b-shapes.yaml instead (Llama-3.1-8B's 128,256-token
vocabulary and tokenizer shape, hidden 256): there the LM head dominates the cost.

    python -m bench.evaluate [--shape tiny|rehearsal] [--pairs 64] [--batch-size 16] [--threads N] [--repeats 5]
                             [--device cpu|cuda] [--no-trl]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from stages.base import build_llama31_tokenizer, build_model, build_tokenizer
from stages.common import offline
from stages.common.config import PARAMS_FILE, deep_merge, load_params, parse_params, read_yaml
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

REHEARSAL = Path(__file__).resolve().parents[1] / "presets" / "rehearsal-8b-shapes.yaml"


def held_out_pairs(n: int, tokenizer: Any) -> tuple[list[str], list[str], list[str]]:
    """N DPO pairs as the default pipeline renders them, every one with the persona system prompt (the
    pipeline gives it to generate.system_prompt_share of them): (prompts, chosen, rejected) texts."""
    cfg = load_params().generate.model_copy(update={"sft_count": 0, "dpo_count": n, "system_prompt_share": 1.0})
    _, dpo, _ = generate_offline(cfg, load_params().heldout)
    rows = [render_dpo(tokenizer, row, "<|eot_id|>") for row in dpo]
    return [r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows]


def _kb(key: str) -> int:
    import re

    try:
        return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
    except (OSError, AttributeError):  # not Linux
        return 0


def timed(fns: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Best wall time of each, interleaved run by run (the machine is shared: the minimum is the least
    disturbed run, and interleaving spreads any slow spell over all of them), and the most each run raised the
    process's peak RSS above what it held before it (MB; Linux only)."""
    best = dict.fromkeys(fns, float("inf"))
    peak = dict.fromkeys(fns, 0.0)
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            try:
                Path("/proc/self/clear_refs").write_text("5")  # the peak restarts from the current RSS
            except OSError:
                pass
            before = _kb("VmRSS")
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
            peak[name] = max(peak[name], round((_kb("VmHWM") - before) / 1024, 1))
    return best, peak


class TrlEvaluate:
    """TRL's `DPOTrainer.evaluate()` on the pairs with precomputed reference log-probs (as the `dpo` stage hands
    them to TRL), recording the per-pair policy log-probs TRL logs as logps/chosen and logps/rejected."""

    def __init__(self, model: Any, tokenizer: Any, prompts, chosen, rejected, batch_size: int, device: str):
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        from stages.common.engine import use_torch_logprob_without_cuda
        from stages.common.training import trl_text_rows

        use_torch_logprob_without_cuda()
        rows = [{"prompt": p, "chosen": c, "rejected": r, "ref_chosen_logps": 0.0, "ref_rejected_logps": 0.0}
                for p, c, r in zip(prompts, chosen, rejected, strict=True)]
        self.tmp = tempfile.mkdtemp(prefix="bench-trl-eval-")
        args = DPOConfig(output_dir=self.tmp, per_device_eval_batch_size=batch_size, max_length=None, report_to=[],
                         use_cpu=device == "cpu", bf16=False, disable_tqdm=True, dataloader_drop_last=False)
        # a reference model object so TRL looks for none on the hub; it never runs (precomputed log-probs)
        self.trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, processing_class=tokenizer,
                                  train_dataset=Dataset.from_list(trl_text_rows(tokenizer, rows[:1])),
                                  eval_dataset=Dataset.from_list(trl_text_rows(tokenizer, rows)))
        self.trainer.precompute_ref_logps = True  # read the reference columns, as `dpo` does
        from transformers.trainer_callback import PrinterCallback

        self.trainer.remove_callback(PrinterCallback)  # stdout is the benchmark's JSON
        self.gathered: list[torch.Tensor] = []
        gather = self.trainer.accelerator.gather

        def recording(tensor):
            self.gathered.append(tensor.detach().float().cpu())
            return gather(tensor)

        self.trainer.accelerator.gather = recording

    def __call__(self) -> dict[str, float]:
        self.gathered.clear()
        self.metrics = self.trainer.evaluate()
        return self.metrics

    def logps(self) -> tuple[list[float], list[float]]:
        """Per-pair (chosen, rejected) policy log-probs of the last evaluate(). trl 1.15 gathers seven per-pair
        tensors per batch: _compute_loss's chosen and rejected rewards, accuracies, margins, chosen and rejected
        log-probs, then the evaluation loop's losses; checked against the logps/chosen mean TRL reports."""
        per_pair = [t for t in self.gathered if t.dim() == 1]  # scalars are token counts
        per_step = 7
        assert per_pair and len(per_pair) % per_step == 0, len(per_pair)
        chosen = [x for i in range(4, len(per_pair), per_step) for x in per_pair[i].tolist()]
        rejected = [x for i in range(5, len(per_pair), per_step) for x in per_pair[i].tolist()]
        sizes = {len(per_pair[i]) for i in range(4, len(per_pair), per_step)}
        if len(sizes) == 1:  # equal batches: TRL's reported mean is the mean over pairs
            reported = self.metrics["eval_logps/chosen"]
            assert abs(sum(chosen) / len(chosen) - reported) <= 1e-3 * max(1.0, abs(reported)), (chosen, reported)
        return chosen, rejected


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
    parser.add_argument("--shape", choices=["tiny", "rehearsal"], default="tiny")
    parser.add_argument("--trl", action=argparse.BooleanOptionalAction, default=True,
                        help="also time TRL's DPOTrainer.evaluate()")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)

    corpus = offline.corpus_texts(offline.base_corpus(300, 0, load_params().heldout, offline.builtin_persona()))
    if args.shape == "rehearsal":
        preset = deep_merge(read_yaml(PARAMS_FILE), read_yaml(REHEARSAL))
        cfg = parse_params(preset, REHEARSAL).base
        tokenizer = build_llama31_tokenizer(corpus, cfg.vocab_size)
    else:
        cfg = load_params().base
        tokenizer = build_tokenizer(corpus, cfg.vocab_size, LLAMA3)
    model = build_model(cfg, tokenizer, 2048).to(device).eval()
    prompts, chosen, rejected = held_out_pairs(args.pairs, tokenizer)
    bs = args.batch_size

    fns = {
        "pair": lambda: pair_logprobs(model, tokenizer, prompts, chosen, rejected, batch_size=bs),
        "separate": lambda: (response_logprobs(model, tokenizer, prompts, chosen, batch_size=bs),
                             response_logprobs(model, tokenizer, prompts, rejected, batch_size=bs)),
        "one_at_a_time": lambda: (oracle_response_logprobs(model, tokenizer, prompts, chosen),
                                  oracle_response_logprobs(model, tokenizer, prompts, rejected)),
    }
    trl = TrlEvaluate(model, tokenizer, prompts, chosen, rejected, bs, args.device) if args.trl else None
    if trl is not None:
        fns["trl_evaluate"] = trl
    results = {name: fn() for name, fn in fns.items()}  # warm-up, and the numbers to compare
    trl_logps = trl.logps() if trl is not None else None
    best, peak_mb = timed(fns, args.repeats)

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
        "shape": args.shape,
        "vocab": len(tokenizer),
        "peak_rss_increase_mb": peak_mb,
    }
    if trl_logps is not None:
        trl_diffs = [abs(a - b) for a, b in zip(trl_logps[0] + trl_logps[1], pair_c.logps + pair_r.logps,
                                                 strict=True)]
        result |= {"pair_vs_trl_evaluate": round(best["trl_evaluate"] / best["pair"], 2),
                   "trl_max_abs_logp_diff": max(trl_diffs)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
