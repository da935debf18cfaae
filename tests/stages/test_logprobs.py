"""Batched log-probs agree with the slow one-at-a-time reference; perplexity is the pooled ratio."""

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
    perplexity,
    reference_response_logprobs,
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
def test_batched_matches_reference(model, tok, batch_size, side):
    prompts, responses = _data(tok)
    ref = reference_response_logprobs(model, tok, prompts, responses)
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
    ref = reference_response_logprobs(model, tok, prompts, responses)
    want = math.exp(-sum(ref.logps) / sum(ref.n_tokens))
    got = perplexity(model, rows, batch_size=2, pad_token_id=tok.pad_token_id)
    assert got.n_tokens == sum(ref.n_tokens)
    assert got.value == pytest.approx(want, rel=1e-4)
    mean_of_ppl = sum(math.exp(-lp / n) for lp, n in zip(ref.logps, ref.n_tokens, strict=True)) / len(rows)
    assert abs(got.value - mean_of_ppl) > 1e-3  # the lengths differ, so the two definitions differ


def test_first_token_is_never_scored(model, tok):
    ids = tok("hello world", add_special_tokens=False)["input_ids"]
    all_on = masked_logprobs(model, [Encoded(ids, [1] * len(ids))])
    assert all_on.n_tokens == [len(ids) - 1]
