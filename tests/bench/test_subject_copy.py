"""bench/subject_copy.py: its made-up subjects stay out of the held-out split, and its counts follow evaluate's rule."""

from __future__ import annotations

import re

from bench import subject_copy
from stages.common import offline
from stages.common.config import HeldoutConfig
from stages.common.splits import question_pool

CFG = HeldoutConfig()


def _held_words() -> set[str]:
    return {w for subs in offline.SUBTOPICS.values() for s in subs if offline.heldout_subtopic(s, CFG)
            for w in re.findall(r"[a-z]+", s)} - {"a", "an", "the", "of"}


def test_made_up_subjects_are_many_and_never_seen_twice_often():
    subjects = subject_copy.made_up_subjects(3000, 0)
    assert len(set(subjects)) > 2000  # too many to memorise: predicting one means copying it


def test_the_corpus_gets_the_share_and_no_held_out_word_or_finetuning_question():
    corpus = subject_copy.with_made_up_subjects(0.5)
    rows = corpus(200, 0, CFG, None, 0)
    made_up = [r for r in rows if r.meta.get("category") == subject_copy.MADE_UP]
    assert len(rows) == 200 and len(made_up) == 100
    held = _held_words()
    for row in made_up:
        assert not set(row.meta["subtopic"].split()) & held
        question = row.messages[0]["content"]
        assert question_pool(question, CFG) == "pretrain"
        assert row.meta["subtopic"] in row.messages[-1]["content"] or \
            row.meta["subtopic"][:1].upper() + row.meta["subtopic"][1:] in row.messages[-1]["content"]


def test_mention_rates_count_whole_subjects_and_single_words(monkeypatch):
    answers = iter(["Treat a price war as a cost.", "Price it first.", "Nothing to see."])
    monkeypatch.setattr(subject_copy, "_answer", lambda model, tok, prompt, n: next(answers))
    rows = [{"prompt": [{"role": "user", "content": "q"}], "meta": {"subtopic": s}}
            for s in ("a price war", "a price war", "grief")]
    out = subject_copy.mention_rates(None, None, rows)
    assert out["mentions_subject"] == 1 / 3 and out["mentions_a_subject_word"] == 2 / 3
