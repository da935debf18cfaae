"""bench/evaluate.py runs end to end at a tiny size and its paths, TRL's own DPOTrainer.evaluate() included, agree."""

from __future__ import annotations

import json
import sys

from bench import evaluate as bench


def test_bench_evaluate_runs_and_paths_agree(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench.evaluate", "--pairs", "6", "--batch-size", "4", "--repeats", "1"])
    bench.main()
    out = json.loads(capsys.readouterr().out)
    assert out["pairs"] == 6
    assert out["max_abs_logp_diff"] < 1e-3
    assert out["trl_max_abs_logp_diff"] < 1e-3  # TRL's per-pair policy log-probs = pair_logprobs'
    assert out["trl_evaluate_pairs_per_s"] > 0 and set(out["peak_rss_increase_mb"]) >= {"pair", "trl_evaluate"}
    assert out["mean_prompt_tokens"] > 50  # the persona system prompt is part of every prompt
    for key in ("pair_pairs_per_s", "separate_pairs_per_s", "one_at_a_time_pairs_per_s", "roofline_max_speedup"):
        assert out[key] > 0
