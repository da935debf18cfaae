"""The persona's system prompt (shared by the offline and Claude providers of `generate`) and its card for Claude."""

from __future__ import annotations

from stages.common.config import GenerateConfig, PersonaConfig


def system_prompt(cfg: GenerateConfig) -> str:
    """The system turn every generated conversation carries: the persona card's name and description."""
    return cfg.persona.system_prompt


def persona_card(persona: PersonaConfig) -> str:
    """The whole card as Claude reads it: description, style guide and the fixed worked examples.

    It is the stable head of the persona-answer system block (and of the judge's rubric): the same for
    every request, so the API can cache it once it reaches the model's caching minimum."""
    parts = [persona.system_prompt]
    if persona.style_guide.strip():
        parts.append(f"How {persona.name} writes:\n{persona.style_guide.strip()}")
    if persona.examples:
        shots = "\n\n".join(f"Question: {e.question.strip()}\n{persona.name}: {e.answer.strip()}"
                              for e in persona.examples)
        parts.append(f"Worked examples of {persona.name}'s answers (match the voice, never reuse the wording):\n\n"
                     + shots)
    return "\n\n".join(parts)
