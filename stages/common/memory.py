"""The memory model: peak bytes of each stage as a function of the model's shape and the stage's settings.

One place for every memory figure tuneforge uses: `bench/rehearsal.py` prints its predictions beside the
measured peak RSS of each stage and the table for Llama-3.1-8B on one 24 / 48 / 80 GB GPU; the logit paths
take their chunk size from it (`logit_chunk_tokens`) and the stages their batch sizes from a token budget
(`rows_for_tokens`, `rows_within`). README "Memory" writes the same formulas out with how each row was derived.

A prediction is a sum of terms (bytes), each a function of the model shape (`ModelShape`) and the settings:
- weights: every parameter in its dtype; NF4 linears at 0.5 byte plus their quantisation constants (double
  quant: one 8-bit absmax per 64 weights and one fp32 per 256 of those); embeddings, norms and the LM head in
  the compute dtype (bitsandbytes never quantises the head), fp32 after PEFT's `prepare_model_for_kbit_training`.
- trainable state: the trained parameters (LoRA's in fp32) with their fp32 gradient and two AdamW moments.
- activations: what autograd keeps per token per layer (`ModelShape.train_bytes_per_token_layer`), or with
  gradient checkpointing one hidden state per layer plus one layer's full set; without autograd one layer's
  working set; KV caches where a stage keeps them.
- logits: one chunk of positions at full vocabulary (`logit_chunk_tokens`), never all of them.
- runtime: the imported libraries' resident memory (CPU) or the CUDA context (GPU): measured, not derived.
A fixed 10% (`ALLOCATOR_SLACK`) covers allocator fragmentation on the live tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

GiB = 1024**3
MiB = 1024**2

# One chunk of full-vocabulary logits with its fp32 copies: at most this many bytes.
LOGIT_CHUNK_BYTES = 64 * MiB
LOGIT_COPIES = 3  # the head's output (<= 4 bytes/logit), its fp32 copy, the fp32 log-softmax

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# NF4 with double quantisation: 4 bits per weight, one 8-bit absmax per block of 64, one fp32 per 256 blocks
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
NF4_BYTES_PER_PARAM_SINGLE = 0.5 + 4 / 64  # without double quantisation: one fp32 absmax per 64

# The CUDA context and cuBLAS workspaces outside torch's allocator on a recent GPU (H100 / A100 class), a
# commonly measured ~0.5-0.7 GB; the CPU runtime is measured per process by bench/rehearsal.py.
CUDA_RUNTIME_BYTES = 0.6 * GiB
# A loaded fast tokenizer (Rust vocabulary and merges, transformers' added-token maps): ~700 bytes per entry,
# measured on the rehearsal's 128,256-entry tokenizer (+80-90 MB RSS on loading).
TOKENIZER_BYTES_PER_ENTRY = 700
ALLOCATOR_SLACK = 1.10


def logit_chunk_tokens(vocab_size: int, budget_bytes: int | None = None) -> int:
    """Positions per chunk of full-vocabulary logits so that one chunk's copies stay within `budget_bytes`
    (default `LOGIT_CHUNK_BYTES`)."""
    budget = LOGIT_CHUNK_BYTES if budget_bytes is None else budget_bytes
    return max(1, budget // (LOGIT_COPIES * 4 * max(1, vocab_size)))


def rows_within(tokens_per_batch: int | None, width: int, max_rows: int) -> int:
    """How many rows of `width` padded tokens fit in `tokens_per_batch`: at least one, at most `max_rows`."""
    if tokens_per_batch is None:
        return max_rows
    return max(1, min(max_rows, tokens_per_batch // max(1, width)))


def rows_for_tokens(widths: Sequence[int], tokens_per_batch: int | None, max_rows: int) -> list[int]:
    """Batch sizes for sequences sorted longest first: each batch takes as many rows as fit in
    `tokens_per_batch` padded tokens (rows x its longest width), at least one and at most `max_rows`."""
    sizes, start = [], 0
    while start < len(widths):
        n = min(rows_within(tokens_per_batch, widths[start], max_rows), len(widths) - start)
        sizes.append(n)
        start += n
    return sizes


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on in a Llama-architecture causal LM."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = False

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers config object or its config.json as a dict."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        head_dim = get("head_dim") or get("hidden_size") // get("num_attention_heads")
        return cls(vocab=get("vocab_size"), hidden=get("hidden_size"), intermediate=get("intermediate_size"),
                   layers=get("num_hidden_layers"), heads=get("num_attention_heads"),
                   kv_heads=get("num_key_value_heads") or get("num_attention_heads"), head_dim=head_dim,
                   tied=bool(get("tie_word_embeddings", False)))

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each projection in one block."""
        kv = self.kv_heads * self.head_dim
        q = self.heads * self.head_dim
        return {"q_proj": (q, self.hidden), "k_proj": (kv, self.hidden), "v_proj": (kv, self.hidden),
                "o_proj": (self.hidden, q), "gate_proj": (self.intermediate, self.hidden),
                "up_proj": (self.intermediate, self.hidden), "down_proj": (self.hidden, self.intermediate)}

    @property
    def linear_params(self) -> int:
        """Parameters of the blocks' projections (what 4-bit quantises), all layers."""
        return self.layers * sum(o * i for o, i in self.linear_shapes().values())

    @property
    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden
        norms = (2 * self.layers + 1) * self.hidden
        return embeddings + self.head_params + self.linear_params + norms

    def lora_params(self, r: int, targets: Sequence[str]) -> int:
        return self.layers * sum(r * (o + i) for name, (o, i) in self.linear_shapes().items() if name in targets)

    def kv_bytes_per_token(self, dtype_bytes: float) -> float:
        """KV cache per token: keys and values of every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def train_bytes_per_token_layer(self, dtype_bytes: float, lora: bool) -> float:
        """What autograd keeps per token in one decoder layer (attention through SDPA / flash: no seq^2 term).

        Counted from the Llama block: the two RMSNorms keep their fp32 input (2 x 4h bytes) and output; attention
        keeps q, k, v before and after rotary and its output; the MLP keeps gate, up, act(gate) and act(gate)*up
        (4 x intermediate); the two residual adds one h each; LoRA keeps the dropout output of each targeted
        projection's input (~6h + intermediate) and the rank-r projections (negligible)."""
        h, i = self.hidden, self.intermediate
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        elems = 2 * h + 2 * (q + 2 * kv) + q + 4 * i + 2 * h
        if lora:
            elems += 6 * h + i
        return elems * dtype_bytes + 2 * 4 * h + 4 * self.heads  # + fp32 norm inputs and log-sum-exp


