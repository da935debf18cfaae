"""Normalise every dataset format, drop malformed and duplicate rows with reasons, split without leaks.

DVC stage `validate`: data/raw + data.sources + data/base_corpus -> data/clean.  Run: python -m stages.validate

Every row that does not reach data/clean/{sft,dpo}_{train,eval,heldout}.jsonl is in
data/clean/rejects.jsonl with its source file, line and reason. Near-duplicates are found with
MinHash LSH over word shingles and confirmed by exact Jaccard. Rows whose metadata says held out
(stages/common/splits.py) go to `heldout`, files pinned with `data.sources[].split` where they say;
the seeded random split of the rest keeps near-duplicate prompt clusters (SFT and DPO together) on
one side, so no eval prompt has a near-duplicate in train. Then the contamination report: the
longest token n-gram each eval/heldout row shares with any training text, pretraining included;
above validate.max_contamination the stage fails naming the rows.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.common import offline
from stages.common.config import DataSource, HeldoutConfig, Params, ValidateConfig, load_params
from stages.common.contamination import longest_shared
from stages.common.dedup import UnionFind, near_duplicate_pairs, semantic_duplicate_pairs, text_hash
from stages.common.io import InputError, iter_jsonl, run_main, write_json, write_jsonl
from stages.common.persona import system_prompt
from stages.common.readers import (
    REQUIRED_KEYS,
    Kind,
    Message,
    RawRow,
    RowError,
    read_source,
    to_conversation,
    to_preference,
    with_default_system,
)
from stages.common.splits import SPLITS, row_split
from stages.common.tables import markdown_table
from stages.common.templates import TEMPLATES, load_base_tokenizer

log = logging.getLogger(__name__)

Record = dict[str, Any]
TokenCounter = Callable[[list[list[Message]]], list[int]]
Tokenize = Callable[[list[str]], list[list[int]]]
OUTPUTS = tuple(f"{kind}_{split}" for kind in ("sft", "dpo") for split in SPLITS)


class RejectShareError(InputError):
    """More rows were rejected than validate.max_reject_share allows."""


class ContaminationError(InputError):
    """More evaluation rows share a long n-gram with training data than validate.max_contamination allows."""


@dataclass
class ValidationResult:
    sft_train: list[Record]
    sft_eval: list[Record]
    sft_heldout: list[Record]
    dpo_train: list[Record]
    dpo_eval: list[Record]
    dpo_heldout: list[Record]
    rejects: list[Record]
    report: dict[str, Any]
    examples: dict[str, list[Record]] = field(default_factory=dict)
    contamination: list[Record] = field(default_factory=list)  # one row per eval/heldout record

    @property
    def reject_share(self) -> float:
        return self.report["reject_share"]


# ---------------------------------------------------------------- row checks


def check_roles(messages: list[Message], *, ends_with: str) -> None:
    if not messages:
        raise RowError("missing_key", "no messages")
    for i, m in enumerate(messages):
        if m["role"] == "system" and i != 0:
            raise RowError("role_order", f"system turn at position {i} (only the first turn may be system)")
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if not turns or turns[0] != "user":
        raise RowError("role_order", "the first non-system turn must be the user's")
    for a, b in zip(turns, turns[1:], strict=False):
        if a == b == "assistant":
            raise RowError("role_order", "two assistant turns in a row")
    if turns[-1] != ends_with:
        raise RowError(
            "role_order", f"must end with a{'n' if ends_with == 'assistant' else ''} {ends_with} turn"
        )


def check_texts(texts: Iterable[tuple[str, str]], min_chars: int) -> None:
    for where, text in texts:
        if not text.strip():
            raise RowError("empty_content", f"{where} is empty or whitespace")
        if len(text.strip()) < min_chars:
            raise RowError("too_short", f"{where} has fewer than {min_chars} characters")


@dataclass(frozen=True)
class Patterns:
    """Compiled content checks: control strings (injection), refusals, identity leaks."""

    control: re.Pattern[str] | None
    refusal: re.Pattern[str] | None
    identity: re.Pattern[str] | None

    @classmethod
    def build(cls, control_strings: Iterable[str], cfg: ValidateConfig) -> Patterns:
        ctrl = sorted({s for s in control_strings if s}, key=len, reverse=True)

        def union(patterns: list[str], flags: int = re.IGNORECASE) -> re.Pattern[str] | None:
            return re.compile("|".join(f"(?:{p})" for p in patterns), flags) if patterns else None

        return cls(
            union([re.escape(s) for s in ctrl], 0), union(cfg.refusal_patterns), union(cfg.identity_patterns)
        )

    def check(self, texts: list[tuple[str, str]], assistant_texts: list[str]) -> None:
        if self.control:
            for where, text in texts:
                if m := self.control.search(text):
                    raise RowError("injection", f"{where} contains control string {m.group(0)!r}")
        for reason, pat in (("refusal", self.refusal), ("identity_leak", self.identity)):
            if pat:
                for text in assistant_texts:
                    if m := pat.search(text):
                        raise RowError(reason, f"assistant text matches {m.group(0)!r}")


def control_strings(tokenizer: Any, extra: Iterable[str] = ()) -> set[str]:
    """Every named template's control strings, the tokenizer's special tokens, and params extras."""
    out = {s for t in TEMPLATES.values() for s in t.special_tokens} | set(extra)
    if tokenizer is not None:
        out |= {t for t in getattr(tokenizer, "all_special_tokens", []) if t}
        out |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    return out


def check_pair(chosen: str, rejected: str, cfg: ValidateConfig) -> None:
    from rapidfuzz import fuzz

    a, b = chosen.strip(), rejected.strip()
    if a == b:
        raise RowError("dpo_identical", "chosen == rejected")
    similarity = fuzz.ratio(a, b) / 100
    if similarity >= cfg.dpo_max_similarity:
        raise RowError("dpo_near_identical", f"chosen/rejected similarity {similarity:.3f}")
    ratio = max(len(a), len(b)) / max(1, min(len(a), len(b)))
    if ratio > cfg.dpo_max_length_ratio:
        raise RowError("dpo_length_ratio", f"length ratio {ratio:.1f} > {cfg.dpo_max_length_ratio}")


# ---------------------------------------------------------------- the stage


@dataclass
class _Item:
    row: RawRow
    record: Record
    kind: Kind

    @property
    def dedup_text(self) -> str:
        """SFT: user + assistant text (system prompts are often shared); DPO: the prompt's user text."""
        msgs = self.record["messages"] if self.kind == "sft" else self.record["prompt"]
        return "\n".join(m["content"] for m in msgs if m["role"] != "system")

    @property
    def prompt_text(self) -> str:
        msgs = self.record["messages"] if self.kind == "sft" else self.record["prompt"]
        return "\n".join(m["content"] for m in msgs if m["role"] == "user")


