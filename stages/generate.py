"""Write synthetic SFT conversations and DPO pairs for the persona.

DVC stage `generate`: params generate -> data/raw/{sft,dpo}.jsonl, reports/generation.json.
Run: python -m stages.generate

Providers: `offline` (deterministic templates, labelled `source: offline`; the default without an
API key) and `anthropic` (Claude, see stages/common/synth.py). `auto` picks anthropic when
ANTHROPIC_API_KEY is set.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from stages.common import offline
from stages.common.config import GenerateConfig, ParamsError, load_params
from stages.common.io import InputError, run_main, write_json, write_jsonl

log = logging.getLogger(__name__)


def resolve_provider(cfg: GenerateConfig) -> str:
    if cfg.provider != "auto":
        return cfg.provider
    return "anthropic" if os.environ.get("ANTHROPIC_API_KEY") else "offline"


def system_prompt(cfg: GenerateConfig) -> str:
    return cfg.persona.system_prompt


def generate_offline(cfg: GenerateConfig) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Deterministic template data: the first sft_count grid questions for SFT, the next dpo_count for DPO."""
    grid = offline.question_grid(cfg.categories, cfg.seed)
    needed = cfg.sft_count + cfg.dpo_count
    if needed > len(grid):
        raise ParamsError(
            f"params.yaml: generate.sft_count + generate.dpo_count: the offline grid has {len(grid)} distinct questions, fewer than "
            f"sft_count + dpo_count = {needed}; add categories or use the anthropic provider"
        )
    system = system_prompt(cfg)
    sft = [
        {
            "id": f"sft-{q.id}",
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": q.text},
                {"role": "assistant", "content": offline.persona_answer(q, cfg.seed)},
            ],
            "source": offline.SOURCE,
        }
        for q in grid[: cfg.sft_count]
    ]
    dpo = [
        {
            "id": f"dpo-{q.id}",
            "prompt": [{"role": "system", "content": system}, {"role": "user", "content": q.text}],
            "chosen": offline.persona_answer(q, cfg.seed),
            "rejected": offline.generic_answer(q, cfg.seed),
            "source": offline.SOURCE,
        }
        for q in grid[cfg.sft_count : needed]
    ]
    report = {"provider": "offline", "note": "template stand-in for Claude; not real model output",
              "requests_sent": 0, "cost_usd": 0.0}
    return sft, dpo, report


def generate(cfg: GenerateConfig, cache_dir: Path) -> tuple[list[dict], list[dict], dict[str, Any]]:
    provider = resolve_provider(cfg)
    log.info("generate: provider %s, %d SFT, %d DPO", provider, cfg.sft_count, cfg.dpo_count)
    if provider == "offline":
        return generate_offline(cfg)
    from stages.common.synth import generate_with_claude

    return generate_with_claude(cfg, cache_dir)


def main() -> None:
    params = load_params()
    try:
        sft, dpo, report = generate(params.generate, params.paths.cache)
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
