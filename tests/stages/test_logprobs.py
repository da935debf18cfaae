"""Batched log-probs agree with the slow one-at-a-time oracle; perplexity is the pooled ratio."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stages.base import build_tokenizer
from stages.common.logprobs import (
    Encoded,
    PrefixMismatchError,
    encode_pairs,
    masked_logprobs,
    oracle_response_logprobs,
    pair_logprobs,
    perplexity,
    response_logprobs,
)
from stages.common.templates import LLAMA3

CORPUS = [
    "hello world, the mechanism is simple and the trade-off is clear.",
    "You can do it! Believe in yourself and keep going, every day is a gift.",
    "State the decision. Name the cost. Move on.",
] * 20

QUESTIONS = ["How do I stay motivated?", "Should I quit?", "What is failure?", "Why do people lie?", "Hi"]
ANSWERS = [
    "Motivation is unreliable. Build a schedule.",
    "You can do it! Believe in yourself and keep going, every day is a gift!!",
    "Failure is data.",
    "Incentives.",
    "State the decision. Name the cost. Move on. The trade-off is clear and the mechanism is simple.",
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(CORPUS, 400, LLAMA3)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, attention_dropout=0.3)
    return LlamaForCausalLM(cfg).eval()


def _data(tok):
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in QUESTIONS]
    return prompts, [a + "<|eot_id|>" for a in ANSWERS]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 16])
@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_matches_oracle(model, tok, batch_size, side):
    prompts, responses = _data(tok)
    ref = oracle_response_logprobs(model, tok, prompts, responses)
    got = response_logprobs(model, tok, prompts, responses, batch_size=batch_size, padding_side=side)
    assert got.n_tokens == ref.n_tokens
    assert len(set(got.n_tokens)) > 1  # lengths differ, so padding is exercised
    for a, b in zip(got.logps, ref.logps, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_tokenizer_truncation_and_padding_settings_change_nothing(model, tok):
    prompts, responses = _data(tok)
    before = response_logprobs(model, tok, prompts, responses, batch_size=4)
    tok2 = build_tokenizer(CORPUS, 400, LLAMA3)
    tok2.model_max_length = 8
    tok2.truncation_side = "left"
    tok2.padding_side = "left"
    tok2.backend_tokenizer.enable_truncation(max_length=8)
    assert len(tok2(prompts[0], add_special_tokens=False, truncation=True)["input_ids"]) == 8  # settings are live
    after = response_logprobs(model, tok2, prompts, responses, batch_size=4)
    assert after.n_tokens == before.n_tokens
    assert after.logps == pytest.approx(before.logps, abs=1e-4)


def test_eval_mode_and_training_flag_restored(model, tok):
    prompts, responses = _data(tok)
    ref = response_logprobs(model, tok, prompts, responses)
    model.train()  # attention dropout 0.3 would change every number if left on
    try:
        got = response_logprobs(model, tok, prompts, responses)
        assert model.training
    finally:
        model.eval()
    assert got.logps == pytest.approx(ref.logps, abs=1e-5)


def test_only_response_tokens_are_scored(model, tok):
    prompts, responses = _data(tok)
    enc = encode_pairs(tok, prompts, responses)
    for e, p, r in zip(enc, prompts, responses, strict=True):
        n_prompt = len(tok(p, add_special_tokens=False)["input_ids"])
        assert e.mask == [0] * n_prompt + [1] * (len(e.input_ids) - n_prompt)
        assert tok.decode([t for t, m in zip(e.input_ids, e.mask, strict=True) if m]) == r
    # a different prompt changes the summed log-prob of the same response
    other = response_logprobs(model, tok, [prompts[1]] * 5, responses)
    base = response_logprobs(model, tok, prompts, responses)
    assert other.n_tokens == base.n_tokens and other.logps != pytest.approx(base.logps, abs=1e-4)


def test_prompt_not_a_prefix_raises(tok):
    # "hello" is one merged token: a prompt ending inside it is not a token prefix of prompt+response
    assert len(tok("hello", add_special_tokens=False)["input_ids"]) < len(
        tok("hel", add_special_tokens=False)["input_ids"] + tok("lo", add_special_tokens=False)["input_ids"])
    with pytest.raises(PrefixMismatchError, match="example 1"):
        encode_pairs(tok, ["ok", "<|begin_of_text|>hel"], [" fine", "lo world"])


def test_perplexity_is_pooled_over_tokens(model, tok):
    prompts, responses = _data(tok)
    enc = encode_pairs(tok, prompts, responses)
    rows = [(e.input_ids, e.mask) for e in enc]
    ref = oracle_response_logprobs(model, tok, prompts, responses)
    want = math.exp(-sum(ref.logps) / sum(ref.n_tokens))
    got = perplexity(model, rows, batch_size=2, pad_token_id=tok.pad_token_id)
    assert got.n_tokens == sum(ref.n_tokens)
    assert got.value == pytest.approx(want, rel=1e-4)
    mean_of_ppl = sum(math.exp(-lp / n) for lp, n in zip(ref.logps, ref.n_tokens, strict=True)) / len(rows)
    assert abs(got.value - mean_of_ppl) > 1e-3  # the lengths differ, so the two definitions differ


@pytest.mark.parametrize("side", ["left", "right"])
def test_first_token_is_never_scored(model, tok, side):
    ids = tok("hello world", add_special_tokens=False)["input_ids"]
    longer = tok("hello world, the mechanism is simple", add_special_tokens=False)["input_ids"]
    seqs = [Encoded(ids, [1] * len(ids)), Encoded(longer, [1] * len(longer))]  # different lengths: padding
    all_on = masked_logprobs(model, seqs, batch_size=2, padding_side=side, pad_token_id=tok.pad_token_id)
    alone = [masked_logprobs(model, [s]).logps[0] for s in seqs]
    assert all_on.n_tokens == [len(ids) - 1, len(longer) - 1]
    assert all_on.logps == pytest.approx(alone, abs=1e-4)  # a pad never "predicts" a row's first token


def _rejected(tok):
    return [a + "<|eot_id|>" for a in reversed(ANSWERS)]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 16])
def test_pair_logprobs_match_reference_on_both_sides(model, tok, batch_size):
    prompts, chosen = _data(tok)
    rejected = _rejected(tok)
    got_c, got_r = pair_logprobs(model, tok, prompts, chosen, rejected, batch_size=batch_size)
    for got, responses in ((got_c, chosen), (got_r, rejected)):
        ref = oracle_response_logprobs(model, tok, prompts, responses)
        assert got.n_tokens == ref.n_tokens
        assert got.logps == pytest.approx(ref.logps, abs=1e-4)
    # prompts of different lengths share a batch, so the left-padded prompt cache and the carried-on
    # position ids are exercised; a one-token answer ("Incentives." is not) would skip the continuation
    assert len({len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts}) > 1


def test_pair_logprobs_one_token_answers_and_eval_mode(model, tok):
    prompts, _ = _data(tok)
    one = ["<|eot_id|>"] * len(prompts)  # scored from the prompt pass alone
    chosen = [a + "<|eot_id|>" for a in ANSWERS]
    model.train()
    try:
        got_c, got_r = pair_logprobs(model, tok, prompts, chosen, one, batch_size=2)
        assert model.training
    finally:
        model.eval()
    assert got_r.n_tokens == [1] * len(prompts)
    assert got_r.logps == pytest.approx(oracle_response_logprobs(model, tok, prompts, one).logps, abs=1e-5)
    assert got_c.logps == pytest.approx(oracle_response_logprobs(model, tok, prompts, chosen).logps, abs=1e-4)


def test_pair_logprobs_rejects_an_empty_prompt(model, tok):
    with pytest.raises(ValueError, match="example 0: the prompt has no tokens"):
        pair_logprobs(model, tok, [""], ["State the decision."], ["Hi"])


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM that ignores `logits_to_keep` and always returns every position's logits."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, logits_to_keep=None, **kwargs):
        return self.inner(**kwargs)


def test_models_that_return_every_position_score_the_same(model, tok):
    prompts, chosen = _data(tok)
    rejected = _rejected(tok)
    plain = _NoLogitsToKeep(model)
    assert plain(input_ids=torch.tensor([[1, 2, 3]]), logits_to_keep=1).logits.shape[1] == 3
    want = oracle_response_logprobs(model, tok, prompts, chosen).logps
    assert response_logprobs(plain, tok, prompts, chosen, batch_size=2).logps == pytest.approx(want, abs=1e-4)
    assert pair_logprobs(plain, tok, prompts, chosen, rejected, batch_size=2)[0].logps == pytest.approx(want, abs=1e-4)


class _NoCache(torch.nn.Module):
    """A causal LM that never returns a KV cache (as a custom or non-transformers model may not)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, use_cache=None, past_key_values=None, **kwargs):
        assert past_key_values is None, "a model without a cache was handed one"
        out = self.inner(use_cache=False, **kwargs)
        out.past_key_values = None
        return out


