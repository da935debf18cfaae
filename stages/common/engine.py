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

from stages.common.base_ref import base_model_id
from stages.common.config import Engine, LoraConfig, Method, PartialConfig, QuantizationConfig
from stages.common.io import InputError, require, write_json

log = logging.getLogger(__name__)

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


def load_tokenizer(path: Path | str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(require(path, "tokenizer")))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def compute_dtype(quantization: QuantizationConfig) -> torch.dtype:
    """sft.quantization.compute_dtype resolved: what a 4-bit model computes (and keeps unquantised weights) in."""
    if quantization.compute_dtype == "auto":
        return inference_dtype()
    return torch_dtype(quantization.compute_dtype)


def inference_dtype() -> torch.dtype:
    """16-bit where a GPU makes it pay; full precision on CPU (no speed gain there, and exact checks)."""
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _project(hidden, weight, bias, out):
    """hidden @ weight.T (+ bias) into `out`, an fp32 buffer reused from chunk to chunk (no allocation per chunk:
    freed chunk-sized tensors would fragment the CPU heap). Under autocast the projection runs in the autocast
    dtype, as TRL's kernel runs its tiles in the compute dtype, and is copied in."""
    if torch.is_autocast_enabled(hidden.device.type):
        return out.copy_(torch.nn.functional.linear(hidden, weight, bias))
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


def _logits(hidden, weight, bias, temperature, softcap, logit_scale, out):
    """One chunk's transformed logits in fp32 in `out`, and tanh of the softcap for the backward. In place: no
    copy for a scale or temperature of 1."""
    return _transform(_project(hidden, weight, bias, out), temperature, softcap, logit_scale)


@torch.autocast("cpu", enabled=False)
@torch.autocast("cuda", enabled=False)
def _transform(z, temperature, softcap, logit_scale):
    if logit_scale != 1.0:
        z.mul_(logit_scale)
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(z.div_(softcap))
        z = tanh * softcap
    if temperature != 1.0:
        z.div_(temperature)
    return z, tanh


def _head_outputs(hidden, weight, bias, targets, temperature, softcap, logit_scale, outputs, buffers):
    """TRL's per-token LM-head outputs for a block of positions, from their full-vocabulary logits in fp32
    (computed in buffers[0], with buffers[1] as the second chunk-sized buffer)."""
    z, _ = _logits(hidden, weight, bias, temperature, softcap, logit_scale, buffers[0])
    return _outputs_from_logits(z, targets, outputs, buffers[1])


@torch.autocast("cpu", enabled=False)
@torch.autocast("cuda", enabled=False)
def _outputs_from_logits(z, targets, outputs, spare):
    """Everything after the projection in fp32, whatever the caller's autocast. Works in place on `z` and `spare`
    (no autograd here: the backward is written out)."""
    picked = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mean_logits = z.mean(-1) if "mean_logits" in outputs else None
    is_top1 = (z.argmax(-1) == targets) if "is_top1" in outputs else None
    top = z.amax(-1, keepdim=True)
    shifted = z.sub_(top)  # z - max, in place
    e = torch.exp(shifted, out=spare)
    total = e.sum(-1)
    log_z = top.squeeze(-1) + total.log()
    entropy = log_sum_sq = None
    if "entropy" in outputs:  # H = log Z - sum p z = log(total) - sum e (z - max) / total
        entropy = total.log() - torch.linalg.vecdot(e, shifted) / total
    if "log_sum_sq_probs" in outputs:  # log sum p^2 = log sum e^2 - 2 log total
        log_sum_sq = e.square_().sum(-1).log() - 2 * total.log()
    return picked - log_z, entropy, log_sum_sq, mean_logits, is_top1


