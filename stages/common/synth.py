"""The `anthropic` provider of `generate`: persona SFT data and DPO pairs written by Claude.

Diversity by construction: a grid of category x subtopic x question style x asker drives question
writing (subtopics are asked of Claude once per category; styles and askers are in
stages/prompts/grid.yaml). Then persona answers (SFT targets and DPO `chosen`) and generic-assistant
answers (DPO `rejected`). Each step renders its own versioned template from stages/prompts/.

Every id and request is a pure function of (params, templates, earlier cached answers): the SFT and
DPO streams walk their own seeded permutation of the grid, so raising sft_count keys the first
requests identically and pays only for the new ones. Requests whose answer fails (refusal,
truncation, invalid output) are replaced by the next question, so counts stay exact.

    sft_rows, dpo_rows, report = generate_with_claude(params.generate, params.paths.cache)
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stages.common.claude import ClaudeClient, ClaudeError, ClaudeRequest, ClaudeResult, Tool
from stages.common.config import GenerateConfig
from stages.common.io import InputError
from stages.common.persona import persona_card, system_prompt

log = logging.getLogger(__name__)

PROMPTS = Path(__file__).resolve().parent.parent / "prompts"
MAX_ROUNDS = 6  # answer rounds: failed answers are replaced by fresh questions this many times at most


class GenerationFailed(ClaudeError):
    """Too many requests failed; `report` holds the accounting so far (the cache keeps every answer)."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Template:
    name: str
    version: str
    system: str
    user: str
    tool: Tool

    @property
    def tag(self) -> str:
        return f"{self.name}@{self.version}"


def load_template(name: str, root: Path = PROMPTS) -> Template:
    path = root / f"{name}.yaml"
    if not path.exists():
        raise InputError(f"{path}: prompt template not found")
    data = yaml.safe_load(path.read_text()) or {}
    missing = [k for k in ("name", "version", "system", "user", "tool") if k not in data]
    if missing:
        raise InputError(f"{path}: missing key(s) {', '.join(missing)}")
    tool = data["tool"]
    return Template(name=data["name"], version=str(data["version"]), system=data["system"], user=data["user"],
                    tool=Tool(tool["name"], tool["description"], tool["input_schema"]))


def load_grid(root: Path = PROMPTS) -> tuple[list[str], list[str], str]:
    path = root / "grid.yaml"
    data = yaml.safe_load(path.read_text()) if path.exists() else None
    if not data or not data.get("styles") or not data.get("askers"):
        raise InputError(f"{path}: needs non-empty `styles` and `askers` lists")
    return list(data["styles"]), list(data["askers"]), f"grid@{data.get('version', 0)}"


def _with_count(tool: Tool, prop: str, n: int) -> Tool:
    schema = {**tool.input_schema, "properties": dict(tool.input_schema["properties"])}
    schema["properties"][prop] = {**schema["properties"][prop], "minItems": n}
    return Tool(tool.name, tool.description, schema)


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def _row_id(prefix: str, text: str) -> str:
    return f"{prefix}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


@dataclass
class Stream:
    """One deterministic walk through the grid (SFT or DPO): question batches, then answered rows."""

    name: str
    need: int
    cells: list[tuple[str, str, str, str]]
    batches: dict[int, ClaudeResult] = field(default_factory=dict)
    questions: list[str] = field(default_factory=list)
    pos: int = 0  # questions[:pos] have been sent for answers
    rows: list[dict[str, Any]] = field(default_factory=list)


