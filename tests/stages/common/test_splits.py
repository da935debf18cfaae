"""The split assignment: a pure seeded function, and at the default params every pair of splits disjoint,
the base's pretraining corpus included."""

from __future__ import annotations

import itertools

import pytest

from stages.common import offline
from stages.common.config import HeldoutConfig, load_params
from stages.common.readers import RawRow
from stages.common.splits import heldout_frame, heldout_subtopic, question_pool, row_split, unit
from stages.generate import generate_offline
from stages.validate import validate
from tests.repo import ROOT

CFG = HeldoutConfig()


def test_assignment_is_pure_seeded_and_near_its_share():
    names = [f"subtopic {i}" for i in range(2000)]
    first = [heldout_subtopic(n, CFG) for n in names]
    assert first == [heldout_subtopic(n, CFG) for n in names]  # no hidden state
    assert heldout_subtopic("Grief", CFG) == heldout_subtopic("  grief ", CFG)  # case and spacing do not matter
    assert abs(sum(first) / len(first) - CFG.subtopic_share) < 0.03
    other = [heldout_subtopic(n, CFG.model_copy(update={"seed": 8})) for n in names]
    assert other != first
    frames = [heldout_frame(f"cassius:b:{i:04x}", CFG) for i in range(2000)]
    assert abs(sum(frames) / len(frames) - CFG.frame_share) < 0.03
    pools = [question_pool(f"question {i}?", CFG) for i in range(2000)]
    assert abs(pools.count("pretrain") / len(pools) - CFG.pretrain_share) < 0.03
    assert 0 <= unit(1, "a") < 1 and unit(1, "a") != unit(2, "a") and unit(1, "a", "b") != unit(1, "ab")


def test_row_split_reads_subtopic_then_frames():
    subtopics = [s for subs in offline.SUBTOPICS.values() for s in subs]
    held = next(s for s in subtopics if heldout_subtopic(s, CFG))
    kept = next(s for s in subtopics if not heldout_subtopic(s, CFG))
    frame = next(f"f{i}" for i in range(100) if heldout_frame(f"f{i}", CFG))
    assert row_split({"subtopic": held}, CFG) == "heldout"
    assert row_split({"subtopic": kept, "frames": [frame]}, CFG) == "heldout"
    assert row_split({"subtopic": kept, "frames": []}, CFG) is None
    assert row_split(None, CFG) is None and row_split({}, CFG) is None  # user files: the random split


@pytest.fixture(scope="module")
def default_splits():
    """The default run's rows, routed as validate routes them, and the base's pretraining corpus."""
    params = load_params(ROOT / "params.yaml")
    sft, dpo, _ = generate_offline(params.generate, params.heldout)
    rows = [RawRow("sft.jsonl", i + 1, "sft", "openai", r) for i, r in enumerate(sft)]
    rows += [RawRow("dpo.jsonl", i + 1, "dpo", "preference", r) for i, r in enumerate(dpo)]
    result = validate(rows, params.validate, lambda convs: [0] * len(convs), heldout=params.heldout)
    assert {r["reason"] for r in result.rejects} <= {"near_duplicate"} and len(result.rejects) < 0.01 * len(rows)
    corpus = offline.base_corpus(params.base.corpus_size, params.base.seed, params.heldout,
                                 offline.load_register(params.generate.persona.offline))
    return params, result, corpus


def _questions(rows):
    return {next(m["content"] for m in (r.get("messages") or r["prompt"]) if m["role"] == "user") for r in rows}


def test_every_pair_of_splits_shares_no_question_pretraining_included(default_splits):
    params, result, corpus = default_splits
    sets = {
        "pretraining": {r.messages[-2]["content"] for r in corpus if r.kind == "chat"},
        "sft_train": _questions(result.sft_train), "dpo_train": _questions(result.dpo_train),
        "eval": _questions(result.sft_eval + result.dpo_eval),
        "heldout": _questions(result.sft_heldout + result.dpo_heldout),
    }
    assert all(sets.values()) and len(sets["heldout"]) > 100 and len(sets["eval"]) > 50
    for (a, qa), (b, qb) in itertools.combinations(sets.items(), 2):
        assert not qa & qb, f"{a} and {b} share {len(qa & qb)} questions, e.g. {sorted(qa & qb)[:2]}"


def test_heldout_subtopics_and_frames_appear_in_no_training_data(default_splits):
    params, result, corpus = default_splits
    training = result.sft_train + result.dpo_train + result.sft_eval + result.dpo_eval
    train_subtopics = {r["meta"]["subtopic"] for r in training} | {r.meta["subtopic"] for r in corpus}
    train_frames = {f for r in training for f in r["meta"]["frames"]} | {f for r in corpus for f in r.meta["frames"]}
    held = result.sft_heldout + result.dpo_heldout
    held_subtopics = {r["meta"]["subtopic"] for r in held}
    held_frames = {f for r in held for f in r["meta"]["frames"]}
    assert held_subtopics and not held_subtopics & train_subtopics
    assert held_frames and not held_frames & train_frames
    assert all(heldout_subtopic(s, params.heldout) for s in held_subtopics)
    assert all(heldout_frame(f, params.heldout) for f in held_frames)
    assert not any(heldout_frame(f, params.heldout) for f in train_frames)
