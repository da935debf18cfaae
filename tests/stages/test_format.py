"""format: rendering, loss masks, DPO text, and the chat-template contract check."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from stages.common.config import deep_merge, parse_params, read_yaml
from stages.common.io import run_main
from stages.common.templates import TEMPLATES, get_template
from stages.format import (
    GOLDEN,
    ContractError,
    contract_problems,
    dpo_prefix_problems,
    end_of_turn,
    format_data,
    masks_by_prefix,
    render_sft,
    run,
)

REPO = Path(__file__).resolve().parents[2]
CORPUS = [m["content"] for _, conv in GOLDEN for m in conv] * 5 + [
    "Plans expose wrong assumptions early. The quick brown fox jumps over the lazy dog."
] * 5

CLEAN = {
    "sft_train": [
        {
            "id": "s1",
            "source": "t",
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "Why plan?"},
                {"role": "assistant", "content": "Plans expose wrong assumptions."},
                {"role": "user", "content": "And then?"},
                {"role": "assistant", "content": "Revise them."},
            ],
        }
    ],
    "sft_eval": [
        {
            "id": "s2",
            "source": "t",
            "messages": [
                {"role": "user", "content": "Define risk."},
                {"role": "assistant", "content": "Variance you cannot afford."},
            ],
        }
    ],
    "dpo_train": [
        {
            "id": "d1",
            "source": "t",
            "prompt": [{"role": "user", "content": "I failed my exam."}],
            "chosen": "Measure why, then change the method.",
            "rejected": "Oh no, you poor thing!",
        }
    ],
    "dpo_eval": [],
    "sft_heldout": [
        {
            "id": "s3",
            "source": "offline",
            "meta": {"subtopic": "grief", "frames": ["q:1"]},
            "messages": [
                {"role": "user", "content": "How do I handle grief?"},
                {"role": "assistant", "content": "Grief has a cost. Count it."},
            ],
        }
    ],
    "dpo_heldout": [
        {
            "id": "d2",
            "source": "offline",
            "meta": {"subtopic": "grief", "frames": ["q:1"]},
            "prompt": [{"role": "user", "content": "How do I handle grief?"}],
            "chosen": "Grief has a cost. Count it.",
            "rejected": "Sending you love through grief!",
        }
    ],
}


def make_tokenizer(template: str = "llama3"):
    from stages.base import build_tokenizer

    tmpl = get_template(template)
    tok = build_tokenizer(CORPUS, 400, tmpl)
    missing = [t for t in tmpl.special_tokens if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    return tok


def clone(tok, jinja: str | None = None):
    other = copy.deepcopy(tok)
    if jinja is not None:
        other.chat_template = jinja
    return other


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_contract_holds_for_every_named_template(name):
    t = make_tokenizer(name)
    assert contract_problems(t, clone(t)) == []


def test_sft_masks_cover_assistant_text_and_end_of_turn(tok):
    eot = end_of_turn(tok)
    assert eot == "<|eot_id|>"
    eot_ids = tok(eot, add_special_tokens=False)["input_ids"]
    conv = CLEAN["sft_train"][0]["messages"]
    row = render_sft(tok, conv, eot_ids, markers=True)
    masked = tok.decode([t for t, m in zip(row["input_ids"], row["assistant_masks"], strict=True) if m])
    assert masked == "Plans expose wrong assumptions.<|eot_id|>Revise them.<|eot_id|>"
    assert row["input_ids"][0] == tok.bos_token_id and row["input_ids"][1] != tok.bos_token_id
    assert masks_by_prefix(tok, conv, row["input_ids"], eot_ids) == row["assistant_masks"]


def test_template_without_generation_markers_gets_masks_from_prefixes(tok):
    plain = clone(
        tok, get_template("llama3").jinja.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    )
    result = format_data(plain, clone(plain), CLEAN, max_seq_length=256)
    marked = format_data(tok, clone(tok), CLEAN, max_seq_length=256)
    assert result.report["generation_markers"] is False
    assert result.splits["sft_train"] == marked.splits["sft_train"]


def test_format_data_rows_and_report(tok):
    result = format_data(tok, clone(tok), CLEAN, max_seq_length=40)
    sft = result.splits["sft_train"][0]
    assert set(sft) == {"id", "text", "input_ids", "assistant_masks"}
    assert len(sft["input_ids"]) == len(sft["assistant_masks"])
    dpo = result.splits["dpo_train"][0]
    assert dpo["prompt"].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert dpo["chosen"] == "Measure why, then change the method.<|eot_id|>"
    assert dpo["rejected"] == "Oh no, you poor thing!<|eot_id|>"
    rep = result.report
    assert rep["sft_train"]["rows"] == 1 and rep["sft_train"]["max"] == len(sft["input_ids"])
    assert rep["sft_train"]["over_max_seq_length"] == 1  # 40 tokens is too short for the two-turn row
    assert rep["would_truncate"] == sum(rep[n]["over_max_seq_length"] for n in result.splits)
    assert len(sft["input_ids"]) > 40  # reported, never cut


MISMATCHES = {
    # the tokenizer saved with the model renders differently from the one used for training
    "saved tokenizer differs": (None, get_template("chatml").jinja, "differ from the saved tokenizer"),
    # the end-of-turn token is outside the generation block: the model would never learn to stop
    "eot not masked": (
        get_template("llama3").jinja.replace(
            "{{ '<|eot_id|>' }}{% endgeneration %}", "{% endgeneration %}{{ '<|eot_id|>' }}"
        ),
        None,
        "loss mask",
    ),
    # the header is inside the generation block: role tokens would be trained on
    "header masked": (
        get_template("llama3")
        .jinja.replace(
            "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
            "{% if message['role'] == 'assistant' %}{% generation %}",
            "{% if message['role'] == 'assistant' %}{% generation %}"
            "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}",
        )
        .replace(
            "{% else %}{{ message",
            "{% else %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}{{ message",
        ),
        None,
        "loss mask",
    ),
    # the generation prompt is not what the conversation contains at that point
    "generation prompt drift": (
        get_template("llama3").jinja.replace(
            "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
            "{{ '<|start_header_id|>Assistant<|end_header_id|>\n\n' }}{% endif %}",
        ),
        None,
        "not a token prefix",
    ),
    "double bos": ("{{ bos_token }}" + get_template("llama3").jinja, None, "double BOS"),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_contract_check_catches_mismatched_templates(tok, case):
    train_jinja, saved_jinja, message = MISMATCHES[case]
    train = clone(tok, train_jinja)
    saved = clone(train, saved_jinja)
    problems = contract_problems(train, saved)
    assert problems and any(message in p for p in problems), problems
    with pytest.raises(ContractError, match="contract violated"):
        format_data(train, saved, CLEAN, max_seq_length=256)


def test_dpo_prefix_check_catches_tokens_merging_across_the_boundary(tok):
    rows = [
        {
            "id": "ok",
            "prompt": "<|start_header_id|>assistant<|end_header_id|>\n\n",
            "chosen": "Plans.",
            "rejected": "Revise.",
        },
        {"id": "bad", "prompt": "Plans expose wrong assum", "chosen": "ptions early.", "rejected": "ptions."},
    ]
    problems = dpo_prefix_problems(tok, rows)
    assert problems and all("DPO row bad" in p for p in problems)


def _params(tmp_path: Path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "models" / "base")
    clean = tmp_path / "data" / "clean"
    clean.mkdir(parents=True)
    for name, rows in CLEAN.items():
        (clean / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths = {k: str(tmp_path / v) for k, v in read_yaml(REPO / "params.yaml")["paths"].items()}
    return parse_params(deep_merge(read_yaml(REPO / "params.yaml"), {"paths": paths}))


def test_stage_writes_formatted_data_report_and_tokenizer(tmp_path, tok):
    params = _params(tmp_path, tok)
    run(params)
    out = tmp_path / "data" / "formatted"
    assert sorted(p.name for p in out.glob("*.jsonl")) == [
        "dpo_eval.jsonl",
        "dpo_heldout.jsonl",
        "dpo_train.jsonl",
        "sft_eval.jsonl",
        "sft_heldout.jsonl",
        "sft_train.jsonl",
    ]
    held = [json.loads(line) for line in (out / "dpo_heldout.jsonl").read_text().splitlines()]
    assert held[0]["meta"] == {"subtopic": "grief", "frames": ["q:1"]}  # evaluate reads the subject from it
    report = json.loads((tmp_path / "reports" / "format.json").read_text())
    assert report["golden_checks"] == len(GOLDEN) and report["template_source"] == "tokenizer"
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert saved.chat_template == tok.chat_template


def test_stage_installs_named_template_for_a_base_without_one(tmp_path, tok):
    bare = clone(tok)
    bare.chat_template = None
    params = _params(tmp_path, bare)
    run(params)
    report = json.loads((tmp_path / "reports" / "format.json").read_text())
    assert report["template_source"] == "llama3"


def test_stage_exits_non_zero_on_a_broken_template(tmp_path, tok):
    params = _params(tmp_path, clone(tok, MISMATCHES["eot not masked"][0]))
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: run(params))
    assert exit_info.value.code == 2
    assert not (tmp_path / "data" / "formatted").exists()  # nothing written before the check


def test_stage_makes_the_end_of_turn_the_eos_of_a_base_tokenizer(tmp_path, tok):
    """A base model's tokenizer (EOS <|end_of_text|>) with the llama3 template: answers end with <|eot_id|>,
    so that becomes EOS; generation stops there and TRL's DPOTrainer appends nothing to the completions."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    base = clone(tok)
    base.eos_token = "<|end_of_text|>"
    run(_params(tmp_path, base))
    report = json.loads((tmp_path / "reports" / "format.json").read_text())
    assert report["eos_token"] == "<|eot_id|>" and report["eos_token_replaced"] == "<|end_of_text|>"
    saved = AutoTokenizer.from_pretrained(tmp_path / "data" / "formatted" / "tokenizer")
    assert saved.eos_token == "<|eot_id|>"

    rows = [json.loads(line) for line in (tmp_path / "data/formatted/dpo_train.jsonl").read_text().splitlines()]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(saved), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, max_length=None)
    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, processing_class=saved,
                         train_dataset=ds)
    for row, seen in zip(rows, trainer.train_dataset, strict=True):  # nothing appended after <|eot_id|>
        assert seen["chosen_ids"] == saved(row["prompt"] + row["chosen"], add_special_tokens=False)[
            "input_ids"][len(seen["prompt_ids"]):]


def test_stage_keeps_an_eos_that_already_ends_the_turn(tmp_path, tok):
    run(_params(tmp_path, tok))
    report = json.loads((tmp_path / "reports" / "format.json").read_text())
    assert report["eos_token"] == tok.eos_token == "<|eot_id|>" and report["eos_token_replaced"] is None
