"""The Claude client layer against the local test server: faults, kills, batches, cache, secrets.

The real anthropic SDK talks to tests/claude_server.py over HTTP (ANTHROPIC_BASE_URL); nothing below
the SDK is patched. The server counts every paid answer by request body, so "paid twice" is exact.
"""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.common.claude import (
    ClaudeClient,
    ClaudeFatalError,
    ClaudeRequest,
    RequestCache,
    Tool,
    cache_min_tokens,
)
from stages.common.config import AnthropicConfig, BatchPollConfig
from tests.claude_server import TEST_KEY as KEY
from tests.claude_server import ClaudeServer

ROOT = Path(__file__).resolve().parents[2]
TOOL = Tool("record_answer", "Record the answer.", {
    "type": "object", "properties": {"answer": {"type": "string", "minLength": 1}},
    "required": ["answer"], "additionalProperties": False})

# A generation process for kill tests: N requests through the client, cache in argv[1].
CHILD = """
import sys
from stages.common.claude import ClaudeClient, Tool
from stages.common.config import AnthropicConfig, BatchPollConfig
tool = Tool("record_answer", "Record the answer.", {"type": "object", "properties": {"answer": {"type": "string",
       "minLength": 1}}, "required": ["answer"], "additionalProperties": False})
cfg = AnthropicConfig(mode=sys.argv[3], concurrency=4, max_retries=0, batch=BatchPollConfig(poll_interval=0.05))
client = ClaudeClient(cfg, sys.argv[1], progress=False)
client.run([client.request("You are Cassius.", [{"role": "user", "content": f"Question {i}: what now?"}], tool,
            "t@1") for i in range(int(sys.argv[2]))])
"""


def cfg(**kw: object) -> AnthropicConfig:
    kw.setdefault("concurrency", 4)
    kw.setdefault("max_retries", 4)
    kw.setdefault("batch", BatchPollConfig(poll_interval=0.02, poll_max_interval=0.1))
    return AnthropicConfig(**kw)


def requests(client: ClaudeClient, n: int, prefix: str = "Question") -> list[ClaudeRequest]:
    return [client.request("You are Cassius.", [{"role": "user", "content": f"{prefix} {i}: what now?"}], TOOL,
                           "t@1", tag=f"q{i}") for i in range(n)]


def run(cache: Path, n: int, **kw: object) -> tuple[ClaudeClient, dict]:
    client = ClaudeClient(cfg(**kw), cache, progress=False)
    try:
        return client, client.run(requests(client, n))
    finally:
        client.close()


def test_key_covers_every_input_but_not_the_tag() -> None:
    base = dict(model="m", system="s", messages=[{"role": "user", "content": "q"}], tool=TOOL, max_tokens=10,
                temperature=None, template_version="t@1")
    key = ClaudeRequest(**base).key
    assert ClaudeRequest(**base, tag="other").key == key
    other_tool = Tool("record_answer", "Record the answer.", {**TOOL.input_schema, "required": []})
    for change in ({"model": "m2"}, {"system": "s2"}, {"messages": [{"role": "user", "content": "q2"}]},
                   {"max_tokens": 11}, {"temperature": 0.5}, {"tool": other_tool}, {"template_version": "t@2"}):
        assert ClaudeRequest(**{**base, **change}).key != key, change


def test_answers_are_cached_and_not_paid_again(claude_server: ClaudeServer, tmp_path: Path) -> None:
    client, results = run(tmp_path, 8)
    assert [r.ok for r in results.values()] == [True] * 8 and claude_server.answered == 8
    assert client.report()["requests_sent"] == 8
    client, results = run(tmp_path, 8)
    assert all(r.ok and r.cached for r in results.values())
    assert claude_server.answered == 8 and client.report()["cache_hits"] == 8 and client.report()["requests_sent"] == 0


@pytest.mark.parametrize("fault", ["429", "529", "500", "drop", "slow"])
def test_transient_faults_give_exact_counts_without_paying_twice(claude_server: ClaudeServer, tmp_path: Path,
                                                                   fault: str) -> None:
    times = 1 if fault == "slow" else 3
    claude_server.slow_s = 1.5
    claude_server.inject(fault, times=times, after=2)
    client, results = run(tmp_path, 10, timeout=0.75)
    assert len(results) == 10 and all(r.ok for r in results.values())
    assert claude_server.repeated_paid() == 0
    assert claude_server.answered == 10  # a slow answer the client gave up on is not delivered, so not counted
    assert client.report()["retries"] >= times and client.report()["failed"] == 0


