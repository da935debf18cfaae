"""The engine layer: load models and tokenizers for training or inference, the same way for every stage.

`engine: unsloth | transformers | auto` and `method: lora | qlora | full | partial` give the same
outputs (Hugging Face / PEFT folders loadable by plain transformers + peft) whichever engine ran.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stages.common.config import Engine, LoraConfig, Method, PartialConfig, QuantizationConfig
from stages.common.io import InputError, require, write_json

log = logging.getLogger(__name__)

BASE_REF = "base_ref.json"  # written by the `base` stage for a real (hub / local) base model
META = "tuneforge.json"  # written beside every trained artifact: what it was trained from and how


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_engine(engine: Engine) -> str:
    """`auto` = unsloth when it is installed (it has a CPU backend), else transformers."""
    if engine != "auto":
        return engine
    if os.environ.get("TUNEFORGE_ENGINE") in ("unsloth", "transformers"):
        return os.environ["TUNEFORGE_ENGINE"]
    return "unsloth" if importlib.util.find_spec("unsloth") else "transformers"


def base_model_id(base_dir: Path | str) -> str:
    """The weights behind models/base: the folder itself (tiny) or the model named in base_ref.json."""
    base_dir = require(base_dir, "base model")
    ref = Path(base_dir) / BASE_REF
    if ref.exists():
        return json.loads(ref.read_text())["base"]
    return str(base_dir)


def load_tokenizer(path: Path | str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(require(path, "tokenizer")))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def inference_dtype() -> torch.dtype:
    """16-bit where a GPU makes it pay; full precision on CPU (no speed gain there, and exact checks)."""
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class TorchLogProb:
    """Plain-torch stand-in for TRL's Triton `ChunkedLogProbFunction` (same arguments and outputs).

    TRL 1.15's trainers always route the LM head through that Triton kernel when Triton imports, and
    unsloth installs Triton even on CPU-only machines, where the kernel has no driver and fails.
    On CPU this computes the same per-token outputs with full logits and autograd.
    """

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale,
              outputs=("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")):
        z = torch.nn.functional.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
        z = z * logit_scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        z = z / temperature
        log_z = torch.logsumexp(z, dim=-1)
        log_probs = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_z
        entropy = log_sum_sq = mean_logits = is_top1 = None
        if "entropy" in outputs:
            entropy = log_z - (torch.softmax(z, dim=-1) * z).sum(-1)
        with torch.no_grad():
            if "log_sum_sq_probs" in outputs:
                log_sum_sq = torch.logsumexp(2 * z, dim=-1) - 2 * log_z
            if "mean_logits" in outputs:
                mean_logits = z.mean(-1)
            if "is_top1" in outputs:
                is_top1 = z.argmax(-1) == targets
        return log_probs, entropy, log_sum_sq, mean_logits, is_top1


def use_torch_logprob_without_cuda() -> None:
    """Swap TRL's Triton LM-head kernel for TorchLogProb when there is no CUDA device."""
    if torch.cuda.is_available():
        return
    import trl.trainer.utils as trl_utils

    if getattr(trl_utils, "_ChunkedLogProbFunction", None) not in (None, TorchLogProb):
        log.debug("no CUDA: TRL's Triton log-prob kernel replaced by the torch implementation")
        trl_utils._ChunkedLogProbFunction = TorchLogProb


@dataclass(frozen=True)
class TrainSpec:
    """Everything that decides how a model is prepared for training."""

    model: str  # folder or hub id of the weights
    tokenizer: Path  # folder holding the tokenizer (with chat template)
    method: Method
    engine: Engine
    lora: LoraConfig
    quantization: QuantizationConfig
    partial: PartialConfig
    max_seq_length: int
    seed: int


def freeze_all_but_last_blocks(model: Any, last_n_blocks: int) -> list[str]:
    """`partial`: train only the last N transformer blocks, the final norm and the LM head."""
    layers = model.model.layers
    if last_n_blocks > len(layers):
        raise InputError(f"params.yaml: sft.partial.last_n_blocks={last_n_blocks} > {len(layers)} model blocks")
    first = len(layers) - last_n_blocks
    trainable_prefixes = [f"model.layers.{i}." for i in range(first, len(layers))] + ["model.norm.", "lm_head."]
    names = []
    for name, param in model.named_parameters():
        param.requires_grad = any(name.startswith(p) for p in trainable_prefixes)
        if param.requires_grad:
            names.append(name)
    return names