def test_models_without_a_kv_cache_fall_back_to_separate_scoring(model, tok, caplog):
    prompts, chosen = _data(tok)
    rejected = _rejected(tok)
    with caplog.at_level("INFO", logger="stages.common.logprobs"):
        got_c, got_r = pair_logprobs(_NoCache(model), tok, prompts, chosen, rejected, batch_size=2)
    assert "no reusable KV cache" in caplog.text
    assert got_c.logps == pytest.approx(oracle_response_logprobs(model, tok, prompts, chosen).logps, abs=1e-4)
    assert got_r.logps == pytest.approx(oracle_response_logprobs(model, tok, prompts, rejected).logps, abs=1e-4)
    assert got_r.n_tokens == oracle_response_logprobs(model, tok, prompts, rejected).n_tokens


class _Counting(torch.nn.Module):
    """Counts the non-pad input tokens a model is run on."""

    def __init__(self, inner, pad):
        super().__init__()
        self.inner, self.pad, self.calls = inner, pad, []

    def forward(self, input_ids, **kwargs):
        self.calls.append(int((input_ids != self.pad).sum()))
        return self.inner(input_ids=input_ids, **kwargs)


def test_pair_logprobs_runs_each_prompt_token_once(model, tok):
    prompts, chosen = _data(tok)
    rejected = _rejected(tok)
    ids = lambda texts: [tok(t, add_special_tokens=False)["input_ids"] for t in texts]  # noqa: E731
    p = ids(prompts)
    c = ids([a + b for a, b in zip(prompts, chosen, strict=True)])
    r = ids([a + b for a, b in zip(prompts, rejected, strict=True)])
    shared = min(len(x) for x in p)
    while any(x[:shared] != p[0][:shared] for x in p):
        shared -= 1
    assert shared >= 4  # BOS and the chat header are common to every prompt
    counting = _Counting(model, tok.pad_token_id)
    pair_logprobs(counting, tok, prompts, chosen, rejected, batch_size=2)
    assert counting.calls[0] == shared  # the shared prefix, once for the call
    # every other prompt token once; every answer token but the last once
    want = shared + sum(len(x) - shared for x in p) + sum(len(x) - len(q) - 1 for x, q in zip(c + r, p + p, strict=True))
    assert sum(counting.calls) == want


