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

import json
import logging
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
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
from stages.common.base_ref import BASE_REF, resolve_base
from stages.common.config import BaseConfig, HeldoutConfig, ModelConfig, load_params
from stages.common.io import InputError, run_main, write_json, write_jsonl
from stages.common.templates import LLAMA3, ChatTemplate, set_end_of_turn_eos

log = logging.getLogger(__name__)

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


# Llama 3.1's 256 special tokens, in its order (ids vocab_size - 256 ...; 128000-128255 in Llama-3.1-8B)
LLAMA31_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", *(f"<|reserved_special_token_{i}|>" for i in range(3, 248)),
]
# Llama 3's pre-tokenizer split (tiktoken's cl100k-style pattern), before the byte-level mapping
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def llama31_chat_template() -> str:
    """Llama 3.1's own chat template (system header with the knowledge / today dates, tool calls), as TRL ships it
    to recognise the model (trl/chat_templates/llama3_1.jinja)."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / "llama3_1.jinja").read_text()


def build_llama31_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A tokenizer with Llama-3.1-8B's shape: `vocab_size` ids (128,256 for the real one), the last 256 of them Llama
    3.1's special tokens in its order, Llama 3's pre-tokenizer, BOS added by the tokenizer itself, Llama 3.1's chat
    template, EOS <|eot_id|> and pad <|finetune_right_pad_id|> (as unsloth's Instruct tokenizer).

    The byte-level BPE is trained on `texts` for as many merges as they support; the ids between the last trained
    token and the special tokens are reserved entries no merge produces (Llama 3 pads its 128,000 BPE tokens with
    reserved special tokens the same way), so the embedding and LM head have the real model's rows."""
    n_bpe = vocab_size - len(LLAMA31_SPECIAL_TOKENS)
    if n_bpe < 512:
        raise InputError(f"params.yaml: base.vocab_size={vocab_size} leaves no room for a byte-level BPE beside "
                         f"Llama 3.1's {len(LLAMA31_SPECIAL_TOKENS)} special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_bpe, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    trained = len(vocab)
    for i in range(trained, n_bpe):  # reserved: in the vocabulary, never produced by a merge
        vocab[f"<|reserved_bpe_{i - trained}|>"] = i
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA31_SPECIAL_TOKENS])
    bos = tok.token_to_id("<|begin_of_text|>")
    assert bos == n_bpe and tok.get_vocab_size() == vocab_size, (bos, tok.get_vocab_size())
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|finetune_right_pad_id|>", clean_up_tokenization_spaces=False)
    fast.chat_template = llama31_chat_template()
    log.info("llama-3.1 tokenizer: %d trained BPE tokens, %d reserved, %d special (vocab %d)", trained,
             n_bpe - trained, len(LLAMA31_SPECIAL_TOKENS), vocab_size)
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
        ref, source = resolve_base(model_cfg)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise InputError(f"params.yaml: model.base={model_cfg.base!r}: no tokenizer in {source}: {err}") from None
        tokenizer.save_pretrained(output)  # its template, if any, is kept; `format` applies model.chat_template
        write_json(output / BASE_REF, ref)
        if corpus_dir is not None:  # nothing of ours was pretrained on: an empty corpus, so audits still run
            write_jsonl(corpus_dir / offline.CORPUS_FILE, [])
        return {k: v for k, v in ref.items() if k != "files"}

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
    if cfg.tokenizer == "llama-3.1":
        tokenizer = build_llama31_tokenizer(offline.corpus_texts(corpus), cfg.vocab_size)
    else:
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