def _record(row: RawRow, used_ids: set[str]) -> Record:
    """Normalise and check one row (everything except length and duplicates); raises RowError."""
    if row.error:
        raise RowError(row.error, "line could not be parsed")
    obj = row.obj
    if not isinstance(obj, dict):
        raise RowError("not_object", f"expected a JSON object, got {type(obj).__name__}")
    required = ("instruction", "response") if row.format == "dolly" else REQUIRED_KEYS[row.format]
    missing = [k for k in required if k not in obj]  # Dolly's context is optional within a Dolly file
    if missing:
        raise RowError("missing_key", ", ".join(missing))
    rid = obj.get("id")
    rid = (
        str(rid)
        if isinstance(rid, (str, int)) and str(rid).strip()
        else f"{Path(row.source).stem}-{row.line}"
    )
    if rid in used_ids:
        rid = f"{Path(row.source).stem}-{row.line}:{rid}"
    source = obj.get("source") if isinstance(obj.get("source"), str) else row.source
    meta = {"meta": obj["meta"]} if isinstance(obj.get("meta"), dict) else {}  # subtopic, grammar frames
    if row.kind == "sft":
        messages = with_default_system(to_conversation(obj, row.format), row.system_prompt)
        return {"id": rid, "messages": messages, "source": source, **meta}
    prompt, chosen, rejected = to_preference(obj)
    prompt = with_default_system(prompt, row.system_prompt)
    return {"id": rid, "prompt": prompt, "chosen": chosen, "rejected": rejected, "source": source, **meta}


