"""Claude client layer shared by `generate` and the evaluation judge: cached, resumable, accounted for.

Every request asks for JSON by forced tool use and is keyed by a hash of (model, system, messages,
sampling params, tool schema, template version). Paid answers go to an append-only request cache
(`<cache_dir>/claude/requests.jsonl`) the moment they arrive, so a killed run resumes by sending only
what was never answered. `mode: online` runs AsyncAnthropic with bounded concurrency and client-side
requests/min and tokens/min limits; `mode: batch` uses the Message Batches API and persists batch ids
at once (`<cache_dir>/claude/batches.jsonl`) so a rerun resumes polling instead of resubmitting.

Prompt caching is reported as the API does it: each distinct prefix (tools + system) is sized once with
the free count_tokens endpoint, cache reads and writes come only from each answer's `usage`, and
`report()["prompt_cache"]` says per template whether the prefix reached the model's caching minimum
(CACHE_MIN_TOKENS). A 400 that names a request parameter (a `temperature` the model rejects) stops the run.

The API key is read by the SDK from ANTHROPIC_API_KEY (never passed, stored or logged here);
ANTHROPIC_BASE_URL points the client at any server speaking the Messages API.

    client = ClaudeClient(params.generate.anthropic, params.paths.cache)
    results = client.run([ClaudeRequest(...), ...])   # {key: ClaudeResult}
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import re
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import anthropic
import jsonschema
from anthropic import AsyncAnthropic
from anthropic._middleware import Middleware
from tqdm.auto import tqdm

from stages.common.config import AnthropicConfig
from stages.common.io import InputError

log = logging.getLogger(__name__)

CACHE_SUBDIR = "claude"
# The smallest prefix (tools, then system, up to the cache breakpoint) the API caches, per model; a shorter
# prefix is processed at full price, silently. Published tables, 2026 (see FIELD_NOTES); dated ids such as
# claude-sonnet-4-5-20250929 match their family; any other model is "unknown".
CACHE_MIN_TOKENS = {
    "claude-sonnet-4": 1024, "claude-opus-4": 1024, "claude-opus-4-1": 1024, "claude-sonnet-4-5": 1024,
    "claude-sonnet-4-6": 2048,
    "claude-haiku-4-5": 4096, "claude-opus-4-5": 4096, "claude-opus-4-6": 4096,
}
COUNT_ATTEMPT = -1  # request-cache slot of a prefix's token count (count_tokens), beside answers 0 and 1
_SPEND_LIMIT = re.compile(r"usage limit|spend(ing)? limit|credit balance|billing|quota|insufficient", re.I)
# A 400 naming a request parameter every request carries (e.g. "`temperature` and `top_p` cannot both be
# specified for this model"): every later request would get it too, so it stops the run at once.
_PARAM_REJECTED = re.compile(
    r"\b(temperature|top_p|top_k|max_tokens|thinking|tool_choice|stop_sequences|service_tier)\b"
    r"|extra inputs are not permitted", re.I)


class ClaudeError(InputError):
    """A Claude run could not finish; everything already answered stays in the request cache.

    An InputError (the API is the stage's input), so `run_main` reports it in one line and exits 2."""


class ClaudeFatalError(ClaudeError):
    """Waiting will not help (bad key, no permission, spend limit, unknown model): stop at once."""


@dataclass(frozen=True)
class Tool:
    """The one tool the model is forced to call; its input_schema is the answer's JSON schema."""

    name: str
    description: str
    input_schema: dict[str, Any]

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "input_schema": self.input_schema}


