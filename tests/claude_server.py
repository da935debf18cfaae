"""A local stand-in for the Claude API: Messages (with forced tool use) and Message Batches, with faults.

Stdlib only: a ThreadingHTTPServer on 127.0.0.1 (a free port) that the real `anthropic` SDK talks to
through base_url / ANTHROPIC_BASE_URL. Answers are deterministic and valid against the request's tool
schema; faults are injected on command and every paid answer is counted by request body, so tests can
prove that nothing was paid for twice.

    with ClaudeServer(latency=0.05) as server:
        server.inject("429", times=2)
        ... ANTHROPIC_BASE_URL=server.url ...
        assert server.repeated_paid() == 0

Fault kinds: 429 (with retry-after), 529, 500, drop (connection closed, no answer), slow (answer after
`slow_s`, past the client timeout), malformed (tool input that breaks the schema), max_tokens (truncated),
refusal, 401, spend (a 429 spend-limit that waiting will not clear), batch_errored, batch_expired.
`reject_param(name)` makes every request carrying that parameter a 400 invalid_request_error, as a model
that does not accept it answers (online; in a batch, an errored item).

Prompt caching as the API does it: the prefix (tools, then the system blocks up to the one with
cache_control) is cached per model only when it reaches that model's minimum (MIN_CACHE_TOKENS, from the
providers' tables); a shorter prefix is processed at full price with zero cache tokens in `usage`. Tokens
are counted as characters / 4, the same in `usage` and in POST /v1/messages/count_tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TEST_KEY = "sk-ant-test-" + secrets.token_hex(12)  # made at run time: no file holds it

HTTP_FAULTS = {"429", "529", "500", "drop", "slow", "401", "spend"}
CONTENT_FAULTS = {"malformed", "max_tokens", "refusal"}
BATCH_FAULTS = {"batch_errored", "batch_expired"}
# the API's caching minimum per model (FIELD_NOTES: providers' published tables, 2026); unlisted models: 1,024
MIN_CACHE_TOKENS = {"claude-sonnet-4-5": 1024, "claude-sonnet-4-6": 2048, "claude-haiku-4-5": 4096,
                    "claude-opus-4-5": 4096, "claude-opus-4-6": 4096}
WORDS = ("leverage", "constraint", "incentive", "trade-off", "signal", "cost", "option", "risk", "timing",
         "evidence", "position", "margin", "priority", "commitment", "exit")


@dataclass
class Fault:
    kind: str
    times: int | None  # None = for ever
    after: int  # matching requests let through first
    match: str | None  # only requests whose body contains this text


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _text_of(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return " ".join(b.get("text", "") for b in content or [] if isinstance(b, dict) and b.get("type") == "text")


def _topic(body: dict[str, Any]) -> str:
    users = [m for m in body.get("messages", []) if m.get("role") == "user"]
    text = _text_of(users[0]) if users else ""
    words = [w.strip(".,;:?!\"'()") for w in text.split()]
    words = [w for w in words if len(w) > 3][:6]
    return " ".join(words) or "the problem"


def _tokens(obj: Any) -> int:
    return len(obj if isinstance(obj, str) else json.dumps(obj)) // 4


def prompt_tokens(body: dict[str, Any]) -> tuple[int, int | None]:
    """(all input tokens, tokens of the cacheable prefix or None without a cache_control breakpoint)."""
    system = body.get("system") or []
    blocks = [{"type": "text", "text": system}] if isinstance(system, str) else list(system)
    tools = _tokens(body["tools"]) if body.get("tools") else 0
    marked = [i for i, b in enumerate(blocks) if "cache_control" in b]
    prefix = tools + sum(_tokens(b.get("text", "")) for b in blocks[: marked[-1] + 1]) if marked else None
    total = tools + sum(_tokens(b.get("text", "")) for b in blocks) + _tokens(body.get("messages")) + 20
    return total, prefix


def _fake(schema: dict[str, Any], seed: str, name: str, topic: str) -> Any:
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return {p: _fake(s, _digest([seed, p]), p, topic) for p, s in props.items()}
    if kind == "array":
        n = schema.get("minItems") or min(3, schema.get("maxItems", 3))
        return [_fake(schema.get("items", {"type": "string"}), _digest([seed, i]), name, topic) for i in range(n)]
    if kind in ("integer", "number"):
        return max(1, schema.get("minimum", 1))
    if kind == "boolean":
        return True
    h = seed[:8]
    w = [WORDS[int(seed[i : i + 2], 16) % len(WORDS)] for i in range(0, 10, 2)]
    if name.startswith("question"):
        return f"What is the right way to think about {w[0]} and {w[1]} when facing {topic} (case {h})?"
    if name.startswith("subtopic"):
        return f"{w[0]} and {w[1]} ({h})"
    if name == "answer":
        return (f"Name the {w[0]} first. {topic.capitalize()} turns on {w[1]} and {w[2]}; weigh the {w[3]} "
                f"against the {w[4]} and decide. Ref {h}.")
    return f"{name} {w[0]} {h}"


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that gave up (its timeout, a killed process) closes the socket mid-answer: expected here
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class ClaudeServer:
    """The test server; thread-safe counters and fault controls live here, the handler below uses them."""

    def __init__(self, latency: float = 0.0, slow_s: float = 2.0, batch_polls: int = 1,
                 retry_after_ms: int = 20) -> None:
        self.latency = latency
        self.slow_s = slow_s
        self.batch_polls = batch_polls  # retrieves answered `in_progress` before a batch ends
        self.retry_after_ms = retry_after_ms
        self.lock = threading.Lock()
        self.faults: list[Fault] = []
        self.arrivals = 0  # POST /v1/messages received
        self.status_counts: Counter = Counter()  # HTTP status (or "drop") of each /v1/messages answer
        self.paid: Counter = Counter()  # request-body digest -> answers delivered (online + batch)
        self.api_keys: set[str] = set()
        self.cached_prefixes: set[str] = set()
        self.rejected_params: dict[str, str] = {}  # parameter -> the 400's message
        self.count_calls = 0  # POST /v1/messages/count_tokens
        self.batches: dict[str, dict[str, Any]] = {}
        self.batch_creates = 0
        self.batch_retrieves = 0
        self.batch_items: Counter = Counter()  # body digest -> times submitted in a batch
        self.hold_batches = False
        self._kill: tuple[int, int, float] | None = None
        self.kill_epoch = 0
        self._killed = threading.Event()
        self.httpd = _QuietServer(("127.0.0.1", 0), _Handler)
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    # ---- lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> ClaudeServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> ClaudeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- controls
    def inject(self, kind: str, times: int | None = 1, after: int = 0, match: str | None = None) -> None:
        if kind not in HTTP_FAULTS | CONTENT_FAULTS | BATCH_FAULTS:
            raise ValueError(f"unknown fault {kind!r}")
        with self.lock:
            self.faults.append(Fault(kind, times, after, match))

    def reject_param(self, name: str, message: str | None = None) -> None:
        """Answer 400 invalid_request_error to every request that carries `name` (as newer models do)."""
        self.rejected_params[name] = message or f"`{name}` is deprecated for this model. Omit it to use the default."

    def rejection(self, body: dict[str, Any]) -> str | None:
        return next((msg for name, msg in self.rejected_params.items() if name in body), None)

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()

    def kill_at(self, arrival: int, pid: int, settle: float = 0.6) -> None:
        """SIGKILL `pid` when the `arrival`-th message request comes in; it and later ones go unanswered.

        Answers already under way are delivered during `settle` (> latency), so the client has had them."""
        self._kill = (arrival, pid, settle)

    @property
    def answered(self) -> int:
        return sum(self.paid.values())

    def repeated_paid(self) -> int:
        """How many answers were paid for more than once (same request body)."""
        return sum(n - 1 for n in self.paid.values() if n > 1)

    # ---- internals used by the handler
    def take_fault(self, body_text: str, kinds: set[str]) -> str | None:
        with self.lock:
            for f in self.faults:
                if f.kind not in kinds or (f.match and f.match not in body_text):
                    continue
                if f.after > 0:
                    f.after -= 1
                    continue
                if f.times is not None:
                    if f.times <= 0:
                        continue
                    f.times -= 1
                return f.kind
        return None

    def answer(self, body: dict[str, Any], fault: str | None) -> dict[str, Any]:
        """A Messages API response for `body` (deterministic), shaped by a content fault."""
        seed = _digest(body)
        tool = (body.get("tools") or [{}])[0]
        topic = _topic(body)
        tool_input = _fake(tool.get("input_schema", {"type": "object"}), seed, "", topic)
        content: list[dict[str, Any]] = [{"type": "tool_use", "id": f"toolu_{seed[:20]}",
                                          "name": tool.get("name", "tool"), "input": tool_input}]
        stop = "tool_use" if tool else "end_turn"
        if fault == "malformed":
            content[0]["input"] = {"unexpected": 1}
        elif fault == "max_tokens":
            content = [{"type": "text", "text": json.dumps(tool_input)[:40]}]
            stop = "max_tokens"
        elif fault == "refusal":
            content = [{"type": "text", "text": "I can't help with that request."}]
            stop = "refusal"
        total, size = prompt_tokens(body)
        cached_tokens = write_tokens = 0
        model = body.get("model") or ""
        if size is not None and size >= MIN_CACHE_TOKENS.get(model, 1024):
            prefix = _digest([model, body.get("tools"), body.get("system")])
            with self.lock:
                if prefix in self.cached_prefixes:
                    cached_tokens = size
                else:
                    self.cached_prefixes.add(prefix)
                    write_tokens = size
        return {
            "id": f"msg_{seed[:24]}", "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": total - cached_tokens - write_tokens,
                      "output_tokens": len(json.dumps(content)) // 4,
                      "cache_creation_input_tokens": write_tokens, "cache_read_input_tokens": cached_tokens},
        }

    def finish_batch(self, batch: dict[str, Any]) -> None:
        if batch["results"] is not None:
            return
        results = []
        for item in batch["requests"]:
            text = json.dumps(item["params"])
            fault = self.take_fault(text, BATCH_FAULTS | CONTENT_FAULTS)
            if (rejected := self.rejection(item["params"])) is not None:
                result = {"type": "errored", "error": {"type": "error", "error": {
                    "type": "invalid_request_error", "message": rejected}}}
            elif fault == "batch_errored":
                result = {"type": "errored", "error": {"type": "error", "error": {
                    "type": "api_error", "message": "Internal server error"}}}
            elif fault == "batch_expired" or batch["canceled"]:
                result = {"type": "canceled" if batch["canceled"] else "expired"}
            else:
                result = {"type": "succeeded", "message": self.answer(item["params"], fault)}
                with self.lock:
                    self.paid[_digest(item["params"])] += 1
            results.append({"custom_id": item["custom_id"], "result": result})
        batch["results"] = list(reversed(results))  # any order: clients must join on custom_id
        batch["status"] = "ended"

    def batch_object(self, batch: dict[str, Any]) -> dict[str, Any]:
        counts = Counter(r["result"]["type"] for r in batch["results"] or [])
        ended = batch["status"] == "ended"
        return {
            "id": batch["id"], "type": "message_batch", "processing_status": batch["status"],
            "request_counts": {"processing": 0 if ended else len(batch["requests"]), "succeeded": counts["succeeded"],
                               "errored": counts["errored"], "canceled": counts["canceled"],
                               "expired": counts["expired"]},
            "created_at": "2026-11-01T00:00:00Z", "expires_at": "2026-11-02T00:00:00Z",
            "ended_at": "2026-11-01T00:10:00Z" if ended else None,
            "results_url": f"{self.url}/v1/messages/batches/{batch['id']}/results" if ended else None,
        }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    @property
    def owner(self) -> ClaudeServer:
        return self.server.owner  # type: ignore[attr-defined]

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.send_header("request-id", f"req_{int(time.time() * 1e6)}")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _error(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, {"type": "error", "error": {"type": kind, "message": message}}, headers)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(2)
        except OSError:
            pass

    def _body(self) -> tuple[str, Any]:
        n = int(self.headers.get("content-length") or 0)
        text = self.rfile.read(n).decode() if n else ""
        return text, (json.loads(text) if text else None)

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        text, body = self._body()
        auth = self.headers.get("authorization", "")
        key = self.headers.get("x-api-key") or (auth[7:] if auth.lower().startswith("bearer ") else "")
        if not key:
            return self._error(401, "authentication_error", "missing credentials")
        self.owner.api_keys.add(key)
        path = self.path.split("?")[0]
        if path == "/v1/messages":
            self._messages(text, body)
        elif path == "/v1/messages/count_tokens":
            with self.owner.lock:
                self.owner.count_calls += 1
            self._send(200, {"input_tokens": prompt_tokens(body)[0]})
        elif path == "/v1/messages/batches":
            self._create_batch(body)
        elif path.startswith("/v1/messages/batches/") and path.endswith("/cancel"):
            self._cancel(path.split("/")[4])
        else:
            self._error(404, "not_found_error", f"no route {path}")

    def do_GET(self) -> None:  # noqa: N802
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[:3] != ["v1", "messages", "batches"] or len(parts) < 4:
            return self._error(404, "not_found_error", f"no route {self.path}")
        owner = self.owner
        batch = owner.batches.get(parts[3])
        if batch is None:
            return self._error(404, "not_found_error", f"no batch {parts[3]}")
        if len(parts) == 5 and parts[4] == "results":
            if batch["status"] != "ended":
                return self._error(400, "invalid_request_error", "batch has not ended")
            lines = "".join(json.dumps(r) + "\n" for r in batch["results"])
            return self._send(200, lines.encode(), content_type="application/binary")
        with owner.lock:
            owner.batch_retrieves += 1
        if batch["status"] == "in_progress" and not owner.hold_batches:
            if batch["polls_left"] > 0:
                batch["polls_left"] -= 1
            else:
                owner.finish_batch(batch)
        self._send(200, owner.batch_object(batch))

    def _messages(self, text: str, body: dict[str, Any]) -> None:
        owner = self.owner
        with owner.lock:
            owner.arrivals += 1
            arrival = owner.arrivals
            epoch = owner.kill_epoch
        if owner._kill and arrival >= owner._kill[0]:
            self._kill_client(arrival)
            return self._drop()
        fault = owner.take_fault(text, HTTP_FAULTS | CONTENT_FAULTS)
        if owner.latency:
            time.sleep(owner.latency)
        status = 200
        if (rejected := owner.rejection(body)) is not None:
            status = 400
            self._error(400, "invalid_request_error", rejected)
        elif fault == "429":
            status = 429
            self._error(429, "rate_limit_error", "Number of requests has exceeded your rate limit",
                        {"retry-after-ms": str(owner.retry_after_ms), "retry-after": "1"})
        elif fault == "spend":
            status = 429
            self._error(429, "rate_limit_error", "You have reached your specified API usage limits. "
                        "You will regain access on 2026-12-01 at 00:00 UTC.")
        elif fault == "529":
            status = 529
            self._error(529, "overloaded_error", "Overloaded", {"retry-after-ms": str(owner.retry_after_ms)})
        elif fault == "500":
            status = 500
            self._error(500, "api_error", "Internal server error", {"retry-after-ms": str(owner.retry_after_ms)})
        elif fault == "401":
            status = 401
            self._error(401, "authentication_error", "invalid x-api-key")
        elif fault == "drop":
            status = "drop"
            self._drop()
        else:
            if fault == "slow":
                time.sleep(owner.slow_s)
            message = owner.answer(body, fault)
            if owner.kill_epoch != epoch:  # the client was killed while this answer was under way
                status = "drop"
                self._drop()
            else:
                try:
                    self._send(200, message)
                    if fault != "slow":  # the client gave up on a slow answer: it never got it
                        with owner.lock:
                            owner.paid[_digest(body)] += 1
                except OSError:
                    status = "drop"
        with owner.lock:
            owner.status_counts[status] += 1

    def _kill_client(self, arrival: int) -> None:
        owner = self.owner
        target, pid, settle = owner._kill  # type: ignore[misc]
        if arrival == target:
            time.sleep(settle)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            with owner.lock:
                owner.kill_epoch += 1
            owner._killed.set()
        else:
            owner._killed.wait(timeout=10)

    def _create_batch(self, body: dict[str, Any]) -> None:
        owner = self.owner
        requests = body.get("requests") or []
        ids = [r["custom_id"] for r in requests]
        if len(set(ids)) != len(ids) or any(len(i) > 64 for i in ids):
            return self._error(400, "invalid_request_error", "custom_id must be unique and at most 64 characters")
        fault = owner.take_fault(json.dumps(body), {"401", "spend"})
        if fault == "401":
            return self._error(401, "authentication_error", "invalid x-api-key")
        with owner.lock:
            owner.batch_creates += 1
            batch_id = f"msgbatch_{owner.batch_creates:04d}_{_digest(ids)[:8]}"
            for r in requests:
                owner.batch_items[_digest(r["params"])] += 1
            owner.batches[batch_id] = {"id": batch_id, "requests": requests, "status": "in_progress",
                                       "polls_left": owner.batch_polls, "results": None, "canceled": False}
        self._send(200, owner.batch_object(owner.batches[batch_id]))

    def _cancel(self, batch_id: str) -> None:
        owner = self.owner
        batch = owner.batches.get(batch_id)
        if batch is None:
            return self._error(404, "not_found_error", f"no batch {batch_id}")
        if batch["status"] != "ended":
            batch["canceled"] = True
            owner.finish_batch(batch)
        self._send(200, owner.batch_object(batch))