# Llama-3.1-8B(-Instruct): config.json of meta-llama/Llama-3.1-8B-Instruct
LLAMA_3_1_8B = ModelShape(vocab=128256, hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8,
                          head_dim=128)
ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Prediction:
    """Peak bytes of one stage by term, plus the runtime (what `bench/rehearsal.py` prints, README derives)."""

    stage: str
    terms: dict[str, float] = field(default_factory=dict)
    runtime: float = 0.0
    settings: str = ""

    @property
    def model_bytes(self) -> float:
        """The weights the stage holds (largest model)."""
        return sum(v for k, v in self.terms.items() if k.startswith("weights"))

    @property
    def activation_bytes(self) -> float:
        """Everything else the stage holds besides the weights and the runtime."""
        return ALLOCATOR_SLACK * sum(self.terms.values()) - self.model_bytes

    @property
    def total(self) -> float:
        return self.runtime + ALLOCATOR_SLACK * sum(self.terms.values())


def weight_bytes(shape: ModelShape, dtype: str, four_bit: bool = False, double_quant: bool = True,
                 unquantised_dtype: str | None = None) -> float:
    """All parameters: NF4 linears (if `four_bit`) and the rest (embeddings, norms, head) in `unquantised_dtype`
    (default `dtype`)."""
    if not four_bit:
        return shape.params * DTYPE_BYTES[dtype]
    per = NF4_BYTES_PER_PARAM if double_quant else NF4_BYTES_PER_PARAM_SINGLE
    return shape.linear_params * per + (shape.params - shape.linear_params) * DTYPE_BYTES[unquantised_dtype or dtype]


def logit_chunk_bytes(shape: ModelShape) -> float:
    return LOGIT_COPIES * 4 * shape.vocab * logit_chunk_tokens(shape.vocab)


def lm_head_bytes(shape: ModelShape, tokens: int, device: str, dtype_bytes: float, training: bool) -> float:
    """TRL's fused LM head (SFT / DPO forward, the reference precompute): on CUDA the Triton kernel's tile (4,096
    tokens x 32,768 vocabulary in the compute dtype), on CPU `engine.TorchLogProb`'s chunk (its backward
    recomputes one chunk with autograd: ~2 more copies); in training also the fp32 gradient of the scored hidden
    states."""
    if device == "cuda":
        tile = min(tokens, 4096) * min(shape.vocab, 32768) * dtype_bytes
    else:
        tile = logit_chunk_bytes(shape) * (2 if training else 1)
    return tile + (tokens * shape.hidden * 4 if training else 0)