@dataclass(frozen=True, eq=False)
class ClaudeRequest:
    """One structured-output request. `tag` labels it in logs and the cache; it is not part of the key."""

    model: str
    system: str
    messages: list[dict[str, Any]]
    tool: Tool
    max_tokens: int
    temperature: float | None
    template_version: str
    tag: str = ""

    @cached_property
    def key(self) -> str:
        ident = {
            "model": self.model,
            "system": self.system,
            "messages": self.messages,
            "sampling": {"max_tokens": self.max_tokens, "temperature": self.temperature},
            "schema": self.tool.spec(),
            "template_version": self.template_version,
        }
        blob = json.dumps(ident, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def body(self, previous: dict[str, Any] | None = None, error: str = "") -> dict[str, Any]:
        """Messages API parameters; with `previous` (an invalid first answer) the re-ask that quotes it."""
        messages = list(self.messages)
        if previous is not None:
            messages += _reask_turns(previous, self.tool.name, error)
        body = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "system": [{"type": "text", "text": self.system, "cache_control": {"type": "ephemeral"}}],
            "messages": messages,
            "tools": [self.tool.spec()],
            "tool_choice": {"type": "tool", "name": self.tool.name},
        }
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return body

    def estimated_tokens(self) -> int:
        chars = len(self.system) + len(json.dumps(self.messages)) + len(json.dumps(self.tool.input_schema))
        return chars // 4 + self.max_tokens

    @cached_property
    def prefix_key(self) -> str:
        """Identity of the cacheable prefix: model, tool and system (the breakpoint is on the system block)."""
        ident = {"model": self.model, "system": self.system, "schema": self.tool.spec()}
        return hashlib.sha256(json.dumps(ident, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def prefix_body(self) -> dict[str, Any]:
        """count_tokens parameters for the prefix: tools and system, and a one-character user turn."""
        body = self.body()
        return {k: body[k] for k in ("model", "system", "tools", "tool_choice")} | {
            "messages": [{"role": "user", "content": "."}]}


def cache_min_tokens(model: str) -> int | None:
    """The model's prompt-caching minimum in tokens; None when the model is not in CACHE_MIN_TOKENS."""
    family = max((k for k in CACHE_MIN_TOKENS if model == k or model.startswith(k + "-")), key=len, default=None)
    return CACHE_MIN_TOKENS[family] if family else None


def _reask_turns(previous: dict[str, Any], tool_name: str, error: str) -> list[dict[str, Any]]:
    content = [b for b in previous.get("content", []) if b.get("type") in ("text", "tool_use")]
    content = [{k: v for k, v in b.items() if k in ("type", "text", "id", "name", "input")} for b in content]
    tool_use = next((b for b in content if b["type"] == "tool_use"), None)
    note = f"That answer was invalid: {error}. Call the tool `{tool_name}` again with input that matches its schema."
    if tool_use is None:
        return [{"role": "assistant", "content": content or [{"type": "text", "text": "(no answer)"}]},
                {"role": "user", "content": note}]
    return [
        {"role": "assistant", "content": content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use["id"], "is_error": True,
                                      "content": note}]},
    ]


@dataclass
class ClaudeResult:
    """The outcome for one request: `data` (the validated tool input) or a failure kind with the raw text."""

    request: ClaudeRequest
    data: dict[str, Any] | None = None
    failure: str | None = None  # refusal | max_tokens | invalid_output | timeout | connection | server_error ...
    raw: str = ""
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.data is not None


# --------------------------------------------------------------------------- validation

_validators: dict[str, jsonschema.protocols.Validator] = {}


def _validator(tool: Tool) -> jsonschema.protocols.Validator:
    key = json.dumps(tool.input_schema, sort_keys=True)
    if key not in _validators:
        cls = jsonschema.validators.validator_for(tool.input_schema)
        _validators[key] = cls(tool.input_schema)
    return _validators[key]


def _raw_text(message: dict[str, Any]) -> str:
    parts = []
    for block in message.get("content", []):
        if block.get("type") == "tool_use":
            parts.append(json.dumps(block.get("input"), ensure_ascii=False))
        elif block.get("type") == "text":
            parts.append(block.get("text", ""))
    return "\n".join(parts)


