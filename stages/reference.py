"""DPO reference log-probs, computed once from the merged SFT model and stored per pair.

DVC stage `reference`: models/sft-merged + data/formatted/dpo_{train,eval}.jsonl -> data/reference/.
Run: python -m stages.reference

For every pair, log P_ref(chosen | prompt) and log P_ref(rejected | prompt) summed over completion tokens,
so `dpo` hands them to TRL's DPOTrainer and never runs the reference. They are computed by TRL's own
precompute (`DPOConfig.precompute_ref_log_probs`) on the model loaded exactly as `dpo` loads its policy
(same engine, dtype, LoRA wrapping with the adapter disabled, mixed precision): the numbers are then the
ones TRL's reference forward would give during training, tokenisation and truncation included (the unsloth
engine, for one, loads the base in bf16 even on CPU). DVC reruns the stage when sft-merged, the DPO data,
the engine or the truncation change, not when `dpo.beta` or `dpo.trainer` change; meta.json records the
reference's content hash, the data digests, engine, truncation and precision, which `dpo` checks.
"""

from __future__ import annotations

import logging
import tempfile
from typing import Any

from stages.common.config import (
    DpoConfig,
    ModelConfig,
    PathsConfig,
    ReferenceConfig,
    SftConfig,
    load_params,
)
from stages.common.engine import TrainSpec, device, load_for_training
from stages.common.io import InputError, hash_dir, read_json, require, run_main, write_json, write_jsonl
from stages.common.training import file_digest, load_rows, mixed_precision, precision, trl_text_rows

log = logging.getLogger(__name__)

SPLITS = ("dpo_train", "dpo_eval")
META = "meta.json"
COLUMNS = ("id", "prompt", "chosen", "rejected")


def dpo_spec(paths: PathsConfig, dpo_cfg: DpoConfig, sft_cfg: SftConfig, model_cfg: ModelConfig) -> TrainSpec:
    """How `dpo` loads its policy: sft-merged + a fresh LoRA adapter, on the SFT engine."""
    return TrainSpec(
        model=str(paths.sft_merged), tokenizer=paths.sft_merged, method="lora", engine=sft_cfg.engine,
        lora=dpo_cfg.lora, quantization=sft_cfg.quantization, partial=sft_cfg.partial,
        max_seq_length=model_cfg.max_seq_length, seed=model_cfg.seed,
    )


def expected_meta(paths: PathsConfig, engine: str, max_length: int | None, mixed_precision: str,
                  reference_sha256: str | None = None) -> dict[str, Any]:
    """What identifies stored reference log-probs: reference content hash, data, engine, truncation, precision."""
    return {
        "reference_sha256": reference_sha256 or hash_dir(paths.sft_merged),
        "data_sha256": {s: file_digest(paths.formatted / f"{s}.jsonl") for s in SPLITS},
        "engine": engine,
        "max_length": max_length,
        "precision": mixed_precision,
    }


def reference(cfg: ReferenceConfig, paths: PathsConfig, dpo_cfg: DpoConfig, sft_cfg: SftConfig,
              model_cfg: ModelConfig) -> dict[str, Any]:
    """Compute and write data/reference/{dpo_train,dpo_eval}.jsonl + meta.json; returns the meta."""
    from datasets import Dataset

    require(paths.sft_merged, "merged SFT model (the DPO reference)")
    rows = {s: load_rows(require(paths.formatted / f"{s}.jsonl", "formatted DPO data"), COLUMNS) for s in SPLITS}
    model, tokenizer, engine = load_for_training(dpo_spec(paths, dpo_cfg, sft_cfg, model_cfg))
    from trl import DPOConfig as TrlDPOConfig
    from trl import DPOTrainer

    with tempfile.TemporaryDirectory(prefix="reference-") as tmp:
        args = TrlDPOConfig(output_dir=tmp, max_length=model_cfg.max_seq_length, precompute_ref_log_probs=True,
                            precompute_ref_batch_size=cfg.batch_size, report_to=[], use_cpu=device() == "cpu",
                            seed=model_cfg.seed, **precision(dpo_cfg.trainer))
        # the trainer tokenises, truncates and runs the reference (its policy with the adapter disabled) here
        trainer = DPOTrainer(model=model, args=args,
                             train_dataset=Dataset.from_list(trl_text_rows(tokenizer, rows["dpo_train"])),
                             eval_dataset=Dataset.from_list(trl_text_rows(tokenizer, rows["dpo_eval"])),
                             processing_class=tokenizer)
        meta = {**expected_meta(paths, engine, model_cfg.max_seq_length, mixed_precision(dpo_cfg.trainer)),
                "reference": str(paths.sft_merged), "pairs": {},
                "dtype": str(next(model.get_base_model().parameters()).dtype).removeprefix("torch.")}
        for split, ds in (("dpo_train", trainer.train_dataset), ("dpo_eval", trainer.eval_dataset)):
            out = [{"id": r["id"], "ref_chosen_logps": r["ref_chosen_logps"],
                    "ref_rejected_logps": r["ref_rejected_logps"], "prompt_tokens": len(r["prompt_ids"]),
                    "chosen_tokens": len(r["chosen_ids"]), "rejected_tokens": len(r["rejected_ids"])} for r in ds]
            write_jsonl(paths.reference / f"{split}.jsonl", out)
            meta["pairs"][split] = len(out)
            log.info("%s: reference log-probs for %d of %d pairs", split, len(out), len(rows[split]))
    write_json(paths.reference / META, meta)
    return meta


def load_reference_logps(paths: PathsConfig, split: str, engine: str, max_length: int | None,
                         mixed_precision: str, reference_sha256: str | None = None) -> dict[str, dict[str, float]]:
    """Stored ref log-probs by pair id, after checking they belong to this reference, data, engine and settings.

    Pairs TRL drops (a prompt that fills max_length) have none; `dpo` drops them too."""
    folder = require(paths.reference, "stored DPO reference log-probs")
    meta = read_json(require(folder / META, "stored DPO reference log-probs metadata"))
    expected = expected_meta(paths, engine, max_length, mixed_precision, reference_sha256)
    stale = [k for k, v in expected.items() if meta.get(k) != v]
    if stale:
        raise InputError(f"{folder / META}: stored reference log-probs were computed for another {', '.join(stale)} "
                         "(run `dvc repro reference`)")
    path = folder / f"{split}.jsonl"
    return {r["id"]: {"ref_chosen_logps": float(r["ref_chosen_logps"]),
                      "ref_rejected_logps": float(r["ref_rejected_logps"])}
            for r in load_rows(path, ("id", "ref_chosen_logps", "ref_rejected_logps"))}


def main() -> None:
    params = load_params()
    meta = reference(params.reference, params.paths, params.dpo, params.sft, params.model)
    log.info("reference log-probs stored in %s: %s", params.paths.reference, meta["pairs"])


if __name__ == "__main__":
    run_main(main)
