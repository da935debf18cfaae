"""Supervised fine-tuning on the formatted persona conversations.

DVC stage `sft`: data/formatted/sft_*.jsonl + models/base -> models/sft, reports/sft.json, dvclive/sft.
Run: python -m stages.sft

`sft.method`: lora | qlora (NF4 base, double quant) | full | partial (last N blocks + norm + head).
`sft.engine`: unsloth | transformers | auto. `sft.trainer` goes straight into trl.SFTConfig, except the keys the
stage sets itself (config validation refuses them); its `report_to` (default [dvclive]) picks the trackers: DVCLive
writes the step metrics to dvclive/sft (`dvc plots show`, `dvc exp show`).
Checkpoints live in checkpoints/sft/<run key> (key = input bytes + params); a killed run resumes from
the last complete one, other data or params never resume, and a finished run removes its checkpoints.
`train.num_processes > 1` re-runs the stage under `accelerate launch` (DDP); rank 0 writes the outputs.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from stages.common.config import ModelConfig, PathsConfig, SftConfig, load_params
from stages.common.engine import TrainSpec, base_model_id, device, load_for_training, write_meta
from stages.common.io import require, run_main, write_json
from stages.common.templates import set_end_of_turn_eos
from stages.common.training import (
    checkpoint_dir,
    distributed_type,
    finish_run,
    is_main_process,
    last_checkpoint,
    load_rows,
    relaunch_distributed,
    report_to_trackers,
    run_key,
    trl_config,
)

log = logging.getLogger(__name__)


# Attention implementations that keep packed examples apart when TRL's padding-free collation passes position_ids and
# no attention mask: flash attention's varlen kernels, and (transformers >= 5) sdpa / eager, whose causal mask is
# made block-diagonal from the position ids (masking_utils.find_packed_sequence_indices). tests/stages/test_sft.py
# checks packed = unpacked per-example losses and logits on sdpa and eager.
ISOLATING_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")
PADDING_FREE_PACKING = ("bfd", "bfd_split")  # TRL's strategies that mark each example's start in position_ids


def packing_allowed(model: Any, trainer: dict[str, Any] | None = None, engine: str = "transformers") -> tuple[bool, str]:
    """Packed examples must not attend to each other: TRL's padding-free packing plus an attention implementation
    that builds per-example attention from the position ids."""
    strategy = (trainer or {}).get("packing_strategy", "bfd")
    if strategy not in PADDING_FREE_PACKING:
        return False, f"packing_strategy {strategy!r} does not mark where each packed example starts"
    if engine == "unsloth":  # unsloth reads each example's length from the position ids (unsloth/utils/packing.py)
        return True, "unsloth's attention keeps packed examples apart (packed_seq_lengths from position ids)"
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl in ISOLATING_ATTENTION:
        return True, f"attention {impl} keeps packed examples apart (padding-free, block-diagonal by position ids)"
    return False, f"attention {impl!r} would let packed examples attend to each other"


def loss_tokens(dataset: Any) -> tuple[int, int]:
    """(tokens with a label, all tokens) of a prepared training set: what the loss is computed on."""
    labelled = total = 0
    for row in dataset:
        labels = row.get("labels") or row["input_ids"]
        labelled += sum(1 for t in labels if t != -100)
        total += len(row["input_ids"])
    return labelled, total


def sft(cfg: SftConfig, model_cfg: ModelConfig, paths: PathsConfig) -> dict[str, Any]:
    """Train and save models/sft; returns the report."""
    from datasets import Dataset

    train_file = require(paths.formatted / "sft_train.jsonl", "formatted SFT data")
    eval_file = require(paths.formatted / "sft_eval.jsonl", "formatted SFT data")
    spec = TrainSpec(
        model=base_model_id(paths.base), tokenizer=paths.formatted / "tokenizer", method=cfg.method, engine=cfg.engine,
        lora=cfg.lora, quantization=cfg.quantization, partial=cfg.partial,
        max_seq_length=model_cfg.max_seq_length, seed=model_cfg.seed,
        gradient_checkpointing=cfg.gradient_checkpointing, attn_implementation=model_cfg.attn_implementation,
    )
    model, tokenizer, engine = load_for_training(spec)  # unsloth (if used) is imported before trl
    from trl import SFTConfig as TrlSFTConfig
    from trl import SFTTrainer

    columns = ("input_ids", "assistant_masks") if cfg.assistant_only_loss else ("input_ids",)
    train = Dataset.from_list(load_rows(train_file, columns))
    evaluation = Dataset.from_list(load_rows(eval_file, columns))

    trainer_args = dict(cfg.trainer)  # fp32 on CPU unless sft.trainer says otherwise (trl_config)
    if trainer_args.get("packing"):
        ok, why = packing_allowed(model, trainer_args, engine)
        if not ok:
            log.warning("packing off: %s", why)
            trainer_args["packing"] = False
    key = run_key([train_file, eval_file, paths.base / "config.json" if (paths.base / "config.json").exists()
                   else paths.base / "tokenizer_config.json"],
                  {"sft": cfg.model_dump(), "model": model_cfg.model_dump(), "engine": engine,
                   "world_size": int(os.environ.get("WORLD_SIZE", "1"))})  # more processes, other batches
    out_dir = checkpoint_dir(paths.checkpoints, "sft", key)
    args = trl_config(TrlSFTConfig, "sft.trainer", trainer_args, output_dir=str(out_dir),
                      max_length=model_cfg.max_seq_length, use_cpu=device() == "cpu",
                      gradient_checkpointing=spec.gradient_checkpointing)  # as the engine prepared the model
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                         processing_class=tokenizer)
    report_to_trackers(trainer, paths, "sft", key)
    backend = None
    if trainer.args.world_size > 1:
        import torch.distributed as dist

        backend = dist.get_backend()
        log.info("distributed: %d processes, %s backend", trainer.args.world_size, backend)
    labelled, total = loss_tokens(trainer.train_dataset)
    log.info("loss on %d of %d training tokens (assistant_only_loss=%s)", labelled, total, cfg.assistant_only_loss)
    resume = last_checkpoint(out_dir)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    runtime = time.perf_counter() - started

    if trainer.is_world_process_zero():
        paths.sft.mkdir(parents=True, exist_ok=True)
        set_end_of_turn_eos(trainer.model.generation_config, tokenizer)  # saved with a whole model
        trainer.model.save_pretrained(paths.sft)  # adapter (lora/qlora) or whole model; never the DDP wrapper
        tokenizer.save_pretrained(paths.sft)
        write_meta(paths.sft, stage="sft", base=str(paths.base), method=cfg.method, engine=engine, run_key=key)
    trainer.accelerator.wait_for_everyone()
    finish_run(out_dir)
    tokens = sum(len(ids) for ids in train["input_ids"]) * float(args.num_train_epochs)
    return {  # the step metrics (loss, eval loss, learning rate, grad norm ...) are DVCLive's, in dvclive/sft
        "steps": trainer.state.global_step,
        "best_metric": trainer.state.best_metric,  # of args.metric_for_best_model (eval_loss); null without one
        "method": cfg.method,
        "engine": engine,
        "resumed_from_step": int(resume.rsplit("-", 1)[1]) if resume else 0,
        "loss_tokens": labelled,
        "train_tokens": total,
        "packing": bool(args.packing),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "gradient_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
        "processes": trainer.args.world_size,
        "distributed_backend": backend,
        "distributed_type": distributed_type(trainer.accelerator),  # DDP (MULTI_CPU/GPU), FSDP1/2, DEEPSPEED
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_rows": len(train),
        "runtime_s": round(runtime, 2),
        "tokens_per_s": round(tokens / runtime, 1) if runtime > 0 else None,
    }


def main() -> None:
    params = load_params()
    relaunch_distributed("stages.sft", params.train)  # train.num_processes > 1: N processes, then exit
    report = sft(params.sft, params.model, params.paths)
    if is_main_process():
        write_json(Path(params.paths.reports) / "sft.json", report)
        log.info("sft done: %s", report)


if __name__ == "__main__":
    run_main(main)
