"""DPO reference log-probs, computed once from the merged SFT model and stored per pair.

DVC stage `reference`: models/sft-merged + data/formatted/dpo_{train,eval}.jsonl -> data/reference/.
Run: python -m stages.reference

For every pair, log P_ref(chosen | prompt) and log P_ref(rejected | prompt) summed over completion tokens,
tokenised exactly as TRL's DPOTrainer tokenises (prompt, chosen, rejected) and truncated to
`model.max_seq_length` as its collator does, so `dpo` can hand them to the trainer and never run the
reference model. The output is keyed by its inputs (DVC reruns it only when sft-merged or the DPO data
change, not when `dpo.*` changes); meta.json records the reference's content hash and the data digests,
which `dpo` checks before using the numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stages.common.config import PathsConfig, ReferenceConfig, load_params
from stages.common.engine import device, load_causal_lm, load_tokenizer
from stages.common.io import InputError, hash_dir, read_json, require, run_main, write_json, write_jsonl
from stages.common.logprobs import Encoded, masked_logprobs
from stages.common.training import file_digest, load_rows

log = logging.getLogger(__name__)

SPLITS = ("dpo_train", "dpo_eval")
META = "meta.json"
COLUMNS = ("id", "prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PairTokens:
    chosen: Encoded
    rejected: Encoded


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def trl_encode(tokenizer: Any, prompt: str, chosen: str, rejected: str, max_length: int | None) -> PairTokens:
    """(prompt + chosen, prompt + rejected) token ids and completion masks as TRL 1.15's DPOTrainer builds them.

    Mirrors `DPOTrainer._prepare_dataset` for text (non-conversational) rows: EOS appended when missing,
    `tokenizer(text=...)` with its default special tokens, the completion starting where prompt and
    prompt+completion diverge, then `DataCollatorForPreference`'s keep_start truncation to max_length.
    """
    eos = tokenizer.eos_token
    chosen = chosen if chosen.endswith(eos) else chosen + eos
    rejected = rejected if rejected.endswith(eos) else rejected + eos
    prompt_ids = tokenizer(text=prompt)["input_ids"]
    chosen_ids = tokenizer(text=prompt + chosen)["input_ids"]
    rejected_ids = tokenizer(text=prompt + rejected)["input_ids"]
    n = min(_common_prefix(prompt_ids, chosen_ids), _common_prefix(prompt_ids, rejected_ids))

    def encoded(ids: list[int]) -> Encoded:
        mask = [0] * n + [1] * (len(ids) - n)
        if max_length is not None:
            ids, mask = ids[:max_length], mask[:max_length]
        return Encoded(list(ids), mask)

    return PairTokens(encoded(chosen_ids), encoded(rejected_ids))


def reference_logps(model: Any, tokenizer: Any, rows: list[dict[str, Any]], max_length: int | None,
                    batch_size: int) -> list[dict[str, Any]]:
    """One row per pair: id, ref_chosen_logps, ref_rejected_logps and the completion token counts."""
    pairs = [trl_encode(tokenizer, r["prompt"], r["chosen"], r["rejected"], max_length) for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    chosen = masked_logprobs(model, [p.chosen for p in pairs], batch_size=batch_size, pad_token_id=pad)
    rejected = masked_logprobs(model, [p.rejected for p in pairs], batch_size=batch_size, pad_token_id=pad)
    return [
        {"id": r["id"], "ref_chosen_logps": c, "ref_rejected_logps": j, "chosen_tokens": nc, "rejected_tokens": nj}
        for r, c, j, nc, nj in zip(rows, chosen.logps, rejected.logps, chosen.n_tokens, rejected.n_tokens,
                                   strict=True)
    ]


def expected_meta(reference: Path, formatted: Path, max_length: int | None) -> dict[str, Any]:
    """What identifies stored reference log-probs: the reference's content hash, the data, the truncation."""
    return {
        "reference_sha256": hash_dir(reference),
        "data_sha256": {s: file_digest(formatted / f"{s}.jsonl") for s in SPLITS},
        "max_length": max_length,
    }


def reference(cfg: ReferenceConfig, paths: PathsConfig, max_length: int | None) -> dict[str, Any]:
    """Compute and write data/reference/{dpo_train,dpo_eval}.jsonl + meta.json; returns the meta."""
    ref_dir = require(paths.sft_merged, "merged SFT model (the DPO reference)")
    files = {s: require(paths.formatted / f"{s}.jsonl", "formatted DPO data") for s in SPLITS}
    # the dtype sft-merged was stored in (as the DPO policy loads it); fp32 on CPU
    model = load_causal_lm(str(ref_dir), dtype=torch.float32 if device() == "cpu" else "auto")
    model.eval()
    tokenizer = load_tokenizer(ref_dir)
    meta = {**expected_meta(ref_dir, paths.formatted, max_length), "reference": str(ref_dir), "pairs": {}}
    for split, path in files.items():
        rows = load_rows(path, COLUMNS)
        out = reference_logps(model, tokenizer, rows, max_length, cfg.batch_size)
        write_jsonl(paths.reference / f"{split}.jsonl", out)
        meta["pairs"][split] = len(out)
        log.info("%s: reference log-probs for %d pairs", split, len(out))
    write_json(paths.reference / META, meta)
    return meta


def load_reference_logps(paths: PathsConfig, split: str, ids: list[str], max_length: int | None,
                         ) -> list[dict[str, float]]:
    """Stored ref log-probs for these pair ids, after checking they belong to this reference and data."""
    folder = require(paths.reference, "stored DPO reference log-probs")
    meta = read_json(require(folder / META, "stored DPO reference log-probs metadata"))
    expected = expected_meta(paths.sft_merged, paths.formatted, max_length)
    stale = [k for k, v in expected.items() if meta.get(k) != v]
    if stale:
        raise InputError(f"{folder / META}: stored reference log-probs were computed for another {', '.join(stale)} "
                         "(run `dvc repro reference`)")
    path = folder / f"{split}.jsonl"
    stored = {r["id"]: r for r in load_rows(path, ("id", "ref_chosen_logps", "ref_rejected_logps"))}
    missing = [i for i in ids if i not in stored]
    if missing:
        raise InputError(f"{path}: no reference log-probs for pair(s) {missing[:5]} (run `dvc repro reference`)")
    return [{"ref_chosen_logps": float(stored[i]["ref_chosen_logps"]),
             "ref_rejected_logps": float(stored[i]["ref_rejected_logps"])} for i in ids]


def main() -> None:
    params = load_params()
    meta = reference(params.reference, params.paths, params.model.max_seq_length)
    log.info("reference log-probs stored in %s: %s", params.paths.reference, meta["pairs"])


if __name__ == "__main__":
    run_main(main)
