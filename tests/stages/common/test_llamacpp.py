"""llama.cpp's runtime wrapper on the exported tiny GGUF: tokenizer, template, log-probs, streaming chat."""

from __future__ import annotations

import math

import pytest
from transformers import AutoTokenizer

from stages.common.llamacpp import LlamaCpp, gguf_path


@pytest.fixture(scope="module")
def llm(exported):
    with LlamaCpp(gguf_path(exported / "models" / "final", "Vex", "f16"), n_ctx=256) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def tok(exported):
    return AutoTokenizer.from_pretrained(exported / "models" / "final")


def test_gguf_path_is_what_export_writes(exported):
    assert gguf_path(exported / "models" / "final", "Vex", "q8_0").is_file()
    assert gguf_path(exported, "Dr. Who?", "f16").name == "dr-who-f16.gguf"


def test_tokenize_and_template_match_hugging_face(llm, tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is failure?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert llm.apply_template(messages) == text
    assert llm.tokenize(text) == tok(text, add_special_tokens=False)["input_ids"]
    assert llm.props()["eos_token"] == "<|eot_id|>"


def test_next_token_logprobs_are_a_distribution(llm, tok):
    ids = tok("<|begin_of_text|>Hello", add_special_tokens=False)["input_ids"]
    top = llm.next_token_logprobs(ids, 50, end_token=tok.convert_tokens_to_ids("<|eot_id|>"))
    assert len(top) == 50 and all(lp <= 0 for lp in top.values())
    assert 0 < sum(math.exp(lp) for lp in top.values()) <= 1.0001


def test_chat_streams_the_same_answer_it_returns(llm):
    messages = [{"role": "user", "content": "Should I quit?"}]
    pieces: list[str] = []
    streamed = llm.chat(messages, max_tokens=8, on_text=pieces.append)
    whole = llm.chat(messages, max_tokens=8)
    assert "".join(pieces) == streamed["content"] == whole["content"]
    assert streamed["finish_reason"] == whole["finish_reason"] in ("stop", "length")
    assert whole["prompt_tokens"] > 0
