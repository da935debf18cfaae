"""readers: format detection, normalisation, and read errors naming file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.common.io import InputError
from stages.common.readers import read_source, to_conversation

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "data"


def test_alpaca_input_and_dolly_context_join_the_instruction():
    alpaca = json.loads((FIXTURES / "alpaca.json").read_text())[1]
    assert to_conversation(alpaca, "alpaca")[0]["content"] == f"{alpaca['instruction']}\n\n{alpaca['input']}"
    dolly = json.loads((FIXTURES / "dolly.jsonl").read_text().splitlines()[1])
    assert dolly["context"] in to_conversation(dolly, "dolly")[0]["content"]


def test_mixed_formats_fail_naming_file_and_line():
    with pytest.raises(InputError, match=r"mixed\.jsonl:2: .*sharegpt.*alpaca"):
        read_source(FIXTURES / "mixed.jsonl", "sft")


def test_unknown_format_fails_naming_file_and_line():
    with pytest.raises(InputError, match=r"unknown\.jsonl:1: no row matches a known format"):
        read_source(FIXTURES / "unknown.jsonl", "sft")


def test_unreadable_json_array_fails_naming_file_and_line():
    with pytest.raises(InputError, match=r"broken\.json:3: not valid JSON"):
        read_source(FIXTURES / "broken.json", "sft")


def test_missing_file_and_wrong_kind_fail():
    with pytest.raises(InputError, match="nope.jsonl: data source not found"):
        read_source(FIXTURES / "nope.jsonl", "sft")
    with pytest.raises(InputError, match="format preference holds dpo data but the source kind is sft"):
        read_source(FIXTURES / "preference.jsonl", "sft")
