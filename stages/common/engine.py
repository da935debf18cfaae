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


def _head_outputs(hidden, weight, bias, targets, temperature, softcap, logit_scale, outputs):
    """TRL's per-token LM-head outputs for a block of positions, from their full-vocabulary logits in fp32."""
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


class TorchLogProb(torch.autograd.Function):
    """Plain-torch stand-in for TRL's Triton `ChunkedLogProbFunction` (same arguments and outputs).

    TRL 1.15's trainers always route the LM head through that Triton kernel when Triton imports, and
    unsloth installs Triton even on CPU-only machines, where the kernel has no driver and fails.
    Like the kernel, this never holds full-vocabulary logits for more than one chunk of positions
    (`memory.logit_chunk_tokens`): the forward computes each chunk's outputs and keeps only the inputs, the
    backward recomputes each chunk under the forward's autocast state and takes its gradient, so SFT, DPO and
    TRL's reference precompute keep TRL's memory shape on CPU. Per position the numbers are those of one
    fp32 log-softmax over the whole vocabulary.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale,
                outputs=("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")):
        from stages.common.memory import logit_chunk_tokens

        ctx.set_materialize_grads(False)
        rows = logit_chunk_tokens(weight.shape[0])
        parts = [_head_outputs(hidden[s : s + rows], weight, bias, targets[s : s + rows], temperature, softcap,
                               logit_scale, outputs) for s in range(0, hidden.shape[0], rows)]
        if not parts:  # a micro-batch without a scored token
            parts = [_head_outputs(hidden, weight, bias, targets, temperature, softcap, logit_scale, outputs)]
        result = tuple(None if part[0] is None else torch.cat(part) for part in zip(*parts, strict=True))
        ctx.save_for_backward(hidden, weight, bias, targets)
        device = hidden.device.type
        ctx.args = (temperature, softcap, logit_scale, outputs, rows)
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.mark_non_differentiable(*(x for x in result[2:] if x is not None))
        return result

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, *_):
        hidden, weight, bias, targets = ctx.saved_tensors
        temperature, softcap, logit_scale, outputs, rows = ctx.args
        needs = ctx.needs_input_grad[:3]
        grads: list[Any] = [torch.empty_like(hidden) if needs[0] else None,
                            torch.zeros_like(weight, dtype=torch.float32) if needs[1] else None,
                            torch.zeros_like(bias, dtype=torch.float32) if needs[2] and bias is not None else None]
        if any(needs) and (grad_log_probs is not None or grad_entropy is not None):
            device, enabled, dtype = ctx.autocast
            w = weight.detach().requires_grad_(needs[1])
            b = None if bias is None else bias.detach().requires_grad_(needs[2])
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                for s in range(0, hidden.shape[0], rows):
                    h = hidden[s : s + rows].detach().requires_grad_(needs[0])
                    log_probs, entropy, *_ = _head_outputs(h, w, b, targets[s : s + rows], temperature, softcap,
                                                           logit_scale, outputs)
                    total = log_probs.new_zeros(())
                    if grad_log_probs is not None:
                        total = total + (grad_log_probs[s : s + rows].float() * log_probs).sum()
                    if grad_entropy is not None and entropy is not None:
                        total = total + (grad_entropy[s : s + rows].float() * entropy).sum()
                    inputs = [t for t, need in zip((h, w, b), needs, strict=True) if need and t is not None]
                    got = iter(torch.autograd.grad(total, inputs, allow_unused=True))
                    for k, (t, need) in enumerate(zip((h, w, b), needs, strict=True)):
                        if not need or t is None:
                            continue
                        g = next(got)
                        if g is None:
                            continue
                        if k == 0:
                            grads[0][s : s + rows] = g
                        else:
                            grads[k] += g.float()
        if grads[0] is not None and (grad_log_probs is None and grad_entropy is None):
            grads[0].zero_()
        return (grads[0], None if grads[1] is None else grads[1].to(weight.dtype),
                None if grads[2] is None else grads[2].to(bias.dtype), None, None, None, None, None, None)


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
    gradient_checkpointing: bool = True  # TRL's default; the engine sets it up its own way (unsloth's, or PEFT's)
    attn_implementation: str = "auto"  # model.attn_implementation; auto = transformers' choice (sdpa)


def four_bit_config(quantization: QuantizationConfig):
    """The NF4 config every 4-bit load uses (SFT on both engines, merge's qlora gap, reference and dpo)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=quantization.double_quant,
                              bnb_4bit_compute_dtype=torch_dtype(quantization.compute_dtype))


def attention_kwargs(attn_implementation: str) -> dict[str, str]:
    """`attn_implementation` for from_pretrained: nothing for auto (transformers picks sdpa where it can)."""
    return {} if attn_implementation == "auto" else {"attn_implementation": attn_implementation}


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

    qlora = spec.method == "qlora"
    kwargs: dict[str, Any] = {}
    if qlora:  # the 4-bit model merge's qlora gap rebuilds: sft.quantization, not unsloth's own defaults
        kwargs = {"quantization_config": four_bit_config(spec.quantization),
                  "dtype": torch_dtype(spec.quantization.compute_dtype)}
    model, _ = FastLanguageModel.from_pretrained(
        model_name=spec.model,
        max_seq_length=spec.max_seq_length,
        load_in_4bit=qlora,
        full_finetuning=spec.method in ("full", "partial"),
        use_gradient_checkpointing="unsloth" if spec.gradient_checkpointing else False,
        use_exact_model_name=True,  # never swap in a pre-quantised repo with other quantisation settings
        random_state=spec.seed,
        **{"dtype": None, **kwargs},
    )
    if spec.method in ("lora", "qlora"):
        model = FastLanguageModel.get_peft_model(
            model,
            r=spec.lora.r,
            lora_alpha=spec.lora.alpha,
            lora_dropout=spec.lora.dropout,
            bias=spec.lora.bias,
            target_modules=list(spec.lora.target_modules),
            use_gradient_checkpointing="unsloth" if spec.gradient_checkpointing else False,
            random_state=spec.seed,
        )
    return model


def _load_transformers(spec: TrainSpec):
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = attention_kwargs(spec.attn_implementation)
    dtype: Any = torch.float32 if device() == "cpu" else "auto"
    if spec.method == "qlora":
        kwargs["quantization_config"] = four_bit_config(spec.quantization)
        dtype = torch_dtype(spec.quantization.compute_dtype)  # what is not quantised computes in it
        # each process of a multi-GPU launch keeps its 4-bit weights on its own GPU
        kwargs["device_map"] = {"": f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if device() == "cuda" else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(spec.model, dtype=dtype, **kwargs)
    if spec.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.method in ("lora", "qlora"):
        model = get_peft_model(model, _peft_config(spec.lora))
        if spec.gradient_checkpointing:
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
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


def load_for_inference(path: Path | str):
    """(model, tokenizer) in eval mode from a full model folder, an adapter folder, or models/base.

    An adapter folder's base comes from its tuneforge.json (`base`), else from adapter_config.json.
    """
    from peft import PeftModel

    path = require(path, "model")
    if (path / "adapter_config.json").exists():
        meta = read_meta(path)
        base = meta.get("base") or json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = load_causal_lm(base_model_id(base) if Path(base).is_dir() else base)
        model = PeftModel.from_pretrained(model, str(path))
    else:
        model = load_causal_lm(base_model_id(path))
    model.eval()
    return model, load_tokenizer(path)