def _check(record: Record, kind: Kind, cfg: ValidateConfig, patterns: Patterns) -> None:
    if kind == "sft":
        msgs = record["messages"]
        check_texts(((f"messages[{i}]", m["content"]) for i, m in enumerate(msgs)), cfg.min_chars)
        check_roles(msgs, ends_with="assistant")
        texts = [(f"messages[{i}]", m["content"]) for i, m in enumerate(msgs)]
        patterns.check(texts, [m["content"] for m in msgs if m["role"] == "assistant"])
        return
    prompt = record["prompt"]
    texts = [(f"prompt[{i}]", m["content"]) for i, m in enumerate(prompt)]
    texts += [("chosen", record["chosen"]), ("rejected", record["rejected"])]
    check_texts(texts, cfg.min_chars)
    check_roles(prompt, ends_with="user")
    patterns.check(texts, [record["chosen"]])
    check_pair(record["chosen"], record["rejected"], cfg)


def _split(items: list[_Item], edges: Iterable[tuple[int, int]], fraction: float, seed: int) -> list[bool]:
    """Seeded cluster-level split: True = eval. Clusters (connected by edges) never straddle the split."""
    uf = UnionFind(len(items))
    for i, j in edges:
        uf.union(i, j)
    clusters: dict[int, list[int]] = defaultdict(list)
    for i in range(len(items)):
        clusters[uf.find(i)].append(i)
    order = sorted(clusters)
    random.Random(seed).shuffle(order)
    totals = Counter(it.kind for it in items)
    target = {k: (max(1, round(fraction * n)) if n >= 2 else 0) for k, n in totals.items()}
    taken: Counter[str] = Counter()
    is_eval = [False] * len(items)
    for root in order:
        sizes = Counter(items[i].kind for i in clusters[root])
        if all(taken[k] + n <= target[k] for k, n in sizes.items()) and any(sizes.values()):
            for i in clusters[root]:
                is_eval[i] = True
            taken.update(sizes)
        if all(taken[k] >= target[k] for k in target):
            break
    return is_eval


