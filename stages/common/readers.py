"""Read every supported input format and normalise its rows to canonical records.

Formats: openai (messages), sharegpt (conversations), alpaca, dolly, instruction_response,
prompt_completion (SFT) and preference (DPO), in JSONL or a JSON array; `read_source` detects the
format from a file's rows unless one is given. Unreadable files, unknown or mixed formats raise
`InputError` naming the file and line; a bad row raises `RowError` with the reason it is rejected for.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stages.common.io import InputError

log = logging.getLogger(__name__)

Kind = Literal["sft", "dpo"]
Message = dict[str, str]

# Format -> keys a row must carry. Detection tries them in this order (most specific first).
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "preference": ("prompt", "chosen", "rejected"),
    "sharegpt": ("conversations",),
    "openai": ("messages",),
    "dolly": ("instruction", "context", "response"),
    "instruction_response": ("instruction", "response"),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
}
KIND_OF_FORMAT: dict[str, Kind] = {f: ("dpo" if f == "preference" else "sft") for f in REQUIRED_KEYS}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "system": "system",
}
ROLES = ("system", "user", "assistant")


class RowError(Exception):
    """A row fails a check; `reason` is the key counted in reports/validation.json."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class RawRow:
    """One line (or JSON-array element) of an input file, before any check."""

    source: str
    line: int
    kind: Kind
    format: str
    obj: Any
    error: str | None = None  # not_json / invalid_utf8 when the line could not be parsed
    system_prompt: str | None = None  # the system turn for a row that has none (data.sources[].system_prompt)


# ---------------------------------------------------------------- reading and format detection


def _parse_json_array(path: Path, text: str) -> list[tuple[int, Any]]:
    """Elements of a top-level JSON array with the line each starts on; errors name file and line."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    idx = ws.match(text, 0).end()
    if idx >= len(text) or text[idx] != "[":
        raise InputError(f"{path}:1: a .json source must be a JSON array of objects")
    idx = ws.match(text, idx + 1).end()
    out: list[tuple[int, Any]] = []
    while idx < len(text) and text[idx] != "]":
        line = text.count("\n", 0, idx) + 1
        try:
            obj, idx = decoder.raw_decode(text, idx)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        out.append((line, obj))
        idx = ws.match(text, idx).end()
        if idx < len(text) and text[idx] == ",":
            idx = ws.match(text, idx + 1).end()
        elif idx >= len(text) or text[idx] != "]":
            raise InputError(f"{path}:{text.count(chr(10), 0, idx) + 1}: expected ',' or ']' in JSON array")
    return out


def _read_objects(path: Path) -> list[tuple[int, Any, str | None]]:
    """(line, object or raw text, error reason) for every non-blank line / array element."""
    if not path.is_file():
        raise InputError(f"{path}: data source not found")
    data = path.read_bytes()
    head = data.lstrip()[:1]
    if head == b"[":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            raise InputError(f"{path}:{line}: invalid UTF-8 in a JSON array file") from None
        return [(line, obj, None) for line, obj in _parse_json_array(path, text)]
    rows: list[tuple[int, Any, str | None]] = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            rows.append((lineno, raw.decode("utf-8", errors="replace"), "invalid_utf8"))
            continue
        try:
            rows.append((lineno, json.loads(text), None))
        except json.JSONDecodeError:
            rows.append((lineno, text, "not_json"))
    return rows


def matching_formats(obj: dict[str, Any]) -> list[str]:
    """Formats whose required keys the row carries, most specific first."""
    return [f for f, keys in REQUIRED_KEYS.items() if all(k in obj for k in keys)]


def read_source(
    path: Path | str, kind: Kind, fmt: str = "auto", system_prompt: str | None = None
) -> tuple[str, list[RawRow]]:
    """Read one JSONL / JSON-array file; returns (format used, rows). A file mixing formats fails.

    `system_prompt` (resolved text, or None) is given to every row that carries no system turn of its own."""
    path = Path(path)
    items = _read_objects(path)
    chosen: str | None = None if fmt == "auto" else fmt
    if chosen is not None and chosen not in REQUIRED_KEYS:
        raise InputError(f"{path}: unknown format {chosen!r}")
    if chosen is None:
        for line, obj, err in items:
            if err is None and isinstance(obj, dict) and (found := matching_formats(obj)):
                chosen = found[0]
                log.info("%s: detected format %s (from line %d)", path, chosen, line)
                break
        if chosen is None:
            first = items[0][0] if items else 1
            raise InputError(
                f"{path}:{first}: no row matches a known format (keys expected: "
                + "; ".join(f"{f}: {', '.join(k)}" for f, k in REQUIRED_KEYS.items())
                + ")"
            )
    if KIND_OF_FORMAT[chosen] != kind:
        raise InputError(
            f"{path}: format {chosen} holds {KIND_OF_FORMAT[chosen]} data but the source kind is {kind}"
        )
    rows = []
    for line, obj, err in items:
        if err is None and isinstance(obj, dict) and chosen not in (found := matching_formats(obj)):
            if found and not (chosen in ("dolly", "instruction_response") and "instruction" in obj):
                raise InputError(f"{path}:{line}: row is {found[0]} but the file is {chosen} (mixed formats)")
        rows.append(RawRow(str(path), line, kind, chosen, obj, err, system_prompt))
    return chosen, rows


# ---------------------------------------------------------------- normalisation to canonical records


def _text(obj: dict[str, Any], key: str, *, optional: bool = False) -> str:
    if key not in obj or obj[key] is None:
        if optional:
            return ""
        raise RowError("missing_key", key)
    value = obj[key]
    if not isinstance(value, str):
        raise RowError("wrong_type", f"{key} must be a string, got {type(value).__name__}")
    return value


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
        return "\n".join(p["text"] for p in value)  # OpenAI content parts
    raise RowError("wrong_type", f"{where} must be a string, got {type(value).__name__}")


def _messages(
    value: Any,
    where: str,
    role_key: str = "role",
    content_key: str = "content",
    role_map: dict[str, str] | None = None,
) -> list[Message]:
    if not isinstance(value, list):
        raise RowError("wrong_type", f"{where} must be a list, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RowError("wrong_type", f"{where}[{i}] must be an object")
        if role_key not in m or content_key not in m:
            raise RowError("missing_key", f"{where}[{i}].{role_key if role_key not in m else content_key}")
        role = m[role_key]
        if not isinstance(role, str):
            raise RowError("wrong_type", f"{where}[{i}].{role_key} must be a string")
        role = (role_map or {r: r for r in ROLES}).get(role.lower())
        if role is None:
            raise RowError("bad_role", f"{where}[{i}].{role_key} = {m[role_key]!r}")
        out.append({"role": role, "content": _content(m[content_key], f"{where}[{i}].{content_key}")})
    return out


def _with_system(obj: dict[str, Any], messages: list[Message]) -> list[Message]:
    system = _text(obj, "system", optional=True)
    return ([{"role": "system", "content": system}] if system.strip() else []) + messages


def _completion(value: Any, where: str) -> str:
    """A preference / completion side: a string, or messages whose last turn is the assistant's."""
    if isinstance(value, list):
        msgs = _messages(value, where)
        if not msgs or msgs[-1]["role"] != "assistant":
            raise RowError("role_order", f"{where} must end with an assistant turn")
        return msgs[-1]["content"]
    return _content(value, where)