def runtime_bytes(device: str, measured_cpu: float | None = None) -> float:
    return CUDA_RUNTIME_BYTES if device == "cuda" else (measured_cpu or 0.0)


def training(stage: str, shape: ModelShape, *, method: str, dtype: str, tokens: int, device: str,
             lora_r: int = 16, lora_targets: Sequence[str] = ALL_LINEARS, gradient_checkpointing: bool = True,
             double_quant: bool = True, engine: str = "transformers", trainable_params: int | None = None,
             runtime: float | None = None) -> Prediction:
    """SFT / DPO: weights + trainable state + activations of `tokens` tokens per micro-batch + the LM head.

    `tokens` is what one forward sees: rows x padded width (SFT; packed rows are max_seq_length wide), DPO twice
    that (chosen and rejected stacked)."""
    b = DTYPE_BYTES[dtype]
    four_bit = method == "qlora"
    lora = method in ("lora", "qlora")
    # PEFT's prepare_model_for_kbit_training (transformers engine) upcasts every unquantised parameter to fp32
    upcast = "float32" if four_bit and engine == "transformers" else None
    terms: dict[str, float] = {"weights": weight_bytes(shape, dtype, four_bit, double_quant, upcast)}
    trainable = shape.lora_params(lora_r, lora_targets) if lora else (trainable_params or shape.params)
    # LoRA weights in fp32 (full / partial weights are counted above) + fp32 gradient + two AdamW moments
    terms["trainable state"] = trainable * (4 * 3 + (4 if lora else 0))
    per_layer = shape.train_bytes_per_token_layer(b, lora=lora)
    if gradient_checkpointing:
        terms["activations"] = tokens * (shape.layers * shape.hidden * b + per_layer)
    else:
        terms["activations"] = tokens * shape.layers * per_layer
    terms["lm head"] = lm_head_bytes(shape, tokens, device, b, training=True)
    if four_bit:  # bitsandbytes dequantises one projection at a time for its matmul (and its backward)
        terms["dequantised projection"] = 2 * max(o * i for o, i in shape.linear_shapes().values()) * b
    gc = "gradient checkpointing" if gradient_checkpointing else "no checkpointing"
    return Prediction(stage, terms, runtime_bytes(device, runtime),
                      f"{method}, {dtype}, {tokens} tokens per micro-batch, {gc}")


def inference(stage: str, shape: ModelShape, *, dtype: str, tokens: int, device: str, four_bit: bool = False,
              kv_tokens: int = 0, extra: dict[str, float] | None = None, runtime: float | None = None,
              settings: str = "") -> Prediction:
    """A forward without autograd over `tokens` tokens: weights, one layer's working set (residual stream, q/k/v,
    the MLP's gate, up and product), KV caches of `kv_tokens` tokens, the logit chunk and anything the stage
    keeps (`extra`)."""
    b = DTYPE_BYTES[dtype]
    terms: dict[str, float] = {"weights": weight_bytes(shape, dtype, four_bit)}
    q = shape.heads * shape.head_dim
    terms["activations"] = tokens * (3 * shape.hidden + q + 3 * shape.intermediate) * b
    if kv_tokens:
        terms["kv cache"] = kv_tokens * shape.kv_bytes_per_token(b)
    terms["logits"] = logit_chunk_bytes(shape)
    if four_bit:
        terms["dequantised projection"] = max(o * i for o, i in shape.linear_shapes().values()) * b
    terms.update(extra or {})
    return Prediction(stage, terms, runtime_bytes(device, runtime), settings)