def validate(
    rows: Iterable[RawRow],
    cfg: ValidateConfig,
    count_tokens: TokenCounter,
    controls: Iterable[str] = (),
    formats: dict[str, str] | None = None,
    heldout: HeldoutConfig | None = None,
    pins: dict[str, str] | None = None,
    tokenizer: Any = None,
    pretraining: Sequence[tuple[str, str]] = (),
) -> ValidationResult:
    """Pure: raw rows in, clean split records + rejects with reasons + report out.

    Split: a file pinned in `pins` (source -> train | eval | heldout) goes there; a row whose metadata
    says held out (splits.row_split) goes to heldout; the rest take the seeded random train/eval split.
    With a tokenizer, every eval/heldout row gets its longest shared token n-gram with the training rows
    and `pretraining` ((source, text) of the base's corpus): the contamination report."""
    patterns = Patterns.build(controls, cfg)
    rows = list(rows)
    seen: Counter[str] = Counter(r.source for r in rows)
    rejects: list[Record] = []
    items: list[_Item] = []
    used_ids: set[str] = set()

    def reject(row: RawRow, reason: str, detail: str, record: Record | None = None) -> None:
        rejects.append(
            {
                "source": row.source,
                "line": row.line,
                "reason": reason,
                "detail": detail,
                "kind": row.kind,
                "row": row.obj if record is None else record,
            }
        )

    for row in rows:
        try:
            record = _record(row, used_ids)
            _check(record, row.kind, cfg, patterns)
        except RowError as err:
            reject(row, err.reason, err.detail)
            continue
        used_ids.add(record["id"])
        items.append(_Item(row, record, row.kind))

    # Length in tokens of the target tokenizer (rendered through its chat template).
    convs: list[list[Message]] = []
    for it in items:
        if it.kind == "sft":
            convs.append(it.record["messages"])
        else:
            for side in ("chosen", "rejected"):
                convs.append(it.record["prompt"] + [{"role": "assistant", "content": it.record[side]}])
    lengths = iter(count_tokens(convs)) if convs else iter(())
    survivors = []
    for it in items:
        n = next(lengths) if it.kind == "sft" else max(next(lengths), next(lengths))
        if n > cfg.max_tokens:
            reject(it.row, "too_long", f"{n} tokens > {cfg.max_tokens}", it.record)
        else:
            survivors.append(it)
    items = survivors

    # Exact then near duplicates within SFT (whole conversation) and within DPO (prompt).
    dup_stats: dict[str, Any] = {}
    kept: list[_Item] = []
    for kind in ("sft", "dpo"):
        group = [it for it in items if it.kind == kind]
        first: dict[str, int] = {}
        unique: list[_Item] = []
        for it in group:
            h = text_hash(it.dedup_text)
            if h in first:
                reject(
                    it.row, "duplicate", f"same normalised text as {unique[first[h]].record['id']}", it.record
                )
            else:
                first[h] = len(unique)
                unique.append(it)
        texts = [it.dedup_text for it in unique]
        near = near_duplicate_pairs(texts, cfg.near_dup_threshold, cfg.shingle_size, cfg.num_perm, cfg.seed)
        sem = semantic_duplicate_pairs(texts, cfg.semantic_threshold) if cfg.semantic_dedup and texts else []
        lexical = {i for pair in near for i in pair[:2]}
        uf = UnionFind(len(unique))
        for i, j, _ in near + sem:
            uf.union(i, j)
        clusters = Counter(uf.find(i) for i in range(len(unique)))
        for i, it in enumerate(unique):
            root = uf.find(i)
            if root != i:
                reason = "near_duplicate" if i in lexical else "semantic_duplicate"
                reject(it.row, reason, f"near-duplicate of {unique[root].record['id']}", it.record)
            else:
                kept.append(it)
        dup_stats[kind] = {
            "exact": len(group) - len(unique),
            "near_pairs": len(near),
            "semantic_pairs": len(sem),
            "near_clusters": sum(1 for c in clusters.values() if c > 1),
        }
    kept.sort(key=lambda it: (it.row.source, it.row.line))

    # Decontamination: prompt-level near-duplicate clusters across SFT and DPO stay on one side.
    prompts = [it.prompt_text for it in kept]
    by_hash: dict[str, int] = {}
    edges: list[tuple[int, int]] = []
    for i, p in enumerate(prompts):
        h = text_hash(p)
        if h in by_hash:
            edges.append((by_hash[h], i))
        else:
            by_hash[h] = i
    edges += [
        (i, j)
        for i, j, _ in near_duplicate_pairs(
            prompts, cfg.near_dup_threshold, cfg.shingle_size, cfg.num_perm, cfg.seed
        )
    ]
    if cfg.semantic_dedup and len(prompts) > 1:
        edges += [(i, j) for i, j, _ in semantic_duplicate_pairs(prompts, cfg.semantic_threshold)]
    uf = UnionFind(len(kept))
    for i, j in edges:
        uf.union(i, j)
    split = _fixed_splits(kept, uf, heldout or HeldoutConfig(), pins or {})
    auto = [i for i, sp in enumerate(split) if sp is None]
    index = {i: k for k, i in enumerate(auto)}
    auto_edges = [(index[i], index[j]) for i, j in edges if i in index and j in index]
    for i, ev in zip(auto, _split([kept[i] for i in auto], auto_edges, cfg.eval_fraction, cfg.seed), strict=True):
        split[i] = "eval" if ev else "train"
    members: dict[int, set[str]] = defaultdict(set)
    sizes: Counter[int] = Counter()
    for i, it in enumerate(kept):
        members[uf.find(i)].add(it.kind)
        sizes[uf.find(i)] += 1
    dup_stats["prompt_clusters"] = sum(1 for c in sizes.values() if c > 1)
    dup_stats["cross_clusters"] = sum(1 for k in members.values() if len(k) == 2)

    out: dict[str, list[Record]] = {name: [] for name in OUTPUTS}
    for it, sp in zip(kept, split, strict=True):
        out[f"{it.kind}_{sp}"].append(it.record)

    contamination, rows_report = (
        contamination_report(out, pretraining, tokenizer, cfg.contamination_ngram) if tokenizer is not None
        else ({}, [])
    )
    report = _report(seen, kept, rejects, dup_stats, out, formats or {})
    if contamination:
        report["contamination"] = contamination
    examples: dict[str, list[Record]] = defaultdict(list)
    for r in rejects:
        if len(examples[r["reason"]]) < cfg.report_examples:
            examples[r["reason"]].append(r)
    return ValidationResult(**out, rejects=rejects, report=report, examples=dict(examples),
                            contamination=rows_report)


