"""Longest token n-gram each evaluation row shares with any training text (validate's contamination report).

Texts are token-id sequences in the target tokenizer, one per message content, so an n-gram never
spans two turns and the chat template's control tokens never count. Callers leave out what every row
legitimately shares: system prompts.

The search extends every window one token at a time and keeps, on each side, only the windows whose
n-gram also occurs on the other side (an (n+1)-gram can only match where its n-gram prefix did), so
after the first few lengths almost nothing is left. N-grams are compared by a 64-bit polynomial hash.

    res = longest_shared(eval_segments, eval_owner, train_segments)   # one Match per eval row
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier; arithmetic wraps mod 2**64


@dataclass(frozen=True)
class Match:
    """For one evaluation row: the longest shared n-gram (0 = not even one token), where it starts in
    the row's tokens (segment, offset) and the training segment it was found in (-1 when none)."""

    longest: int
    segment: int
    offset: int
    train_segment: int


def _flatten(segments: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(s) for s in segments), dtype=np.int64, count=len(segments))
    flat = np.fromiter((t for s in segments for t in s), dtype=np.uint64, count=int(lengths.sum()))
    seg = np.repeat(np.arange(len(segments), dtype=np.int64), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(segments) else lengths
    return flat, seg, starts


def longest_shared(
    eval_segments: Sequence[Sequence[int]], eval_owner: Sequence[int], train_segments: Sequence[Sequence[int]],
    n_rows: int,
) -> list[Match]:
    """The longest n-gram each of n_rows evaluation rows shares with the training segments.

    eval_owner[i] is the row that eval_segments[i] belongs to."""
    best = [Match(0, -1, 0, -1)] * n_rows
    if not eval_segments or not train_segments:
        return best
    fe, se, starts_e = _flatten(eval_segments)
    ft, st, _ = _flatten(train_segments)
    owner = np.asarray(eval_owner, dtype=np.int64)
    pe, pt = np.arange(len(fe), dtype=np.int64), np.arange(len(ft), dtype=np.int64)
    he, ht = np.zeros(len(pe), dtype=np.uint64), np.zeros(len(pt), dtype=np.uint64)
    n = 0
    with np.errstate(over="ignore"):
        while len(pe) and len(pt):
            keep_e = pe + n < len(fe)
            pe, he = pe[keep_e], he[keep_e]
            keep_e = se[pe + n] == se[pe]
            pe, he = pe[keep_e], he[keep_e]
            keep_t = pt + n < len(ft)
            pt, ht = pt[keep_t], ht[keep_t]
            keep_t = st[pt + n] == st[pt]
            pt, ht = pt[keep_t], ht[keep_t]
            he = he * _BASE + fe[pe + n] + np.uint64(1)
            ht = ht * _BASE + ft[pt + n] + np.uint64(1)
            n += 1
            hit_e, hit_t = np.isin(he, ht), np.isin(ht, he)
            pe, he, pt, ht = pe[hit_e], he[hit_e], pt[hit_t], ht[hit_t]
            if not len(pe):
                break
            order = np.argsort(ht, kind="stable")
            where = pt[order[np.searchsorted(ht[order], he)]]  # a training window with the same n-gram
            rows = owner[se[pe]]
            first = np.unique(rows, return_index=True)[1]
            for k in first:
                segment = int(se[pe[k]])
                best[int(rows[k])] = Match(n, segment, int(pe[k] - starts_e[segment]), int(st[where[k]]))
    return best
