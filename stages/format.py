"""Render every conversation through the model's chat template and prove the template contract holds.

DVC stage `format`: data/clean + models/base -> data/formatted.  Run: python -m stages.format

SFT rows get input_ids and assistant_masks (1 on assistant content and its end-of-turn token); DPO
rows get the rendered prompt (ending with the generation prompt) and chosen/rejected completions
ending with the end-of-turn string. Before writing anything the golden-conversation contract check
runs: training-time tokens equal the saved tokenizer's apply_chat_template tokens, the generation
prompt is an exact token prefix of the conversation, masks cover exactly the assistant spans plus
their end-of-turn token, and there is no double BOS. A violation exits non-zero before training.
The tokenizer used (template installed) is saved to data/formatted/tokenizer for the training stages.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.common.config import Params, load_params
from stages.common.io import read_jsonl, require, run_main, write_json, write_jsonl
from stages.common.splits import SPLITS
from stages.common.templates import ContractError, end_of_turn, load_base_tokenizer

log = logging.getLogger(__name__)

Message = dict[str, str]
TOKENIZER_DIR = "tokenizer"

GOLDEN: tuple[tuple[str, list[Message]], ...] = (
    (
        "single-turn",
        [
            {"role": "user", "content": "What is leverage?"},
            {"role": "assistant", "content": "Force multiplied by position."},
        ],
    ),
    (
        "single-turn+system",
        [
            {"role": "system", "content": "Answer in one sentence."},
            {"role": "user", "content": "Why plan?"},
            {"role": "assistant", "content": "Plans expose wrong assumptions early."},
        ],
    ),
    (
        "multi-turn",
        [
            {"role": "user", "content": "Define risk."},
            {"role": "assistant", "content": "Variance you cannot afford."},
            {"role": "user", "content": "And reward?"},
            {"role": "assistant", "content": "The price paid for bearing it."},
        ],
    ),
    (
        "multi-turn+system",
        [
            {"role": "system", "content": "You are terse.\nNo comfort."},
            {"role": "user", "content": "I failed my exam."},
            {"role": "assistant", "content": "Then measure why: time, method or difficulty."},
            {"role": "user", "content": "Method, probably."},
            {"role": "assistant", "content": "Change the method, not the goal."},
        ],
    ),
)


def _ids(tokenizer: Any, messages: list[Message], gen: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=gen)
    return list(out["input_ids"])


def _text(tokenizer: Any, messages: list[Message], gen: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def use_end_of_turn_as_eos(tokenizer: Any) -> str | None:
    """Make the template's end-of-turn token the tokenizer's EOS; the EOS it replaced, or None.

    A chat fine-tune ends every answer with the end-of-turn token (`<|eot_id|>`, `<|im_end|>`). A base
    model's tokenizer often has another EOS (Llama 3.1 base: `<|end_of_text|>`); left so, generation would
    not stop at the end of an answer and TRL's DPOTrainer would append that EOS to every completion.
    """
    eot = end_of_turn(tokenizer)
    if tokenizer.eos_token == eot:
        return None
    replaced = tokenizer.eos_token
    tokenizer.eos_token = eot
    return replaced


def has_generation_markers(tokenizer: Any) -> bool:
    return "generation" in (tokenizer.chat_template or "") and "endgeneration" in (
        tokenizer.chat_template or ""
    )


def masks_by_prefix(tokenizer: Any, messages: list[Message], ids: list[int], eot_ids: list[int]) -> list[int]:
    """Assistant mask derived from the template itself: from the end of each generation prompt
    through the first end-of-turn token after it. Raises ContractError when the prompt is not a prefix."""
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _ids(tokenizer, messages[:i], gen=True)
        if ids[: len(prompt)] != prompt:
            raise ContractError(
                f"generation prompt before turn {i} is not a token prefix of the conversation"
            )
        start, n = len(prompt), len(eot_ids)
        end = next((e for e in range(start, len(ids) - n + 1) if ids[e : e + n] == eot_ids), None)
        if end is None:
            raise ContractError(f"no end-of-turn token after assistant turn {i}")
        mask[start : end + n] = [1] * (end + n - start)
    return mask


def render_sft(tokenizer: Any, messages: list[Message], eot_ids: list[int], markers: bool) -> dict[str, Any]:
    """text, input_ids and assistant_masks of one conversation."""
    if markers:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    else:
        ids = _ids(tokenizer, messages)
        mask = masks_by_prefix(tokenizer, messages, ids, eot_ids)
    return {"text": _text(tokenizer, messages), "input_ids": ids, "assistant_masks": mask}


def render_dpo(tokenizer: Any, row: dict[str, Any], eot: str) -> dict[str, Any]:
    """Rendered prompt (with generation prompt) and chosen/rejected completions ending with eot."""
    prompt = _text(tokenizer, row["prompt"], gen=True)
    out = {"id": row["id"], "prompt": prompt}
    for side in ("chosen", "rejected"):
        full = _text(tokenizer, row["prompt"] + [{"role": "assistant", "content": row[side]}])
        if not full.startswith(prompt):
            raise ContractError(
                f"DPO row {row['id']}: rendered prompt is not a text prefix of prompt + {side}"
            )
        completion = full[len(prompt) :]
        cut = completion.find(eot)
        if cut < 0:
            raise ContractError(f"DPO row {row['id']}: no end-of-turn string after {side}")
        out[side] = completion[: cut + len(eot)]
    return out


def contract_problems(
    train_tok: Any, saved_tok: Any, conversations: Sequence[tuple[str, list[Message]]] = GOLDEN
) -> list[str]:
    """Golden-conversation checks of the template contract; empty when it holds."""
    problems: list[str] = []
    try:
        eot = end_of_turn(train_tok)
    except ContractError as err:
        return [str(err)]
    eot_ids = train_tok(eot, add_special_tokens=False)["input_ids"]
    markers = has_generation_markers(train_tok)
    bos = train_tok.bos_token_id
    for name, conv in conversations:
        try:
            row = render_sft(train_tok, conv, eot_ids, markers)
            ids, mask = row["input_ids"], row["assistant_masks"]
            saved = _ids(saved_tok, conv)
            if ids != saved:
                problems.append(
                    f"{name}: training tokens differ from the saved tokenizer's apply_chat_template"
                )
            if train_tok(row["text"], add_special_tokens=False)["input_ids"] != ids:
                problems.append(f"{name}: tokenizing the rendered text does not give the training tokens")
            expected = masks_by_prefix(train_tok, conv, ids, eot_ids)  # also asserts the prefix property
            if mask != expected:
                masked = [i for i, m in enumerate(mask) if m]
                want = [i for i, m in enumerate(expected) if m]
                problems.append(
                    f"{name}: loss mask covers positions {_spans(masked)}, expected assistant spans "
                    f"+ end-of-turn {_spans(want)}"
                )
            runs = _runs(mask)
            turns = [m for m in conv if m["role"] == "assistant"]
            if len(runs) != len(turns):
                problems.append(f"{name}: {len(runs)} masked spans for {len(turns)} assistant turns")
            for (a, b), m in zip(runs, turns, strict=False):
                if (
                    m["content"].strip() not in train_tok.decode(ids[a:b])
                    or ids[b - len(eot_ids) : b] != eot_ids
                ):
                    problems.append(f"{name}: masked span {a}-{b - 1} is not assistant text + {eot!r}")
            masked_text = train_tok.decode([t for t, k in zip(ids, mask, strict=True) if k])
            if any(m["content"].strip() in masked_text for m in conv if m["role"] != "assistant"):
                problems.append(f"{name}: system/user text is inside the loss mask")
            if bos is not None and any(a == b == bos for a, b in zip(ids, ids[1:], strict=False)):
                problems.append(f"{name}: double BOS at the start of the rendered conversation")
        except ContractError as err:
            problems.append(f"{name}: {err}")
    return problems


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of ones."""
    runs, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _spans(positions: list[int]) -> str:
    if not positions:
        return "[]"
    spans, start, prev = [], positions[0], positions[0]
    for p in positions[1:] + [None]:
        if p is None or p != prev + 1:
            spans.append(f"{start}-{prev}")
            if p is not None:
                start = p
        if p is not None:
            prev = p
    return "[" + ", ".join(spans) + "]"


