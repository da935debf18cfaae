"""Merge the SFT adapter into a full-precision (never 4-bit) copy of the base, and prove the merge.

DVC stage `merge`: models/sft + models/base -> models/sft-merged, reports/merge.json.
Run: python -m stages.merge

The merge runs in fp32 on a dequantised base (no quantization config, whatever SFT trained on). On
`merge.held_out` held-out SFT conversations it compares the merged model's logits with base + adapter
(max |diff|, mean KL) and the held-out loss (assistant tokens) before and after; a max |diff| beyond
`merge.tolerance` fails the stage after the report is written. The merged model is then stored in
`merge.dtype` (auto = bf16/fp16 on CUDA, fp32 on CPU) and what that cast changes is reported too.
When SFT trained on a 4-bit base (qlora), the report also shows the gap between the adapter on that
4-bit base (as trained) and the merged model, i.e. what the QLoRA merge costs.
For full / partial SFT there is no adapter: the SFT weights are copied through in `merge.dtype`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from stages.common.config import MergeConfig, PathsConfig, QuantizationConfig, load_params
from stages.common.engine import (
    base_model_id,
    device,
    inference_dtype,
    load_causal_lm,
    load_tokenizer,
    read_meta,
    torch_dtype,
    write_meta,
)
from stages.common.io import InputError, require, run_main, write_json
from stages.common.templates import set_end_of_turn_eos
from stages.common.training import load_rows

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


class MergeCheckFailed(InputError):
    """The merged model does not reproduce base + adapter within tolerance."""


def batches(rows: list[dict[str, Any]], batch_size: int, pad_id: int) -> list[Batch]:
    """Right-padded batches of held-out rows; labels only on assistant tokens."""
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
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


@torch.no_grad()
def forward(model: Any, data: list[Batch]) -> tuple[list[torch.Tensor], float]:
    """fp32 logits at real tokens (per batch, on CPU) and the pooled held-out loss on assistant tokens."""
    model.eval()
    where = next(model.parameters()).device
    logits_out, nll, count = [], 0.0, 0
    for batch in data:
        ids, attn, labels = (batch[k].to(where) for k in ("input_ids", "attention_mask", "labels"))
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits.float()
        target = labels[:, 1:]
        scored = target != -100
        logp = logits[:, :-1][scored].log_softmax(-1)
        nll -= float(logp.gather(-1, target[scored].unsqueeze(-1)).sum())
        count += int(scored.sum())
        logits_out.append(logits[attn.bool()].cpu())
    return logits_out, nll / max(count, 1)


def compare(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict[str, float]:
    """Max |logit diff| and mean KL(reference || other) over every real token."""
    max_diff, kl_sum, n = 0.0, 0.0, 0
    for ref, oth in zip(reference, other, strict=True):
        ref_logp, oth_logp = ref.double().log_softmax(-1), oth.double().log_softmax(-1)  # fp64: KL ~ diff^2
        max_diff = max(max_diff, float((ref - oth).abs().max()))
        kl_sum += float((ref_logp.exp() * (ref_logp - oth_logp)).sum(-1).clamp(min=0).sum())
        n += ref.size(0)
    return {"max_abs_logit_diff": max_diff, "mean_kl": kl_sum / max(n, 1)}


def storage_dtype(cfg: MergeConfig) -> torch.dtype:
    return inference_dtype() if cfg.dtype == "auto" else torch_dtype(cfg.dtype)


def merge(cfg: MergeConfig, paths: PathsConfig, quantization: QuantizationConfig) -> dict[str, Any]:
    """Write models/sft-merged; returns the report (its `passed` says whether the check held)."""
    from peft import PeftModel

    sft_dir = require(paths.sft, "SFT output")
    meta = read_meta(sft_dir)
    method = meta.get("method", "lora")
    tokenizer = load_tokenizer(sft_dir)
    eval_file = require(paths.formatted / "sft_eval.jsonl", "formatted SFT eval data")
    rows = load_rows(eval_file, ("input_ids", "assistant_masks"))[: cfg.held_out]
    data = batches(rows, cfg.batch_size, tokenizer.pad_token_id)
    report: dict[str, Any] = {"method": method, "held_out_rows": len(rows), "tolerance": cfg.tolerance}

    if not (sft_dir / "adapter_config.json").exists():  # full / partial: already a whole model
        model = load_causal_lm(str(sft_dir), dtype=torch.float32)
        logits, loss = forward(model, data)
        report.update(adapter=False, held_out_loss_after=loss, max_abs_logit_diff=0.0, mean_kl=0.0)
    else:
        base_id = base_model_id(require(paths.base, "base model"))
        # fp32 and dequantised: the base is loaded without any quantization config
        model = PeftModel.from_pretrained(load_causal_lm(base_id, dtype=torch.float32), str(sft_dir))
        with model.disable_adapter():
            _, loss_base = forward(model, data)
        adapter_logits, loss_before = forward(model, data)
        model = merge_and_unload(model)
        logits, loss = forward(model, data)
        report.update(adapter=True, held_out_loss_base=loss_base, held_out_loss_before=loss_before,
                      held_out_loss_after=loss, **compare(adapter_logits, logits))
        del adapter_logits
        if method == "qlora":
            report["qlora_gap"] = qlora_gap(base_id, sft_dir, data, logits, loss, quantization)

    dtype = storage_dtype(cfg)
    report["dtype"] = str(dtype).removeprefix("torch.")
    if dtype != torch.float32:  # what storing in 16 bits changes (reported, not gated)
        model = model.to(dtype)
        cast_logits, cast_loss = forward(model, data)
        report["storage_cast"] = {**compare(logits, cast_logits), "held_out_loss": cast_loss}
    report["passed"] = report["max_abs_logit_diff"] <= cfg.tolerance
    if report["passed"]:  # a merge that failed its check is never left where `dpo` would pick it up
        save(model, tokenizer, paths.sft_merged, paths.base, method, meta.get("engine"))
    elif paths.sft_merged.exists():
        shutil.rmtree(paths.sft_merged)
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


def _four_bit_config(quantization: QuantizationConfig):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=quantization.double_quant,
                              bnb_4bit_compute_dtype=torch_dtype(quantization.compute_dtype))


def qlora_gap(base_id: str, adapter: Path, data: list[Batch], merged_logits: list[torch.Tensor],
              merged_loss: float, quantization: QuantizationConfig) -> dict[str, float]:
    """What the QLoRA merge costs: the adapter on the NF4 base (as trained) vs the fp32 merged model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base4 = AutoModelForCausalLM.from_pretrained(base_id, quantization_config=_four_bit_config(quantization),
                                                 device_map={"": device()})
    model4 = PeftModel.from_pretrained(base4, str(adapter))
    logits4, loss4 = forward(model4, data)
    return {**compare(logits4, merged_logits), "held_out_loss_4bit": loss4, "held_out_loss_merged": merged_loss}


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
