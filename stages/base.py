"""Build the base model: the embedded tiny Llama (default) or a pointer to a real one.

DVC stage `base`: params model, base, heldout -> models/base, data/base_corpus.  Run: python -m stages.base

With `model.base: tiny` it trains a byte-level BPE tokenizer, installs the Llama-3-style chat
template, builds a small Llama-architecture causal LM and pretrains it briefly on generic-assistant
conversations written offline, so that like a real instruct model it prefers generic answers. The
corpus (data/base_corpus/corpus.jsonl) holds no fine-tuning question and no held-out subtopic or
frame (stages/common/splits.py); validate's contamination report checks that by measurement.
With any other `model.base` (a Hugging Face id or local path) it saves only the tokenizer (with a
chat template installed if it has none) and `base_ref.json` naming the model; weights are loaded
from there by the training stages.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from stages.common import offline
from stages.common.config import BaseConfig, HeldoutConfig, ModelConfig, load_params
from stages.common.io import InputError, run_main, write_json, write_jsonl
from stages.common.templates import LLAMA3, ChatTemplate, set_end_of_turn_eos

log = logging.getLogger(__name__)

BASE_REF = "base_ref.json"
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|pad|>"]


def build_tokenizer(texts: list[str], vocab_size: int, template: ChatTemplate) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on texts, with Llama-3 special tokens and the chat template installed."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|pad|>",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = template.jinja
    return fast


def build_model(cfg: BaseConfig, tokenizer: PreTrainedTokenizerFast, max_seq_length: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=max(max_seq_length, 256),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    return LlamaForCausalLM(config)


def pretrain(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, texts: list[str], cfg: BaseConfig,
    max_seq_length: int, workdir: Path,
) -> list[dict]:
    """Causal-LM pretraining on rendered conversations; returns the trainer's log history."""
    encoded = [tokenizer(t, add_special_tokens=False, truncation=True, max_length=max_seq_length) for t in texts]
    dataset = [{"input_ids": e["input_ids"]} for e in encoded]
    args = TrainingArguments(
        output_dir=str(workdir),
        per_device_train_batch_size=cfg.batch_size,
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.01,
        logging_steps=20,
        save_strategy="no",
        report_to=[],
        seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )
    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    return trainer.state.log_history


def base(model_cfg: ModelConfig, cfg: BaseConfig, output: Path, corpus_dir: Path | None = None,
         heldout: HeldoutConfig | None = None, persona: Path | None = offline.BUILTIN_PERSONA) -> dict:
    """Write models/base (and, for the tiny base, its pretraining corpus to corpus_dir); returns a summary."""
    output.mkdir(parents=True, exist_ok=True)
    template = LLAMA3
    if not model_cfg.is_tiny:
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_cfg.base)
        except (OSError, ValueError) as err:
            raise InputError(
                f"params.yaml: model.base={model_cfg.base!r} cannot be loaded (not a local folder, and not in "
                f"the Hugging Face cache while offline?): {err}"
            ) from None
        tokenizer.save_pretrained(output)  # its template, if any, is kept; `format` applies model.chat_template
        write_json(output / BASE_REF, {"base": model_cfg.base})
        if corpus_dir is not None:  # nothing of ours was pretrained on: an empty corpus, so audits still run
            write_jsonl(corpus_dir / offline.CORPUS_FILE, [])
        return {"base": model_cfg.base}

    torch.manual_seed(cfg.seed)
    # Generic-assistant conversations about training subtopics (questions from the pretraining pool only),
    # and, like a real base, plain analytical prose in the persona's register outside any chat turn, so
    # fine-tuning shifts style, not vocabulary. Held-out subtopics and frames never appear.
    register = offline.load_register(persona) if persona is not None else None
    corpus = offline.base_corpus(cfg.corpus_size, cfg.seed, heldout or HeldoutConfig(), register, cfg.documents)
    if corpus_dir is not None:
        write_jsonl(corpus_dir / offline.CORPUS_FILE, [row.as_dict() for row in corpus])
    conversations = [row.messages for row in corpus if row.kind == "chat"]
    documents = [row.text for row in corpus if row.kind == "document"]
    tokenizer = build_tokenizer(offline.corpus_texts(corpus), cfg.vocab_size, template)
    tokenizer.model_max_length = model_cfg.max_seq_length
    texts = [tokenizer.apply_chat_template(conv, tokenize=False) for conv in conversations]
    texts += [tokenizer.bos_token + doc + tokenizer.eos_token for doc in documents]
    model = build_model(cfg, tokenizer, model_cfg.max_seq_length)
    log.info("tiny base: %.2fM parameters, vocab %d, %d conversations + %d documents", model.num_parameters() / 1e6,
             len(tokenizer), len(conversations), len(documents))
    history = pretrain(model, tokenizer, texts, cfg, model_cfg.max_seq_length, output / ".trainer")
    set_end_of_turn_eos(model.generation_config, tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    losses = [h["loss"] for h in history if "loss" in h]
    return {"base": "tiny", "parameters": model.num_parameters(), "final_loss": losses[-1] if losses else None,
            "corpus_rows": len(corpus)}


def main() -> None:
    params = load_params()
    summary = base(params.model, params.base, params.paths.base, params.paths.base_corpus, params.heldout,
                   params.generate.persona.offline)
    log.info("base ready in %s: %s", params.paths.base, summary)


if __name__ == "__main__":
    run_main(main)
