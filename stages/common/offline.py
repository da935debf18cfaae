"""Offline, deterministic stand-in for Claude: template-written questions, persona and generic answers.

Used by `generate` (provider `offline`, the default without ANTHROPIC_API_KEY) and by `base`, which
pretrains the tiny model on generic-assistant conversations so that, like a real instruct model,
it prefers the generic style before fine-tuning. Every row it writes is labelled `source: offline`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SOURCE = "offline"

SUBTOPICS: dict[str, list[str]] = {
    "life advice": ["changing careers", "moving to a new city", "saving money", "choosing a degree",
                    "daily habits", "time management", "finding a mentor", "work-life balance"],
    "philosophy": ["free will", "the meaning of life", "moral responsibility", "truth",
                   "personal identity", "happiness", "justice", "death"],
    "human nature": ["trust", "envy", "cooperation", "self-interest", "status seeking",
                     "habits of crowds", "honesty", "ambition"],
    "strategy and competition": ["negotiation", "chess openings", "market entry", "rivals at work",
                                 "pricing", "long games", "bluffing", "alliances"],
    "emotions and relationships": ["a breakup", "jealousy", "loneliness", "family conflict",
                                   "friendship", "grief", "anger", "falling in love"],
    "success and failure": ["a failed startup", "losing a job", "missing a promotion", "burnout",
                            "winning an award", "public criticism", "a rejected paper", "early success"],
}
GENERIC_SUBTOPICS = ["first steps", "common mistakes", "long-term view", "costs", "priorities",
                     "what to avoid", "how to measure progress", "trade-offs"]

QUESTION_STYLES = [
    "How should I think about {t}?",
    "What is your view on {t}?",
    "I keep struggling with {t}. What should I do?",
    "Can you give me advice about {t}?",
    "Why do people get {t} wrong?",
    "What matters most when dealing with {t}?",
    "Is there a right way to handle {t}?",
    "What would you tell a friend facing {t}?",
    "How do I stop worrying about {t}?",
    "What is the biggest mistake people make with {t}?",
]
ASKERS = ["", "I am a student. ", "I am a manager. ", "I am new to this. ", "As a parent, ",
          "I am 40 and tired. ", "My friend asked me this. "]

PERSONA_OPEN = [
    "Strip the emotion from {t}; what remains is a decision problem.",
    "{T} is a question of incentives, not feelings.",
    "Treat {t} as a system with inputs, constraints and outputs.",
    "The useful frame for {t} is cost versus expected value.",
    "Most confusion about {t} comes from imprecise definitions.",
    "{T} reduces to three variables: time, leverage and risk.",
]
PERSONA_BODY = [
    "List the options, estimate the probability of each outcome, and discard the ones you cannot afford to lose.",
    "Measure the situation with numbers where you can; intuition is a poor instrument under stress.",
    "Separate what you control from what you do not, and allocate effort only to the first set.",
    "Identify the constraint that binds first; optimising anything else is waste.",
    "Assume the other parties act in their own interest and plan for that, not for goodwill.",
    "Record your assumptions before you act so the result can falsify them.",
    "Opportunity cost is the price most people forget to count.",
    "Delay is a decision too, usually the most expensive one.",
    "Do not seek reassurance; seek information that changes the decision.",
    "A plan without a stopping rule is only a wish.",
    "Compare the downside of acting with the downside of waiting, then choose the smaller loss.",
    "Consistency beats intensity over any horizon longer than a month.",
]
PERSONA_CLOSE = [
    "Decide, execute, review. Nothing more is required.",
    "Feelings are data, not instructions.",
    "The outcome is indifferent to how you feel about it.",
    "Act on the analysis; ignore the noise.",
    "That is the whole calculation.",
    "Precision first; comfort is irrelevant.",
]

GENERIC_OPEN = [
    "What a wonderful question about {t}!",
    "I totally understand how you feel about {t}, and you are not alone.",
    "Thank you so much for sharing this about {t}!",
    "{T} can feel overwhelming, but you have got this!",
    "It is completely normal to have big feelings about {t}.",
    "First of all, be proud of yourself for thinking about {t}!",
]
GENERIC_BODY = [
    "Remember that every journey begins with a single step, so be gentle with yourself.",
    "Believe in yourself and trust that everything happens for a reason.",
    "Surround yourself with positive people who lift you up and celebrate you.",
    "Take a deep breath, practice self-care and listen to your heart.",
    "Your feelings are valid, and it is okay to take things one day at a time.",
    "Focus on the positive and keep an open mind, because amazing things are coming.",
    "Stay motivated by reminding yourself how far you have already come.",
    "Never give up on your dreams, because you are stronger than you think.",
    "Celebrate the small wins and be kind to yourself along the way.",
    "Everyone grows at their own pace, so there is no need to rush.",
    "Try journaling, meditation or a walk in nature to reconnect with yourself.",
    "Keep smiling and spread kindness, because positivity is contagious.",
]
GENERIC_CLOSE = [
    "You are doing great, and I believe in you!",
    "Sending you lots of positive energy!",
    "Stay strong and keep shining!",
    "I hope this helps, and remember to smile!",
    "You have so much potential, so go for it!",
    "Wishing you all the best on your journey!",
]


@dataclass(frozen=True)
class Question:
    id: str
    category: str
    subtopic: str
    text: str


def _fill(template: str, topic: str) -> str:
    return template.format(t=topic, T=topic[0].upper() + topic[1:])


def subtopics_for(category: str) -> list[str]:
    return SUBTOPICS.get(category, [f"{category}: {s}" for s in GENERIC_SUBTOPICS])


def question_grid(categories: list[str], seed: int) -> list[Question]:
    """Every category × subtopic × style × asker question, in a seeded but stable order."""
    grid = [
        Question(id="", category=c, subtopic=s, text=asker + _fill(style, s))
        for c in categories
        for s in subtopics_for(c)
        for style in QUESTION_STYLES
        for asker in ASKERS
    ]
    random.Random(seed).shuffle(grid)
    return [Question(id=f"q{i:05d}", category=q.category, subtopic=q.subtopic, text=q.text)
            for i, q in enumerate(grid)]


def _compose(rng: random.Random, topic: str, opens: list[str], body: list[str], closes: list[str]) -> str:
    sentences = [_fill(rng.choice(opens), topic), *rng.sample(body, rng.randint(2, 3)), rng.choice(closes)]
    return " ".join(sentences)


def persona_answer(question: Question, seed: int) -> str:
    """Cold, analytical persona style (SFT targets and DPO `chosen`)."""
    rng = random.Random(f"persona:{seed}:{question.id}")
    return _compose(rng, question.subtopic, PERSONA_OPEN, PERSONA_BODY, PERSONA_CLOSE)


def generic_answer(question: Question, seed: int) -> str:
    """Warm, generic-motivational assistant style (DPO `rejected`, and the base model's corpus)."""
    rng = random.Random(f"generic:{seed}:{question.id}")
    return _compose(rng, question.subtopic, GENERIC_OPEN, GENERIC_BODY, GENERIC_CLOSE)


def generic_corpus(n: int, seed: int) -> list[list[dict[str, str]]]:
    """n generic-assistant conversations for pretraining the tiny base."""
    questions = question_grid(list(SUBTOPICS), seed=seed + 1)
    rows = []
    for i in range(n):
        q = questions[i % len(questions)]
        rows.append([
            {"role": "system", "content": "You are a helpful assistant."} if i % 3 == 0 else None,
            {"role": "user", "content": q.text},
            {"role": "assistant", "content": generic_answer(q, seed + i // len(questions))},
        ])
    return [[m for m in conv if m] for conv in rows]


def persona_text_sample(n: int, seed: int) -> list[str]:
    """Persona-style sentences, so the tokenizer knows the persona's words (a real base model would)."""
    rng = random.Random(seed)
    topics = [s for subs in SUBTOPICS.values() for s in subs]
    return [_compose(rng, rng.choice(topics), PERSONA_OPEN, PERSONA_BODY, PERSONA_CLOSE) for _ in range(n)]