def dpo_prefix_problems(tokenizer: Any, rows: list[dict[str, Any]], limit: int = 5) -> list[str]:
    """tokenize(prompt) must be a token prefix of tokenize(prompt + completion) for every DPO row."""
    problems = []
    for side in ("chosen", "rejected"):
        prompts = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
        fulls = tokenizer([r["prompt"] + r[side] for r in rows], add_special_tokens=False)["input_ids"]
        for r, p, f in zip(rows, prompts, fulls, strict=True):
            if f[: len(p)] != p:
                problems.append(
                    f"DPO row {r['id']}: tokenize(prompt) is not a prefix of tokenize(prompt + {side})"
                )
    return problems[:limit] + ([f"... and {len(problems) - limit} more"] if len(problems) > limit else [])


def _distribution(lengths: list[int], max_len: int) -> dict[str, Any]:
    if not lengths:
        return {"rows": 0, "over_max_seq_length": 0}
    a = np.asarray(lengths)
    return {
        "rows": len(a),
        "mean": round(float(a.mean()), 2),
        "min": int(a.min()),
        "max": int(a.max()),
        "p50": int(np.percentile(a, 50)),
        "p90": int(np.percentile(a, 90)),
        "p99": int(np.percentile(a, 99)),
        "over_max_seq_length": int((a > max_len).sum()),
        "histogram": {f"<={b}": int((a <= b).sum()) for b in (32, 64, 128, 256, 512, 1024, 2048, 4096)},
    }


SFT_SPLITS = tuple(f"sft_{s}" for s in SPLITS)
DPO_SPLITS = tuple(f"dpo_{s}" for s in SPLITS)


def _meta(record: dict[str, Any]) -> dict[str, Any]:
    """The row's metadata (subtopic, grammar frames) travels on: evaluate checks answers mention the subject."""
    return {"meta": record["meta"]} if isinstance(record.get("meta"), dict) else {}


