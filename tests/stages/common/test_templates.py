"""Shared template helpers: the end-of-turn token, the EOS every saved model gets, the Ollama templates."""

from __future__ import annotations

import pytest
from transformers import GenerationConfig

from stages.base import build_tokenizer
from stages.common.templates import (
    LLAMA3,
    TEMPLATES,
    ContractError,
    end_of_turn,
    ollama_template,
    set_end_of_turn_eos,
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(["Plans expose wrong assumptions early.", "Decide."], 320, LLAMA3)


def test_end_of_turn_is_the_token_after_assistant_content(tok):
    assert end_of_turn(tok) == "<|eot_id|>"
    saved = tok.chat_template
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    try:
        with pytest.raises(ContractError, match="no special end-of-turn token"):
            end_of_turn(tok)
    finally:
        tok.chat_template = saved


def test_generation_eos_gains_the_end_of_turn_token_and_keeps_what_was_there(tok):
    """A Llama 3 base: generation_config says <|end_of_text|> only; the chat model must stop at <|eot_id|>."""
    eot, end_of_text = tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|end_of_text|>")
    cfg = GenerationConfig(eos_token_id=end_of_text)
    assert set_end_of_turn_eos(cfg, tok) == [end_of_text, eot]
    assert cfg.eos_token_id == [end_of_text, eot] and cfg.pad_token_id == tok.pad_token_id
    already = GenerationConfig(eos_token_id=eot, pad_token_id=7)
    set_end_of_turn_eos(already, tok)
    assert already.eos_token_id == eot and already.pad_token_id == 7
    empty = GenerationConfig()
    set_end_of_turn_eos(empty, tok)
    assert empty.eos_token_id == eot


def test_ollama_template_only_for_templates_it_renders_equally(tok):
    assert ollama_template(tok).startswith("<|begin_of_text|>{{ range .Messages }}")
    saved = tok.chat_template
    try:
        tok.chat_template = TEMPLATES["llama2"].jinja  # no Go equivalent written: None, never a wrong one
        assert ollama_template(tok) is None
        tok.chat_template = saved + " "  # a template that is not exactly a known one
        assert ollama_template(tok) is None
    finally:
        tok.chat_template = saved