class TorchLogProb(torch.autograd.Function):
    """Plain-torch stand-in for TRL's Triton `ChunkedLogProbFunction` (same arguments and outputs).

    TRL 1.15's trainers always route the LM head through that Triton kernel when Triton imports, and
    unsloth installs Triton even on CPU-only machines, where the kernel has no driver and fails.
    Like the kernel, this never holds full-vocabulary logits for more than one chunk of positions
    (`memory.logit_chunk_tokens`), and like it the backward recomputes each chunk and turns it into the logits'
    gradient in place (d log p_t / dz = onehot_t - p, d entropy / dz = -p (log p + H)), accumulating the
    projection's gradients in fp32: SFT, DPO and TRL's reference precompute keep TRL's memory shape on CPU.
    Per position the numbers are those of one fp32 log-softmax over the whole vocabulary (tests).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale,
                outputs=("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")):
        from stages.common.memory import logit_chunk_tokens

        ctx.set_materialize_grads(False)
        n, vocab = hidden.shape[0], weight.shape[0]
        rows = logit_chunk_tokens(vocab)
        h, w, b = hidden.float(), weight.float(), None if bias is None else bias.float()  # weight cast once
        buffers = torch.empty((2, max(1, min(rows, n)), vocab), dtype=torch.float32, device=hidden.device)
        parts = [_head_outputs(h[s : s + rows], w, b, targets[s : s + rows], temperature, softcap, logit_scale,
                               outputs, buffers[:, : min(rows, n - s)]) for s in range(0, n, rows)]
        if not parts:  # a micro-batch without a scored token
            parts = [_head_outputs(h, w, b, targets, temperature, softcap, logit_scale, outputs, buffers[:, :0])]
        result = tuple(None if part[0] is None else torch.cat(part) for part in zip(*parts, strict=True))
        ctx.save_for_backward(hidden, weight, bias, targets, result[1] if result[1] is not None else result[0])
        device = hidden.device.type
        ctx.args = (temperature, softcap, logit_scale, rows, result[1] is not None)
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.mark_non_differentiable(*(x for x in result[2:] if x is not None))
        return result

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, *_):
        hidden, weight, bias, targets, entropy = ctx.saved_tensors
        temperature, softcap, logit_scale, rows, has_entropy = ctx.args
        needs = ctx.needs_input_grad[:3]
        if not has_entropy:
            grad_entropy = None
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if needs[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs[1] else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs[2] and bias is not None \
            else None
        if grad_log_probs is not None or grad_entropy is not None:
            device, enabled, dtype = ctx.autocast
            h_all, w, b = hidden.float(), weight.float(), None if bias is None else bias.float()
            n = hidden.shape[0]
            buffers = torch.empty((2, max(1, min(rows, n)), weight.shape[0]), dtype=torch.float32, device=hidden.device)
            with torch.no_grad():
                for s in range(0, n, rows):
                    h = h_all[s : s + rows]
                    with torch.autocast(device, dtype=dtype, enabled=enabled):  # the forward's logits, recomputed
                        z, tanh = _logits(h, w, b, temperature, softcap, logit_scale, buffers[0, : h.shape[0]])
                    z.sub_(z.amax(-1, keepdim=True))
                    p = torch.exp(z, out=buffers[1, : h.shape[0]])
                    total = p.sum(-1, keepdim=True)
                    p.div_(total)
                    log_p = z.sub_(total.log_())  # z becomes log p, in place
                    if grad_entropy is not None:  # -g_H p (log p + H), in log p's buffer
                        grad = log_p.add_(entropy[s : s + rows, None]).mul_(p).mul_(-grad_entropy[s : s + rows,
                                                                                                None].float())
                    else:
                        grad = log_p.zero_()
                    if grad_log_probs is not None:  # g (onehot - p)
                        g = grad_log_probs[s : s + rows, None].float()
                        grad.sub_(p.mul_(g))
                        grad.scatter_add_(-1, targets[s : s + rows, None], g)
                    del p, log_p
                    if temperature != 1.0:
                        grad.div_(temperature)
                    if tanh is not None:
                        grad.mul_(1 - tanh.square_())
                    if logit_scale != 1.0:
                        grad.mul_(logit_scale)
                    if grad_h is not None:  # the projection's gradients in fp32, as TRL's kernel accumulates them
                        torch.mm(grad, w, out=grad_h[s : s + rows])
                    if grad_w is not None:
                        grad_w.addmm_(grad.t(), h)
                    if grad_b is not None:
                        grad_b += grad.sum(0)
        return (None if grad_h is None else grad_h.to(hidden.dtype), None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None, None)


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
                              bnb_4bit_compute_dtype=compute_dtype(quantization))


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
                  "dtype": compute_dtype(spec.quantization)}
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
        dtype = compute_dtype(spec.quantization)  # what is not quantised computes in it
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
