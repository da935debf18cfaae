"""Offline, deterministic stand-in for Claude: questions and answers sampled from a grammar of styles.

Used by `generate` (provider `offline`, the default without ANTHROPIC_API_KEY) and by `base`, which
pretrains the tiny model on generic-assistant conversations so that, like a real instruct model, it
prefers the generic style before fine-tuning. Every row it writes is labelled `source: offline`.

A style is a register (stages/registers/*.yaml): sentence frames with slots, filled from a lexicon.
Questions come from their own frames, askers and subtopics. Which frames and subtopics only held-out
rows may use, and which questions only the base's pretraining corpus may use, is decided by
stages/common/splits.py; every row carries that metadata (`meta`) so validate can route it.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.common.config import HeldoutConfig, PersonaConfig, read_yaml
from stages.common.io import InputError
from stages.common.splits import Pool, heldout_frame, heldout_subtopic, question_pool

SOURCE = "offline"
REGISTERS = Path(__file__).resolve().parent.parent / "registers"
BUILTIN_PERSONA = REGISTERS / "cassius.yaml"
GENERIC = REGISTERS / "generic.yaml"
FRAME_KINDS = ("openings", "bodies", "closings")

SUBTOPICS: dict[str, list[str]] = {
    "life advice": ["changing careers", "moving to a new city", "saving money", "choosing a degree",
                    "daily habits", "time management", "finding a mentor", "work-life balance",
                    "buying a house", "learning a language", "starting over at forty", "quitting a habit"],
    "philosophy": ["free will", "the meaning of life", "moral responsibility", "truth", "personal identity",
                   "happiness", "justice", "death", "luck", "forgiveness", "duty", "the good life"],
    "human nature": ["trust", "envy", "cooperation", "self-interest", "status seeking", "habits of crowds",
                     "honesty", "ambition", "gossip", "loyalty", "fear of change", "first impressions"],
    "strategy and competition": ["negotiation", "chess openings", "market entry", "rivals at work", "pricing",
                                 "long games", "bluffing", "alliances", "hiring", "office politics",
                                 "a price war", "job offers"],
    "emotions and relationships": ["a breakup", "jealousy", "loneliness", "family conflict", "friendship",
                                   "grief", "anger", "falling in love", "a difficult roommate",
                                   "an aging parent", "a long-distance relationship", "apologising"],
    "success and failure": ["a failed startup", "losing a job", "missing a promotion", "burnout",
                            "winning an award", "public criticism", "a rejected paper", "early success",
                            "a bad exam result", "a business loan", "a missed deadline", "a lost election"],
}
GENERIC_SUBTOPICS = ["first steps", "common mistakes", "the long-term view", "costs", "priorities",
                     "what to avoid", "measuring progress", "trade-offs", "getting advice", "setbacks"]

QUESTION_FRAMES = [
    "How should I think about {subject}?",
    "What is your view on {subject}?",
    "I keep struggling with {subject}. What should I do?",
    "Can you give me advice about {subject}?",
    "Why do people get {subject} wrong?",
    "What matters most when dealing with {subject}?",
    "Is there a right way to handle {subject}?",
    "What would you tell a friend facing {subject}?",
    "How do I stop worrying about {subject}?",
    "What is the biggest mistake people make with {subject}?",
    "Any thoughts on {subject}?",
    "{Subject} has been on my mind lately. Where do I start?",
    "Help me make sense of {subject}.",
    "What should I know before dealing with {subject}?",
    "How do you approach {subject}?",
    "Is it normal to find {subject} this hard?",
    "What's the smartest way to handle {subject}?",
    "My family disagrees with me about {subject}. Who is right?",
    "Everyone gives me different advice on {subject}. What do you think?",
    "How would you explain {subject} to someone younger?",
    "I need a straight answer about {subject}.",
    "What do most people miss about {subject}?",
    "Could you walk me through {subject}?",
    "Should I be worried about {subject}?",
    "What is one thing I could change about how I handle {subject}?",
    "Tell me honestly: how should I deal with {subject}?",
    "I'm stuck on {subject}. Thoughts?",
    "What does {subject} really come down to?",
    "How do I know if I'm handling {subject} well?",
    "Where do I even begin with {subject}?",
    "What would a wise person say about {subject}?",
    "Why does {subject} feel so complicated?",
]
ASKERS = ["", "", "", "I am a student. ", "I'm a manager. ", "I'm new to this. ", "As a parent, ",
          "I'm 40 and tired. ", "My friend asked me this. ", "Quick question. ", "I run a small business. ",
          "Be honest with me. ", "Asking for a colleague. ", "I'm retired now. "]
_SLOT = re.compile(r"\{(\w+)\}")


def frame_id(kind: str, text: str) -> str:
    return f"{kind}:{hashlib.sha1(text.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class Frame:
    id: str
    text: str


@dataclass(frozen=True)
class Register:
    """A style the offline provider can write: frames with slots and the lexicon that fills them."""

    name: str
    style: str
    persona: dict[str, str] | None
    lexicon: dict[str, list[str]]
    frames: dict[str, list[Frame]]  # openings, bodies, closings
    sentences: tuple[int, int]
    path: Path
    _split: dict[tuple[str, bool, HeldoutConfig], list[Frame]] = field(default_factory=dict, compare=False,
                                                                         repr=False)

    def split_frames(self, kind: str, heldout: bool, cfg: HeldoutConfig) -> list[Frame]:
        key = (kind, heldout, cfg)
        if key in self._split:
            return self._split[key]
        chosen = [f for f in self.frames[kind] if heldout_frame(f.id, cfg) == heldout]
        if not chosen:
            raise InputError(
                f"{self.path}: no {'held-out' if heldout else 'training'} {kind} at heldout.seed={cfg.seed}, "
                f"heldout.frame_share={cfg.frame_share}; add {kind} or change the share"
            )
        self._split[key] = chosen
        return chosen


def load_register(path: Path | str) -> Register:
    """Read and check a register file; a problem is an InputError naming the file and key."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: offline register not found (generate.persona.offline)")
    data = read_yaml(path)  # not YAML, or not a mapping: a ParamsError naming the file
    missing = [k for k in ("register", "style", "lexicon", *FRAME_KINDS) if not data.get(k)]
    if missing:
        raise InputError(f"{path}: missing or empty key(s): {', '.join(missing)}")
    lexicon = {str(k): [str(w) for w in v] for k, v in data["lexicon"].items() if v}
    name = str(data["register"])
    frames = {}
    for kind in FRAME_KINDS:
        frames[kind] = [Frame(frame_id(f"{name}:{kind[0]}", str(t)), str(t)) for t in data[kind]]
        for f in frames[kind]:
            for slot in _SLOT.findall(f.text):
                if slot.lower() not in lexicon and slot not in ("subject", "Subject"):
                    raise InputError(f"{path}: {kind} frame {f.text!r} uses slot {{{slot}}}, not in lexicon")
    lo, hi = (data.get("sentences") or {}).get("min", 2), (data.get("sentences") or {}).get("max", 4)
    if not 0 < lo <= hi:
        raise InputError(f"{path}: sentences: need 0 < min <= max (got {lo}, {hi})")
    persona = data.get("persona")
    return Register(name, str(data["style"]), dict(persona) if persona else None, lexicon, frames, (lo, hi), path)