def _fixed_splits(kept: list[_Item], uf: UnionFind, heldout: HeldoutConfig, pins: dict[str, str]) -> list[str | None]:
    """Pinned files and held-out metadata decide first; an unpinned row whose prompt is a near-duplicate of
    a pinned eval/heldout row's follows it there (heldout before eval), so a cluster never reaches train."""
    split: list[str | None] = []
    for it in kept:
        pin = pins.get(it.row.source, "auto")
        split.append(pin if pin != "auto" else row_split(it.record.get("meta"), heldout))
    pinned = {it.row.source for it in kept if pins.get(it.row.source, "auto") != "auto"}
    cluster_split: dict[int, str] = {}
    for i, sp in enumerate(split):
        if sp in ("eval", "heldout"):
            root = uf.find(i)
            cluster_split[root] = "heldout" if "heldout" in (sp, cluster_split.get(root)) else sp
    for i, it in enumerate(kept):
        if split[i] is None and it.row.source not in pinned and uf.find(i) in cluster_split:
            split[i] = cluster_split[uf.find(i)]
    return split


def _segments(record: Record) -> list[str]:
    """A record's texts for the contamination search: every message content except system prompts."""
    msgs = record["messages"] if "messages" in record else record["prompt"]
    texts = [m["content"] for m in msgs if m["role"] != "system"]
    return texts + ([record["chosen"], record["rejected"]] if "chosen" in record else [])


def contamination_report(
    out: dict[str, list[Record]], pretraining: Sequence[tuple[str, str]], tokenizer: Any, ngram: int,
) -> tuple[dict[str, Any], list[Record]]:
    """Longest token n-gram each eval/heldout row shares with any training text: SFT and DPO train rows
    (generated and user files) and the base's pretraining corpus. System prompts are left out (every row
    shares them) and contents are tokenized one message at a time, so chat-template tokens never count."""
    backend = tokenizer.backend_tokenizer

    def encode(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)] if texts else []

    train_labels: list[str] = []
    train_ids: list[str] = []
    train_texts: list[str] = []
    for name in ("sft_train", "dpo_train"):
        for rec in out[name]:
            for text in _segments(rec):
                train_labels.append(str(rec.get("source", name)))
                train_ids.append(str(rec["id"]))
                train_texts.append(text)
    for label, text in pretraining:
        train_labels.append(label)
        train_ids.append("")
        train_texts.append(text)
    train = encode(train_texts)
    evaluated = [(name.split("_", 1)[1], rec) for name in OUTPUTS if not name.endswith("_train") for rec in out[name]]
    eval_segments: list[list[int]] = []
    owner: list[int] = []
    for k, (_, rec) in enumerate(evaluated):
        for seg in encode(_segments(rec)):
            eval_segments.append(seg)
            owner.append(k)
    matches = longest_shared(eval_segments, owner, train, len(evaluated))
    rows: list[Record] = []
    for (split, rec), m in zip(evaluated, matches, strict=True):
        span = eval_segments[m.segment][m.offset : m.offset + m.longest] if m.longest else []
        rows.append({
            "id": rec["id"], "split": split, "kind": "sft" if "messages" in rec else "dpo",
            "source": rec.get("source", ""), "longest": m.longest, "flagged": m.longest >= ngram,
            "matched_source": train_labels[m.train_segment] if m.longest else None,
            "matched_id": train_ids[m.train_segment] if m.longest else None,
            "span": tokenizer.decode(span) if m.longest else None,
        })
    summary: dict[str, Any] = {"ngram": ngram, "excluded": "system prompts; chat-template tokens",
                               "training_segments": dict(sorted(Counter(train_labels).items())),
                               "training_tokens": int(sum(map(len, train))), "splits": {}}
    for split in ("eval", "heldout"):
        mine = [r for r in rows if r["split"] == split]
        flagged = [r for r in mine if r["flagged"]]
        summary["splits"][split] = {
            "rows": len(mine), "flagged": len(flagged),
            "flagged_share": round(len(flagged) / len(mine), 6) if mine else 0.0,
            "longest_max": max((r["longest"] for r in mine), default=0),
            "longest_mean": round(float(np.mean([r["longest"] for r in mine])), 3) if mine else 0.0,
            "flagged_by_source": dict(sorted(Counter(r["matched_source"] for r in flagged).items())),
        }
    return summary, rows


