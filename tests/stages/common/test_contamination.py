"""longest_shared: the longest n-gram each evaluation row shares with training text, against brute force."""

from __future__ import annotations

import random

from stages.common.contamination import longest_shared


def brute(evals: list[list[int]], train: list[list[int]]) -> int:
    best = 0
    for e in evals:
        for t in train:
            for i in range(len(e)):
                for j in range(len(t)):
                    k = 0
                    while i + k < len(e) and j + k < len(t) and e[i + k] == t[j + k]:
                        k += 1
                    best = max(best, k)
    return best


def test_matches_brute_force_and_points_at_the_match():
    rng = random.Random(0)
    for _ in range(150):
        train = [[rng.randrange(5) for _ in range(rng.randrange(1, 12))] for _ in range(rng.randrange(1, 5))]
        evals = [[rng.randrange(5) for _ in range(rng.randrange(1, 12))] for _ in range(rng.randrange(1, 6))]
        owner = [rng.randrange(3) for _ in evals]
        for row, m in enumerate(longest_shared(evals, owner, train, 3)):
            mine = [e for e, o in zip(evals, owner, strict=True) if o == row]
            assert m.longest == (brute(mine, train) if mine else 0)
            if m.longest:
                span = evals[m.segment][m.offset : m.offset + m.longest]
                t = train[m.train_segment]
                assert owner[m.segment] == row and any(t[j : j + m.longest] == span for j in range(len(t)))


def test_ngrams_never_span_two_segments():
    """[1, 2] + [3, 4] in training does not contain [2, 3]: turns are separate segments."""
    res = longest_shared([[2, 3]], [0], [[1, 2], [3, 4]], 1)
    assert res[0].longest == 1
    assert longest_shared([], [], [[1]], 2)[1].longest == 0 and longest_shared([[1]], [0], [], 1)[0].longest == 0