# -- bf16: every path against the fp32 oracle ----------------------------------------------------------------------
# Measured on this peaked model (head x 10: logit std 1.6, |logit| up to 6.8, like a trained model's): bf16 paths
# differ from the fp32 one-at-a-time oracle on the same (bf16-rounded) weights by at most 0.0045 nats per scored
# token (pair_logprobs at batch 1/2/16, response_logprobs left/right, perplexity); the tolerance is 0.01.
BF16_TOLERANCE_PER_TOKEN = 0.01


@pytest.fixture(scope="module")
def bf16_models(model):
    """(bf16 model, the same bf16-rounded weights in fp32 for the oracle)."""
    import copy

    peaked = copy.deepcopy(model)
    with torch.no_grad():
        peaked.lm_head.weight.mul_(10.0)
    bf16 = peaked.to(torch.bfloat16).eval()
    return bf16, copy.deepcopy(bf16).float().eval()


def _per_token_error(got, ref) -> float:
    assert got.n_tokens == ref.n_tokens
    return max(abs(a - b) / n for a, b, n in zip(got.logps, ref.logps, ref.n_tokens, strict=True))


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_bf16_pair_logprobs_with_its_kv_cache_copy_match_fp32_oracle(bf16_models, tok, batch_size):
    bf16, fp32 = bf16_models
    prompts, chosen = _data(tok)
    rejected = _rejected(tok)
    got_c, got_r = pair_logprobs(bf16, tok, prompts, chosen, rejected, batch_size=batch_size)
    assert next(bf16.parameters()).dtype == torch.bfloat16
    for got, responses in ((got_c, chosen), (got_r, rejected)):  # rejected continues from the copied cache
        assert _per_token_error(got, oracle_response_logprobs(fp32, tok, prompts, responses)) < BF16_TOLERANCE_PER_TOKEN


@pytest.mark.parametrize("side", ["left", "right"])
def test_bf16_response_logprobs_and_perplexity_match_fp32_oracle(bf16_models, tok, side):
    bf16, fp32 = bf16_models
    prompts, responses = _data(tok)
    ref = oracle_response_logprobs(fp32, tok, prompts, responses)
    got = response_logprobs(bf16, tok, prompts, responses, batch_size=3, padding_side=side)
    assert _per_token_error(got, ref) < BF16_TOLERANCE_PER_TOKEN
    rows = [(e.input_ids, e.mask) for e in encode_pairs(tok, prompts, responses)]
    ppl = perplexity(bf16, rows, batch_size=2, pad_token_id=tok.pad_token_id)
    want = -sum(ref.logps) / sum(ref.n_tokens)
    assert abs(math.log(ppl.value) - want) < BF16_TOLERANCE_PER_TOKEN  # mean NLL per token


def test_bf16_tolerance_catches_a_shared_kv_cache(bf16_models, tok, monkeypatch):
    """Control: if the rejected answers continued from the chosen answers' cache instead of a copy, the bf16 check
    would fail by far more than the tolerance."""
    from stages.common import logprobs as lp

    bf16, fp32 = bf16_models
    prompts, chosen = _data(tok)
    rejected = _rejected(tok)
    monkeypatch.setattr(lp.copy, "deepcopy", lambda cache: cache)  # one batch: only the side copy matters
    _, got_r = pair_logprobs(bf16, tok, prompts, chosen, rejected, batch_size=16)
    assert _per_token_error(got_r, oracle_response_logprobs(fp32, tok, prompts, rejected)) > 10 * BF16_TOLERANCE_PER_TOKEN
