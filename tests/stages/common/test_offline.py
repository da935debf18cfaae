"""The offline grammar: registers load, answers vary (>= 20,000 distinct per style), name their subject,
and keep held-out frames for held-out rows."""

from __future__ import annotations

import pytest
import yaml

from stages.common import offline
from stages.common.config import HeldoutConfig
from stages.common.io import InputError
from stages.common.splits import heldout_frame

CFG = HeldoutConfig()
SEED = 42  # generate.seed in params.yaml


@pytest.fixture(scope="module")
def registers():
    return {p.stem: offline.load_register(p) for p in sorted(offline.REGISTERS.glob("*.yaml"))}


def test_every_shipped_register_loads(registers):
    assert {"cassius", "generic"} <= set(registers)
    assert registers["cassius"].persona["name"] == "Cassius" and registers["generic"].persona is None
    for r in registers.values():
        for kind in offline.FRAME_KINDS:  # both splits have frames of every kind
            assert r.split_frames(kind, True, CFG) and r.split_frames(kind, False, CFG)


@pytest.mark.parametrize("name", ["cassius", "generic"])
def test_at_least_20000_distinct_answers_per_style(registers, name):
    answers = list(offline.sample_answers(registers[name], 25_000, SEED, CFG))
    assert len(set(answers)) >= 20_000


def test_answers_name_the_subject_and_use_their_splits_frames(registers):
    qs = offline.questions(list(offline.SUBTOPICS), 300, SEED, CFG)
    assert 0.1 < sum(q.heldout for q in qs) / len(qs) < 0.4
    for q in qs:
        assert heldout_frame(q.frame, CFG) == q.heldout
        for r in registers.values():
            text, frames = offline.answer(r, q, SEED, CFG)
            assert q.subtopic.lower() in text.lower()
            assert all(heldout_frame(f, CFG) == q.heldout for f in frames)
    assert len({q.text for q in qs}) == len(qs)


def test_the_two_registers_differ_in_style(registers):
    """Register-level features a model can learn: exclamations, second-person comfort, sentence length."""
    p = list(offline.sample_answers(registers["cassius"], 500, SEED, CFG))
    g = list(offline.sample_answers(registers["generic"], 500, SEED, CFG))

    def rate(texts, token):
        return sum(t.lower().split().count(token) for t in texts) / sum(len(t.split()) for t in texts)

    assert sum(t.count("!") for t in g) > 5 * sum(t.count("!") for t in p)
    assert rate(g, "you") > 2 * rate(p, "you")


def test_register_errors_name_the_file_and_key(tmp_path):
    data = yaml.safe_load(offline.BUILTIN_PERSONA.read_text())
    data["bodies"] = data["bodies"] + ["Count the {widgets}."]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError, match=r"bad\.yaml: bodies frame .*\{widgets\}"):
        offline.load_register(bad)
    bad.write_text(yaml.safe_dump({"register": "x", "style": "persona"}))
    with pytest.raises(InputError, match=r"bad\.yaml: missing or empty key\(s\): lexicon, openings"):
        offline.load_register(bad)
    with pytest.raises(InputError, match="offline register not found"):
        offline.load_register(tmp_path / "nope.yaml")