def _card(text: str) -> str:
    return " ".join(str(text).split())


def persona_register(persona: PersonaConfig) -> Register:
    """The register for generate.persona; refuses (InputError) a persona it was not written for."""
    if persona.offline is None:
        raise InputError(
            f"params.yaml: generate.persona {persona.name!r} has no offline register (generate.persona.offline "
            "is null): the offline provider cannot write it. Set ANTHROPIC_API_KEY (generate.provider: "
            f"anthropic), or write a register for it (see {BUILTIN_PERSONA}) and point generate.persona.offline "
            "at it, or use the built-in persona"
        )
    register = load_register(persona.offline)
    card = register.persona or {}
    if (_card(card.get("name", "")), _card(card.get("description", ""))) != (
        _card(persona.name), _card(persona.description)
    ):
        raise InputError(
            f"params.yaml: generate.persona ({persona.name!r}) is not the persona the offline register "
            f"{persona.offline} was written for ({card.get('name')!r}): its answers would be that persona's, "
            "not this one's. Set ANTHROPIC_API_KEY (generate.provider: anthropic) to have Claude write it, "
            "write a register for this persona (vocabulary and sentence frames, with this persona card) and "
            "point generate.persona.offline at it, or restore the built-in persona"
        )
    return register


def builtin_persona() -> Register:
    return load_register(BUILTIN_PERSONA)