def evaluate(message: dict[str, Any], tool: Tool) -> tuple[str, Any]:
    """Classify a paid answer: ("ok", data) | ("refusal"|"max_tokens", raw) | ("invalid", error)."""
    stop = message.get("stop_reason")
    if stop == "refusal":
        return "refusal", _raw_text(message)
    if stop in ("max_tokens", "model_context_window_exceeded"):
        return "max_tokens", _raw_text(message)
    block = next((b for b in message.get("content", []) if b.get("type") == "tool_use" and b.get("name") == tool.name),
                 None)
    if block is None:
        return "invalid", f"no call to the tool `{tool.name}`"
    errors = sorted(_validator(tool).iter_errors(block.get("input")), key=lambda e: list(e.path))
    if errors:
        err = errors[0]
        where = "/".join(str(p) for p in err.path) or "input"
        return "invalid", f"{where}: {err.message}"[:300]
    return "ok", block["input"]


# --------------------------------------------------------------------------- request cache


class RequestCache:
    """Append-only JSONL of paid answers, one line per (key, attempt); survives kills mid-write."""

    def __init__(self, cache_dir: Path | str) -> None:
        self.dir = Path(cache_dir) / CACHE_SUBDIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "requests.jsonl"
        self._entries: dict[tuple[str, int], dict[str, Any]] = {}
        self._load()
        self._fh = self.path.open("a", encoding="utf-8")

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        bad = 0
        for line in data.splitlines():
            try:
                rec = json.loads(line)
                self._entries[(rec["key"], int(rec["attempt"]))] = rec
            except (ValueError, KeyError, TypeError):
                bad += 1  # a line cut short by a kill: that request is simply sent again
        if bad:
            log.warning("%s: skipped %d unreadable line(s) (an interrupted write)", self.path, bad)
        if data and not data.endswith(b"\n"):
            with self.path.open("ab") as fh:
                fh.write(b"\n")

    def get(self, key: str, attempt: int) -> dict[str, Any] | None:
        return self._entries.get((key, attempt))

    def put(self, key: str, attempt: int, tag: str, message: dict[str, Any]) -> None:
        rec = {"key": key, "attempt": attempt, "tag": tag, "time": round(time.time(), 3), "message": message}
        self._fh.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
        self._fh.flush()
        self._entries[(key, attempt)] = rec

    def close(self) -> None:
        self._fh.close()

    def __len__(self) -> int:
        """Paid answers held (prefix token counts are not answers)."""
        return sum(attempt >= 0 for _, attempt in self._entries)


