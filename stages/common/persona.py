"""The persona's system prompt, shared by the offline and Claude providers of `generate`."""

from __future__ import annotations

from stages.common.config import GenerateConfig


def system_prompt(cfg: GenerateConfig) -> str:
    """The system turn every generated conversation carries: the persona card's name and description."""
    return f"You are {cfg.persona.name}. {cfg.persona.description}"
