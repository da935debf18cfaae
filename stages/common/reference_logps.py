"""Stored DPO reference log-probs (written by the `reference` stage, read by `dpo`): how the policy is loaded for
them, what identifies them, and reading them back after checking they belong to this run.

The reference model is sft-merged: `dpo` trains a fresh LoRA adapter on it, and TRL's reference forward is that
policy with the adapter disabled. The log-probs are stored per pair in `paths.reference_logps`, with a
`tuneforge.json` that records sft-merged's content hash, the data digests, the engine, the truncation length,
the precision and the quantization (`dpo.quantization`: NF4 after a QLoRA SFT) they were computed under. Each is
a DVC dep or param of `reference` (the engine through sft-merged's own record, the precision through
`dpo.trainer.bf16` / `fp16`), so DVC reruns it when one changes.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

from stages.common.config import DpoConfig, ModelConfig, PathsConfig, SftConfig
from stages.common.engine import META, TrainSpec, read_meta, resolve_engine
from stages.common.io import InputError, hash_dir, read_json, require
from stages.common.training import file_digest, load_rows

SPLITS = ("dpo_train", "dpo_eval")


def dpo_quantization(dpo_cfg: DpoConfig, sft_cfg: SftConfig) -> str:
    """`dpo.quantization` resolved: nf4 (4-bit, with sft.quantization's settings) or none (16-bit)."""
    if dpo_cfg.quantization == "auto":
        return "nf4" if sft_cfg.method == "qlora" else "none"
    return dpo_cfg.quantization


def sft_merged_engine(paths: PathsConfig, sft_cfg: SftConfig) -> str:
    """The engine sft-merged was trained with, as its tuneforge.json records it (`merge` copies it from `sft`).

    `engine: auto` is resolved once, when `sft` runs: `reference` and `dpo` load the model the same way, so a
    changed environment (unsloth installed or removed) never makes them disagree with each other or with
    sft-merged, and an engine change (sft rerun) changes sft-merged, which reruns both. Without a record:
    sft.engine resolved here."""
    engine = read_meta(paths.sft_merged).get("engine") or resolve_engine(sft_cfg.engine)
    if engine == "unsloth" and importlib.util.find_spec("unsloth") is None:
        raise InputError(f"{paths.sft_merged / META}: sft-merged was trained with the unsloth engine, which is not "
                         "installed here: install it (`make install`), or retrain on the other engine "
                         "(`dvc exp run -S sft.engine=transformers`)")
    return engine


def dpo_spec(paths: PathsConfig, dpo_cfg: DpoConfig, sft_cfg: SftConfig, model_cfg: ModelConfig) -> TrainSpec:
    """How `dpo` loads its policy (and `reference` its reference): sft-merged (in 4-bit when `dpo.quantization`
    says so: a QLoRA recipe's DPO trains and scores the 4-bit model) + a fresh LoRA adapter, on the engine
    sft-merged was trained with."""
    return TrainSpec(
        model=str(paths.sft_merged), tokenizer=paths.sft_merged,
        method="qlora" if dpo_quantization(dpo_cfg, sft_cfg) == "nf4" else "lora",
        engine=sft_merged_engine(paths, sft_cfg),  # type: ignore[arg-type]
        lora=dpo_cfg.lora, quantization=sft_cfg.quantization, partial=sft_cfg.partial,
        max_seq_length=model_cfg.max_seq_length, seed=model_cfg.seed,
        gradient_checkpointing=dpo_cfg.gradient_checkpointing, attn_implementation=model_cfg.attn_implementation,
    )


def expected_meta(paths: PathsConfig, engine: str, max_length: int | None, mixed_precision: str,
                  sft_merged_sha256: str | None = None, quantization: str = "none") -> dict[str, Any]:
    """What identifies stored reference log-probs: sft-merged's content hash, data, engine, truncation, precision,
    quantization."""
    return {
        "sft_merged_sha256": sft_merged_sha256 or hash_dir(paths.sft_merged),
        "data_sha256": {s: file_digest(paths.formatted / f"{s}.jsonl") for s in SPLITS},
        "engine": engine,
        "max_length": max_length,
        "precision": mixed_precision,
        "quantization": quantization,
    }


def load_reference_logps(paths: PathsConfig, splits: Sequence[str], engine: str, max_length: int | None,
                         mixed_precision: str, sft_merged_sha256: str | None = None,
                         quantization: str = "none") -> dict[str, dict[str, dict[str, float]]]:
    """Each split's stored ref log-probs by pair id, after checking (once) they belong to this sft-merged, data,
    engine and settings.

    Pairs TRL drops (a prompt that fills max_length) have none; `dpo` drops them too."""
    folder = require(paths.reference_logps, "stored DPO reference log-probs")
    meta = read_json(require(folder / META, "stored DPO reference log-probs metadata"))
    expected = expected_meta(paths, engine, max_length, mixed_precision, sft_merged_sha256, quantization)
    stale = [k for k, v in expected.items() if meta.get(k) != v]
    if stale:
        raise InputError(f"{folder / META}: stored reference log-probs were computed for another {', '.join(stale)} "
                         "(run `dvc repro reference`)")
    return {split: {r["id"]: {"ref_chosen_logps": float(r["ref_chosen_logps"]),
                              "ref_rejected_logps": float(r["ref_rejected_logps"])}
                    for r in load_rows(folder / f"{split}.jsonl", ("id", "ref_chosen_logps", "ref_rejected_logps"))}
            for split in splits}
