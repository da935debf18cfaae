"""llama.cpp's own runtime, in-process: a GGUF served by llama.cpp's server engine (the `xllamacpp` wheel).

`export` verifies every GGUF in it and `chat --gguf` talks to one. The engine's HTTP endpoints listen on
127.0.0.1 only (a free port, chosen by llama.cpp): `/tokenize` and `/apply-template` answer with
llama.cpp's tokenizer and its Jinja engine on the GGUF's embedded chat template; completions go through
the engine's Python handlers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from stages.common.io import InputError, require

log = logging.getLogger(__name__)

Message = dict[str, str]


def gguf_path(folder: Path, name: str, outtype: str) -> Path:
    """Where `export` writes the GGUF of type outtype (f16, q8_0, ...) for a model called name."""
    return Path(folder) / f"{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-') or 'model'}-{outtype}.gguf"


class LlamaCppError(InputError):
    """llama.cpp refused a request or a GGUF (the message carries its answer)."""


class LlamaCpp:
    """One GGUF loaded by llama.cpp (one slot, greedy unless told otherwise)."""

    def __init__(self, gguf: Path | str, n_ctx: int, threads: int | None = None) -> None:
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = str(require(gguf, "GGUF file"))
        params.n_ctx = n_ctx
        params.n_parallel = 1
        params.cpuparams.n_threads = threads or min(4, os.cpu_count() or 1)
        params.cpuparams_batch.n_threads = params.cpuparams.n_threads
        params.warmup = False
        params.verbosity = int(os.environ.get("TUNEFORGE_LLAMACPP_VERBOSITY", "-1"))
        self.path = Path(gguf)
        self._server = xllamacpp.Server(params)
        self.url = self._server.listening_address

    # ------------------------------------------------------------ llama.cpp's HTTP endpoints (loopback)

    def _http(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())

    def props(self) -> dict[str, Any]:
        """The engine's view of the model: bos/eos strings, chat template, ..."""
        return self._http("/props")

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        """llama.cpp's tokenization; control tokens written in the text are parsed as such."""
        return self._http("/tokenize", {"content": text, "add_special": add_special, "parse_special": True})["tokens"]

    def apply_template(self, messages: Sequence[Message]) -> str:
        """The GGUF's chat template rendered by llama.cpp, with the generation prompt."""
        return self._http("/apply-template", {"messages": list(messages)})["prompt"]

    # ------------------------------------------------------------ generation

    def _check(self, result: dict[str, Any]) -> dict[str, Any]:
        if "error" in result or result.get("code", 200) >= 400:
            raise LlamaCppError(f"{self.path}: llama.cpp answered {result}")
        return result

    def complete(self, prompt: Sequence[int] | str, max_tokens: int, n_probs: int = 0,
                 logit_bias: dict[int, float] | None = None) -> dict[str, Any]:
        """Greedy completion of token ids (or text); with n_probs, each generated token's top log-probs."""
        return self._check(self._server.handle_completions({
            "prompt": list(prompt) if not isinstance(prompt, str) else prompt, "max_tokens": max_tokens,
            "temperature": 0.0, "n_probs": n_probs, "cache_prompt": True,
            "logit_bias": [[t, b] for t, b in (logit_bias or {}).items()],
        }))["choices"][0]

    def next_token_logprobs(self, ids: Sequence[int], n_probs: int, end_token: int) -> dict[int, float]:
        """{token id: log-prob} of the n_probs most likely next tokens after ids (full-softmax log-probs).

        The one token generated is forced to end_token (an end-of-generation token) by a logit bias: the
        server holds back a sampled byte token that is incomplete UTF-8 and then returns no log-probs. The
        log-probs it reports are the model's own, computed before any sampler (the bias included) runs.
        """
        choice = self.complete(ids, max_tokens=1, n_probs=n_probs, logit_bias={end_token: 1000.0})
        content = (choice.get("logprobs") or {}).get("content") or []
        if not content:
            raise LlamaCppError(f"{self.path}: no log-probs returned for a {len(ids)}-token prompt")
        return {int(t["id"]): float(t["logprob"]) for t in content[0]["top_logprobs"]}

    def chat(self, messages: Sequence[Message], max_tokens: int, temperature: float = 0.0,
             on_text: Callable[[str], None] | None = None) -> dict[str, Any]:
        """A chat completion through the GGUF's template; on_text receives the answer as it streams.

        Returns {"content", "finish_reason", "prompt_tokens", "completion_tokens"}.
        """
        body = {"messages": list(messages), "max_tokens": max_tokens, "temperature": temperature}
        if on_text is None:
            result = self._check(self._server.handle_chat_completions(body))
            choice = result["choices"][0]
            return {"content": choice["message"]["content"], "finish_reason": choice["finish_reason"],
                    "prompt_tokens": result["usage"]["prompt_tokens"],
                    "completion_tokens": result["usage"]["completion_tokens"]}
        parts: list[str] = []
        final: dict[str, Any] = {}

        def chunk(data: Any) -> bool:  # called by the engine per streamed chunk; True would stop it
            if isinstance(data, dict) and "choices" in data:
                for choice in data["choices"]:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        parts.append(text)
                        on_text(text)
                    if choice.get("finish_reason"):
                        final["finish_reason"] = choice["finish_reason"]
                if data.get("usage"):
                    final.update(prompt_tokens=data["usage"].get("prompt_tokens"),
                                 completion_tokens=data["usage"].get("completion_tokens"))
            elif isinstance(data, dict) and ("error" in data or "code" in data):
                final["error"] = data
            return False

        self._server.handle_chat_completions({**body, "stream": True, "stream_options": {"include_usage": True}},
                                             chunk)
        if "error" in final:
            raise LlamaCppError(f"{self.path}: llama.cpp answered {final['error']}")
        return {"content": "".join(parts), "finish_reason": final.get("finish_reason"),
                "prompt_tokens": final.get("prompt_tokens"), "completion_tokens": final.get("completion_tokens")}

    def close(self) -> None:
        self._server = None

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
