"""Padding-correct, batched log-probabilities of responses given prompts, and perplexity.

Everything tokenizes prompt and prompt+response with the model's own tokenizer (no added special tokens: a
rendered prompt already starts with BOS), checks that the prompt tokens are an exact prefix of the full
sequence, and sums fp32 log-probs over the response tokens only, in eval mode without autograd. Nothing is
ever truncated, so tokenizer truncation settings change nothing; position ids follow each sequence's true
length, so batch size and padding side change nothing either.

- `pair_logprobs` is what evaluation uses: chosen and rejected answers of a preference pair continue from
  one KV cache of their shared prompt, so each prompt runs once instead of twice.
- `response_logprobs` / `masked_logprobs` score one response per sequence (perplexity uses them).
- Both run the LM head only at scored positions, `memory.logit_chunk_tokens` of them at a time (the backbone's
  hidden states go through the head chunk by chunk), so full-vocabulary logits never exist for more than one
  chunk: memory does not grow with vocabulary x tokens x batch. A model that does not expose its backbone and
  head is scored from its own logits, sliced with `logits_to_keep`.
- `oracle_response_logprobs` is the slow one-example-at-a-time, unpadded version that the tests and
  `bench/evaluate.py` compare against.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class Head:
    """A causal LM split where the logits are made: the backbone (hidden states) and the LM head.

    Scoring through it runs the head only on scored positions, `chunk` of them at a time, so full-vocabulary
    logits never exist for more than one chunk of tokens (`memory.logit_chunk_tokens`)."""

    backbone: Any
    head: Any
    softcap: float | None
    scale: float
    chunk: int


def lm_head(model: Any, chunk_tokens: int | None = None) -> Head | None:
    """The model's backbone and LM head, or None for a model that does not expose them (it is then scored from
    the logits it returns, sliced with `logits_to_keep`) or that transforms its logits in a way not handled here."""
    from stages.common.memory import logit_chunk_tokens

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    backbone = getattr(inner, "base_model", None)
    config = getattr(inner, "config", None)
    if head is None or backbone is None or backbone is inner or config is None or not hasattr(head, "weight"):
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(text, k, None) is not None for k in ("lm_head_multiplier", "logits_scaling", "output_multiplier")):
        return None
    scale = getattr(text, "logit_scale", None)
    return Head(backbone, head, getattr(text, "final_logit_softcapping", None), 1.0 if scale is None else scale,
                chunk_tokens or logit_chunk_tokens(head.weight.shape[0]))


def scored_logps(head: Head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for each row of `hidden` (n, hidden size): the LM head and an fp32 log-softmax on `chunk`
    rows at a time, in place on the chunk's logits (one chunk-sized buffer; two for a 16-bit head)."""
    n = hidden.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=hidden.device)
    plain = type(head.head) is torch.nn.Linear  # else (e.g. a PEFT-wrapped head) call the module
    weight = head.head.weight
    rows = max(1, min(head.chunk, n))
    buf = torch.empty((rows, weight.shape[0]), dtype=torch.float32, device=hidden.device)  # reused: no heap churn
    low = torch.empty((rows, weight.shape[0]), dtype=weight.dtype, device=hidden.device) \
        if plain and weight.dtype != torch.float32 else None
    for start in range(0, n, head.chunk):
        h = hidden[start : start + head.chunk]
        if not plain:
            z = head.head(h).float()
        elif low is None:
            z = torch.mm(h, weight.t(), out=buf[: h.shape[0]])
        else:  # a 16-bit head computes in its dtype, as the model's own forward would, then in fp32
            z = buf[: h.shape[0]].copy_(torch.mm(h, weight.t(), out=low[: h.shape[0]]))
        if plain and head.head.bias is not None:
            z.add_(head.head.bias)
        if head.scale != 1.0:
            z.mul_(head.scale)
        if head.softcap is not None:
            z.div_(head.softcap).tanh_().mul_(head.softcap)
        z.sub_(z.amax(-1, keepdim=True))
        picked = z.gather(-1, targets[start : start + h.shape[0]].unsqueeze(-1)).squeeze(-1)
        out[start : start + head.chunk] = picked - z.exp_().sum(-1).log()
    return out


