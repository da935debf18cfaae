"""bench/handwritten.py: the hand-written pairs stay out of every training source, and the scorer runs."""

from __future__ import annotations

import numpy as np

from bench import handwritten
from stages.base import build_tokenizer
from stages.common import offline
from stages.common.config import load_params
from stages.common.contamination import longest_shared
from stages.common.io import read_jsonl
from stages.common.templates import LLAMA3
from stages.generate import generate_offline
from tests.repo import ROOT
from tests.training_workspace import tiny_model


def test_pairs_share_no_long_ngram_with_the_grammar_or_the_base_corpus():
    """Written by hand, not from the grammar: the longest token run any pair shares with what the default
    run trains on (generated rows and the base's pretraining corpus) is far below the 13-gram flag."""
    params = load_params(ROOT / "params.yaml")
    rows = read_jsonl(handwritten.PAIRS)
    assert len(rows) >= 30 and len({r["question"] for r in rows}) == len(rows)
    corpus = offline.corpus_texts(offline.base_corpus(params.base.corpus_size, params.base.seed, params.heldout,
                                                      offline.builtin_persona()))
    sft, dpo, _ = generate_offline(params.generate, params.heldout)
    training = corpus + [m["content"] for r in sft for m in r["messages"][1:]]
    training += [t for r in dpo for t in (r["prompt"][-1]["content"], r["chosen"], r["rejected"])]
    tok = build_tokenizer(corpus, params.base.vocab_size, LLAMA3)

    def ids(texts):
        return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]

    segments = [t for r in rows for t in (r["question"], r["persona"], r["generic"])]
    matches = longest_shared(ids(segments), [i // 3 for i in range(len(segments))], ids(training), len(rows))
    longest = [m.longest for m in matches]
    assert max(longest) < 13, max(longest)


def test_score_returns_margins_with_and_without_system_prompt():
    rows = read_jsonl(handwritten.PAIRS)[:4]
    tok = build_tokenizer([t for r in rows for t in r.values()], 400, LLAMA3)
    model = tiny_model(tok, seed=0).eval()
    for system in ("You are terse.", None):
        out = handwritten.score(model, tok, rows, system)
        assert set(out) == {"reward_margin", "reward_accuracy", "reward_margin_per_token", "reward_accuracy_per_token"}
        assert all(np.isfinite(v) for v in out.values())
