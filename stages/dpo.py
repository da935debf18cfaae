"""Direct preference optimisation of the merged SFT model with a fresh LoRA adapter.

DVC stage `dpo`: models/sft-merged + data/formatted/dpo_*.jsonl -> models/dpo, reports/dpo.json, dvclive/dpo.
Run: python -m stages.dpo

The reference is the merged SFT model itself (never the raw base; its content hash is recorded in
reports/dpo.json), and its log-probs for every pair come precomputed from the `reference` stage
(data/reference_logps), so no reference forward runs here and changing `dpo.*` (e.g. beta) reuses them.
The policy is sft-merged plus a new zero-initialised LoRA adapter, on the engine sft-merged was trained with.
`dpo.trainer` goes straight into trl.DPOConfig, except the keys the stage sets itself (config validation refuses
them); its `report_to` (default [dvclive]) picks the trackers: DVCLive writes loss, rewards/margins, accuracies
... per step to dvclive/dpo.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from typing import Any, Literal

from stages.common.config import DpoConfig, ModelConfig, PathsConfig, SftConfig, load_params
from stages.common.engine import device, load_for_training, write_meta
from stages.common.io import hash_dir, require, run_main, write_json
from stages.common.reference_logps import dpo_quantization, dpo_spec, load_reference_logps, sft_merged_engine
from stages.common.training import (
    checkpoint_dir,
    finish_run,
    is_main_process,
    last_checkpoint,
    load_rows,
    mixed_precision,
    relaunch_distributed,
    report_to_trackers,
    run_key,
    trl_config,
    trl_text_rows,
)

log = logging.getLogger(__name__)

COLUMNS = ("id", "prompt", "chosen", "rejected")
# Where the reference log-probs come from. stored: data/reference_logps, written by the `reference` stage (the
# stage's way). adapter: TRL's implicit reference, a forward with the adapter disabled every step. model: a second,
# frozen copy of sft-merged. The last two exist to measure.
RefLogps = Literal["stored", "adapter", "model"]


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def with_reference(rows: list[dict[str, Any]], stored: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Rows with their stored ref log-probs; pairs without any (TRL drops their too-long prompts) are left out."""
    kept = [{**{c: r[c] for c in COLUMNS[1:]}, **stored[r["id"]]} for r in rows if r["id"] in stored]
    if len(kept) < len(rows):
        log.warning("%d of %d pairs have no stored reference log-probs (prompt >= max_length): left out",
                    len(rows) - len(kept), len(rows))
    return kept


def dpo(cfg: DpoConfig, sft_cfg: SftConfig, model_cfg: ModelConfig, paths: PathsConfig,
        ref_logps: RefLogps = "stored") -> dict[str, Any]:
    from datasets import Dataset

    sft_merged = require(paths.sft_merged, "merged SFT model (the DPO reference)")
    train_file = require(paths.formatted / "dpo_train.jsonl", "formatted DPO data")
    eval_file = require(paths.formatted / "dpo_eval.jsonl", "formatted DPO data")
    train_rows, eval_rows = load_rows(train_file, COLUMNS), load_rows(eval_file, COLUMNS)
    sft_merged_hash = hash_dir(sft_merged)
    quantization = dpo_quantization(cfg, sft_cfg)
    ref_inputs = []
    if ref_logps == "stored":  # checked before any model is loaded
        settings = (sft_merged_engine(paths, sft_cfg), model_cfg.max_seq_length, mixed_precision(cfg.trainer),
                    sft_merged_hash, quantization)
        stored = load_reference_logps(paths, ("dpo_train", "dpo_eval"), *settings)
        train_rows = with_reference(train_rows, stored["dpo_train"])
        eval_rows = with_reference(eval_rows, stored["dpo_eval"])
        ref_inputs = [paths.reference_logps / "dpo_train.jsonl", paths.reference_logps / "dpo_eval.jsonl"]
    else:
        train_rows = [{c: r[c] for c in COLUMNS[1:]} for r in train_rows]
        eval_rows = [{c: r[c] for c in COLUMNS[1:]} for r in eval_rows]
    spec = dpo_spec(paths, cfg, sft_cfg, model_cfg)
    model, tokenizer, engine = load_for_training(spec)
    from trl import DPOConfig as TrlDPOConfig
    from trl import DPOTrainer

    train = Dataset.from_list(trl_text_rows(tokenizer, train_rows))
    evaluation = Dataset.from_list(trl_text_rows(tokenizer, eval_rows))
    key = run_key([train_file, eval_file, *ref_inputs],
                  {"dpo": cfg.model_dump(), "model": model_cfg.model_dump(), "sft_merged": sft_merged_hash,
                   "engine": engine, "ref_logps": ref_logps, "quantization": quantization})
    out_dir = checkpoint_dir(paths.checkpoints, "dpo", key)
    # fp32 on CPU unless dpo.trainer says otherwise (trl_config); checkpointing as the engine prepared the model
    args = trl_config(TrlDPOConfig, "dpo.trainer", cfg.trainer, output_dir=str(out_dir), beta=cfg.beta,
                      max_length=model_cfg.max_seq_length, use_cpu=device() == "cpu",
                      gradient_checkpointing=spec.gradient_checkpointing)
    ref_model = None
    if ref_logps == "model":
        from stages.common.engine import load_causal_lm

        ref_model = load_causal_lm(str(sft_merged), dtype=next(model.parameters()).dtype).eval()
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train,
                         eval_dataset=evaluation, processing_class=tokenizer)
    report_to_trackers(trainer, paths, "dpo", key)
    if ref_logps == "stored":
        # TRL's loss then reads ref_chosen_logps / ref_rejected_logps from the batch (its collator passes the
        # columns through) instead of running the reference; DPOConfig.precompute_ref_log_probs stays False
        # so TRL does not compute them again itself.
        trainer.precompute_ref_logps = True
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=last_checkpoint(out_dir))
    runtime = time.perf_counter() - started
    final_eval = trainer.evaluate()

    if trainer.is_world_process_zero():  # under `accelerate launch` only rank 0 writes
        paths.dpo.mkdir(parents=True, exist_ok=True)
        trainer.model.save_pretrained(paths.dpo)
        tokenizer.save_pretrained(paths.dpo)
        write_meta(paths.dpo, stage="dpo", base=str(sft_merged), sft_merged_sha256=sft_merged_hash, engine=engine,
                   run_key=key)
    finish_run(out_dir)
    return {  # the step metrics (loss, rewards/margins, rewards/accuracies ...) are DVCLive's, in dvclive/dpo
        "steps": trainer.state.global_step,
        "beta": cfg.beta,
        "engine": engine,
        "quantization": quantization,
        "gradient_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
        "sft_merged": str(sft_merged),
        "sft_merged_sha256": sft_merged_hash,
        "ref_logps": "stored in " + str(paths.reference_logps) if ref_logps == "stored" else ref_logps,
        "train_pairs": len(train),
        "processes": trainer.args.world_size,
        "eval_rewards_margins": final_eval.get("eval_rewards/margins"),
        "eval_rewards_accuracies": final_eval.get("eval_rewards/accuracies"),
        "runtime_s": round(runtime, 2),
        "peak_rss_mb": peak_rss_mb(),
    }


def main() -> None:
    params = load_params()
    relaunch_distributed("stages.dpo", params.train)  # train.num_processes > 1: N processes, then exit
    report = dpo(params.dpo, params.sft, params.model, params.paths)
    if is_main_process():
        write_json(params.paths.reports / "dpo.json", report)
        log.info("dpo done: %s", report)


if __name__ == "__main__":
    run_main(main)
