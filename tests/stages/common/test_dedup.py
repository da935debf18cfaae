"""dedup: numpy MinHash LSH finds exactly the pairs over the Jaccard threshold; shingles of short texts."""

from __future__ import annotations

import random

from stages.common.dedup import ShingleSets, near_duplicate_pairs, shingle_sets


def test_minhash_lsh_matches_exact_jaccard():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    docs = [" ".join(rng.choice(vocab) for _ in range(80)) for _ in range(300)]
    for i in range(0, 60, 2):  # plant near-duplicates with 1-4 substituted words
        words = docs[i].split()
        for _ in range(1 + i % 4):
            words[rng.randrange(len(words))] = rng.choice(vocab)
        docs[i + 1] = " ".join(words)
    sets = shingle_sets(docs, 5)
    truth = {(i, j) for i in range(len(docs)) for j in range(i + 1, len(docs)) if sets.jaccard(i, j) >= 0.8}
    found = {(i, j) for i, j, _ in near_duplicate_pairs(docs, 0.8)}
    assert len(truth) >= 15
    assert found == truth


def test_shingles_of_short_texts():
    sets = shingle_sets(["one two", "one two", "", "a b c d e f"], 5)
    assert isinstance(sets, ShingleSets)
    assert [sets.size(i) for i in range(4)] == [1, 1, 0, 2]
    assert sets.jaccard(0, 1) == 1.0 and sets.jaccard(0, 2) == 0.0
