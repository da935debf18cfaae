"""Write synthetic SFT conversations and DPO pairs for the persona.

DVC stage `generate`: params generate -> data/raw/{sft,dpo}.jsonl, reports/generation.json.
Run: python -m stages.generate

Providers: `offline` (sampled from the grammar of stages/common/offline.py in the persona's register,
labelled `source: offline`; the default without an API key; it refuses a persona its register was not
written for) and `anthropic` (Claude, see stages/common/synth.py). `auto` picks anthropic when
ANTHROPIC_API_KEY is set.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from stages.common import offline
from stages.common.config import GenerateConfig, HeldoutConfig, load_params
from stages.common.io import InputError, run_main, write_json, write_jsonl
from stages.common.persona import system_prompt
from stages.common.splits import unit

log = logging.getLogger(__name__)


def resolve_provider(cfg: GenerateConfig) -> str:
    if cfg.provider != "auto":
        return cfg.provider
    return "anthropic" if os.environ.get("ANTHROPIC_API_KEY") else "offline"


def generate_offline(cfg: GenerateConfig, heldout: HeldoutConfig) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Grammar-sampled data in the persona's offline register: the first sft_count questions for SFT, the
    next dpo_count for DPO (chosen: the persona's register; rejected: the generic assistant's). Rows about
    held-out subtopics use held-out frames only; `meta` records subtopic and frames for validate."""
    persona = offline.persona_register(cfg.persona)  # refuses a persona the register was not written for
    generic = offline.generic_register()
    qs = offline.questions(cfg.categories, cfg.sft_count + cfg.dpo_count, cfg.seed, heldout)
    system = system_prompt(cfg)

    def head(q: offline.Question) -> list[dict[str, str]]:  # the system turn, on system_prompt_share of rows
        return [{"role": "system", "content": system}] if unit(cfg.seed, "system", q.text) < cfg.system_prompt_share else []

    sft, dpo = [], []
    for q in qs[: cfg.sft_count]:
        text, frames = offline.answer(persona, q, cfg.seed, heldout)
        sft.append({
            "id": f"sft-{q.id}",
            "messages": [
                *head(q),
                {"role": "user", "content": q.text},
                {"role": "assistant", "content": text},
            ],
            "source": offline.SOURCE,
            "meta": {**q.meta, "frames": [q.frame, *frames]},
        })
    for q in qs[cfg.sft_count :]:
        chosen, chosen_frames = offline.answer(persona, q, cfg.seed, heldout)
        rejected, rejected_frames = offline.answer(generic, q, cfg.seed, heldout)
        dpo.append({
            "id": f"dpo-{q.id}",
            "prompt": [*head(q), {"role": "user", "content": q.text}],
            "chosen": chosen,
            "rejected": rejected,
            "source": offline.SOURCE,
            "meta": {**q.meta, "frames": [q.frame, *chosen_frames, *rejected_frames]},
        })
    report = {
        "provider": "offline",
        "note": "grammar-sampled stand-in for Claude; not real model output",
        "register": str(cfg.persona.offline),
        "requests_sent": 0,
        "cost_usd": 0.0,
        "heldout_subtopic_rows": {"sft": sum(q.heldout for q in qs[: cfg.sft_count]),
                                  "dpo": sum(q.heldout for q in qs[cfg.sft_count :])},
    }
    return sft, dpo, report


def generate(cfg: GenerateConfig, cache_dir: Path,
             heldout: HeldoutConfig | None = None) -> tuple[list[dict], list[dict], dict[str, Any]]:
    provider = resolve_provider(cfg)
    log.info("generate: provider %s, %d SFT, %d DPO", provider, cfg.sft_count, cfg.dpo_count)
    if provider == "offline":
        return generate_offline(cfg, heldout or HeldoutConfig())
    from stages.common.synth import generate_with_claude

    return generate_with_claude(cfg, cache_dir)


def main() -> None:
    params = load_params()
    try:
        sft, dpo, report = generate(params.generate, params.paths.cache, params.heldout)
    except InputError as err:  # a failed Claude run still leaves its accounting behind
        if isinstance(getattr(err, "report", None), dict):
            write_json(params.paths.reports / "generation.json", err.report)
        raise
    raw = params.paths.raw
    report = {**report, "sft_rows": write_jsonl(raw / "sft.jsonl", sft), "dpo_rows": write_jsonl(raw / "dpo.jsonl", dpo)}
    write_json(params.paths.reports / "generation.json", report)
    log.info("wrote %d SFT and %d DPO rows to %s", report["sft_rows"], report["dpo_rows"], raw)


if __name__ == "__main__":
    run_main(main)
