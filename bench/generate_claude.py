"""Benchmark the Claude client's online mode against the local test server.

1,000 structured-output requests, 100 ms server latency per answer, concurrency 16: prints the wall
time, the ideal (requests x latency / concurrency) and their ratio (goal: <= 1.3x).

    .venv/bin/python bench/generate_claude.py [--requests 1000] [--latency 0.1] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from claude_server import ClaudeServer  # noqa: E402

from stages.common.claude import ClaudeClient, Tool  # noqa: E402
from stages.common.config import AnthropicConfig  # noqa: E402

TOOL = Tool(
    "record_answer",
    "Record the answer.",
    {
        "type": "object",
        "properties": {"answer": {"type": "string", "minLength": 1}},
        "required": ["answer"],
        "additionalProperties": False,
    },
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--latency", type=float, default=0.1)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    cfg = AnthropicConfig(concurrency=args.concurrency, requests_per_minute=0, tokens_per_minute=0)
    with ClaudeServer(latency=args.latency) as server, tempfile.TemporaryDirectory() as cache:
        os.environ["ANTHROPIC_BASE_URL"] = server.url
        os.environ.setdefault("ANTHROPIC_API_KEY", "sk-bench-not-a-key")
        client = ClaudeClient(cfg, cache, progress=False)
        reqs = [
            client.request(
                "You are Cassius, a cold analytical strategist.",
                [{"role": "user", "content": f"Benchmark question {i}: how do I weigh risk?"}],
                TOOL,
                "bench@1",
                tag=f"bench-{i}",
            )
            for i in range(args.requests)
        ]
        start = time.perf_counter()
        results = client.run(reqs)
        wall = time.perf_counter() - start
        client.close()
        ok = sum(r.ok for r in results.values())
    ideal = args.requests * args.latency / args.concurrency
    print(
        f"requests {args.requests}  answered {ok}  server answers {server.answered}  repeated {server.repeated_paid()}"
    )
    print(f"wall {wall:.2f} s  ideal {ideal:.2f} s  ratio {wall / ideal:.2f}x  (goal <= 1.30x)")


if __name__ == "__main__":
    main()
