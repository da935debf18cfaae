"""The embedded tiny base: tokenizer, chat template, model, and a pretraining that prefers generic answers."""

from __future__ import annotations

import json
from pathlib import Path

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


SHA_MAIN, SHA_V2 = "a" * 40, "b" * 40


@pytest.fixture
def hub_cache(tiny, tmp_path, monkeypatch):
    """An offline hub cache holding the tiny base as tuneforge-test/tiny at two commits: main and v2 (other weights)."""
    import huggingface_hub.constants as hub
    from transformers import AutoModelForCausalLM

    from tests.hub import add_to_hub_cache

    cache = tmp_path / "hub"
    add_to_hub_cache(cache, "tuneforge-test/tiny", tiny / "models/base", SHA_MAIN, refs=("main",))
    other = AutoModelForCausalLM.from_pretrained(tiny / "models/base")
    with torch.no_grad():
        other.lm_head.weight.mul_(2)
    other.save_pretrained(tmp_path / "v2")
    for f in (tiny / "models/base").iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            (tmp_path / "v2" / f.name).write_bytes(f.read_bytes())
    add_to_hub_cache(cache, "tuneforge-test/tiny", tmp_path / "v2", SHA_V2, refs=("v2",))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("revision,commit", [("main", SHA_MAIN), ("v2", SHA_V2), (SHA_V2, SHA_V2)])
def test_hub_base_is_pinned_to_the_commit_its_revision_resolves_to_offline(hub_cache, tmp_path, revision, commit):
    """HF_HUB_OFFLINE=1 with a populated cache: `base` resolves model.revision (branch or commit) to a commit,
    records it, and the training stages load exactly that snapshot."""
    from stages.common.engine import base_model_id

    out = tmp_path / "base"
    summary = base(ModelConfig(base="tuneforge-test/tiny", revision=revision), BaseConfig(), out, tmp_path / "corpus")
    assert summary == {"base": "tuneforge-test/tiny", "revision": revision, "commit": commit}
    assert read_jsonl(tmp_path / "corpus" / offline.CORPUS_FILE) == []  # nothing of ours was pretrained on
    assert json.loads((out / "base_ref.json").read_text())["commit"] == commit
    assert (out / "tokenizer.json").exists() and not (out / "model.safetensors").exists()
    weights = Path(base_model_id(out))
    assert weights.name == commit and weights.is_relative_to(hub_cache)
    model, _ = load_for_inference(out)
    assert model.lm_head.weight.shape[0] > 0


def test_a_revision_missing_from_the_cache_names_the_key(hub_cache, tmp_path):
    with pytest.raises(InputError, match=r"model\.base='tuneforge-test/tiny' at model\.revision='nope'"):
        base(ModelConfig(base="tuneforge-test/tiny", revision="nope"), BaseConfig(), tmp_path / "base")


def test_local_base_is_hashed_and_checked_before_training(tiny, tmp_path):
    import shutil

    from stages.common.engine import base_model_id
    from stages.common.io import hash_dir

    local = tmp_path / "local-model"
    shutil.copytree(tiny / "models/base", local)
    out = tmp_path / "base"
    summary = base(ModelConfig(base=str(local)), BaseConfig(), out)
    assert summary == {"base": str(local), "sha256": hash_dir(local)}
    assert base_model_id(out) == str(local)
    (local / "model.safetensors").touch()  # other stats, same bytes: still the hashed model
    assert base_model_id(out) == str(local)
    weights = bytearray((local / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (local / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(InputError, match=r"local base model changed.*dvc repro --force base"):
        base_model_id(out)


def test_unloadable_real_base_names_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match=r"model\.base='/no/such/model'"):
        base(ModelConfig(base="/no/such/model"), BaseConfig(), tmp_path / "base")


@pytest.mark.slow
def test_changing_model_revision_reruns_the_pipeline_from_base(hub_cache, tmp_path, monkeypatch):
    """In a copy of the repo, offline, against the cache: a new model.revision reruns `base` and, through the
    commit it records, everything downstream. A branch that moves upstream is not seen (DVC cannot see the hub:
    back on `main`, the run-cache even restores the old commit) until `dvc repro --force base` re-resolves it."""
    from stages.common.config import deep_merge
    from tests.repo import MINIMAL, dvc, make_repo, set_params, stages_run

    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    repo = make_repo(tmp_path / "repo", deep_merge(MINIMAL, {"model": {"base": "tuneforge-test/tiny"},
                                                         "validate": {"max_tokens": 4096,
                                                                      # the test base's small tokenizer makes
                                                                      # the askers' openings >= 13 tokens
                                                                      "max_contamination": {"heldout": None}}}))
    commit = lambda: json.loads((repo / "models/base/base_ref.json").read_text())["commit"]  # noqa: E731
    assert sorted(stages_run(dvc("repro", "validate", cwd=repo).stdout)) == ["base", "generate", "validate"]
    assert commit() == SHA_MAIN
    set_params(repo, {"model": {"revision": "v2"}})
    assert stages_run(dvc("repro", "validate", cwd=repo).stdout) == ["base", "validate"]
    assert commit() == SHA_V2

    (hub_cache / "models--tuneforge-test--tiny" / "refs" / "main").write_text(SHA_V2)  # upstream main moves
    set_params(repo, {"model": {"revision": "main"}})
    assert stages_run(dvc("repro", "validate", cwd=repo).stdout) == []  # restored from the run-cache
    assert commit() == SHA_MAIN  # stale: nothing re-resolved `main`
    dvc("repro", "--force", "base", cwd=repo)
    assert commit() == SHA_V2
    assert "models/base" in dvc("status", "validate", cwd=repo).stdout  # and validate, format ... are stale


@pytest.fixture(scope="module")
def llama31():
    from stages.base import build_llama31_tokenizer

    texts = offline.corpus_texts(offline.base_corpus(60, 0, HeldoutConfig(), offline.builtin_persona()))
    return build_llama31_tokenizer(texts, 128256)


def test_llama31_tokenizer_has_the_real_shape_and_passes_the_template_contract(llama31, tmp_path):
    """Llama-3.1-8B's 128,256 ids with its special tokens at their ids, BOS added by the tokenizer, its own chat
    template (with the knowledge-date system header), EOS <|eot_id|>; `format`'s golden contract holds."""
    from transformers import AutoTokenizer

    from stages.base import llama31_chat_template
    from stages.format import contract_problems

    tok = llama31
    assert len(tok) == 128256
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                                     "<|end_header_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>",
                                                     "<|reserved_special_token_247|>")}
    assert ids == {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|start_header_id|>": 128006,
                   "<|end_header_id|>": 128007, "<|eot_id|>": 128009, "<|finetune_right_pad_id|>": 128004,
                   "<|reserved_special_token_247|>": 128255}
    assert tok.eos_token == "<|eot_id|>" and tok("Hi")["input_ids"][0] == 128000
    tok.save_pretrained(tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path)
    assert saved.chat_template == llama31_chat_template() and len(saved) == 128256
    text = saved.apply_chat_template(CONV, tokenize=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date")
    assert contract_problems(tok, saved) == []
