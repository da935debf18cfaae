"""When does the tiny base start naming a subject it has never seen? Pretrain it on subjects it cannot memorise.

No model of the default run names a held-out question's subject (reports/eval.md, "mentions subject" 0.00):
answering about an unseen subject means copying it from the question, and a 1M-parameter model pretrained for
~200 steps on 58 recurring subtopics learns to write one of those instead. This bench retrains the tiny base
(`stages.base.base`, params.yaml's `base` section with the overrides given) with a share of its pretraining
conversations about made-up subjects (a modifier and a noun, or a nonce word: "a rented bicycle", "the brelton"),
thousands of them, each seen about once, so that only copying predicts them. Then it answers the DPO prompts of
`heldout` and `eval` (data/clean/dpo_<split>.jsonl, after `dvc repro validate`) greedily and counts answers that
name the subject (evaluate's rule: all its words, together) and, more leniently, any of its words.

    python -m bench.subject_copy                                   # the default base: no made-up subjects
    python -m bench.subject_copy --made-up 0.6 --set corpus_size=12000 --set batch_size=8

Only a bench: the default pipeline's corpus is unchanged, since its base already takes most of what is left of
the 5-minute budget's slack. What it does not show: whether SFT and DPO keep the copying.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.base_margin import score
from stages.base import base
from stages.common import offline
from stages.common.config import load_params
from stages.common.engine import load_for_inference
from stages.common.io import read_jsonl
from stages.evaluate import mentions

MADE_UP = "made-up subjects"
MODIFIERS = ("new old noisy shared weekly late unpaid broken small big quiet local family first second monthly rented "
             "borrowed cheap expensive slow sudden strict messy long short private daily stubborn crowded seasonal "
             "online remote overdue").split()
NOUNS = ("neighbour garden kitchen budget contract recipe holiday commute marathon landlord bicycle wedding dentist "
         "tax account lesson club bakery ticket trip dog cat houseplant spreadsheet presentation interview meeting "
         "email podcast camera laptop printer warranty pension mortgage diet choir theatre novel poem essay thesis "
         "report camp match puzzle flight hotel passport apartment garage attic roof fence boat tent picnic dinner "
         "heater fridge sofa desk workshop fundraiser petition library museum concert festival market hobby website "
         "password backup invoice client supplier warehouse delivery shipment conference speech toast").split()
_ONSETS = "b c d f g h j k l m n p r s t v w z br cl dr gr pl st tr sh ch th".split()
_VOWELS = "a e i o u ai ea ou".split()
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "ck", "nd", "st"]


def made_up_subjects(n: int, seed: int) -> list[str]:
    """n subjects: half a modifier and a noun, half a nonce word of 1-3 syllables, with an article or none."""
    rng = random.Random(f"made-up:{seed}")
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            words = f"{rng.choice(MODIFIERS)} {rng.choice(NOUNS)}"
        else:
            words = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                            for _ in range(rng.randint(1, 3)))
        out.append(rng.choice(["a ", "the ", "", "my "]) + words)
    return out


def with_made_up_subjects(share: float) -> Any:
    """offline.base_corpus with `share` of its conversations about made-up subjects (pretraining pool, training
    frames); none of their words is a word of a held-out subtopic (checked)."""
    original = offline.base_corpus

    def corpus(n: int, seed: int, cfg: Any, persona: Any, documents: int | None = None) -> list[offline.CorpusRow]:
        extra = round(n * share)
        rows = original(n - extra, seed, cfg, persona, documents)
        if not extra:
            return rows  # the default corpus, in its order
        held = {w for subs in offline.SUBTOPICS.values() for s in subs if offline.heldout_subtopic(s, cfg)
                for w in re.findall(r"[a-z]+", s)} - {"a", "an", "the", "of"}
        subjects = [s for s in made_up_subjects(20 * extra, seed) if not set(s.split()) & held]
        generic = offline.generic_register()
        qs = offline.questions([], extra, seed, cfg, pool="pretrain", include_heldout=False,
                               subjects=[(MADE_UP, s) for s in subjects]) if extra else []
        for i, q in enumerate(qs):
            text, frames = offline.answer(generic, q, seed, cfg)
            rows.append(offline.CorpusRow(f"made-up-{i:05d}", "chat", {**q.meta, "frames": [q.frame, *frames]},
                                          [{"role": "user", "content": q.text},
                                           {"role": "assistant", "content": text}]))
        random.Random(f"made-up-order:{seed}").shuffle(rows)
        return rows

    return corpus


def _answer(model: Any, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def mention_rates(model: Any, tokenizer: Any, rows: list[dict[str, Any]], max_new_tokens: int = 60) -> dict:
    """Greedy answers to the rows' prompts: the share naming the subject (evaluate's rule), or any word of it."""
    exact, lenient, examples = [], [], []
    for row in rows:
        text = _answer(model, tokenizer, row["prompt"], max_new_tokens)
        subject = row["meta"]["subtopic"]
        words = set(re.findall(r"[a-z]+", subject.lower())) - {"a", "an", "the", "of"}
        exact.append(mentions(text, subject))
        lenient.append(bool(words & set(re.findall(r"[a-z]+", text.lower()))))
        examples.append(f"{subject}: {text[:120]}")
    return {"answers": len(rows), "mentions_subject": sum(exact) / len(rows),
            "mentions_a_subject_word": sum(lenient) / len(rows), "examples": examples[:3]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--made-up", type=float, default=0.0, help="share of conversations about made-up subjects")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override of params.yaml's base section (repeatable)")
    parser.add_argument("--prompts", type=int, default=32, help="DPO prompts answered per split")
    args = parser.parse_args()
    params = load_params()
    cfg = params.base.model_validate({**params.base.model_dump(), **dict(s.split("=", 1) for s in args.set)})
    offline.base_corpus = with_made_up_subjects(args.made_up)
    out: dict[str, Any] = {"made_up_share": args.made_up, "overrides": args.set}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        base(params.model, cfg, Path(tmp) / "base", None, params.heldout, params.generate.persona.offline)
        out["pretrain_s"] = round(time.perf_counter() - start, 1)
        model, tokenizer = load_for_inference(Path(tmp) / "base")
        model.eval()
        rows = {split: read_jsonl(params.paths.clean / f"dpo_{split}.jsonl") for split in ("heldout", "eval")}
        for split, split_rows in rows.items():
            out[split] = mention_rates(model, tokenizer, split_rows[: args.prompts])
        out["heldout"]["reward_margin_per_token"] = round(
            score(model, tokenizer, rows["heldout"])["reward_margin_per_token"], 3)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
