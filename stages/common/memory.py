"""The memory model: peak bytes of each stage as a function of the model's shape and the stage's settings.

One place for every memory figure tuneforge uses: `bench/rehearsal.py` prints its predictions beside the
measured peak RSS of each stage and the table for Llama-3.1-8B on one 24 / 48 / 80 GB GPU; the logit paths
take their chunk size from it (`logit_chunk_tokens`) and the stages their batch sizes from a token budget
(`rows_for_tokens`). README "Memory" writes the same formulas out with how each row was derived.

Terms (bytes), each a function of the model shape `ModelShape` and the stage's settings:
- weights: every parameter in its stored dtype; 4-bit (NF4) linears at 0.5 byte + their quantisation
  constants (double quant: one 8-bit absmax per 64 weights, one fp32 per 256 of those), embeddings, norms
  and the LM head in the compute dtype (bitsandbytes never quantises the head).
- trainable state: LoRA (or full / partial) parameters with their gradient and two AdamW moments, fp32.
- activations: what autograd keeps per token per layer (`train_bytes_per_token_layer`), or with gradient
  checkpointing one hidden state per layer plus one layer's full set; inference keeps the KV cache and one
  layer's working set.
- logits: never more than one chunk of positions at full vocabulary (`logit_chunk_tokens`).
- runtime: the imported libraries (CPU) or the CUDA context (GPU), measured, not derived.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

GiB = 1024**3
MiB = 1024**2

# One chunk of full-vocabulary logits, with its fp32 copy and log-softmax: at most this many bytes.
LOGIT_CHUNK_BYTES = 64 * MiB
LOGIT_COPIES = 3  # the head's output (<= 4 bytes), its fp32 copy, the fp32 log-softmax

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "nf4": 0.5}
# NF4 with double quantisation: 4 bits per weight, one 8-bit absmax per block of 64, one fp32 per 256 blocks
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
NF4_BYTES_PER_PARAM_SINGLE = 0.5 + 4 / 64  # without double quantisation: one fp32 absmax per 64

# Process baselines, measured on this project's CPU machines (python -c "import torch, transformers, trl, peft":
# ~0.75 GB RSS; with datasets, accelerate and a trainer set up ~1.0 GB) and the CUDA context on an H100/A100
# class GPU (~0.5 GB outside torch's allocator). bench/rehearsal.py prints the measured import baseline.
RUNTIME_BYTES = {"cpu": 1.0 * GiB, "cuda": 0.6 * GiB}
ALLOCATOR_SLACK = 1.10  # torch's caching allocator and fragmentation on top of live tensors


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
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(vocab=config.vocab_size, hidden=config.hidden_size, intermediate=config.intermediate_size,
                   layers=config.num_hidden_layers, heads=config.num_attention_heads,
                   kv_heads=config.num_key_value_heads, head_dim=head_dim,
                   tied=bool(getattr(config, "tie_word_embeddings", False)))

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each projection in one block."""
        kv = self.kv_heads * self.head_dim
        q = self.heads * self.head_dim
        return {"q_proj": (q, self.hidden), "k_proj": (kv, self.hidden), "v_proj": (kv, self.hidden),
                "o_proj": (self.hidden, q), "gate_proj": (self.intermediate, self.hidden),
                "up_proj": (self.intermediate, self.hidden), "down_proj": (self.hidden, self.intermediate)}

    @property
    def linear_params(self) -> int:
        """Parameters of the transformer blocks' projections (what 4-bit quantises), all layers."""
        return self.layers * sum(o * i for o, i in self.linear_shapes().values())

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.embedding_params + self.head_params + self.linear_params + self.norm_params

    def lora_params(self, r: int, targets: Sequence[str]) -> int:
        shapes = self.linear_shapes()
        return self.layers * sum(r * (o + i) for name, (o, i) in shapes.items() if name in targets)

    def block_params(self) -> int:
        return self.linear_params // self.layers + 2 * self.hidden

    def kv_bytes_per_token(self, dtype_bytes: float) -> float:
        """KV cache per token: keys and values of every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def train_bytes_per_token_layer(self, dtype_bytes: float, lora: bool) -> float:
        """What autograd keeps per token in one decoder layer (attention through SDPA / flash: no seq^2 term).

        Counted from the Llama block: the two RMSNorms keep their fp32 input (2 x 4h); the attention keeps
        q, k, v before and after rotary, its output and log-sum-exp; the MLP keeps gate, up, act(gate) and
        act(gate) * up (4 x intermediate); the residual stream one h for each of the two adds; LoRA keeps the
        dropout output of its input per targeted projection (7 inputs, ~6h + i) and each A-projection (r,
        negligible). Full fine-tuning keeps the same tensors without the LoRA terms."""
        h, i = self.hidden, self.intermediate
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        elems = 2 * h + 2 * (q + 2 * kv) + q + 4 * i + 2 * h
        if lora:
            elems += 6 * h + i
        return elems * dtype_bytes + 2 * 4 * h + 4 * self.heads  # fp32 norm inputs, fp32 log-sum-exp


# Llama-3.1-8B(-Instruct): config.json of meta-llama/Llama-3.1-8B-Instruct
LLAMA_3_1_8B = ModelShape(vocab=128256, hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8,
                          head_dim=128)
RECIPE_LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Prediction:
    """Peak bytes of one stage, by term (what `bench/rehearsal.py` prints and README derives)."""

    stage: str
    terms: dict[str, float] = field(default_factory=dict)
    runtime: float = 0.0
    note: str = ""

    @property
    def model_bytes(self) -> float:
        return sum(v for k, v in self.terms.items() if k.startswith("weights"))

    @property
    def activation_bytes(self) -> float:
        return sum(v for k, v in self.terms.items() if not k.startswith("weights"))

    @property
    def total(self) -> float:
        return self.runtime + ALLOCATOR_SLACK * sum(self.terms.values())


def weight_bytes(shape: ModelShape, dtype: str, four_bit: bool = False, double_quant: bool = True) -> float:
    """All parameters: 4-bit linears (if asked) and the rest (embeddings, norms, head) in `dtype`."""
    b = DTYPE_BYTES[dtype]
    if four_bit:
        per = NF4_BYTES_PER_PARAM if double_quant else NF4_BYTES_PER_PARAM_SINGLE
        return shape.linear_params * per + (shape.params - shape.linear_params) * b
    return shape.params * b


def logit_chunk_bytes(shape: ModelShape) -> float:
    return min(LOGIT_CHUNK_BYTES, LOGIT_COPIES * 4 * shape.vocab * logit_chunk_tokens(shape.vocab))


def trl_head_bytes(shape: ModelShape, tokens: int, device: str, dtype_bytes: float) -> float:
    """TRL's fused LM head (training forward and reference precompute): the Triton kernel's tile on CUDA
    (4,096 tokens x 32,768 vocabulary in the compute dtype) or `engine.TorchLogProb`'s chunk on CPU, plus the
    fp32 gradient of the scored hidden states."""
    if device == "cuda":
        tile = min(tokens, 4096) * min(shape.vocab, 32768) * dtype_bytes
    else:
        tile = logit_chunk_bytes(shape) * 2  # forward chunk, and the recomputed chunk with its gradient
    return tile + tokens * shape.hidden * 4


def training(stage: str, shape: ModelShape, *, method: str, dtype: str, tokens: int, device: str,
             lora_r: int = 16, lora_targets: Sequence[str] = RECIPE_LORA, gradient_checkpointing: bool = False,
             double_quant: bool = True, trainable_params: int | None = None) -> Prediction:
    """SFT / DPO: weights + trainable state + activations of `tokens` tokens per micro-batch + the LM head."""
    b = DTYPE_BYTES[dtype]
    four_bit = method == "qlora"
    terms: dict[str, float] = {"weights": weight_bytes(shape, dtype, four_bit, double_quant)}
    if method in ("lora", "qlora"):
        trainable = shape.lora_params(lora_r, lora_targets)
    else:
        trainable = trainable_params if trainable_params is not None else shape.params
    # weights of trainable params in fp32 (LoRA; the full model's are counted above), gradient and AdamW moments
    terms["trainable state"] = trainable * (4 * 3 + (4 if method in ("lora", "qlora") else 0))
    per_layer = shape.train_bytes_per_token_layer(b, lora=method in ("lora", "qlora"))
    if gradient_checkpointing:
        terms["activations"] = tokens * (shape.layers * shape.hidden * b + per_layer)
    else:
        terms["activations"] = tokens * shape.layers * per_layer
    terms["lm head"] = trl_head_bytes(shape, tokens, device, b)
    if four_bit:  # one layer's dequantised weight at a time (bitsandbytes' 4-bit matmul)
        terms["dequantised layer"] = max(o * i for o, i in shape.linear_shapes().values()) * b
    return Prediction(stage, terms, RUNTIME_BYTES[device])


def inference(stage: str, shape: ModelShape, *, dtype: str, tokens: int, device: str, four_bit: bool = False,
              kv_copies: int = 0, extra: dict[str, float] | None = None) -> Prediction:
    """A forward without autograd over `tokens` tokens: weights, one layer's working set, KV caches, the logit
    chunk and anything the stage keeps (`extra`)."""
    b = DTYPE_BYTES[dtype]
    terms: dict[str, float] = {"weights": weight_bytes(shape, dtype, four_bit)}
    # the residual stream and one layer's widest intermediates (gate, up, act) alive at once
    terms["activations"] = tokens * (2 * shape.hidden + 3 * shape.intermediate) * b + tokens * shape.hidden * b
    if kv_copies:
        terms["kv cache"] = kv_copies * tokens * shape.kv_bytes_per_token(b)
    terms["logits"] = logit_chunk_bytes(shape)
    if four_bit:
        terms["dequantised layer"] = max(o * i for o, i in shape.linear_shapes().values()) * b
    terms.update(extra or {})
    return Prediction(stage, terms, RUNTIME_BYTES[device])


def gib(n: float) -> float:
    return round(n / GiB, 2)


def mib(n: float) -> float:
    return round(n / MiB, 1)