def merge(shape: ModelShape, *, dtype: str, device: str, held_out_tokens: int, batch_tokens: int,
          lora_params: int, qlora: bool, compute_dtype: str = "float32", runtime: float | None = None) -> Prediction:
    """The merge: the base in the stored dtype + the fp32 adapter on the device, one batch's forward, PEFT's fp32
    update of one projection at a time, the LM-head copy of the model compared against (moved to the device for
    the comparison) and the fp64 comparison chunk of two models; the held-out hidden states are kept in host
    memory (counted on CPU only). The qlora gap runs after the merged model is freed: the 4-bit model plus the
    merged model's head copy, so the peak is the larger phase."""
    b = DTYPE_BYTES[dtype]
    extra = {"adapter": lora_params * 4, "compared model's head copy": shape.vocab * shape.hidden * b,
             "comparison chunk": 2 * 2 * 8 * shape.vocab * max(1, logit_chunk_tokens(shape.vocab) // 4)}
    if device == "cpu":
        extra["stored hidden states"] = held_out_tokens * shape.hidden * b
    widest = max(o * i for o, i in shape.linear_shapes().values())
    merged = inference("merge", shape, dtype=dtype, tokens=batch_tokens, device=device, runtime=runtime,
                       extra={**extra, "merge update (one projection, fp32)": 2 * widest * 4},
                       settings=f"{dtype} merge, {held_out_tokens} held-out tokens, {batch_tokens} per batch")
    if not qlora:
        return merged
    gap = inference("merge", shape, dtype=compute_dtype, tokens=batch_tokens, device=device, four_bit=True,
                    runtime=runtime, extra=extra, settings=merged.settings + " (qlora gap phase)")
    return merged if merged.total >= gap.total else gap


def reference(shape: ModelShape, *, dtype: str, device: str, batch_tokens: int, four_bit: bool, lora_params: int,
              runtime: float | None = None) -> Prediction:
    """TRL's reference precompute: the DPO policy as `dpo` loads it (4-bit after QLoRA) and one batch of pairs
    (chosen and rejected stacked) without autograd, the LM head through TRL's fused head."""
    return inference("reference", shape, dtype=dtype, tokens=batch_tokens, device=device, four_bit=four_bit,
                     runtime=runtime,
                     extra={"adapter": lora_params * 4, "lm head": lm_head_bytes(shape, batch_tokens, device,
                                                                                 DTYPE_BYTES[dtype], False)},
                     settings=f"{'nf4' if four_bit else dtype}, {batch_tokens} tokens per batch")


def evaluate(shape: ModelShape, *, dtype: str, device: str, pair_tokens: int, generate_tokens: int,
             lora_params: int, runtime: float | None = None) -> Prediction:
    """evaluate, one model at a time (the DPO model = sft-merged + its adapter): `pair_logprobs` keeps the batch's
    prompt cache and a copy of it per answer side; generation keeps its batch's KV cache."""
    kv = max(3 * pair_tokens, generate_tokens)
    return inference("evaluate", shape, dtype=dtype, tokens=max(pair_tokens, generate_tokens), device=device,
                     kv_tokens=kv, runtime=runtime, extra={"adapter": lora_params * 4},
                     settings=f"{dtype}, {pair_tokens} tokens per log-prob batch, {generate_tokens} generating")


def export(shape: ModelShape, *, dtype: str, device: str, tokens: int, lora_params: int,
           runtime: float | None = None) -> Prediction:
    """export: models/dpo (sft-merged in fp32 + the DPO adapter) answers the samples greedily (`tokens` = prompt +
    answer of the longest), is merged in fp32 and saved in `export.dtype`; the saved model is loaded again for its
    check while the merged one is still resident, so two models are held at the peak."""
    return inference("export", shape, dtype="float32", tokens=tokens, device=device, kv_tokens=tokens,
                     runtime=runtime, extra={"adapter": lora_params * 4,
                                             "weights of the saved model (reloaded for its check)":
                                                 weight_bytes(shape, dtype)},
                     settings=f"fp32 merge, saved and checked in {dtype}, {tokens} tokens generating")


def pretrain(shape: ModelShape, *, rows: int, width: int, runtime: float | None = None) -> Prediction:
    """The `base` stage's tiny pretraining (CPU, fp32, full training with transformers' Trainer, which computes
    the loss from full logits: logits, their log-softmax and both gradients, 4 x rows x width x vocab x 4 bytes)."""
    tokens = rows * width
    terms = {"weights": shape.params * 4.0, "trainable state": shape.params * 12.0,
             "activations": tokens * shape.layers * shape.train_bytes_per_token_layer(4, lora=False),
             "logits (full, for the loss)": 4.0 * tokens * shape.vocab * 4}
    return Prediction("base", terms, runtime or 0.0, f"fp32, {rows} x {width} tokens per batch")


def tokenizer_bytes(vocab: int) -> float:
    return TOKENIZER_BYTES_PER_ENTRY * vocab


def gib(n: float) -> float:
    return round(n / GiB, 2)


def mib(n: float) -> float:
    return round(n / MiB, 1)


# ------------------------------------------------------------------------ Llama-3.1-8B on one GPU

GPUS_GB = (24, 48, 80)


@dataclass(frozen=True)
class Option:
    """One way to run a stage of the recipe on Llama-3.1-8B."""

    stage: str
    settings: str
    prediction: Prediction


def recipe_options(max_seq_length: int = 2048) -> list[Option]:
    """The recipe's stages at Llama-3.1-8B's shapes with the settings that matter for memory (presets/recipe-*):
    SFT QLoRA batch 2 x 2,048 (unsloth / transformers), LoRA 16-bit and full fine-tuning for comparison, merge in
    bf16 on the device, reference and DPO in 4-bit (dpo.quantization auto after QLoRA) or 16-bit, evaluate in bf16."""
    s, t = LLAMA_3_1_8B, max_seq_length
    dev = "cuda"
    lora16 = s.lora_params(16, ALL_LINEARS)
    lora8 = s.lora_params(8, ALL_LINEARS)
    out = [
        Option("sft", "qlora, unsloth, batch 2 x 2048, checkpointing",
               training("sft", s, method="qlora", dtype="bfloat16", tokens=2 * t, device=dev, engine="unsloth")),
        Option("sft", "qlora, transformers, batch 2 x 2048, checkpointing",
               training("sft", s, method="qlora", dtype="bfloat16", tokens=2 * t, device=dev)),
        Option("sft", "qlora, unsloth, batch 2 x 2048, no checkpointing",
               training("sft", s, method="qlora", dtype="bfloat16", tokens=2 * t, device=dev, engine="unsloth",
                        gradient_checkpointing=False)),
        Option("sft", "lora 16-bit, batch 2 x 2048, checkpointing",
               training("sft", s, method="lora", dtype="bfloat16", tokens=2 * t, device=dev)),
        Option("sft", "full bf16 + AdamW, batch 1 x 2048, checkpointing",
               training("sft", s, method="full", dtype="bfloat16", tokens=t, device=dev)),
        Option("merge", "bf16 on the device, 16 x 2048 held-out tokens, batch 4 x 2048",
               merge(s, dtype="bfloat16", device=dev, held_out_tokens=16 * t, batch_tokens=4 * t,
                     lora_params=lora16, qlora=True, compute_dtype="bfloat16")),
        Option("reference", "nf4 (after QLoRA), batch 2 pairs x 2 x 2048",
               reference(s, dtype="bfloat16", device=dev, batch_tokens=2 * 2 * t, four_bit=True, lora_params=lora8)),
        Option("reference", "bf16, batch 8 pairs x 2 x 2048",
               reference(s, dtype="bfloat16", device=dev, batch_tokens=8 * 2 * t, four_bit=False, lora_params=lora8)),
        Option("dpo", "nf4 (after QLoRA), batch 1 pair x 2 x 2048, checkpointing",
               training("dpo", s, method="qlora", dtype="bfloat16", tokens=2 * t, device=dev, lora_r=8,
                        engine="unsloth")),
        Option("dpo", "bf16 LoRA, batch 1 pair x 2 x 2048, checkpointing",
               training("dpo", s, method="lora", dtype="bfloat16", tokens=2 * t, device=dev, lora_r=8)),
        Option("evaluate", "bf16, tokens_per_batch 8,192 (log-probs and generation)",
               evaluate(s, dtype="bfloat16", device=dev, pair_tokens=8192, generate_tokens=8192, lora_params=lora8)),
        Option("evaluate", "bf16, tokens_per_batch 32,768",
               evaluate(s, dtype="bfloat16", device=dev, pair_tokens=32768, generate_tokens=32768,
                        lora_params=lora8)),
        # export as it landed (#15): models/dpo loaded in fp32 on the device, merged, saved in bf16, reloaded
        Option("export", "fp32 merge on the device (as export runs now), bf16 saved and reloaded",
               export(s, dtype="bfloat16", device=dev, tokens=2 * 1024, lora_params=lora8)),
    ]
    return out


def fits(prediction: Prediction, gpu_gb: int) -> bool:
    """A GPU sold as N GB has about N GiB (an RTX 4090: 23.99 GiB, an H100 80GB: 79.6 GiB); 5% is kept back for
    what the model does not count."""
    return prediction.total <= 0.95 * gpu_gb * GiB
