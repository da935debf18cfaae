"""The persona's system prompt (training rows) and its card (Claude only)."""

from __future__ import annotations

from pathlib import Path

from stages.common.config import load_params
from stages.common.persona import persona_card, system_prompt

ROOT = Path(__file__).resolve().parents[3]


def test_card_carries_style_guide_and_examples_but_rows_keep_the_short_prompt():
    cfg = load_params(ROOT / "params.yaml").generate
    card = persona_card(cfg.persona)
    assert card.startswith(system_prompt(cfg) + "\n\n")
    assert cfg.persona.style_guide.strip() in card and len(cfg.persona.examples) >= 8
    assert all(e.question in card and e.answer in card for e in cfg.persona.examples)
    bare = cfg.persona.model_copy(update={"style_guide": "", "examples": []})
    assert persona_card(bare) == system_prompt(cfg)


def test_offline_provider_never_uses_the_card():
    from stages.generate import generate_offline

    params = load_params(ROOT / "params.yaml")
    cfg = params.generate.model_copy(update={"sft_count": 20, "dpo_count": 2})
    sft, dpo, _ = generate_offline(cfg, params.heldout)
    texts = " ".join(m["content"] for r in sft for m in r["messages"]) + " ".join(r["chosen"] for r in dpo)
    # the rows that carry a system turn (generate.system_prompt_share of them) carry the short one
    assert {m["content"] for r in sft for m in r["messages"] if m["role"] == "system"} == {system_prompt(cfg)}
    assert cfg.persona.examples[0].answer[:40] not in texts and "How Cassius writes" not in texts