class BatchLedger:
    """Append-only record of submitted and collected Message Batches, written before anything else."""

    def __init__(self, cache_dir: Path | str) -> None:
        self.path = Path(cache_dir) / CACHE_SUBDIR / "batches.jsonl"
        self.submitted: dict[str, dict[str, list]] = {}  # batch id -> {custom_id: [key, attempt]}
        self.collected: set[str] = set()
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("event") == "submitted":
                    self.submitted[rec["batch_id"]] = rec["items"]
                elif rec.get("event") == "collected":
                    self.collected.add(rec["batch_id"])

    def _append(self, rec: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def add(self, batch_id: str, items: dict[str, list]) -> None:
        self._append({"event": "submitted", "batch_id": batch_id, "items": items, "time": round(time.time(), 3)})
        self.submitted[batch_id] = items

    def close_batch(self, batch_id: str) -> None:
        self._append({"event": "collected", "batch_id": batch_id, "time": round(time.time(), 3)})
        self.collected.add(batch_id)

    def open_batches(self) -> list[str]:
        return [b for b in self.submitted if b not in self.collected]

    def in_flight(self) -> set[str]:
        return {cid for b in self.open_batches() for cid in self.submitted[b]}


def custom_id(key: str, attempt: int) -> str:
    return key if attempt == 0 else hashlib.sha256(f"{key}:{attempt}".encode()).hexdigest()


# --------------------------------------------------------------------------- accounting


@dataclass
class Accounting:
    """What a run cost: requests, cache hits, retries, failures by kind, tokens and estimated USD."""

    requests: int = 0  # distinct requests asked for
    cache_hits: int = 0
    sent: int = 0  # requests sent to the API (online calls or batch items), re-asks included, retries not
    reasks: int = 0
    http_attempts: int = 0
    retries: int = 0
    batches_submitted: int = 0
    failures: Counter = field(default_factory=Counter)
    tokens: Counter = field(default_factory=Counter)
    cost_usd: float = 0.0
    saved_usd: float = 0.0  # what the cache hits would have cost again
    wall_s: float = 0.0
    unpriced_model: bool = False
    prompt_cache: dict[str, PrefixStats] = field(default_factory=dict)  # by template version

    def report(self, model: str, mode: str) -> dict[str, Any]:
        return {
            "provider": "anthropic", "model": model, "mode": mode,
            "requests": self.requests, "requests_sent": self.sent, "cache_hits": self.cache_hits,
            "reasks": self.reasks, "http_attempts": self.http_attempts, "retries": self.retries,
            "batches_submitted": self.batches_submitted,
            "failures": dict(sorted(self.failures.items())), "failed": sum(self.failures.values()),
            "tokens": {k: self.tokens.get(k, 0) for k in ("input", "output", "cache_read", "cache_write")},
            "cost_usd": round(self.cost_usd, 6), "saved_by_cache_usd": round(self.saved_usd, 6),
            "cost_estimated": not self.unpriced_model, "wall_s": round(self.wall_s, 3),
            "prompt_cache": {t: stats.report(model) for t, stats in sorted(self.prompt_cache.items())},
        }


@dataclass
class PrefixStats:
    """Prompt caching of one template's prefix in this run, from the API's own numbers only: the prefix
    size from count_tokens, cache reads and writes from each answer's `usage`."""

    prefix_tokens: set[int] = field(default_factory=set)  # one per distinct prefix (system text) of the template
    count_error: str = ""
    sent: int = 0  # answers received from the API in this run
    reads: int = 0  # ... whose usage reports cache_read_input_tokens > 0
    writes: int = 0  # ... cache_creation_input_tokens > 0
    read_tokens: int = 0
    write_tokens: int = 0

    def add(self, tokens: dict[str, int]) -> None:
        self.sent += 1
        self.reads += tokens["cache_read"] > 0
        self.writes += tokens["cache_write"] > 0
        self.read_tokens += tokens["cache_read"]
        self.write_tokens += tokens["cache_write"]

    def report(self, model: str) -> dict[str, Any]:
        minimum = cache_min_tokens(model)
        size = min(self.prefix_tokens) if self.prefix_tokens else None
        if not self.sent:
            note = "nothing sent in this run"
        elif self.reads or self.writes:
            note = (f"cached: {self.reads} of {self.sent} answers read the prefix from the cache, "
                    f"{self.writes} wrote it (the API's usage)")
        elif size is not None and minimum is not None and size < minimum:
            note = f"prefix below the model's caching minimum ({size} < {minimum} tokens)"
        elif minimum is None:
            note = f"no cache reads or writes reported; the caching minimum of {model} is unknown"
        elif size is None:
            note = f"no cache reads or writes reported; prefix size unknown ({self.count_error or 'not counted'})"
        else:
            note = f"no cache reads or writes reported although the prefix reaches the minimum ({size} >= {minimum})"
        return {"prefix_tokens": size, "min_tokens": minimum, "answers_sent": self.sent, "cache_reads": self.reads,
                "cache_writes": self.writes, "cache_read_tokens": self.read_tokens,
                "cache_write_tokens": self.write_tokens, "note": note}


def _usage_tokens(message: dict[str, Any]) -> dict[str, int]:
    u = message.get("usage") or {}
    return {"input": u.get("input_tokens") or 0, "output": u.get("output_tokens") or 0,
            "cache_read": u.get("cache_read_input_tokens") or 0,
            "cache_write": u.get("cache_creation_input_tokens") or 0}


# --------------------------------------------------------------------------- limits and faults


class RateLimiter:
    """Token bucket refilled at `per_minute`/60 per second, holding at most one second's worth."""

    def __init__(self, per_minute: int) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    async def take(self, amount: float) -> None:
        if self.rate <= 0:
            return
        async with self.lock:
            need = min(amount, self.capacity)  # a request larger than the bucket waits for a full one
            while True:
                self._refill()
                if self.level >= need:
                    self.level -= amount
                    return
                await asyncio.sleep((need - self.level) / self.rate)

    def give(self, amount: float) -> None:
        """Return an over-estimate (or charge more when negative) once the real usage is known."""
        if self.rate > 0:
            self._refill()
            self.level = min(self.capacity, self.level + amount)


def _error_message(body: str) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:200]