def _forward(model: Any, head: Head | None, ids: torch.Tensor, keep: int, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """(hidden states, output) through the backbone when the head is known, else (logits of the last `keep`
    positions, output) from the model itself.

    `logits_to_keep` is transformers' own argument; a model that ignores it returns every position, which is
    sliced here instead, so the result is the same either way."""
    if head is not None:
        out = head.backbone(input_ids=ids, **kwargs)
        return out.last_hidden_state[:, -keep:], out
    out = model(input_ids=ids, logits_to_keep=keep, **kwargs)
    return out.logits[:, -keep:], out


def _score(head: Head | None, values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per row of `values`: hidden states through the chunked head, or logits as they are."""
    return _token_logps(values, targets) if head is None else scored_logps(head, values, targets)


def _token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) under each row of `logits` (n, vocab), with the log-softmax in fp32."""
    return logits.float().log_softmax(dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _row_sums(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> list[float]:
    return torch.zeros(n_rows, dtype=torch.float32, device=values.device).index_add_(0, rows, values).tolist()


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Eval mode without autograd for the block; the model's training flag is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def masked_logprobs(
    model: Any,
    sequences: Sequence[Encoded],
    *,
    batch_size: int = 16,
    padding_side: PaddingSide = "right",
    pad_token_id: int = 0,
    tokens_per_batch: int | None = None,
    chunk_tokens: int | None = None,
) -> LogprobResult:
    """Batched: summed log-probs of the masked tokens of each sequence (position 0 is never scored).

    A batch holds at most `batch_size` rows and, with `tokens_per_batch`, at most that many padded tokens."""
    from stages.common.memory import rows_for_tokens

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    device = next(model.parameters()).device
    head = lm_head(model, chunk_tokens)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i].input_ids))
    logps = [0.0] * len(sequences)
    start = 0
    with _eval_mode(model):
        for n in rows_for_tokens([len(sequences[i].input_ids) for i in order], tokens_per_batch, batch_size):
            idx = order[start : start + n]
            start += n
            width = max(len(sequences[i].input_ids) for i in idx)
            ids = torch.full((len(idx), width), pad_token_id, dtype=torch.long)
            attn = torch.zeros((len(idx), width), dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.bool)
            for row, i in enumerate(idx):
                seq = sequences[i]
                n = len(seq.input_ids)
                cols = slice(width - n, width) if padding_side == "left" else slice(0, n)
                ids[row, cols] = torch.tensor(seq.input_ids)
                attn[row, cols] = 1
                mask[row, cols] = torch.tensor(seq.mask, dtype=torch.bool)
                mask[row, cols.start] = False  # nothing in the row predicts its first token
            if not mask.any():
                continue
            # logits only from the position before the first scored token on: prompts cost no LM head
            first = int(mask.any(dim=0).nonzero()[0])
            keep = width - first + 1
            position_ids = (attn.cumsum(dim=1) - 1).clamp(min=0)
            ids, attn, mask, position_ids = (t.to(device) for t in (ids, attn, mask, position_ids))
            values, _ = _forward(model, head, ids, keep, attention_mask=attn, position_ids=position_ids,
                                 use_cache=False)
            scored = mask[:, first:]
            token_lp = _score(head, values[:, :-1][scored], ids[:, first:][scored])
            sums = _row_sums(token_lp, scored.nonzero(as_tuple=True)[0], len(idx))
            for row, i in enumerate(idx):
                logps[i] = sums[row]
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
    tokens_per_batch: int | None = None,
    chunk_tokens: int | None = None,
) -> LogprobResult:
    """Summed log P(response | prompt) over response tokens, per example (batched)."""
    return masked_logprobs(
        model, encode_pairs(tokenizer, prompts, responses), batch_size=batch_size, padding_side=padding_side,
        pad_token_id=_pad_id(tokenizer), tokens_per_batch=tokens_per_batch, chunk_tokens=chunk_tokens,
    )


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _continue(model: Any, head: Head | None, cache: Any, p_attn: torch.Tensor, n_prompt: Sequence[int],
              answers: Sequence[Sequence[int]], pad: int) -> list[float]:
    """Summed log-probs of answer tokens 1.. continuing each row's cached, left-padded prompt."""
    width = max(map(len, answers)) - 1  # the last answer token is never an input
    if width == 0:
        return [0.0] * len(answers)
    ids = torch.full((len(answers), width), pad, dtype=torch.long)
    targets = torch.full((len(answers), width), pad, dtype=torch.long)
    attn = torch.zeros((len(answers), width), dtype=torch.long)
    for row, a in enumerate(answers):
        ids[row, : len(a) - 1] = torch.tensor(a[:-1])
        targets[row, : len(a) - 1] = torch.tensor(a[1:])
        attn[row, : len(a) - 1] = 1
    position_ids = torch.tensor(n_prompt)[:, None] + torch.arange(width)  # carry on from each true length
    ids, targets, attn, position_ids = (t.to(p_attn.device) for t in (ids, targets, attn, position_ids))
    values, _ = _forward(model, head, ids, width, attention_mask=torch.cat([p_attn, attn], dim=1),
                         position_ids=position_ids, past_key_values=cache, use_cache=True)
    scored = attn.bool()
    return _row_sums(_score(head, values[scored], targets[scored]), scored.nonzero(as_tuple=True)[0], len(answers))


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix all sequences share."""
    for k in range(min(map(len, seqs))):
        if any(s[k] != seqs[0][k] for s in seqs):
            return k
    return min(map(len, seqs))


def pair_logprobs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    *,
    batch_size: int = 16,
    tokens_per_batch: int | None = None,
    chunk_tokens: int | None = None,
) -> tuple[LogprobResult, LogprobResult]:
    """Summed log P(chosen | prompt) and log P(rejected | prompt) per pair, computing each prompt once.

    Prefix caching, in three steps, all with the model's own KV cache:
    1. The token prefix every prompt shares (BOS, the chat header and, in a persona data set, the whole system
       prompt) runs once for the call.
    2. Per batch, each prompt's remaining tokens continue from a copy of that cache, left-padded so every
       prompt ends in the last column; the last position's logits score each answer's first token.
    3. The chosen answers continue from the batch's cache and the rejected ones from a copy of it, each
       right-padded to its own width, with position ids carrying on from each prompt's true length.
    Same numbers as `response_logprobs` on each side (tests), with every prompt token computed once per call
    instead of twice per pair. A batch holds at most `batch_size` pairs and, with `tokens_per_batch`, at most
    that many tokens of prompt plus longer answer per pair (padded).
    """
    from stages.common.memory import rows_for_tokens

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    enc = {"chosen": encode_pairs(tokenizer, prompts, chosen), "rejected": encode_pairs(tokenizer, prompts, rejected)}
    n_prompt = [e.mask.index(1) for e in enc["chosen"]]
    if 0 in n_prompt:
        raise ValueError(f"example {n_prompt.index(0)}: the prompt has no tokens (nothing to condition on)")
    prompt_ids = [e.input_ids[:p] for e, p in zip(enc["chosen"], n_prompt, strict=True)]
    answers = {side: [e.input_ids[p:] for e, p in zip(es, n_prompt, strict=True)] for side, es in enc.items()}
    # every prompt keeps at least its last token out of the shared prefix: its logits score the answer's first
    shared = min(common_prefix(prompt_ids), min(n_prompt) - 1)
    logps: dict[str, list[float]] = {side: [0.0] * len(n_prompt) for side in enc}
    pad = _pad_id(tokenizer)
    device = next(model.parameters()).device
    head = lm_head(model, chunk_tokens)
    width_of = {i: n_prompt[i] + max(len(answers["chosen"][i]), len(answers["rejected"][i])) for i in range(len(n_prompt))}
    order = sorted(range(len(n_prompt)), key=lambda i: -width_of[i])
    with _eval_mode(model):
        _, probe = _forward(model, head, torch.tensor([prompt_ids[0][: max(shared, 1)]], device=device), 1,
                            use_cache=True)
        probe = probe.past_key_values
        if not hasattr(probe, "batch_repeat_interleave"):  # no transformers KV cache (e.g. a custom model)
            log.info("pair_logprobs: %s returns no reusable KV cache; scoring chosen and rejected separately",
                     type(model).__name__)
            return tuple(  # type: ignore[return-value]
                masked_logprobs(model, enc[side], batch_size=batch_size, pad_token_id=pad,
                                tokens_per_batch=tokens_per_batch, chunk_tokens=chunk_tokens) for side in enc
            )
        prefix = probe if shared else None
        start = 0
        for n in rows_for_tokens([width_of[i] for i in order], tokens_per_batch, batch_size):
            idx = order[start : start + n]
            start += n
            width = max(n_prompt[i] for i in idx) - shared
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            attn = torch.zeros((len(idx), shared + width), dtype=torch.long)
            attn[:, :shared] = 1
            for row, i in enumerate(idx):
                own = n_prompt[i] - shared
                ids[row, width - own :] = torch.tensor(prompt_ids[i][shared:])
                attn[row, shared + width - own :] = 1
            position_ids = (attn.cumsum(dim=1) - 1).clamp(min=0)[:, shared:]
            ids, attn, position_ids = (t.to(device) for t in (ids, attn, position_ids))
            cache = None
            if prefix is not None:
                cache = copy.deepcopy(prefix)
                cache.batch_repeat_interleave(len(idx))
            last, out = _forward(model, head, ids, 1, attention_mask=attn, position_ids=position_ids,
                                 past_key_values=cache, use_cache=True)
            caches = {"chosen": out.past_key_values, "rejected": copy.deepcopy(out.past_key_values)}
            for side, side_cache in caches.items():
                rows = [answers[side][i] for i in idx]
                first = _score(head, last[:, -1], torch.tensor([a[0] for a in rows], device=device)).tolist()
                rest = _continue(model, head, side_cache, attn, [n_prompt[i] for i in idx], rows, pad)
                for k, i in enumerate(idx):
                    logps[side][i] = first[k] + rest[k]
    return tuple(LogprobResult(logps[side], [sum(e.mask) for e in enc[side]]) for side in enc)  # type: ignore[return-value]


def oracle_response_logprobs(
    model: Any, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str]
) -> LogprobResult:
    """Slow oracle: one example at a time, no padding, full-vocabulary log-softmax over every position."""
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
    tokens_per_batch: int | None = None,
    chunk_tokens: int | None = None,
) -> Perplexity:
    """exp(total NLL / total scored tokens) over (input_ids, assistant_masks) rows: one pooled ratio,
    not a mean of per-example perplexities."""
    seqs = [Encoded(list(ids), list(mask)) for ids, mask in rows]
    res = masked_logprobs(model, seqs, batch_size=batch_size, pad_token_id=pad_token_id,
                          tokens_per_batch=tokens_per_batch, chunk_tokens=chunk_tokens)
    return Perplexity(nll=-sum(res.logps), n_tokens=sum(res.n_tokens))