def test_invalid_tool_input_is_reasked_once_then_recorded(claude_server: ClaudeServer, tmp_path: Path) -> None:
    claude_server.inject("malformed", times=1)
    client, results = run(tmp_path, 4, concurrency=1)
    assert all(r.ok for r in results.values()) and client.report()["reasks"] == 1

    claude_server.inject("malformed", times=2, match="Other 0:")  # the question and its re-ask
    client = ClaudeClient(cfg(concurrency=1), tmp_path, progress=False)
    result = client.run(requests(client, 1, prefix="Other"))
    (only,) = result.values()
    assert not only.ok and only.failure == "invalid_output" and "unexpected" in only.raw
    assert client.report()["failures"] == {"invalid_output": 1} and client.report()["reasks"] == 1
    before = claude_server.arrivals
    client.run(requests(client, 1, prefix="Other"))  # a paid failure is cached, not paid for again
    assert claude_server.arrivals == before


def test_truncation_and_refusal_are_recorded_not_kept(claude_server: ClaudeServer, tmp_path: Path) -> None:
    claude_server.inject("max_tokens", match="Question 1:")
    claude_server.inject("refusal", match="Question 2:")
    client, results = run(tmp_path, 5)
    by_tag = {r.request.tag: r for r in results.values()}
    assert by_tag["q1"].failure == "max_tokens" and by_tag["q1"].data is None and by_tag["q1"].raw
    assert by_tag["q2"].failure == "refusal" and "can't help" in by_tag["q2"].raw
    assert client.report()["failures"] == {"max_tokens": 1, "refusal": 1}
    assert sum(r.ok for r in results.values()) == 3


def test_401_stops_at_once_and_keeps_what_was_answered(claude_server: ClaudeServer, tmp_path: Path) -> None:
    claude_server.latency = 0.01
    claude_server.inject("401", times=None, after=6)
    with pytest.raises(ClaudeFatalError, match="401.*ANTHROPIC_API_KEY"):
        run(tmp_path, 40, concurrency=2)
    assert claude_server.status_counts[401] <= 2  # in flight when it hit; none sent after, none retried
    kept = len(RequestCache(tmp_path))
    assert kept == claude_server.answered == 6
    claude_server.clear()
    client, results = run(tmp_path, 40, concurrency=2)
    assert all(r.ok for r in results.values()) and client.report()["cache_hits"] == 6
    assert claude_server.answered == 40 and claude_server.repeated_paid() == 0


def test_spend_limit_429_is_fatal_without_retrying(claude_server: ClaudeServer, tmp_path: Path) -> None:
    claude_server.inject("spend", times=None, after=3)
    start = time.monotonic()
    with pytest.raises(ClaudeFatalError, match="usage limits"):
        run(tmp_path, 30, concurrency=1)
    assert time.monotonic() - start < 5 and claude_server.status_counts[429] == 1 and claude_server.answered == 3


