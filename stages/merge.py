"""Merge the SFT adapter into a 16-bit (fp32 on CPU), never 4-bit, copy of the base, and prove the merge.

DVC stage `merge`: models/sft + models/base -> models/sft-merged, reports/merge.json.
Run: python -m stages.merge

The base is loaded without any quantization config (whatever SFT trained on) in `merge.dtype` (auto =
bf16/fp16 on CUDA, fp32 on CPU), on the device, and merged there: PEFT keeps the adapter in fp32, so each
layer's update is computed in fp32 and added to its weight with one rounding, the fp32 merge cast, bit for bit
(tests). No fp32 copy of the whole model is ever made. On `merge.held_out` held-out SFT conversations the merged
model is compared with base + adapter (max |logit diff|, mean KL) and the held-out loss (assistant tokens) before
and after; a max |diff| beyond `merge.tolerance` (fp32) / `merge.tolerance_16bit` fails the stage after the
report is written. Logits exist for one chunk of positions at a time: each model's hidden states at real tokens
and a copy of its LM head are kept instead (`held_out`).
When SFT trained on a 4-bit base (qlora), the report also shows the gap between the adapter on that 4-bit base
(SFT's own quantization params, as trained) and the merged model, i.e. what the QLoRA merge costs; the merged
model is freed before the 4-bit one loads.
For full / partial SFT there is no adapter: the SFT weights are copied through in `merge.dtype`.
"""

from __future__ import annotations

import gc
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stages.common.config import MergeConfig, PathsConfig, QuantizationConfig, load_params
from stages.common.engine import (
    base_model_id,
    compute_dtype,
    device,
    four_bit_config,
    inference_dtype,
    load_causal_lm,
    load_tokenizer,
    read_meta,
    torch_dtype,
    write_meta,
)
from stages.common.io import InputError, require, run_main, write_json
from stages.common.logprobs import Head, lm_head, scored_logps
from stages.common.memory import rows_for_tokens
from stages.common.templates import set_end_of_turn_eos
from stages.common.training import load_rows

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


class MergeCheckFailed(InputError):
    """The merged model does not reproduce base + adapter within tolerance."""


def batches(rows: list[dict[str, Any]], batch_size: int, pad_id: int, tokens_per_batch: int | None = None) -> list[Batch]:
    """Right-padded batches of held-out rows, longest first, each at most `batch_size` rows and (with
    `tokens_per_batch`) that many padded tokens; labels only on assistant tokens."""
    rows = sorted(rows, key=lambda r: -len(r["input_ids"]))
    out, start = [], 0
    for n in rows_for_tokens([len(r["input_ids"]) for r in rows], tokens_per_batch, batch_size):
        chunk = rows[start : start + n]
        start += n
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for i, r in enumerate(chunk):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor([t if m else -100 for t, m in zip(r["input_ids"], r["assistant_masks"],
                                                                           strict=True)])
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


@dataclass
class Stored:
    """A model's held-out logits, kept small: the hidden states at real tokens (CPU, in the model's dtype) and a
    copy of its LM head, so any chunk of logits can be recomputed later without keeping the model or the logits."""

    hidden: list[torch.Tensor]
    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None
    scale: float


@dataclass
class HeldOut:
    """One model's pass over the held-out batches: pooled loss, comparison with a stored model, its own logits."""

    loss: float
    comparison: dict[str, float] | None = None
    stored: Stored | None = None