def _peft_config(lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )


def _load_unsloth(spec: TrainSpec):
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        model_name=spec.model,
        max_seq_length=spec.max_seq_length,
        dtype=None,
        load_in_4bit=spec.method == "qlora",
        full_finetuning=spec.method in ("full", "partial"),
        random_state=spec.seed,
    )
    if spec.method in ("lora", "qlora"):
        model = FastLanguageModel.get_peft_model(
            model,
            r=spec.lora.r,
            lora_alpha=spec.lora.alpha,
            lora_dropout=spec.lora.dropout,
            bias=spec.lora.bias,
            target_modules=list(spec.lora.target_modules),
            use_gradient_checkpointing="unsloth",
            random_state=spec.seed,
        )
    return model


def _load_transformers(spec: TrainSpec):
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {}
    if spec.method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=spec.quantization.double_quant,
            bnb_4bit_compute_dtype=torch_dtype(spec.quantization.compute_dtype),
        )
        # each process of a multi-GPU launch keeps its 4-bit weights on its own GPU
        kwargs["device_map"] = {"": f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if device() == "cuda" else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(spec.model, dtype=torch.float32 if device() == "cpu" else "auto",
                                                 **kwargs)
    if spec.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if spec.method in ("lora", "qlora"):
        model = get_peft_model(model, _peft_config(spec.lora))
    return model


def load_for_training(spec: TrainSpec):
    """Model (PEFT-wrapped for lora/qlora, partly frozen for partial) and tokenizer, on the chosen engine."""
    torch.manual_seed(spec.seed)
    engine = resolve_engine(spec.engine)
    log.info("loading %s for %s training with the %s engine", spec.model, spec.method, engine)
    model = _load_unsloth(spec) if engine == "unsloth" else _load_transformers(spec)
    use_torch_logprob_without_cuda()
    if spec.method == "partial":
        names = freeze_all_but_last_blocks(model, spec.partial.last_n_blocks)
        log.info("partial: %d trainable tensors (last %d blocks, final norm, lm_head)",
                 len(names), spec.partial.last_n_blocks)
    tokenizer = load_tokenizer(spec.tokenizer)
    return model, tokenizer, engine


def write_meta(output: Path, **meta: Any) -> None:
    write_json(output / META, meta)


def read_meta(path: Path | str) -> dict[str, Any]:
    meta = Path(path) / META
    return json.loads(meta.read_text()) if meta.exists() else {}


def load_causal_lm(model_id: str, dtype: torch.dtype | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype or inference_dtype())
    return model.to(device())


def adapter_base(path: Path | str) -> str:
    """The weights an adapter folder was trained on, as a loadable folder or hub id.

    The base is recorded (tuneforge.json `base`, else adapter_config.json) relative to the repository root,
    e.g. `models/sft-merged`. It is looked up from each folder above the adapter first (the adapter's own
    repository), then from the working directory, so `models/dpo` loads from any directory and never picks
    up another checkout's model of the same name (a relative hub lookup would fail offline).
    """
    path = Path(path)
    base = read_meta(path).get("base") or json.loads((path / "adapter_config.json").read_text())[
        "base_model_name_or_path"]
    if not Path(base).is_absolute():
        base = next((str(p / base) for p in path.resolve().parents if (p / base).is_dir()), base)
    return base_model_id(base) if Path(base).is_dir() else base


def load_for_inference(path: Path | str, merge: bool = False, dtype: torch.dtype | None = None):
    """(model, tokenizer) in eval mode from a full model folder, an adapter folder, or models/base.

    With merge=True the adapter is merged into the (16-bit / fp32, never 4-bit) base weights; dtype
    defaults to inference_dtype().
    """
    from peft import PeftModel

    path = require(path, "model")
    if (path / "adapter_config.json").exists():
        model = PeftModel.from_pretrained(load_causal_lm(adapter_base(path), dtype=dtype), str(path))
        if merge:
            model = model.merge_and_unload()
    else:
        model = load_causal_lm(base_model_id(path), dtype=dtype)
    model.eval()
    return model, load_tokenizer(path)
