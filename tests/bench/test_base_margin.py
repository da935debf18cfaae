"""bench/base_margin.py: the per-token scorer's figures agree with the summed log-probs the stages use."""

from __future__ import annotations

import numpy as np
import pytest

from bench import base_margin
from stages.base import build_tokenizer
from stages.common.logprobs import pair_logprobs
from stages.common.templates import LLAMA3
from tests.training_workspace import tiny_model

ROWS = [{"prompt": [{"role": "user", "content": f"How should I think about {s}?"}],
         "chosen": f"Treat {s} as a cost. Measure it. Decide.",
         "rejected": f"Oh, {s} can feel so big! You've got this!"} for s in ("luck", "grief", "a price war")]


def test_score_matches_pair_logprobs():
    tok = build_tokenizer([t for r in ROWS for t in (r["chosen"], r["rejected"], r["prompt"][0]["content"])], 400,
                          LLAMA3)
    model = tiny_model(tok, seed=0).eval()
    out = base_margin.score(model, tok, ROWS)
    prompts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in ROWS]
    chosen, rejected = pair_logprobs(model, tok, prompts, [r["chosen"] + tok.eos_token for r in ROWS],
                                     [r["rejected"] + tok.eos_token for r in ROWS])
    c, r = np.array(chosen.logps), np.array(rejected.logps)
    assert out["pairs"] == 3
    assert out["reward_margin"] == pytest.approx(np.mean(c - r), abs=1e-3)
    per_token = c / np.array(chosen.n_tokens) - r / np.array(rejected.n_tokens)
    assert out["reward_margin_per_token"] == pytest.approx(np.mean(per_token), abs=1e-4)
    assert all(np.isfinite(v) for v in out.values())