def _report(
    seen: Counter[str],
    kept: list[_Item],
    rejects: list[Record],
    dups: dict[str, Any],
    out: dict[str, list[Record]],
    formats: dict[str, str],
) -> dict[str, Any]:
    kept_by = Counter(it.row.source for it in kept)
    reasons_by: dict[str, Counter[str]] = defaultdict(Counter)
    for r in rejects:
        reasons_by[r["source"]][r["reason"]] += 1
    total_seen = sum(seen.values())
    return {
        "seen": total_seen,
        "kept": len(kept),
        "rejected": len(rejects),
        "reject_share": round(len(rejects) / total_seen, 6) if total_seen else 0.0,
        "reasons": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "sources": {
            src: {
                "format": formats.get(src, ""),
                "seen": n,
                "kept": kept_by[src],
                "rejected": sum(reasons_by[src].values()),
                "reasons": dict(sorted(reasons_by[src].items())),
            }
            for src, n in sorted(seen.items())
        },
        "duplicates": dups,
        "split": {k: len(v) for k, v in out.items()},
    }


def check_contamination(result: ValidationResult, cfg: ValidateConfig) -> None:
    """Fail, naming rows, when a split's flagged share exceeds validate.max_contamination for it."""
    summary = result.report.get("contamination", {}).get("splits", {})
    problems = []
    for split, stats in summary.items():
        limit = getattr(cfg.max_contamination, split)
        if limit is None or stats["flagged_share"] <= limit:
            continue
        flagged = [r for r in result.contamination if r["split"] == split and r["flagged"]]
        named = "; ".join(f"{r['id']} ({r['longest']} tokens shared with {r['matched_source']}: {r['span']!r})"
                          for r in flagged[:5])
        problems.append(f"{stats['flagged']} of {stats['rows']} {split} rows ({stats['flagged_share']:.1%} > "
                        f"max_contamination.{split} {limit:.1%}) share a {cfg.contamination_ngram}-gram or longer "
                        f"with training data: {named}{' ...' if len(flagged) > 5 else ''}")
    if problems:
        raise ContaminationError("validate: " + "\n  ".join(problems) +
                                 "\nSee data/clean/contamination.jsonl and reports/validation.md")


def check_reject_share(result: ValidationResult, cfg: ValidateConfig) -> None:
    """Fail (naming the top reasons) when more rows were rejected than validate.max_reject_share."""
    if result.reject_share > cfg.max_reject_share:
        top = ", ".join(f"{r} ({n})" for r, n in Counter(result.report["reasons"]).most_common(3))
        raise RejectShareError(
            f"validate: rejected {result.report['rejected']} of {result.report['seen']} rows "
            f"({result.reject_share:.1%} > max_reject_share {cfg.max_reject_share:.1%}); top reasons: {top}. "
            "See data/clean/rejects.jsonl and reports/validation.md"
        )