@dataclass
class Formatted:
    splits: dict[str, list[dict[str, Any]]]
    report: dict[str, Any]


def format_data(
    tokenizer: Any,
    saved_tok: Any,
    clean: dict[str, list[dict[str, Any]]],
    max_seq_length: int,
    golden_check: bool = True,
) -> Formatted:
    """Pure: clean records in, formatted rows + report out; ContractError on any contract violation."""
    problems = contract_problems(tokenizer, saved_tok) if golden_check else []
    if problems:
        raise ContractError("chat template contract violated:\n  " + "\n  ".join(problems))
    eot = end_of_turn(tokenizer)
    eot_ids = tokenizer(eot, add_special_tokens=False)["input_ids"]
    markers = has_generation_markers(tokenizer)
    splits: dict[str, list[dict[str, Any]]] = {}
    report: dict[str, Any] = {
        "end_of_turn": eot,
        "generation_markers": markers,
        "max_seq_length": max_seq_length,
        "golden_checks": len(GOLDEN) if golden_check else 0,
    }
    for name in SFT_SPLITS:
        rows = []
        for rec in clean.get(name, []):
            row = {"id": rec["id"], **render_sft(tokenizer, rec["messages"], eot_ids, markers), **_meta(rec)}
            if not any(row["assistant_masks"]):
                raise ContractError(f"{name} row {rec['id']}: no assistant tokens in the loss mask")
            rows.append(row)
        splits[name] = rows
        lengths = [len(r["input_ids"]) for r in rows]
        report[name] = _distribution(lengths, max_seq_length)
        report[name]["assistant_tokens_mean"] = (
            round(float(np.mean([sum(r["assistant_masks"]) for r in rows])), 2) if rows else 0
        )
        report[name]["tokens_total"] = int(sum(lengths))
    for name in DPO_SPLITS:
        rows = [{**render_dpo(tokenizer, rec, eot), **_meta(rec)} for rec in clean.get(name, [])]
        problems = dpo_prefix_problems(tokenizer, rows) if rows else []
        if problems:
            raise ContractError("DPO tokenization contract violated:\n  " + "\n  ".join(problems))
        splits[name] = rows
        if rows:
            enc = {
                k: tokenizer([r[k] for r in rows], add_special_tokens=False)["input_ids"]
                for k in ("prompt", "chosen", "rejected")
            }
            lengths = [
                len(p) + max(len(c), len(r))
                for p, c, r in zip(enc["prompt"], enc["chosen"], enc["rejected"], strict=True)
            ]
            report[name] = _distribution(lengths, max_seq_length)
            report[name]["prompt_tokens_mean"] = round(float(np.mean([len(p) for p in enc["prompt"]])), 2)
        else:
            report[name] = _distribution([], max_seq_length)
    report["would_truncate"] = sum(report[n]["over_max_seq_length"] for n in splits)
    return Formatted(splits, report)


def run(params: Params) -> Formatted:
    from transformers import AutoTokenizer

    tokenizer, template_source = load_base_tokenizer(params.paths.base, params.model.chat_template)
    log.info("chat template: %s", template_source)
    try:
        replaced_eos = use_end_of_turn_as_eos(tokenizer)
    except ContractError:
        replaced_eos = None  # the golden checks below report what is wrong with the template
    if replaced_eos is not None:
        log.info("eos token: %r -> the template's end of turn %r", replaced_eos, tokenizer.eos_token)
    with tempfile.TemporaryDirectory() as tmp:  # the round trip the training stages will do
        tokenizer.save_pretrained(tmp)
        saved = AutoTokenizer.from_pretrained(tmp)
    clean = {n: read_jsonl(require(params.paths.clean / f"{n}.jsonl")) for n in (*SFT_SPLITS, *DPO_SPLITS)}
    result = format_data(tokenizer, saved, clean, params.model.max_seq_length, params.format.golden_check)
    result.report["template_source"] = template_source
    result.report["eos_token"] = tokenizer.eos_token
    result.report["eos_token_replaced"] = replaced_eos
    if (
        tokenizer(tokenizer.bos_token or "", add_special_tokens=True)["input_ids"].count(
            tokenizer.bos_token_id
        )
        > 1
    ):
        result.report["warning"] = (
            "the tokenizer adds BOS itself: tokenize rendered text with add_special_tokens=False"
        )
        log.warning(result.report["warning"])
    out = params.paths.formatted
    for name, rows in result.splits.items():
        write_jsonl(out / f"{name}.jsonl", rows)
    tokenizer.save_pretrained(out / TOKENIZER_DIR)
    write_json(params.paths.reports / "format.json", result.report)
    if result.report["would_truncate"]:
        log.warning(
            "%d rows exceed model.max_seq_length=%d (not cut here; see reports/format.json)",
            result.report["would_truncate"],
            params.model.max_seq_length,
        )
    log.info("format: %s", {n: len(r) for n, r in result.splits.items()})
    return result


def main() -> None:
    run(load_params())


if __name__ == "__main__":
    run_main(main)
