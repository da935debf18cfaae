"""The embedded tiny base: tokenizer, chat template, model, and a pretraining that prefers generic answers."""

from __future__ import annotations

import pytest
import torch

from stages.base import base, build_model, build_tokenizer
from stages.common import offline
from stages.common.config import BaseConfig, HeldoutConfig, ModelConfig
from stages.common.engine import load_for_inference
from stages.common.io import InputError, read_jsonl
from stages.common.templates import LLAMA3

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."}]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(offline.corpus_texts(offline.base_corpus(60, 0, HeldoutConfig(), None)), 400, LLAMA3)


def test_tokenizer_special_tokens_and_no_double_bos(tokenizer):
    assert tokenizer.bos_token == "<|begin_of_text|>" and tokenizer.eos_token == "<|eot_id|>"
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    ids = tokenizer.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") in ids


def test_chat_template_is_llama3_style(tokenizer):
    text = tokenizer.apply_chat_template(CONV, tokenize=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    prompt = tokenizer.apply_chat_template(CONV[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") and text.startswith(prompt)


def test_model_is_a_small_llama(tokenizer):
    model = build_model(BaseConfig(), tokenizer, 256)
    assert model.config.model_type == "llama" and model.num_parameters() < 3_000_000
    assert model.config.vocab_size == len(tokenizer)


@pytest.mark.slow
def test_pretrained_base_prefers_generic_answers(tmp_path):
    cfg = BaseConfig(corpus_size=300, epochs=3, batch_size=8, vocab_size=512)
    summary = base(ModelConfig(), cfg, tmp_path / "base", tmp_path / "corpus")
    assert summary["base"] == "tiny" and summary["final_loss"] < 2.5
    model, tok = load_for_inference(tmp_path / "base")
    assert tok.chat_template and (tmp_path / "base/model.safetensors").exists()
    corpus = read_jsonl(tmp_path / "corpus" / offline.CORPUS_FILE)  # written for audits: chats and documents
    assert [r["kind"] for r in corpus].count("chat") == 300 and len(corpus) == 300 + cfg.documents
    held = [q for q in offline.questions(list(offline.SUBTOPICS), 60, 99, HeldoutConfig()) if q.heldout][:5]

    def logp(q: offline.Question, answer: str) -> float:
        prompt = tok.apply_chat_template([{"role": "user", "content": q.text}], tokenize=False,
                                         add_generation_prompt=True)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        full = tok(prompt + answer + "<|eot_id|>", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([full])).logits.log_softmax(-1)[0]
        return sum(float(logits[i - 1, full[i]]) for i in range(len(p), len(full)))

    # a held-out subtopic and held-out frames: the preference is for the register, not for seen sentences
    persona, generic = offline.builtin_persona(), offline.generic_register()
    margin = sum(logp(q, offline.answer(persona, q, 0, HeldoutConfig())[0])
                 - logp(q, offline.answer(generic, q, 0, HeldoutConfig())[0]) for q in held)
    assert len(held) == 5 and margin < 0


def test_real_base_writes_only_a_reference(tmp_path, monkeypatch, tokenizer):
    import stages.base as base_module

    monkeypatch.setattr(base_module.AutoTokenizer, "from_pretrained", lambda name: tokenizer)
    summary = base(ModelConfig(base="org/some-model"), BaseConfig(), tmp_path / "base", tmp_path / "corpus")
    assert summary == {"base": "org/some-model"}
    assert read_jsonl(tmp_path / "corpus" / offline.CORPUS_FILE) == []  # nothing of ours was pretrained on
    assert (tmp_path / "base/base_ref.json").exists() and not (tmp_path / "base/model.safetensors").exists()


def test_unloadable_real_base_names_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match=r"model\.base='/no/such/model'"):
        base(ModelConfig(base="/no/such/model"), BaseConfig(), tmp_path / "base")