def test_missing_key_is_an_error_before_any_request(claude_server: ClaudeServer, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    with pytest.raises(ClaudeFatalError, match="ANTHROPIC_API_KEY is not set"):
        run(tmp_path, 2)
    assert claude_server.arrivals == 0


def test_requests_per_minute_limit_is_honoured(claude_server: ClaudeServer, tmp_path: Path) -> None:
    start = time.monotonic()
    run(tmp_path, 25, concurrency=8, requests_per_minute=600)  # 10/s, one second of burst
    assert time.monotonic() - start >= 1.3


def test_cost_follows_the_price_table(claude_server: ClaudeServer, tmp_path: Path) -> None:
    client, _ = run(tmp_path, 6)
    rep = client.report()
    t = rep["tokens"]
    expected = (t["input"] * 3 + t["output"] * 15 + t["cache_read"] * 0.3 + t["cache_write"] * 3.75) / 1e6
    assert rep["cost_usd"] == pytest.approx(expected, abs=1e-6) and rep["cost_usd"] > 0
    client, _ = run(tmp_path / "b", 6, mode="batch")
    t = client.report()["tokens"]
    half = (t["input"] * 3 + t["output"] * 15 + t["cache_read"] * 0.3 + t["cache_write"] * 3.75) / 2e6
    assert client.report()["cost_usd"] == pytest.approx(half, abs=1e-6)


def test_batch_mode_retries_errored_and_expired_in_a_later_batch(claude_server: ClaudeServer, tmp_path: Path) -> None:
    claude_server.inject("batch_errored", times=2)
    claude_server.inject("batch_expired", times=1)
    claude_server.inject("malformed", times=1)
    client, results = run(tmp_path, 12, mode="batch")
    assert len(results) == 12 and all(r.ok for r in results.values())
    assert claude_server.batch_creates == 2 and client.report()["batches_submitted"] == 2
    assert claude_server.answered == 13 and claude_server.repeated_paid() == 0  # 12 answers + 1 re-ask
    assert sum(claude_server.batch_items.values()) == 12 + 3 + 1


def _child(cache: Path, n: int, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(cache), str(n), mode], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_batch_resumes_polling_after_a_crash(claude_server: ClaudeServer, tmp_path: Path) -> None:
    claude_server.hold_batches = True
    proc = _child(tmp_path, 10, "batch")
    deadline = time.monotonic() + 60
    while claude_server.batch_retrieves == 0 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert claude_server.batch_retrieves > 0, proc.stderr.read().decode() if proc.poll() is not None else "no poll"
    proc.kill()
    assert proc.wait() == -9
    claude_server.hold_batches = False
    client, results = run(tmp_path, 10, mode="batch")
    assert all(r.ok for r in results.values())
    assert claude_server.batch_creates == 1 and client.report()["batches_submitted"] == 0  # resumed, not resubmitted
    assert claude_server.answered == 10 and claude_server.repeated_paid() == 0


@pytest.mark.slow
def test_kill_at_a_random_point_then_resume_pays_nothing_twice(claude_server: ClaudeServer, tmp_path: Path) -> None:
    n = 40
    claude_server.latency = 0.02
    proc = _child(tmp_path, n, "online")
    claude_server.kill_at(random.Random().randint(3, n - 5), proc.pid)
    assert proc.wait(timeout=60) == -9  # SIGKILL, mid-run
    answered_before = claude_server.answered
    assert 0 < answered_before < n
    claude_server._kill = None
    client, results = run(tmp_path, n)
    assert all(r.ok for r in results.values())
    assert client.report()["cache_hits"] == answered_before
    assert claude_server.answered == n and claude_server.repeated_paid() == 0


def test_cache_survives_a_line_cut_short(tmp_path: Path) -> None:
    cache = RequestCache(tmp_path)
    cache.put("a" * 64, 0, "t", {"content": [], "stop_reason": "tool_use"})
    cache.close()
    with (tmp_path / "claude" / "requests.jsonl").open("a") as fh:
        fh.write('{"key": "b", "attempt": 0, "mess')  # killed mid-write
    cache = RequestCache(tmp_path)
    assert len(cache) == 1
    cache.put("c" * 64, 0, "t", {"content": []})
    cache.close()
    assert len(RequestCache(tmp_path)) == 2


def test_api_key_never_lands_on_disk(claude_server: ClaudeServer, tmp_path: Path) -> None:
    log_file = tmp_path / "debug.log"
    handler = logging.FileHandler(log_file)
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.DEBUG)
    try:
        claude_server.inject("500", times=1)
        claude_server.inject("malformed", times=1)
        run(tmp_path / "cache", 6)
        run(tmp_path / "cache", 6, mode="batch")
        claude_server.inject("401", times=None)
        with pytest.raises(ClaudeFatalError) as err:
            run(tmp_path / "cache2", 3)
        (tmp_path / "error.txt").write_text(str(err.value))
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
    assert KEY in claude_server.api_keys  # the key was used ...
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 4 and log_file.stat().st_size > 0
    leaks = [str(p) for p in files if KEY.encode() in p.read_bytes()]
    assert leaks == []  # ... and written nowhere
    assert os.environ["ANTHROPIC_API_KEY"] == KEY


# --------------------------------------------------------------------------- prompt caching, as the API does it

LONG_SYSTEM = "You are Cassius. " + " ".join(f"Rule {i}: name the mechanism, the trade-off and the decision."
                                               for i in range(160))  # ~10k characters: ~2.5k server tokens


def _cached_run(cache: Path, system: str, n: int, model: str = "claude-sonnet-4-6", prefix: str = "Question"):
    client = ClaudeClient(cfg(model=model, concurrency=1), cache, progress=False)
    try:
        reqs = [client.request(system, [{"role": "user", "content": f"{prefix} {i}: what now?"}], TOOL, "t@1")
                for i in range(n)]
        return client, client.run(reqs)
    finally:
        client.close()