def _logits(head: Head, weight: torch.Tensor, bias: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
    z = torch.nn.functional.linear(hidden, weight, bias)
    if head.scale != 1.0:
        z = z * head.scale
    if head.softcap is not None:
        z = head.softcap * torch.tanh(z / head.softcap)
    return z


@torch.no_grad()
def held_out(model: Any, data: list[Batch], reference: Stored | None = None, keep: bool = False,
             kl_of_model: bool = False) -> HeldOut:
    """Pooled held-out loss on assistant tokens; with `reference`, max |logit diff| and mean KL(reference || model)
    (KL(model || reference) with `kl_of_model`) over every real token; with `keep`, the model's own `Stored` logits.

    Full-vocabulary logits exist for one chunk of positions at a time (`memory.logit_chunk_tokens`), whatever
    the number of held-out tokens."""
    model.eval()
    head = lm_head(model)
    if head is None:
        raise InputError(f"merge: cannot find the backbone and LM head of {type(model).__name__}")
    where = head.head.weight.device
    chunk = max(1, head.chunk // 4)  # the comparison holds fp64 log-softmaxes of two models
    nll, count = 0.0, 0
    max_diff, kl_sum, n_real = 0.0, 0.0, 0
    kept: list[torch.Tensor] = []
    ref_w = ref_b = None
    if reference is not None:
        ref_w = reference.weight.to(where)
        ref_b = None if reference.bias is None else reference.bias.to(where)
    for b, batch in enumerate(data):
        ids, attn, labels = (batch[k].to(where) for k in ("input_ids", "attention_mask", "labels"))
        hidden = head.backbone(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        target = labels[:, 1:]
        scored = target != -100
        nll -= float(scored_logps(head, hidden[:, :-1][scored], target[scored]).sum())
        count += int(scored.sum())
        real = hidden[attn.bool()]
        if keep:
            kept.append(real.cpu())
        if reference is not None:
            ref_hidden = reference.hidden[b]
            for s in range(0, real.shape[0], chunk):
                ours = _logits(head, head.head.weight, head.head.bias, real[s : s + chunk]).float()
                theirs = _logits(head, ref_w, ref_b, ref_hidden[s : s + chunk].to(where)).float()
                max_diff = max(max_diff, float((theirs - ours).abs().max()))
                p, q = theirs.double().log_softmax(-1), ours.double().log_softmax(-1)  # fp64: KL ~ diff^2
                if kl_of_model:
                    p, q = q, p
                kl_sum += float((p.exp() * (p - q)).sum(-1).clamp(min=0).sum())
            n_real += real.shape[0]
    out = HeldOut(loss=nll / max(count, 1))
    if reference is not None:
        out.comparison = {"max_abs_logit_diff": max_diff, "mean_kl": kl_sum / max(n_real, 1)}
    if keep:
        w = head.head.weight.detach().cpu().clone()
        bias = None if head.head.bias is None else head.head.bias.detach().cpu().clone()
        out.stored = Stored(kept, w, bias, head.softcap, head.scale)
    return out


def storage_dtype(cfg: MergeConfig) -> torch.dtype:
    return inference_dtype() if cfg.dtype == "auto" else torch_dtype(cfg.dtype)


def tolerance(cfg: MergeConfig, dtype: torch.dtype) -> float:
    """The gate for max |logit diff| merged vs base + adapter: `merge.tolerance` in fp32, `merge.tolerance_16bit`
    when the merge runs (and is stored) in 16 bits, where rounding the merged weights is part of the difference."""
    return cfg.tolerance if dtype == torch.float32 else cfg.tolerance_16bit


def free() -> None:
    """Give the memory of dropped models back before the next model is loaded."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def merge(cfg: MergeConfig, paths: PathsConfig, quantization: QuantizationConfig) -> dict[str, Any]:
    """Write models/sft-merged; returns the report (its `passed` says whether the check held)."""
    from peft import PeftModel

    sft_dir = require(paths.sft, "SFT output")
    meta = read_meta(sft_dir)
    method = meta.get("method", "lora")
    tokenizer = load_tokenizer(sft_dir)
    eval_file = require(paths.formatted / "sft_eval.jsonl", "formatted SFT eval data")
    rows = load_rows(eval_file, ("input_ids", "assistant_masks"))[: cfg.held_out]
    data = batches(rows, cfg.batch_size, tokenizer.pad_token_id, cfg.tokens_per_batch)
    dtype = storage_dtype(cfg)
    report: dict[str, Any] = {"method": method, "held_out_rows": len(rows), "dtype": str(dtype).removeprefix("torch."),
                              "tolerance": tolerance(cfg, dtype)}
    merged: HeldOut | None = None
    if not (sft_dir / "adapter_config.json").exists():  # full / partial: already a whole model
        model = load_causal_lm(str(sft_dir), dtype=dtype)
        report.update(adapter=False, held_out_loss_after=held_out(model, data).loss, max_abs_logit_diff=0.0,
                      mean_kl=0.0)
    else:
        base_id = base_model_id(require(paths.base, "base model"))
        # the base in the stored dtype on the device, never quantised (whatever SFT trained on); PEFT keeps the
        # adapter in fp32 and adds each layer's fp32 update to its weight with one rounding to the stored dtype
        model = PeftModel.from_pretrained(load_causal_lm(base_id, dtype=dtype), str(sft_dir))
        with model.disable_adapter():
            loss_base = held_out(model, data).loss
        adapter = held_out(model, data, keep=True)
        model = merge_and_unload(model)
        merged = held_out(model, data, reference=adapter.stored, keep=method == "qlora")
        report.update(adapter=True, held_out_loss_base=loss_base, held_out_loss_before=adapter.loss,
                      held_out_loss_after=merged.loss, **merged.comparison)
        del adapter
    report["passed"] = report["max_abs_logit_diff"] <= report["tolerance"]
    if report["passed"]:  # a merge that failed its check is never left where `dpo` would pick it up
        save(model, tokenizer, paths.sft_merged, paths.base, method, meta.get("engine"))
    elif paths.sft_merged.exists():
        shutil.rmtree(paths.sft_merged)
    if merged is not None and merged.stored is not None:  # qlora: the 4-bit model SFT trained on, vs the merge
        del model
        free()  # one model at a time: the merged one goes before the 4-bit one loads
        report["qlora_gap"] = qlora_gap(base_id, sft_dir, data, merged, quantization)
    return report


def merge_and_unload(model: Any) -> Any:
    """PEFT's merge (a function of its own so a test can break it)."""
    return model.merge_and_unload()


def save(model: Any, tokenizer: Any, out: Path, base: Path, method: str, engine: str | None = None) -> None:
    """The merged model, with the engine SFT trained on: `reference` and `dpo` load it on the same one."""
    if out.exists():
        shutil.rmtree(out)
    set_end_of_turn_eos(model.generation_config, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_meta(out, stage="merge", base=str(base), method=method, engine=engine)


def qlora_gap(base_id: str, adapter: Path, data: list[Batch], merged: HeldOut,
              quantization: QuantizationConfig) -> dict[str, float]:
    """What the QLoRA merge costs: the adapter on the NF4 base SFT trained on (its quantization params) vs the
    merged model; KL(4-bit as trained || merged)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base4 = AutoModelForCausalLM.from_pretrained(base_id, quantization_config=four_bit_config(quantization),
                                                 dtype=compute_dtype(quantization),
                                                 device_map={"": device()})
    model4 = PeftModel.from_pretrained(base4, str(adapter))
    gap = held_out(model4, data, reference=merged.stored, kl_of_model=True)
    del model4, base4
    free()
    return {**gap.comparison, "held_out_loss_4bit": gap.loss, "held_out_loss_merged": merged.loss}


def main() -> None:
    params = load_params()
    report = merge(params.merge, params.paths, params.sft.quantization)
    out = params.paths.reports / "merge.json"
    write_json(out, report)
    log.info("merge: %s", report)
    if not report["passed"]:
        raise MergeCheckFailed(
            f"merge check failed: max |logit diff| {report['max_abs_logit_diff']:.3g} > merge.tolerance "
            f"{params.merge.tolerance:g} (see {out})"
        )


if __name__ == "__main__":
    run_main(main)