def _fatal_message(status: int, body: str) -> str:
    detail = _error_message(body)
    hint = {401: "the API key was rejected: check ANTHROPIC_API_KEY",
            403: "the API key lacks permission for this request"}.get(status, "waiting will not clear this")
    if status == 400 and _PARAM_REJECTED.search(detail):
        hint = ("the model rejected a request parameter: check generate.anthropic (model, max_tokens, temperature) "
                "or, for the judge, evaluate.judge_model / judge_max_tokens / judge_temperature "
                "(null = the model's default)")
    return f"Claude API answered {status} ({detail}); {hint}. Stopping; every answered request is kept in the cache."


class _Watch(Middleware):
    """Counts HTTP attempts and retries; turns errors that waiting will not clear into ClaudeFatalError."""

    def __init__(self, acct: Accounting) -> None:
        self.acct = acct

    async def handle_async(self, request, call_next):  # type: ignore[no-untyped-def]
        self.acct.http_attempts += 1
        if request.retries_taken:
            self.acct.retries += 1
        response = await call_next(request)
        http = response.http_response
        status = http.status_code
        if status in (400, 401, 403, 404, 429):
            body = (await http.aread()).decode("utf-8", "replace")
            spend = status in (400, 429) and (http.headers.get("x-should-retry") == "false" or _SPEND_LIMIT.search(body))
            unknown_model = status == 404 and http.request.url.path.endswith("/v1/messages")
            rejected = status == 400 and _PARAM_REJECTED.search(_error_message(body))
            if status in (401, 403) or spend or unknown_model or rejected:
                raise ClaudeFatalError(_fatal_message(status, body))
        return response


def _failure_kind(err: Exception) -> str:
    if isinstance(err, anthropic.APITimeoutError):
        return "timeout"
    if isinstance(err, anthropic.APIConnectionError):
        return "connection"
    if isinstance(err, anthropic.RateLimitError):
        return "rate_limited"
    if isinstance(err, anthropic.APIStatusError):
        return "overloaded" if err.status_code == 529 else "server_error" if err.status_code >= 500 else "bad_request"
    return "client_error"


# --------------------------------------------------------------------------- the client