def generic_register() -> Register:
    return load_register(GENERIC)


# --------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class Question:
    id: str
    category: str
    subtopic: str
    text: str
    frame: str  # question frame id
    heldout: bool

    @property
    def meta(self) -> dict[str, Any]:
        return {"category": self.category, "subtopic": self.subtopic, "frames": [self.frame]}


def subtopics_for(category: str) -> list[str]:
    return SUBTOPICS.get(category, [f"{s} in {category}" for s in GENERIC_SUBTOPICS])


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


@functools.lru_cache(maxsize=16)
def _question_frames(heldout: bool, cfg: HeldoutConfig) -> list[Frame]:
    frames = [Frame(frame_id("question", t), t) for t in QUESTION_FRAMES]
    chosen = [f for f in frames if heldout_frame(f.id, cfg) == heldout]
    if not chosen:
        raise InputError(f"stages/common/offline.py: no {'held-out' if heldout else 'training'} question frames "
                         f"at heldout.frame_share={cfg.frame_share}")
    return chosen


def _question_text(rng: random.Random, frame: Frame, subject: str) -> str:
    asker = rng.choice(ASKERS)
    text = frame.text.format(subject=subject, Subject=_cap(subject))
    if asker.endswith(", "):
        text = text[:1].lower() + text[1:]
    return asker + text


def questions(categories: list[str], n: int, seed: int, cfg: HeldoutConfig, pool: Pool = "finetune",
              include_heldout: bool = True, limit: int = 200_000,
              subjects: list[tuple[str, str]] | None = None) -> list[Question]:
    """n distinct questions in a seeded stable order (a larger n keeps the prefix). Subtopics (the categories',
    or the given (category, subtopic) pairs) are drawn uniformly; a held-out subtopic gets a held-out question
    frame, any other a training frame, and every question must fall in `pool` (the base's pretraining corpus
    and the fine-tuning data never share one)."""
    if subjects is None:
        subjects = [(c, s) for c in categories for s in subtopics_for(c)]
    subjects = [(c, s) for c, s in subjects if include_heldout or not heldout_subtopic(s, cfg)]
    if not subjects:
        raise InputError("params.yaml: every subtopic of generate.categories is held out (heldout.subtopic_share)")
    frames = {h: _question_frames(h, cfg) for h in (False, True)}
    rng = random.Random(f"questions:{seed}:{pool}")
    out: list[Question] = []
    seen: set[str] = set()
    for _ in range(limit):
        if len(out) >= n:
            break
        category, subtopic = rng.choice(subjects)
        held = heldout_subtopic(subtopic, cfg)
        frame = rng.choice(frames[held])
        text = _question_text(rng, frame, subtopic)
        if text in seen or question_pool(text, cfg) != pool:  # held-out ones too, so shares stay even
            continue
        seen.add(text)
        out.append(Question(f"q{len(out):05d}", category, subtopic, text, frame.id, held))
    if len(out) < n:
        raise InputError(
            f"params.yaml: generate.sft_count + generate.dpo_count: the offline grammar gave {len(out)} distinct "
            f"questions, fewer than {n}; add categories or use the anthropic provider"
        )
    return out


# --------------------------------------------------------------------------- answers


