"""Which split a row belongs to: one pure, seeded assignment shared by `base`, `generate` and `validate`.

Splits: `train`, `eval` (a seeded random in-distribution split, made in `validate`) and `heldout`:
subtopics, and for the offline grammar sentence frames, that no training data ever uses, the tiny
base's pretraining corpus included. Every decision is a hash of (params `heldout.seed`, the item's
name), so it is the same in every stage and for every count of rows, and needs no list of the others.

    heldout_subtopic("grief", cfg)       # True for about heldout.subtopic_share of subtopics
    heldout_frame("persona:o3f2a", cfg)  # True for about heldout.frame_share of grammar frames
    row_split(row["meta"], cfg)          # "heldout" or None (None: validate's random train/eval split)
    question_pool("How do I ...?", cfg)  # "pretrain" (the base's corpus) or "finetune" (generate)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from stages.common.config import HeldoutConfig

SPLITS = ("train", "eval", "heldout")
Split = Literal["train", "eval", "heldout"]
Pool = Literal["pretrain", "finetune"]


def unit(seed: int, *key: str) -> float:
    """A uniform number in [0, 1) that is a pure function of the seed and the key."""
    digest = hashlib.sha256("\x1f".join((str(seed), *key)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def heldout_subtopic(subtopic: str, cfg: HeldoutConfig) -> bool:
    return unit(cfg.seed, "subtopic", _norm(subtopic)) < cfg.subtopic_share


def heldout_frame(frame_id: str, cfg: HeldoutConfig) -> bool:
    return unit(cfg.seed, "frame", frame_id) < cfg.frame_share


def question_pool(question: str, cfg: HeldoutConfig) -> Pool:
    """Training questions are partitioned by text: the base's pretraining corpus never shares one with
    the fine-tuning data (SFT, DPO and every evaluation split)."""
    return "pretrain" if unit(cfg.seed, "pool", _norm(question)) < cfg.pretrain_share else "finetune"


def row_split(meta: Mapping[str, Any] | None, cfg: HeldoutConfig) -> Split | None:
    """`heldout` when the row's subtopic or any of its grammar frames is held out; None when it has no
    metadata that says so (user files, Claude rows): those go through validate's random split."""
    if not meta:
        return None
    subtopic = meta.get("subtopic")
    if isinstance(subtopic, str) and heldout_subtopic(subtopic, cfg):
        return "heldout"
    frames: Iterable[Any] = meta.get("frames") or ()
    if any(isinstance(f, str) and heldout_frame(f, cfg) for f in frames):
        return "heldout"
    return None