def _prompt(value: Any) -> list[Message]:
    return [{"role": "user", "content": value}] if isinstance(value, str) else _messages(value, "prompt")


def to_conversation(obj: dict[str, Any], fmt: str) -> list[Message]:
    """Canonical messages of an SFT row in any supported format."""
    if fmt == "openai":
        return _messages(obj["messages"], "messages")
    if fmt == "sharegpt":
        conv = _messages(obj["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)
        return _with_system(obj, conv)
    if fmt in ("alpaca", "dolly", "instruction_response"):
        instruction = _text(obj, "instruction")
        extra = _text(obj, "context" if fmt == "dolly" else "input", optional=True)
        if fmt == "instruction_response" and not extra:
            extra = _text(obj, "context", optional=True)
        answer = _text(obj, "output" if fmt == "alpaca" else "response")
        history: list[Message] = []
        for i, turn in enumerate(obj.get("history") or []):  # LLaMA-Factory style [[q, a], ...]
            if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise RowError("wrong_type", f"history[{i}] must be a [user, assistant] pair of strings")
            history += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return _with_system(
            obj, history + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        )
    if fmt == "prompt_completion":
        return _prompt(obj["prompt"]) + [
            {"role": "assistant", "content": _completion(obj["completion"], "completion")}
        ]
    raise RowError("wrong_type", f"format {fmt} is not an SFT format")


def with_default_system(messages: list[Message], system_prompt: str | None) -> list[Message]:
    """messages with `system_prompt` as their first turn when they have no system turn (None: unchanged)."""
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def to_preference(obj: dict[str, Any]) -> tuple[list[Message], str, str]:
    prompt = _with_system(obj, _prompt(obj["prompt"]))
    return prompt, _completion(obj["chosen"], "chosen"), _completion(obj["rejected"], "rejected")