def _summary(row: Any, width: int = 240) -> str:
    """A readable one-line view of a rejected row: its non-system turns, or its JSON."""
    if isinstance(row, dict) and isinstance(row.get("messages") or row.get("prompt"), list):
        try:
            turns = [m for m in (row.get("messages") or row["prompt"]) if m.get("role") != "system"]
            text = " | ".join(f"{m['role']}: {m['content']}" for m in turns)
            if "chosen" in row:
                text += f" | chosen: {row['chosen']} | rejected: {row['rejected']}"
        except (AttributeError, KeyError, TypeError):
            text = json.dumps(row, ensure_ascii=False)
    else:
        text = row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)
    text = " ".join(str(text).split()).replace("`", "'")
    return text if len(text) <= width else text[:width] + " ..."


def render_markdown(result: ValidationResult) -> str:
    rep = result.report
    sources = [
        {"source": s, "format": v["format"], "system prompt": v.get("system_prompt", ""), "seen": v["seen"],
         "kept": v["kept"], "rejected": v["rejected"]}
        for s, v in rep["sources"].items()
    ]
    # rejects by source (rows) and reason (columns)
    reasons = pd.DataFrame.from_dict({s: v["reasons"] for s, v in rep["sources"].items() if v["reasons"]},
                                     orient="index").fillna(0).astype(int)
    lines = [
        "# Validation report",
        "",
        f"Seen {rep['seen']}, kept {rep['kept']}, rejected {rep['rejected']} ({rep['reject_share']:.1%}).",
        "",
        markdown_table(sources),
        "",
        markdown_table([{"split": k, "rows": v} for k, v in rep["split"].items()]),
    ]
    if not reasons.empty:
        lines += ["", markdown_table(reasons.sort_index(axis=1).rename_axis("rejected from").reset_index())]
    if "contamination" in rep:
        c = rep["contamination"]
        lines += ["", "## Contamination", "",
                  f"Longest token n-gram each evaluation row shares with any training text ({c['training_tokens']} "
                  f"tokens: SFT/DPO train rows and the base's pretraining corpus; {c['excluded']} excluded). "
                  f"A shared {c['ngram']}-gram flags the row; every row is in data/clean/contamination.jsonl.", "",
                  markdown_table([{"split": k, "rows": v["rows"], "flagged": v["flagged"],
                                   "flagged share": f"{v['flagged_share']:.1%}", "longest (max)": v["longest_max"],
                                   "longest (mean)": f"{v['longest_mean']:.1f}"} for k, v in c["splits"].items()])]
        flagged = [r for r in result.contamination if r["flagged"]][: max(1, 2 * len(c["splits"]))]
        if flagged:
            lines += ["", "Flagged, for example:", ""]
            lines += [f"- `{r['split']}` {r['id']}: {r['longest']} tokens shared with `{r['matched_source']}`: "
                      f"`{_summary(r['span'], 160)}`" for r in flagged]
    lines += ["", "## Rejects by reason", ""]
    for reason, n in sorted(rep["reasons"].items(), key=lambda kv: -kv[1]):
        lines += [f"### {reason} ({n})", ""]
        for ex in result.examples.get(reason, []):
            lines += [f"- `{ex['source']}:{ex['line']}` {ex['detail']}", f"  `{_summary(ex['row'])}`"]
        lines.append("")
    return "\n".join(lines)


def token_counter(tokenizer: Any, limit: int | None = None) -> TokenCounter:
    """Token length of each conversation as rendered by the tokenizer's chat template.

    Fast path: content tokens + the template's overhead for that role sequence (rendered once per
    sequence with placeholder contents). Exact wherever the template separates contents with control
    tokens; rows within a margin of `limit` (or all rows when limit is None) are rendered exactly.
    """
    backend = tokenizer.backend_tokenizer
    overhead: dict[tuple[str, ...], int] = {}

    def lengths(texts: list[str], chunk: int = 4096) -> list[int]:
        out: list[int] = []
        for lo in range(0, len(texts), chunk):  # chunks: Encoding objects are large, keep only lengths
            out += [
                len(e.ids)
                for e in backend.encode_batch_fast(texts[lo : lo + chunk], add_special_tokens=False)
            ]
        return out

    def exact(convs: list[list[Message]]) -> list[int]:
        return lengths([tokenizer.apply_chat_template(c, tokenize=False) for c in convs])

    def count(convs: list[list[Message]]) -> list[int]:
        if limit is None:
            return exact(convs)
        contents = [m["content"].strip() for c in convs for m in c]
        sizes = lengths(contents)
        out, k = [], 0
        for c in convs:
            roles = tuple(m["role"] for m in c)
            if roles not in overhead:
                overhead[roles] = exact([[{"role": r, "content": "x"} for r in roles]])[0] - len(roles) * len(
                    backend.encode("x", add_special_tokens=False).ids
                )
            out.append(overhead[roles] + sum(sizes[k : k + len(c)]))
            k += len(c)
        near = [
            i for i, (n, c) in enumerate(zip(out, convs, strict=True)) if abs(n - limit) <= 2 * len(c) + 2
        ]
        for i, n in zip(near, exact([convs[i] for i in near]) if near else [], strict=True):
            out[i] = n
        return out

    return count




