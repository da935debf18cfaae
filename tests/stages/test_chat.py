"""The chat command: multi-turn history through the template, streaming, one-shot use, both backends."""

from __future__ import annotations

import io
import sys

import pytest

from stages import chat
from tests.export_workspace import SYSTEM, params


class Echo:
    """A stand-in model: records what it is asked and streams a numbered answer in two pieces."""

    def __init__(self) -> None:
        self.asked: list[list[dict]] = []

    def reply(self, messages, on_text):
        self.asked.append(messages)
        on_text(f"answer {len(self.asked)}")
        on_text(".")
        return f"answer {len(self.asked)}."


def test_repl_keeps_the_history_and_the_system_prompt():
    model, out = Echo(), io.StringIO()
    conv = chat.Conversation("You are Vex.")
    n = chat.repl(model, conv, ["What is risk?\n", "\n", "And reward?\n", "/reset\n", "Again?\n", "/exit\n", "x\n"], out)
    assert n == 3
    first, second, third = model.asked
    assert first == [{"role": "system", "content": "You are Vex."}, {"role": "user", "content": "What is risk?"}]
    assert second == [*first, {"role": "assistant", "content": "answer 1."}, {"role": "user", "content": "And reward?"}]
    assert third == [first[0], {"role": "user", "content": "Again?"}]  # /reset cleared the turns, not the system
    assert "model> answer 1.\n" in out.getvalue() and "(conversation cleared)" in out.getvalue()


@pytest.mark.parametrize("backend", ["transformers", "gguf"])
def test_multi_turn_through_the_exported_model(exported, backend, monkeypatch):
    monkeypatch.chdir(exported)
    p = params(exported)
    model = chat.open_chat(p, "final", "q8_0" if backend == "gguf" else None, max_new_tokens=6, temperature=0.0)
    conv = chat.Conversation(SYSTEM)
    pieces: list[str] = []
    first = conv.ask(model, "What is failure?", pieces.append)
    assert first == "".join(pieces).strip()
    seen = []
    original = model.reply

    def spy(messages, on_text):
        seen.append(messages)
        return original(messages, on_text)

    monkeypatch.setattr(model, "reply", spy)
    conv.ask(model, "And trust?", lambda t: None)
    assert seen[0][:3] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is failure?"},
                           {"role": "assistant", "content": first}]
    assert len(conv.turns) == 4


def test_one_shot_prompt_from_the_command_line(exported, monkeypatch, capsys):
    import yaml

    from stages.common.io import run_main
    from tests.training_workspace import PATHS

    (exported / "params.yaml").write_text(yaml.safe_dump({
        "paths": {**PATHS, "final": "models/final"},
        "generate": {"persona": {"name": "Vex", "description": "Cold and brief."}, "categories": ["a"]}}))
    monkeypatch.chdir(exported)
    monkeypatch.setattr(sys, "argv", ["chat", "--gguf", "q8_0", "--prompt", "How do I deal with failure?",
                                      "--max-new-tokens", "5"])
    run_main(chat.main)
    assert capsys.readouterr().out.strip()


def test_missing_gguf_is_a_clear_error(exported, monkeypatch):
    monkeypatch.chdir(exported)
    with pytest.raises(chat.InputError, match="bf16 GGUF"):
        chat.open_chat(params(exported), "final", "bf16", 4, 0.0)
    with pytest.raises(chat.InputError, match="--gguf"):
        chat.open_chat(params(exported), "dpo", "q8_0", 4, 0.0)