class ClaudeClient:
    """Runs requests against Claude (online or batch) through the request cache, with accounting."""

    def __init__(self, cfg: AnthropicConfig, cache_dir: Path | str, progress: bool = True) -> None:
        self.cfg = cfg
        self.cache = RequestCache(cache_dir)
        self.ledger = BatchLedger(cache_dir)
        self.acct = Accounting()
        self._requests: dict[str, ClaudeRequest] = {}  # by key, every request this client was asked
        self.progress = progress
        logging.getLogger("httpx2").setLevel(logging.WARNING)  # one INFO line per HTTP request otherwise
        price = cfg.prices.get(cfg.model)
        if price is None:
            log.warning("no price for model %s in generate.anthropic.prices: cost is not estimated", cfg.model)
            self.acct.unpriced_model = True
        self.price = price

    def request(self, system: str, messages: list[dict[str, Any]], tool: Tool, template_version: str,
                tag: str = "", **sampling: Any) -> ClaudeRequest:
        """A request with this client's model and sampling params (overridable per request)."""
        return ClaudeRequest(model=sampling.get("model", self.cfg.model), system=system, messages=messages,
                             tool=tool, max_tokens=sampling.get("max_tokens", self.cfg.max_tokens),
                             temperature=sampling.get("temperature", self.cfg.temperature),
                             template_version=template_version, tag=tag)

    def report(self) -> dict[str, Any]:
        return self.acct.report(self.cfg.model, self.cfg.mode)

    def close(self) -> None:
        self.cache.close()

    # ---- state machine over the cache: what does a request need next?

    def _cost(self, message: dict[str, Any]) -> float:
        p = self.cfg.prices.get(message.get("model") or "") or self.price  # a judge may override the model
        if p is None:
            return 0.0
        t = _usage_tokens(message)
        usd = (t["input"] * p.input + t["output"] * p.output + t["cache_read"] * p.cache_read
               + t["cache_write"] * p.cache_write) / 1e6
        return usd * (0.5 if message.get("via") == "batch" else 1.0)

    def _next(self, req: ClaudeRequest) -> tuple[ClaudeResult | None, int, dict[str, Any] | None]:
        """(final result, None, None) or (None, attempt, body) for the request still to send."""
        first = self.cache.get(req.key, 0)
        if first is None:
            return None, 0, req.body()
        verdict, value = evaluate(first["message"], req.tool)
        if verdict == "ok":
            return ClaudeResult(req, data=value, raw=_raw_text(first["message"])), -1, None
        if verdict in ("refusal", "max_tokens"):
            return ClaudeResult(req, failure=verdict, raw=value), -1, None
        second = self.cache.get(req.key, 1)
        if second is None:
            return None, 1, req.body(first["message"], value)
        verdict2, value2 = evaluate(second["message"], req.tool)
        if verdict2 == "ok":
            return ClaudeResult(req, data=value2, raw=_raw_text(second["message"])), -1, None
        kind = verdict2 if verdict2 in ("refusal", "max_tokens") else "invalid_output"
        return ClaudeResult(req, failure=kind, raw=_raw_text(second["message"])), -1, None

    def _store(self, req: ClaudeRequest, attempt: int, message: dict[str, Any]) -> None:
        self.cache.put(req.key, attempt, req.tag, message)
        self.acct.sent += 1
        self._account(req, attempt, message)

    def _account(self, req: ClaudeRequest | None, attempt: int, message: dict[str, Any]) -> None:
        """Tokens, cost and prompt-cache activity of one paid answer, as its `usage` reports them (no prompt-cache
        activity when req is None: a batch answer to a request this run does not ask)."""
        tokens = _usage_tokens(message)
        self.acct.reasks += attempt > 0
        self.acct.tokens.update(tokens)
        self.acct.cost_usd += self._cost(message)
        if req is not None:
            self._prefix_stats(req).add(tokens)

    def _prefix_stats(self, req: ClaudeRequest) -> PrefixStats:
        stats = self.acct.prompt_cache.setdefault(req.template_version, PrefixStats())
        counted = self.cache.get(req.prefix_key, COUNT_ATTEMPT)
        if counted is not None:
            stats.prefix_tokens.add(int(counted["message"]["input_tokens"]))
        return stats

    async def _count_prefixes(self, client: AsyncAnthropic, pending: list[ClaudeRequest]) -> None:
        """Size each distinct prefix once with the API's count_tokens (free), kept in the request cache."""
        todo = {r.prefix_key: r for r in pending if self.cache.get(r.prefix_key, COUNT_ATTEMPT) is None}
        for key, req in todo.items():
            try:
                counted = await client.messages.count_tokens(**req.prefix_body())
            except anthropic.APIError as err:
                self._prefix_stats(req).count_error = f"count_tokens failed: {str(err)[:200]}"
                continue
            self.cache.put(key, COUNT_ATTEMPT, f"count_tokens:{req.template_version}",
                           {"input_tokens": counted.input_tokens})
        for req in {r.prefix_key: r for r in pending}.values():
            minimum, counted = cache_min_tokens(req.model), self.cache.get(req.prefix_key, COUNT_ATTEMPT)
            if minimum and counted and counted["message"]["input_tokens"] < minimum:
                log.info("claude: %s: prefix below the model's caching minimum (%d < %d tokens): no cache reads",
                         req.template_version, counted["message"]["input_tokens"], minimum)

    def run(self, requests: Iterable[ClaudeRequest]) -> dict[str, ClaudeResult]:
        """Answer every request (cache first); returns {key: result}. Raises ClaudeFatalError to stop."""
        unique: dict[str, ClaudeRequest] = {}
        for r in requests:
            unique.setdefault(r.key, r)
        self._requests.update(unique)
        start = time.monotonic()
        results: dict[str, ClaudeResult] = {}
        pending: list[ClaudeRequest] = []
        for req in unique.values():
            done, _, _ = self._next(req)
            if done is not None:
                done.cached = True
                results[req.key] = done
                self.acct.cache_hits += 1
                first = self.cache.get(req.key, 0)
                second = self.cache.get(req.key, 1)
                self.acct.saved_usd += sum(self._cost(m["message"]) for m in (first, second) if m)
            else:
                pending.append(req)
        self.acct.requests += len(unique)
        if pending:
            if not (os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("ANTHROPIC_AUTH_TOKEN")):
                raise ClaudeFatalError("ANTHROPIC_API_KEY is not set: the anthropic provider needs it in the environment")
            log.info("claude: %d of %d requests answered from the cache; sending %d (%s mode, %s)",
                     len(unique) - len(pending), len(unique), len(pending), self.cfg.mode, self.cfg.model)
            runner = self._run_batch if self.cfg.mode == "batch" else self._run_online
            try:
                results.update(asyncio.run(runner(pending)))
            finally:
                self.acct.wall_s += time.monotonic() - start
        self.acct.failures.update(r.failure for r in results.values() if not r.ok)
        return results

    def _client(self) -> AsyncAnthropic:
        # The SDK reads ANTHROPIC_API_KEY / ANTHROPIC_BASE_URL itself; the key never passes through here.
        return AsyncAnthropic(timeout=self.cfg.timeout, max_retries=self.cfg.max_retries,
                              middleware=[_Watch(self.acct)])

    def _bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit="req", disable=not self.progress, leave=False)

    # ---- online

    async def _run_online(self, pending: list[ClaudeRequest]) -> dict[str, ClaudeResult]:
        sem = asyncio.Semaphore(self.cfg.concurrency)
        rpm = RateLimiter(self.cfg.requests_per_minute)
        tpm = RateLimiter(self.cfg.tokens_per_minute)
        results: dict[str, ClaudeResult] = {}
        failed = Counter()
        bar = self._bar(len(pending), f"claude {self.cfg.model}")

        async def one(client: AsyncAnthropic, req: ClaudeRequest) -> None:
            while True:
                done, attempt, body = self._next(req)
                if done is not None:
                    results[req.key] = done
                    break
                async with sem:
                    estimate = req.estimated_tokens()
                    await rpm.take(1)
                    await tpm.take(estimate)
                    try:
                        extra = {"temperature": body.pop("temperature")} if "temperature" in body else None
                        msg = await client.messages.create(**body, extra_body=extra)
                    except ClaudeFatalError:
                        raise
                    except (anthropic.AuthenticationError, anthropic.PermissionDeniedError) as err:
                        raise ClaudeFatalError(_fatal_message(err.status_code, str(err))) from None
                    except anthropic.APIError as err:
                        results[req.key] = ClaudeResult(req, failure=_failure_kind(err), raw=str(err)[:500])
                        log.warning("claude: %s failed after retries: %s", req.tag or req.key[:12], err)
                        break
                    message = msg.model_dump(mode="json", exclude_none=True)
                    message = {k: message.get(k) for k in ("id", "model", "content", "stop_reason", "usage")}
                    self._store(req, attempt, message)
                    tpm.give(estimate - sum(_usage_tokens(message)[k] for k in ("input", "output")))
            failed[results[req.key].ok] += 1
            bar.update(1)
            bar.set_postfix(failed=failed[False], refresh=False)

        try:
            async with self._client() as client:
                await self._count_prefixes(client, pending)
                try:
                    async with asyncio.TaskGroup() as tg:
                        for req in pending:
                            tg.create_task(one(client, req))
                except* ClaudeFatalError as group:
                    raise group.exceptions[0] from None
        finally:
            bar.close()
        return results

    # ---- batch

    async def _run_batch(self, pending: list[ClaudeRequest]) -> dict[str, ClaudeResult]:
        by_key = {r.key: r for r in pending}
        bar = self._bar(len(pending), f"claude batch {self.cfg.model}")
        results: dict[str, ClaudeResult] = {}
        last_error: dict[str, str] = {}
        try:
            async with self._client() as client:
                await self._count_prefixes(client, pending)
                for _ in range(self.cfg.batch.max_rounds + 1):
                    todo: dict[str, tuple[ClaudeRequest, int, dict[str, Any]]] = {}
                    for key, req in by_key.items():
                        if key in results:
                            continue
                        done, attempt, body = self._next(req)
                        if done is not None:
                            results[key] = done
                            bar.update(1)
                        else:
                            todo[custom_id(key, attempt)] = (req, attempt, body)
                    in_flight = self.ledger.in_flight()
                    fresh = {cid: item for cid, item in todo.items() if cid not in in_flight}
                    await self._submit(client, fresh)
                    if not self.ledger.open_batches():
                        break
                    await asyncio.gather(*(self._collect(client, b, last_error) for b in self.ledger.open_batches()))
        finally:
            bar.close()
        for key, req in by_key.items():
            if key not in results:
                done, _, _ = self._next(req)
                results[key] = done or ClaudeResult(req, failure=last_error.get(key, "batch_unanswered"))
        return results

    async def _submit(self, client: AsyncAnthropic, todo: dict[str, tuple[ClaudeRequest, int, dict]]) -> None:
        items = list(todo.items())
        for i in range(0, len(items), self.cfg.batch.max_requests):
            chunk = items[i : i + self.cfg.batch.max_requests]
            batch = await client.messages.batches.create(
                requests=[{"custom_id": cid, "params": body} for cid, (_, _, body) in chunk])
            self.ledger.add(batch.id, {cid: [req.key, attempt] for cid, (req, attempt, _) in chunk})
            self.acct.batches_submitted += 1
            self.acct.sent += len(chunk)
            log.info("claude: submitted batch %s with %d requests", batch.id, len(chunk))

    async def _collect(self, client: AsyncAnthropic, batch_id: str, last_error: dict[str, str]) -> None:
        """Poll one batch with backoff until it ends, then stream its results into the cache."""
        cfg = self.cfg.batch
        interval = cfg.poll_interval
        while True:
            try:
                batch = await client.messages.batches.retrieve(batch_id)
            except anthropic.NotFoundError:
                log.warning("claude: batch %s is unknown to the API; its requests will be sent again", batch_id)
                self.ledger.close_batch(batch_id)
                return
            if batch.processing_status == "ended":
                break
            await asyncio.sleep(interval * (0.9 + 0.2 * random.random()))
            interval = min(interval * cfg.poll_backoff, cfg.poll_max_interval)
        items = self.ledger.submitted[batch_id]
        rejected = ""  # a request parameter the model rejected: stop after storing what succeeded
        decoder = await client.messages.batches.results(batch_id)
        async for entry in decoder:
            key, attempt = items.get(entry.custom_id, (None, 0))
            if key is None:
                continue
            result = entry.result
            if result.type == "succeeded":
                message = result.message.model_dump(mode="json", exclude_none=True)
                message = {k: message.get(k) for k in ("id", "model", "content", "stop_reason", "usage")}
                message["via"] = "batch"
                if self.cache.get(key, attempt) is None:
                    self.cache.put(key, attempt, "batch", message)
                    # None: a batch submitted by an earlier run for requests this run does not ask
                    self._account(self._requests.get(key), attempt, message)
            else:
                error = getattr(getattr(result, "error", None), "error", None)
                if getattr(error, "type", "") == "invalid_request_error" and _PARAM_REJECTED.search(error.message):
                    rejected = error.message
                last_error[key] = f"batch_{result.type}"
                self.acct.retries += 1
        self.ledger.close_batch(batch_id)  # every succeeded item is in the request cache by now
        if rejected:
            raise ClaudeFatalError(_fatal_message(400, json.dumps({"error": {"message": rejected}})))
        log.info("claude: collected batch %s (%s)", batch_id, batch.request_counts.model_dump())
