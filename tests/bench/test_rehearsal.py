"""bench/rehearsal.py and bench/gpu.sh: the logit paths' peak stays flat when vocabulary x tokens doubles (the
rehearsal at reduced size), the workspace it builds is valid params, the GPU script is valid bash that stops
without CUDA."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from bench import gpu, rehearsal
from stages.common.config import parse_params

ROOT = Path(__file__).resolve().parents[2]
OURS = ("pair_logprobs", "perplexity", "merge_check", "trl_lm_head_cpu")


@pytest.mark.slow
def test_logit_paths_peak_stays_flat_when_vocab_times_tokens_doubles():
    """Each path's peak above what the process held before it, at (V, T), (2V, T) and (V, 2T) with V = 16,384 and
    T = 1,024 scored tokens: ours stay within 25% + 8 MB of the first; the control (one full-vocabulary
    log-softmax of the same tokens) doubles, so the measurement does see logits."""
    peaks = rehearsal.logit_paths(16384, 1024)
    first, *doubled = peaks.values()
    for name in OURS:
        for other in doubled:
            assert other[name] <= 1.25 * first[name] + 8, (name, peaks)
    control = first["full_logits_control"]
    assert control > 40  # 1,024 x 16,384 fp32 logits and their log-softmax: 128 MB
    for other in doubled:
        assert other["full_logits_control"] > 1.6 * control, peaks
        assert max(other[n] for n in OURS) < 0.5 * other["full_logits_control"], peaks


def test_rehearsal_workspace_params_load_with_long_user_conversations(tmp_path):
    params = rehearsal.prepare(tmp_path, rehearsal.overrides(["sft.trainer.max_steps=1", "model.seed=5"]))
    p = parse_params(params)
    assert p.base.vocab_size == 128256 and p.base.tokenizer == "llama-3.1" and p.model.max_seq_length == 2048
    assert p.sft.method == "qlora" and p.sft.trainer["max_steps"] == 1 and p.model.seed == 5
    assert [s.path.name for s in p.data.sources] == ["long_sft.jsonl", "long_dpo.jsonl"]
    sft = (tmp_path / "data/user/long_sft.jsonl").read_text().splitlines()
    assert len(sft) == 8 and len(set(sft)) == 8
    reduced = parse_params(rehearsal.prepare(tmp_path / "recipe", rehearsal.REDUCED,
                                             preset=ROOT / "presets/recipe-llama-3.1-8b.yaml"))
    assert reduced.model.base == "unsloth/Llama-3.1-8B-Instruct" and reduced.generate.provider == "offline"


def test_the_8b_table_covers_every_model_stage_on_three_gpus():
    text, rows = rehearsal.gpu_table()
    assert {r["stage"] for r in rows} == {"sft", "merge", "reference", "dpo", "evaluate", "export"}
    assert all(set(r["fits"]) == {"24", "48", "80"} for r in rows) and "24 GB" in text


def test_gpu_script_is_valid_bash_and_stops_without_cuda(monkeypatch):
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu.sh")], check=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device visible to torch"):
        gpu.check()