def pretraining_texts(path: Path) -> list[tuple[str, str]]:
    """(source, text) of every non-system message and document the base was pretrained on; none if no file
    (a real base: its pretraining data is not ours to check)."""
    if not path.exists():
        return []
    out = []
    for line, row in iter_jsonl(path):
        texts = [m.get("content", "") for m in row.get("messages", []) if m.get("role") != "system"]
        texts += [row["text"]] if isinstance(row.get("text"), str) else []
        out += [(str(path), t) for t in texts if isinstance(t, str) and t]
        if not texts:
            raise InputError(f"{path}:{line}: a pretraining row with neither messages nor text")
    return out


def sources(params: Params) -> list[DataSource]:
    raw = params.paths.raw
    generated = [  # generated rows carry the persona's system turn already
        DataSource(path=raw / "sft.jsonl", kind="sft", format="openai", system_prompt="none"),
        DataSource(path=raw / "dpo.jsonl", kind="dpo", format="preference", system_prompt="none"),
    ]
    return [s for s in generated if s.path.exists()] + list(params.data.sources)


def source_system_prompt(src: DataSource, params: Params) -> str | None:
    """data.sources[].system_prompt resolved: persona -> the persona's system prompt, none -> None, else the text."""
    return {"persona": system_prompt(params.generate), "none": None}.get(src.system_prompt, src.system_prompt)


def run(params: Params) -> ValidationResult:
    """Read the sources, validate, write data/clean and the reports; fail over the reject threshold."""
    cfg = params.validate
    rows: list[RawRow] = []
    formats: dict[str, str] = {}
    srcs = sources(params)
    if not srcs:
        raise InputError(
            f"{params.paths.raw}/sft.jsonl: no input data (run `dvc repro generate` or set data.sources)"
        )
    pins: dict[str, str] = {}
    for src in srcs:
        fmt, part = read_source(src.path, src.kind, src.format, source_system_prompt(src, params))
        formats[str(src.path)] = fmt
        pins[str(src.path)] = src.split
        rows += part
    tokenizer, _ = load_base_tokenizer(params.paths.base, params.model.chat_template)
    result = validate(
        rows,
        cfg,
        token_counter(tokenizer, cfg.max_tokens),
        control_strings(tokenizer, cfg.extra_control_strings),
        formats,
        params.heldout,
        pins,
        tokenizer,
        pretraining_texts(params.paths.base_corpus / offline.CORPUS_FILE),
    )
    for src in srcs:  # the report names each file's system-prompt choice
        result.report["sources"][str(src.path)]["system_prompt"] = src.system_prompt
    clean = params.paths.clean
    for name in (*OUTPUTS, "rejects", "contamination"):
        write_jsonl(clean / f"{name}.jsonl", getattr(result, name))
    write_json(params.paths.reports / "validation.json", result.report)
    (params.paths.reports / "validation.md").write_text(render_markdown(result))
    log.info(
        "validate: kept %d of %d (%s); split %s",
        result.report["kept"],
        result.report["seen"],
        result.report["reasons"] or "no rejects",
        result.report["split"],
    )
    check_reject_share(result, cfg)
    check_contamination(result, cfg)
    return result


def main() -> None:
    run(load_params())


if __name__ == "__main__":
    run_main(main)