def test_test_server_caches_a_prefix_only_from_the_models_minimum(claude_server: ClaudeServer) -> None:
    def usage(model: str, system: str) -> dict:
        body = {"model": model, "tools": [TOOL.spec()], "messages": [{"role": "user", "content": "q"}],
                "system": [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]}
        return claude_server.answer(body, None)["usage"]

    short = usage("claude-sonnet-4-6", "You are Cassius.")
    assert short["cache_creation_input_tokens"] == short["cache_read_input_tokens"] == 0
    first, second = usage("claude-sonnet-4-6", LONG_SYSTEM), usage("claude-sonnet-4-6", LONG_SYSTEM)
    assert first["cache_creation_input_tokens"] > 2048 and first["cache_read_input_tokens"] == 0
    assert second["cache_read_input_tokens"] == first["cache_creation_input_tokens"]
    assert second["input_tokens"] == first["input_tokens"] < short["input_tokens"] + 100  # the prefix is not billed twice
    assert usage("claude-haiku-4-5", LONG_SYSTEM)["cache_read_input_tokens"] == 0  # 4,096 for Haiku 4.5
    assert usage("claude-sonnet-4-5", LONG_SYSTEM)["cache_creation_input_tokens"] > 0  # 1,024 for Sonnet 4.5


def test_cache_minimum_table_matches_dated_ids() -> None:
    assert cache_min_tokens("claude-sonnet-4-6") == 2048
    assert cache_min_tokens("claude-sonnet-4-5-20250929") == 1024 and cache_min_tokens("claude-sonnet-4") == 1024
    assert cache_min_tokens("claude-haiku-4-5") == cache_min_tokens("claude-opus-4-6") == 4096
    assert cache_min_tokens("claude-3-opus") is None


def test_prefix_below_the_minimum_is_reported_not_claimed(claude_server: ClaudeServer, tmp_path: Path) -> None:
    client, _ = _cached_run(tmp_path, "You are Cassius.", 4)
    report = client.report()
    assert report["tokens"]["cache_read"] == report["tokens"]["cache_write"] == 0
    stats = report["prompt_cache"]["t@1"]
    assert stats["answers_sent"] == 4 and stats["cache_reads"] == stats["cache_writes"] == 0
    assert stats["min_tokens"] == 2048 and 0 < stats["prefix_tokens"] < 2048
    assert stats["note"] == f"prefix below the model's caching minimum ({stats['prefix_tokens']} < 2048 tokens)"
    assert claude_server.count_calls == 1  # one count per distinct prefix, kept in the request cache
    client, _ = _cached_run(tmp_path, "You are Cassius.", 2, prefix="Other")
    assert claude_server.count_calls == 1 and client.report()["prompt_cache"]["t@1"]["note"] == stats["note"]


def test_prefix_above_the_minimum_counts_reads_and_writes_from_usage(claude_server: ClaudeServer,
                                                                      tmp_path: Path) -> None:
    client, _ = _cached_run(tmp_path, LONG_SYSTEM, 5)
    report = client.report()
    stats = report["prompt_cache"]["t@1"]
    assert (stats["answers_sent"], stats["cache_writes"], stats["cache_reads"]) == (5, 1, 4)
    assert stats["prefix_tokens"] >= 2048 and stats["note"].startswith("cached: 4 of 5 answers read")
    assert report["tokens"]["cache_read"] == stats["cache_read_tokens"] == 4 * stats["cache_write_tokens"]
    # the same prefix on a model with a higher minimum is not cached, and the report says so
    client, _ = _cached_run(tmp_path / "haiku", LONG_SYSTEM, 3, model="claude-haiku-4-5")
    stats = client.report()["prompt_cache"]["t@1"]
    assert stats["cache_reads"] == 0 and stats["note"].startswith("prefix below the model's caching minimum (")
    assert stats["note"].endswith(" < 4096 tokens)")


def test_a_rejected_parameter_stops_at_once_with_the_message(claude_server: ClaudeServer, tmp_path: Path) -> None:
    claude_server.reject_param("temperature")
    with pytest.raises(ClaudeFatalError, match=r"400 \(`temperature` is deprecated for this model.*temperature"):
        run(tmp_path, 20, temperature=0.0, concurrency=1)
    assert claude_server.arrivals < 5 and claude_server.answered == 0
    _, results = run(tmp_path, 3, temperature=None)  # the model's default: accepted
    assert all(r.ok for r in results.values())


def test_a_rejected_parameter_in_a_batch_stops_after_storing_the_rest(claude_server: ClaudeServer,
                                                                     tmp_path: Path) -> None:
    claude_server.reject_param("temperature")
    with pytest.raises(ClaudeFatalError, match="`temperature` is deprecated"):
        run(tmp_path, 4, temperature=0.5, mode="batch")
    assert claude_server.batch_creates == 1  # not resubmitted round after round