class Synth:
    def __init__(self, cfg: GenerateConfig, client: ClaudeClient) -> None:
        self.cfg = cfg
        self.acfg = cfg.anthropic
        self.client = client
        self.t = {n: load_template(n) for n in ("subtopics", "questions", "persona_answer", "generic_answer")}
        self.styles, self.askers, self.grid_version = load_grid()
        self.source = f"anthropic:{self.acfg.model}"
        self.card = persona_card(cfg.persona)

    def _request(self, t: Template, values: dict[str, str], tag: str, tool: Tool | None = None,
                 extra_version: str = "") -> ClaudeRequest:
        return self.client.request(t.system.format(**values), [{"role": "user", "content": t.user.format(**values)}],
                                   tool or t.tool, t.tag + extra_version, tag=tag)

    def subtopics(self) -> dict[str, list[str]]:
        n = self.acfg.subtopics_per_category
        t = self.t["subtopics"]
        tool = _with_count(t.tool, "subtopics", n)
        reqs = {c: self._request(t, {"n": str(n), "category": c}, f"subtopics:{c}", tool) for c in self.cfg.categories}
        results = self.client.run(reqs.values())
        out: dict[str, list[str]] = {}
        for c, req in reqs.items():
            res = results[req.key]
            items = [s.strip() for s in (res.data or {}).get("subtopics", []) if s.strip()]
            unique = list(dict.fromkeys(items))[:n]
            if not unique:
                log.warning("no subtopics for %r (%s): using the category itself", c, res.failure)
                unique = [c]
            out[c] = unique
        return out

    def question_request(self, stream: Stream, j: int) -> ClaudeRequest:
        category, subtopic, style, asker = stream.cells[j % len(stream.cells)]
        k = self.acfg.questions_per_request
        t = self.t["questions"]
        values = {"k": str(k), "category": category, "subtopic": subtopic, "style": style, "asker": asker,
                  "label": f"{stream.name}-{j}"}
        return self._request(t, values, f"questions:{stream.name}-{j}", _with_count(t.tool, "questions", k),
                             "+" + self.grid_version)

    def _rebuild(self, streams: list[Stream]) -> None:
        """Questions per stream, in batch order, without duplicates (the SFT stream claims a question first)."""
        k = self.acfg.questions_per_request
        claimed: set[str] = set()
        for s in streams:
            out: list[str] = []
            for j in sorted(s.batches):
                res = s.batches[j]
                for q in ((res.data or {}).get("questions") or [])[:k]:
                    q = q.strip()
                    if len(q) >= 10 and _norm(q) not in claimed:
                        claimed.add(_norm(q))
                        out.append(q)
            s.questions = out

    def ensure_questions(self, streams: list[Stream], wants: dict[str, int]) -> None:
        k = self.acfg.questions_per_request
        for _ in range(MAX_ROUNDS):
            reqs: dict[tuple[str, int], ClaudeRequest] = {}
            for s in streams:
                deficit = s.pos + wants[s.name] - len(s.questions)
                start = len(s.batches)
                for j in range(start, start + max(0, math.ceil(deficit / k))):
                    reqs[(s.name, j)] = self.question_request(s, j)
            if not reqs:
                return
            results = self.client.run(reqs.values())
            for s in streams:
                for (name, j), req in reqs.items():
                    if name == s.name:
                        s.batches[j] = results[req.key]
            self._rebuild(streams)

    def answer_request(self, kind: str, question: str) -> ClaudeRequest:
        t = self.t[kind]
        values = {"name": self.cfg.persona.name, "description": self.cfg.persona.description, "question": question,
                  "persona_card": self.card}
        return self._request(t, values, f"{kind}:{_row_id('q', question)}")

    def answers(self, streams: list[Stream], wants: dict[str, int], system: str) -> None:
        batch: list[tuple[Stream, str, ClaudeRequest, ClaudeRequest | None]] = []
        for s in streams:
            for q in s.questions[s.pos : s.pos + wants[s.name]]:
                generic = self.answer_request("generic_answer", q) if s.name == "dpo" else None
                batch.append((s, q, self.answer_request("persona_answer", q), generic))
            s.pos = min(len(s.questions), s.pos + wants[s.name])
        reqs = [r for _, _, p, g in batch for r in (p, g) if r is not None]
        results = self.client.run(reqs)
        for s, q, p, g in batch:
            chosen = results[p.key]
            if not chosen.ok:
                continue
            answer = chosen.data["answer"].strip()
            if s.name == "sft":
                s.rows.append({"id": _row_id("sft", q), "source": self.source, "messages": [
                    {"role": "system", "content": system}, {"role": "user", "content": q},
                    {"role": "assistant", "content": answer}]})
                continue
            rejected = results[g.key]
            if rejected.ok:
                s.rows.append({"id": _row_id("dpo", q), "source": self.source,
                               "prompt": [{"role": "system", "content": system}, {"role": "user", "content": q}],
                               "chosen": answer, "rejected": rejected.data["answer"].strip()})

    def run(self, system: str) -> tuple[list[dict], list[dict], dict[str, Any]]:
        if self.cfg.sft_count == 0 and self.cfg.dpo_count == 0:
            return [], [], self.client.report()
        subtopics = self.subtopics()
        cells = [(c, sub, st, a) for c in self.cfg.categories for sub in subtopics[c]
                 for st in self.styles for a in self.askers]
        streams = []
        for name, need in (("sft", self.cfg.sft_count), ("dpo", self.cfg.dpo_count)):
            perm = list(cells)
            random.Random(f"{self.cfg.seed}:{name}").shuffle(perm)
            streams.append(Stream(name, need, perm))
        for _ in range(MAX_ROUNDS):
            wants = {s.name: s.need - len(s.rows) for s in streams}
            if not any(w > 0 for w in wants.values()):
                break
            self.ensure_questions(streams, wants)
            self.answers(streams, wants, system)
        sft, dpo = streams[0].rows[: self.cfg.sft_count], streams[1].rows[: self.cfg.dpo_count]
        report = self.client.report()
        share = report["failed"] / max(1, report["requests"])
        report.update({
            "grid_cells": len(cells), "subtopics": {c: len(v) for c, v in subtopics.items()},
            "questions_written": {s.name: len(s.questions) for s in streams},
            "failure_share": round(share, 4), "max_failure_share": self.acfg.max_failure_share,
            "templates": sorted([t.tag for t in self.t.values()] + [self.grid_version]),
        })
        if share > self.acfg.max_failure_share:
            raise GenerationFailed(
                f"{report['failed']} of {report['requests']} Claude requests failed ({share:.1%} > "
                f"generate.anthropic.max_failure_share {self.acfg.max_failure_share:.1%}): {report['failures']}. "
                "Answered requests are cached; fix the cause and rerun to send only the rest.", report)
        if len(sft) < self.cfg.sft_count or len(dpo) < self.cfg.dpo_count:
            raise GenerationFailed(
                f"only {len(sft)}/{self.cfg.sft_count} SFT rows and {len(dpo)}/{self.cfg.dpo_count} DPO pairs "
                f"after {MAX_ROUNDS} rounds (failures: {report['failures']})", report)
        return sft, dpo, report


def generate_with_claude(cfg: GenerateConfig, cache_dir: Path) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """(sft_rows, dpo_rows, report) in the data contract's raw schemas, written by Claude via the request cache."""
    client = ClaudeClient(cfg.anthropic, cache_dir)
    try:
        return Synth(cfg, client).run(system_prompt(cfg))
    finally:
        client.close()
