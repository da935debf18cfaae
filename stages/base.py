"""Build the base model: the embedded tiny Llama (default) or a pointer to a real one.

DVC stage `base`: params model, base -> models/base.  Run: python -m stages.base

With `model.base: tiny` it trains a byte-level BPE tokenizer, installs the Llama-3-style chat
template, builds a small Llama-architecture causal LM and pretrains it briefly on generic-assistant
conversations written offline, so that like a real instruct model it prefers generic answers.
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
from stages.common.config import BaseConfig, ModelConfig, load_params
from stages.common.io import InputError, run_main, write_json
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


def base(model_cfg: ModelConfig, cfg: BaseConfig, output: Path) -> dict:
    """Write models/base; returns a small summary."""
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
        return {"base": model_cfg.base}

    torch.manual_seed(cfg.seed)
    conversations = offline.generic_corpus(cfg.corpus_size, seed=cfg.seed)
    # Like a real base, it has read analytical prose (plain documents, outside any chat turn) but
    # answers as a generic assistant: fine-tuning then shifts style, not vocabulary.
    documents = offline.persona_text_sample(cfg.corpus_size // 3, seed=cfg.seed)
    tokenizer = build_tokenizer(
        [m["content"] for conv in conversations for m in conv] + documents, cfg.vocab_size, template
    )
    tokenizer.model_max_length = model_cfg.max_seq_length
    texts = [tokenizer.apply_chat_template(conv, tokenize=False) for conv in conversations]
    texts += [tokenizer.bos_token + doc + tokenizer.eos_token for doc in documents]
    model = build_model(cfg, tokenizer, model_cfg.max_seq_length)
    log.info("tiny base: %.2fM parameters, vocab %d", model.num_parameters() / 1e6, len(tokenizer))
    history = pretrain(model, tokenizer, texts, cfg, model_cfg.max_seq_length, output / ".trainer")
    set_end_of_turn_eos(model.generation_config, tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    losses = [h["loss"] for h in history if "loss" in h]
    return {"base": "tiny", "parameters": model.num_parameters(), "final_loss": losses[-1] if losses else None}


def main() -> None:
    params = load_params()
    summary = base(params.model, params.base, params.paths.base)
    log.info("base ready in %s: %s", params.paths.base, summary)


if __name__ == "__main__":
    run_main(main)
