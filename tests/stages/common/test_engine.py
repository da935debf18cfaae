"""The engine layer on the tiny model: qlora is NF4 + double quant, partial really freezes, both engines
write adapters that plain transformers + peft load."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from stages.common.config import LoraConfig, PartialConfig, QuantizationConfig
from stages.common.engine import TrainSpec, freeze_all_but_last_blocks, load_for_training
from stages.common.io import InputError
from tests.tiny import LOAD_ADAPTER, TINY_BASE, curve, run_python, run_stage, workspace


def spec(tiny, method: str, **kw) -> TrainSpec:
    return TrainSpec(model=str(tiny / "models/base"), tokenizer=tiny / "data/formatted/tokenizer", method=method,
                     engine="transformers", lora=LoraConfig(r=4, alpha=8),
                     quantization=kw.pop("quantization", QuantizationConfig()),
                     partial=kw.pop("partial", PartialConfig()), max_seq_length=256, seed=1)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_qlora_is_nf4_with_double_quant_and_compute_dtype_from_params(tiny, compute_dtype):
    import bitsandbytes as bnb

    q = QuantizationConfig(double_quant=True, compute_dtype=compute_dtype)
    model, _, engine = load_for_training(spec(tiny, "qlora", quantization=q))
    assert engine == "transformers"
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 7 * TINY_BASE.num_layers  # q k v o gate up down in every block
    for module in linear4:
        assert module.weight.quant_type == "nf4"
        assert module.weight.quant_state.nested  # double quantisation: the absmax scales are quantised too
        assert module.compute_dtype == getattr(torch, compute_dtype)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_qlora_without_double_quant(tiny):
    import bitsandbytes as bnb

    model, _, _ = load_for_training(spec(tiny, "qlora", quantization=QuantizationConfig(double_quant=False)))
    module = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert not module.weight.quant_state.nested


def test_partial_trains_only_last_blocks_norm_and_head(tiny):
    model, _, _ = load_for_training(spec(tiny, "partial", partial=PartialConfig(last_n_blocks=1)))
    last = TINY_BASE.num_layers - 1
    for name, param in model.named_parameters():
        expected = name.startswith((f"model.layers.{last}.", "model.norm.", "lm_head."))
        assert param.requires_grad == expected, name
    assert any(p.requires_grad for n, p in model.named_parameters() if n.startswith("lm_head."))


def test_partial_more_blocks_than_the_model_names_the_key(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny / "models/base"))
    with pytest.raises(InputError, match=r"sft\.partial\.last_n_blocks=5 > 2"):
        freeze_all_but_last_blocks(model, 5)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["unsloth", "transformers"])
def test_both_engines_train_and_write_adapters_plain_peft_loads(tiny, tmp_path, engine):
    """Same data, seed and params through each engine (own process: unsloth patches globally)."""
    if engine == "unsloth" and importlib.util.find_spec("unsloth") is None:  # never import it here
        pytest.skip("unsloth is not installed")
    ws = workspace(tiny, tmp_path / engine, {"sft": {"engine": engine, "trainer": {
        "learning_rate": 3.0e-2, "num_train_epochs": 2, "eval_strategy": "no", "save_strategy": "no",
        "load_best_model_at_end": False}}})
    run_stage("stages.sft", ws)
    report = json.loads((ws / "reports/sft.json").read_text())
    assert report["engine"] == engine and report["method"] == "lora"
    losses = list(curve(ws / "dvclive/sft", "train/loss").values())  # DVCLive, the stage's default tracker
    assert len(losses) == report["steps"] and losses[-1] < losses[0], losses
    # the same tokens carry the loss whichever engine prepared the data (assistant-only by default)
    masks = [json.loads(line)["assistant_masks"] for line in (tiny / "data/formatted/sft_train.jsonl").open()]
    assert report["loss_tokens"] == sum(map(sum, masks)) < report["train_tokens"]
    assert (ws / "models/sft/adapter_config.json").exists()
    assert json.loads((ws / "models/sft/tuneforge.json").read_text())["engine"] == engine
    loaded = json.loads(run_python(LOAD_ADAPTER, ws).strip().splitlines()[-1])
    assert loaded["finite"] and loaded["lora_tensors"] > 0


def _full_logits_logprob(hidden, weight, bias, targets, temperature, softcap, logit_scale, outputs):
    """What TorchLogProb computed before it was chunked: full logits for every position, plain autograd (the
    projection under the caller's autocast, the rest in fp32)."""
    z = torch.nn.functional.linear(hidden.float(), weight.float(), bias.float()).float()
    with torch.autocast("cpu", enabled=False):
        z = z * logit_scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        z = z / temperature
        log_z = torch.logsumexp(z, dim=-1)
        log_probs = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_z
        entropy = log_z - (torch.softmax(z, dim=-1) * z).sum(-1)
        with torch.no_grad():
            log_sum_sq = torch.logsumexp(2 * z, dim=-1) - 2 * log_z
            return log_probs, entropy, log_sum_sq, z.mean(-1), z.argmax(-1) == targets


@pytest.mark.parametrize("softcap,scale,temperature", [(None, 1.0, 1.0), (30.0, 0.5, 0.7)])
@pytest.mark.parametrize("autocast", [False, True])
def test_torch_logprob_is_chunked_and_equals_full_logits(monkeypatch, softcap, scale, temperature, autocast):
    """TRL's LM-head kernel stand-in: the same outputs and gradients as one full-vocabulary autograd pass, with
    logits for at most one chunk of positions (chunks of 3 of 10 positions here). Under bf16 autocast the outputs
    are still equal; the gradients, accumulated in fp32 as TRL's kernel does, are at least as close to the fp32
    gradients as autograd's bf16 ones."""
    from stages.common import memory
    from stages.common.engine import TorchLogProb

    vocab, hidden_size, n = 50, 8, 10
    monkeypatch.setattr(memory, "LOGIT_CHUNK_BYTES", memory.LOGIT_COPIES * 4 * vocab * 3)
    assert memory.logit_chunk_tokens(vocab) == 3
    torch.manual_seed(0)
    hidden = torch.randn(n, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    bias = torch.randn(vocab, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    from stages.common import engine

    seen = []
    real_project = engine._project

    def counting_project(x, *args, **kwargs):  # every projection of the head, forward and backward
        seen.append(x.shape[0])
        return real_project(x, *args, **kwargs)

    monkeypatch.setattr(engine, "_project", counting_project)

    def run(fn, amp):
        for t in (hidden, weight, bias):
            t.grad = None
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = fn(hidden, weight, bias, targets, temperature, softcap, scale, outputs)
        rows = list(seen)
        (out[0].sum() * 0.3 + out[1].sum() * 0.7).backward()
        return [o.detach().clone() for o in out], [t.grad.clone() for t in (hidden, weight, bias)], (rows, seen[len(rows):])

    chunked = lambda *a: TorchLogProb.apply(*a[:5], 32768, *a[5:])  # noqa: E731
    c_out, c_grad, c_rows = run(chunked, autocast)
    f_out, f_grad, _ = run(_full_logits_logprob, autocast)
    forward_rows, backward_rows = c_rows
    assert max(forward_rows) == 3 and sum(forward_rows) == n  # never more than one chunk of positions at full vocabulary
    assert max(backward_rows) == 3 and sum(backward_rows) == n  # the backward recomputes them the same way
    for a, b in zip(c_out, f_out, strict=True):
        assert torch.equal(a, b) if a.dtype == torch.bool else torch.allclose(a, b, atol=1e-5, rtol=0)
    if not autocast:
        for a, b in zip(c_grad, f_grad, strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=0)
    else:
        _, exact, _ = run(_full_logits_logprob, False)
        for ours, autograd, want in zip(c_grad, f_grad, exact, strict=True):
            assert (ours - want).abs().max() <= 1.5 * (autograd - want).abs().max() + 1e-6
    assert c_grad[0].abs().sum() > 0 and c_grad[1].abs().sum() > 0
