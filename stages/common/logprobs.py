"""Padding-correct, batched log-probabilities of responses given prompts, and perplexity.

`response_logprobs` is what evaluation uses: it tokenizes prompt and prompt+response with the model's own
tokenizer (no added special tokens: a rendered prompt already starts with BOS), checks that the prompt
tokens are an exact prefix of the full sequence, and sums fp32 log-probs over the response tokens only, in
eval mode without gradients. Sequences are sorted by length and padded per batch, with position ids taken
from the attention mask, so batch size and padding side do not change the result; nothing is ever
truncated, so tokenizer truncation settings do not either. `reference_response_logprobs` is the slow
one-example-at-a-time, unpadded version that the tests compare against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

PaddingSide = Literal["left", "right"]


class PrefixMismatchError(ValueError):
    """The tokenized prompt is not an exact prefix of the tokenized prompt+response."""


@dataclass(frozen=True)
class Encoded:
    """One tokenized sequence and which of its tokens are scored (1) or context (0)."""

    input_ids: list[int]
    mask: list[int]


@dataclass(frozen=True)
class LogprobResult:
    """Per-example summed log-probability of the scored tokens and how many tokens were scored."""

    logps: list[float]
    n_tokens: list[int]


@dataclass(frozen=True)
class Perplexity:
    nll: float  # total negative log-likelihood over all scored tokens
    n_tokens: int

    @property
    def value(self) -> float:
        return math.exp(self.nll / self.n_tokens) if self.n_tokens else float("nan")


def _ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    enc = tokenizer(list(texts), add_special_tokens=False, truncation=False, padding=False)
    return [list(ids) for ids in enc["input_ids"]]


def encode_pairs(tokenizer: Any, prompts: Sequence[str], responses: Sequence[str]) -> list[Encoded]:
    """Tokenize prompt and prompt+response; mask = 1 on response tokens. Raises PrefixMismatchError."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    prompt_ids = _ids(tokenizer, prompts)
    full_ids = _ids(tokenizer, [p + r for p, r in zip(prompts, responses, strict=True)])
    out = []
    for i, (p, full) in enumerate(zip(prompt_ids, full_ids, strict=True)):
        if full[: len(p)] != p:
            raise PrefixMismatchError(
                f"example {i}: the prompt's {len(p)} tokens are not a prefix of prompt+response "
                f"(tokens merge across the boundary?); prompt ends {prompts[i][-40:]!r}"
            )
        if len(full) == len(p):
            raise ValueError(f"example {i}: the response has no tokens")
        out.append(Encoded(full, [0] * len(p) + [1] * (len(full) - len(p))))
    return out


def _scored_sums(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over positions with mask=1 of log p(token_t | tokens_<t), in fp32; one value per row."""
    target = input_ids[:, 1:]
    scored = mask[:, 1:].bool()
    rows = scored.nonzero(as_tuple=True)[0]
    # log_softmax only at scored positions: (n_scored, vocab) rather than (batch, length, vocab) in fp32
    picked = logits[:, :-1][scored].float().log_softmax(dim=-1)
    token_lp = picked.gather(-1, target[scored].unsqueeze(-1)).squeeze(-1)
    return torch.zeros(input_ids.size(0), dtype=torch.float32, device=logits.device).index_add_(0, rows, token_lp)


def masked_logprobs(
    model: Any,
    sequences: Sequence[Encoded],
    *,
    batch_size: int = 16,
    padding_side: PaddingSide = "right",
    pad_token_id: int = 0,
) -> LogprobResult:
    """Batched: summed log-probs of the masked tokens of each sequence (position 0 is never scored)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i].input_ids))
    logps = [0.0] * len(sequences)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(sequences[i].input_ids) for i in idx)
                ids = torch.full((len(idx), width), pad_token_id, dtype=torch.long)
                attn = torch.zeros((len(idx), width), dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    seq = sequences[i]
                    n = len(seq.input_ids)
                    cols = slice(width - n, width) if padding_side == "left" else slice(0, n)
                    ids[row, cols] = torch.tensor(seq.input_ids)
                    attn[row, cols] = 1
                    mask[row, cols] = torch.tensor(seq.mask)
                position_ids = (attn.cumsum(dim=1) - 1).clamp(min=0)
                ids, attn, mask, position_ids = (t.to(device) for t in (ids, attn, mask, position_ids))
                logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids, use_cache=False).logits
                sums = _scored_sums(logits, ids, mask * attn).tolist()
                for row, i in enumerate(idx):
                    logps[i] = sums[row]
    finally:
        model.train(was_training)
    n_tokens = [sum(s.mask[1:]) for s in sequences]
    return LogprobResult(logps, n_tokens)


def response_logprobs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    batch_size: int = 16,
    padding_side: PaddingSide = "right",
) -> LogprobResult:
    """Summed log P(response | prompt) over response tokens, per example (batched)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return masked_logprobs(
        model, encode_pairs(tokenizer, prompts, responses), batch_size=batch_size, padding_side=padding_side,
        pad_token_id=pad,
    )


def reference_response_logprobs(
    model: Any, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str]
) -> LogprobResult:
    """Slow reference: one example at a time, no padding, full-vocabulary log-softmax over every position."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logps, counts = [], []
    try:
        with torch.no_grad():
            for prompt, response in zip(prompts, responses, strict=True):
                p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                full = tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
                if full[: len(p)] != p:
                    raise PrefixMismatchError("prompt tokens are not a prefix of prompt+response")
                ids = torch.tensor([full], device=device)
                lp = model(input_ids=ids).logits[0].float().log_softmax(-1)  # (len, vocab)
                total = 0.0
                for t in range(len(p), len(full)):
                    total += lp[t - 1, full[t]].item()
                logps.append(total)
                counts.append(len(full) - len(p))
    finally:
        model.train(was_training)
    return LogprobResult(logps, counts)


def perplexity(
    model: Any,
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 16,
    pad_token_id: int = 0,
) -> Perplexity:
    """exp(total NLL / total scored tokens) over (input_ids, assistant_masks) rows: one pooled ratio,
    not a mean of per-example perplexities."""
    seqs = [Encoded(list(ids), list(mask)) for ids, mask in rows]
    res = masked_logprobs(model, seqs, batch_size=batch_size, pad_token_id=pad_token_id)
    return Perplexity(nll=-sum(res.logps), n_tokens=sum(res.n_tokens))