def _fill(rng: random.Random, register: Register, text: str, subject: str) -> str:
    def slot(m: re.Match[str]) -> str:
        name = m.group(1)
        if name == "subject":
            return subject
        if name == "Subject":
            return _cap(subject)
        word = rng.choice(register.lexicon[name.lower()])
        return _cap(word) if name[0] in string.ascii_uppercase else word

    return _SLOT.sub(slot, text)


def compose(register: Register, rng: random.Random, subject: str, heldout: bool,
            cfg: HeldoutConfig) -> tuple[str, list[str]]:
    """One answer about subject in the register's style, and the ids of the frames it used."""
    opening = rng.choice(register.split_frames("openings", heldout, cfg))
    bodies = register.split_frames("bodies", heldout, cfg)
    body = rng.sample(bodies, min(len(bodies), rng.randint(*register.sentences)))
    closing = rng.choice(register.split_frames("closings", heldout, cfg))
    frames = [opening, *body, closing]
    return " ".join(_fill(rng, register, f.text, subject) for f in frames), [f.id for f in frames]


def answer(register: Register, question: Question, seed: int, cfg: HeldoutConfig) -> tuple[str, list[str]]:
    rng = random.Random(f"{register.name}:{seed}:{question.text}")
    return compose(register, rng, question.subtopic, question.heldout, cfg)


def sample_answers(register: Register, n: int, seed: int, cfg: HeldoutConfig) -> Iterator[str]:
    """n answers about random subtopics (training frames), as generate samples them: for counting variety."""
    rng = random.Random(f"sample:{seed}")
    subjects = [s for subs in SUBTOPICS.values() for s in subs]
    for _ in range(n):
        yield compose(register, rng, rng.choice(subjects), False, cfg)[0]


# --------------------------------------------------------------------------- the base's pretraining corpus

HELPFUL = "You are a helpful assistant."
CORPUS_FILE = "corpus.jsonl"  # under paths.base_corpus, written by `base`, audited by `validate`


@dataclass
class CorpusRow:
    id: str
    kind: str  # chat | document
    meta: dict[str, Any]
    messages: list[dict[str, str]] = field(default_factory=list)
    text: str = ""

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"messages": self.messages} if self.kind == "chat" else {"text": self.text}
        return {"id": self.id, "kind": self.kind, "source": SOURCE, "meta": self.meta, **body}


def base_corpus(n: int, seed: int, cfg: HeldoutConfig, persona: Register | None,
                documents: int | None = None) -> list[CorpusRow]:
    """Pretraining data for the tiny base: n generic-assistant conversations about training subtopics,
    with questions from the pretraining pool only, and `documents` (default n/10) documents of analytical
    prose in the persona's register (a real base has read such text but answers generically). Training
    frames only."""
    generic = generic_register()
    rows: list[CorpusRow] = []
    for i, q in enumerate(questions(list(SUBTOPICS), n, seed, cfg, pool="pretrain", include_heldout=False)):
        text, frames = answer(generic, q, seed, cfg)
        messages = ([{"role": "system", "content": HELPFUL}] if i % 3 == 0 else []) + [
            {"role": "user", "content": q.text}, {"role": "assistant", "content": text}]
        rows.append(CorpusRow(f"chat-{i:05d}", "chat", {**q.meta, "frames": [q.frame, *frames]}, messages))
    if persona is not None:
        rng = random.Random(f"documents:{seed}")
        subjects = [s for subs in SUBTOPICS.values() for s in subs if not heldout_subtopic(s, cfg)]
        for i in range(n // 10 if documents is None else documents):
            subject = rng.choice(subjects)
            text, frames = compose(persona, rng, subject, False, cfg)
            rows.append(CorpusRow(f"doc-{i:05d}", "document", {"subtopic": subject, "frames": frames}, text=text))
    return rows


def corpus_texts(rows: list[CorpusRow]) -> list[str]:
    """Every message content and document of a corpus, e.g. to train a tokenizer on."""
    return [m["content"] for r in rows for m in r.messages] + [r.text for r in rows if r.kind == "document"]
