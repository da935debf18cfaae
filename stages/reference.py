"""DPO reference log-probs, computed once from the merged SFT model and stored per pair.

DVC stage `reference`: models/sft-merged + data/formatted/dpo_{train,eval}.jsonl -> data/reference_logps/.
Run: python -m stages.reference

For every pair, log P_ref(chosen | prompt) and log P_ref(rejected | prompt) summed over completion tokens,
so `dpo` hands them to TRL's DPOTrainer and never runs the reference. They are computed by TRL's own
precompute (`DPOConfig.precompute_ref_log_probs`) on the model loaded exactly as `dpo` loads its policy
(same engine, dtype, 4-bit when `dpo.quantization` resolves to nf4 (a QLoRA recipe), LoRA wrapping with the
adapter disabled, mixed precision): the numbers are then the
ones TRL's reference forward would give during training, tokenisation and truncation included (the unsloth
engine, for one, loads the base in bf16 even on CPU). DVC reruns the stage when sft-merged, the DPO data,
the engine or the truncation change, not when `dpo.beta` or `dpo.trainer` change; tuneforge.json records
sft-merged's content hash, the data digests, engine, truncation, precision and quantization, which `dpo` checks
(stages/common/reference_logps.py).
"""

from __future__ import annotations

import logging
import tempfile
from typing import Any

from stages.common.config import DpoConfig, ModelConfig, PathsConfig, ReferenceConfig, SftConfig, load_params
from stages.common.engine import META, device, load_for_training
from stages.common.io import require, run_main, write_json, write_jsonl
from stages.common.memory import rows_within
from stages.common.reference_logps import SPLITS, dpo_quantization, dpo_spec, expected_meta
from stages.common.training import load_rows, mixed_precision, precision, trl_text_rows

log = logging.getLogger(__name__)

COLUMNS = ("id", "prompt", "chosen", "rejected")


def reference(cfg: ReferenceConfig, paths: PathsConfig, dpo_cfg: DpoConfig, sft_cfg: SftConfig,
              model_cfg: ModelConfig) -> dict[str, Any]:
    """Compute and write data/reference_logps/{dpo_train,dpo_eval}.jsonl + tuneforge.json; returns the meta."""
    from datasets import Dataset

    require(paths.sft_merged, "merged SFT model (the DPO reference)")
    rows = {s: load_rows(require(paths.formatted / f"{s}.jsonl", "formatted DPO data"), COLUMNS) for s in SPLITS}
    model, tokenizer, engine = load_for_training(dpo_spec(paths, dpo_cfg, sft_cfg, model_cfg))
    from trl import DPOConfig as TrlDPOConfig
    from trl import DPOTrainer

    with tempfile.TemporaryDirectory(prefix="reference-") as tmp:
        # TRL batches rows, chosen and rejected stacked, padded up to model.max_seq_length: the token budget caps it
        batch = rows_within(cfg.tokens_per_batch, 2 * model_cfg.max_seq_length, cfg.batch_size)
        args = TrlDPOConfig(output_dir=tmp, max_length=model_cfg.max_seq_length, precompute_ref_log_probs=True,
                            precompute_ref_batch_size=batch, report_to=[], use_cpu=device() == "cpu",
                            seed=model_cfg.seed, **precision(dpo_cfg.trainer))
        # the trainer tokenises, truncates and runs the reference (its policy with the adapter disabled) here
        trainer = DPOTrainer(model=model, args=args,
                             train_dataset=Dataset.from_list(trl_text_rows(tokenizer, rows["dpo_train"])),
                             eval_dataset=Dataset.from_list(trl_text_rows(tokenizer, rows["dpo_eval"])),
                             processing_class=tokenizer)
        meta = {**expected_meta(paths, engine, model_cfg.max_seq_length, mixed_precision(dpo_cfg.trainer),
                                quantization=dpo_quantization(dpo_cfg, sft_cfg)),
                "sft_merged": str(paths.sft_merged), "pairs": {},
                "dtype": str(next(model.get_base_model().parameters()).dtype).removeprefix("torch.")}
        for split, ds in (("dpo_train", trainer.train_dataset), ("dpo_eval", trainer.eval_dataset)):
            out = [{"id": r["id"], "ref_chosen_logps": r["ref_chosen_logps"],
                    "ref_rejected_logps": r["ref_rejected_logps"], "prompt_tokens": len(r["prompt_ids"]),
                    "chosen_tokens": len(r["chosen_ids"]), "rejected_tokens": len(r["rejected_ids"])} for r in ds]
            write_jsonl(paths.reference_logps / f"{split}.jsonl", out)
            meta["pairs"][split] = len(out)
            log.info("%s: reference log-probs for %d of %d pairs", split, len(out), len(rows[split]))
    write_json(paths.reference_logps / META, meta)
    return meta


def main() -> None:
    params = load_params()
    meta = reference(params.reference, params.paths, params.dpo, params.sft, params.model)
    log.info("reference log-probs stored in %s: %s", params.paths.reference_logps, meta["pairs"])


if __name__ == "__main__":
    run_main(main)
