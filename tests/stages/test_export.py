"""The export stage on a tiny random model: models/final, GGUFs checked in llama.cpp, the Modelfile, the card, push.

The session fixture `exported` (tests/conftest.py) exports tests/export_workspace.py once. The mutation tests
break one thing of an export (the tokenizer's pre-tokenizer, the chat template, the EOS) and assert that the
stage's own checks fail on it.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from stages import export as ex
from stages.common.config import parse_params
from stages.common.io import run_main
from stages.common.templates import TEMPLATES, ollama_template
from stages.format import GOLDEN
from tests.export_workspace import params
from tests.training_workspace import PATHS

GGUFS = ("gguf-f16", "gguf-q8_0")


def report(root: Path) -> dict:
    return json.loads((root / "reports" / "export.json").read_text())


def test_export_passes_every_check_and_writes_every_file(exported):
    rep = report(exported)
    assert rep["passed"] and set(rep["formats"]) == {"hf-float32", *GGUFS}
    for name, f in rep["formats"].items():
        assert f["passed"] and all(f["checks"].values()), (name, f["checks"])
        assert f["positions"] == rep["positions"] > 0
        assert f["max_logprob_diff"] <= f["tolerance"]["max_logprob_diff"]
    assert rep["formats"]["gguf-f16"]["pre_tokenizer"] == "gpt-2"  # the converter did not know the tiny tokenizer
    final = exported / "models" / "final"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json",
                 "README.md", "Modelfile", "vex-f16.gguf", "vex-q8_0.gguf"):
        assert (final / name).is_file(), name


def test_drift_is_measured_not_assumed(exported):
    """fp32 HF is near-exact; the 16-bit GGUF drifts measurably and q8_0 more: the numbers are real."""
    f = report(exported)["formats"]
    assert f["hf-float32"]["max_logprob_diff"] < 1e-4
    assert 1e-5 < f["gguf-f16"]["max_logprob_diff"] < f["gguf-q8_0"]["max_logprob_diff"]


def test_final_loads_with_plain_transformers_from_another_directory(exported, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.chdir(tmp_path)
    final = exported / "models" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    eos = model.generation_config.eos_token_id
    assert tok.convert_tokens_to_ids("<|eot_id|>") in (eos if isinstance(eos, list) else [eos])
    assert tok.eos_token == "<|eot_id|>" and "generation" in tok.chat_template


def test_models_dpo_loads_from_another_directory(exported, tmp_path, monkeypatch):
    """The adapter records its base relative to the repo root (models/sft-merged); it loads from anywhere."""
    from stages.common.engine import adapter_base, load_for_inference

    monkeypatch.chdir(tmp_path)
    dpo = exported / "models" / "dpo"
    assert Path(adapter_base(dpo)) == exported / "models" / "sft-merged"
    model, _ = load_for_inference(dpo)
    assert sum("lora_" in n for n, _ in model.named_parameters()) > 0


# --------------------------------------------------------------------------- mutations the checks must catch


@pytest.fixture(scope="module")
def checked(exported):
    """What check_gguf / check_hf need, recomputed from the exported workspace (module scope)."""
    from stages.common.engine import load_for_inference

    p = params(exported)
    samples = ex.read_samples(exported / p.paths.formatted, exported / p.paths.clean, p.export.samples)
    model, tok = load_for_inference(exported / "models" / "dpo", dtype=torch.float32)
    reference = ex.reference_answers(model, tok, samples, p.export.max_new_tokens)
    return {"tok": tok, "samples": samples, "reference": reference, "params": p}


def mutated_gguf(exported: Path, tmp_path: Path, checked: dict, outtype: str = "f16", pre: str = "gpt-2",
                 change=None) -> dict:
    """A copy of models/final with `change` applied to it, converted and checked against the reference."""
    src = tmp_path / "mutant"
    shutil.copytree(exported / "models" / "final", src, ignore=shutil.ignore_patterns("*.gguf"))
    if change:
        change(src)
    out = tmp_path / f"mutant-{outtype}.gguf"
    ex.convert_gguf(src, out, outtype, pre, "mutant")
    p = checked["params"]
    return ex.check_gguf(out, checked["tok"], checked["samples"], checked["reference"], p.export.tolerance[outtype], 256)


def test_wrong_pre_tokenizer_fails_the_tokenization_check(exported, tmp_path, checked):
    """llama-bpe splits digits and spaces differently from the GPT-2 split the tiny tokenizer was trained with."""
    result = mutated_gguf(exported, tmp_path, checked, pre="llama-bpe")
    assert not result["checks"]["tokenization"] and not result["passed"]


def test_wrong_chat_template_fails_the_template_check(exported, tmp_path, checked):
    def chatml(folder: Path) -> None:
        (folder / "chat_template.jinja").write_text(TEMPLATES["chatml"].jinja)

    result = mutated_gguf(exported, tmp_path, checked, change=chatml)
    assert not result["checks"]["chat_template"] and not result["passed"]


def test_wrong_eos_fails_the_eos_checks(exported, tmp_path, checked):
    """The Llama 3 failure: EOS left at <|end_of_text|> instead of the template's <|eot_id|>."""
    def end_of_text(folder: Path) -> None:
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<|end_of_text|>"}))

    result = mutated_gguf(exported, tmp_path, checked, change=end_of_text)
    assert not result["checks"]["eos_is_end_of_turn"] and not result["passed"]

    folder = tmp_path / "hf-mutant"
    shutil.copytree(exported / "models" / "final", folder, ignore=shutil.ignore_patterns("*.gguf"))
    end_of_text(folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": 1}))
    p = checked["params"]
    hf = ex.check_hf(folder, checked["tok"], checked["samples"], checked["reference"], p.export.tolerance["float32"],
                     p.export.max_new_tokens)
    assert not hf["checks"]["eos_includes_end_of_turn"] and not hf["passed"]


def test_unmerged_or_wrong_weights_fail_the_drift_check(exported, tmp_path, checked):
    """Exporting sft-merged (the DPO merge lost) must exceed even q8_0's tolerance."""
    from transformers import AutoModelForCausalLM

    from stages.common.templates import set_end_of_turn_eos

    folder = tmp_path / "lost-merge"
    model = AutoModelForCausalLM.from_pretrained(exported / "models" / "sft-merged")
    set_end_of_turn_eos(model.generation_config, checked["tok"])
    model.save_pretrained(folder)
    checked["tok"].save_pretrained(folder)
    p = checked["params"]
    hf = ex.check_hf(folder, checked["tok"], checked["samples"], checked["reference"], p.export.tolerance["q8_0"],
                     p.export.max_new_tokens)
    assert not hf["within_tolerance"] and hf["max_logprob_diff"] > p.export.tolerance["q8_0"].max_logprob_diff


def test_a_failing_export_exits_2_and_leaves_no_model(exported, tmp_path, monkeypatch, capsys):
    """A tolerance nothing can meet: the stage writes its report, removes models/final and names the failure."""
    root = tmp_path / "ws"
    shutil.copytree(exported, root, ignore=shutil.ignore_patterns("final"))
    (root / "params.yaml").write_text(yaml.safe_dump({
        "paths": {**PATHS, "final": "models/final"},
        "generate": {"persona": {"name": "Vex", "description": "Cold and brief."}, "categories": ["a"]},
        "export": {"samples": 1, "max_new_tokens": 4, "gguf": [],
                   "tolerance": {"float32": {"max_logprob_diff": 1e-12, "min_margin": 0.0}}}}))
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", ["stages.export"])
    with pytest.raises(SystemExit) as exit_:
        run_main(ex.main)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "export check failed" in err and "hf-float32" in err
    assert not (root / "models" / "final").exists() and not report(root)["passed"]


def test_every_gguf_type_needs_a_tolerance():
    with pytest.raises(ValueError, match="export.tolerance has no entry"):
        parse_params({"paths": {}, "generate": {"persona": {"name": "a", "description": "b"}, "categories": ["x"]},
                      "export": {"gguf": ["q8_0"], "tolerance": {"f16": {"max_logprob_diff": 1, "min_margin": 0}}}})


# --------------------------------------------------------------------------- the Ollama Modelfile


def go_template(template: str, data: dict) -> str:
    """A small renderer for the part of Go's text/template that the Modelfile templates use: text, `{{ .Field }}`,
    `{{ range .Messages }}...{{ end }}`, `{{ if eq .Role "x" }}...{{ else if ... }}...{{ else }}...{{ end }}`,
    with `{{-` / `-}}` whitespace trimming."""
    tokens = re.split(r"({{-?\s*.*?\s*-?}})", template)
    parts: list[tuple[str, str]] = []
    for i, tok in enumerate(tokens):
        if tok.startswith("{{"):
            if tok.startswith("{{-") and parts and parts[-1][0] == "text":
                parts[-1] = ("text", parts[-1][1].rstrip())
            parts.append(("action", tok.strip("{}-").strip()))
            if tok.endswith("-}}") and i + 1 < len(tokens):
                tokens[i + 1] = tokens[i + 1].lstrip()
        elif tok:
            parts.append(("text", tok))

    def value(expr: str, scope: dict) -> object:
        if expr.startswith('"'):
            return expr.strip('"')
        if expr.startswith("$."):
            return data[expr[2:]]
        return scope[expr.lstrip(".")]

    def truth(cond: str, scope: dict) -> bool:
        if cond.startswith("eq "):
            a, b = re.findall(r'"[^"]*"|\S+', cond[3:])
            return value(a, scope) == value(b, scope)
        return bool(value(cond, scope))

    def block(pos: int, scope: dict, out: list[str]) -> tuple[int, str]:
        """Render from pos until an end/else at this depth; returns (position of it, its action)."""
        while pos < len(parts):
            kind, body = parts[pos]
            if kind == "text":
                out.append(body)
            elif body == "end" or body.startswith("else"):
                return pos, body
            elif body.startswith("range "):
                items = value(body[6:].strip(), scope)
                end = pos
                for item in items:
                    end, _ = block(pos + 1, item, out)
                if not items:
                    end, _ = block(pos + 1, scope, [])
                pos = end
            elif body.startswith("if "):
                pos = branches(pos, body[3:].strip(), scope, out)
            else:
                out.append(str(value(body, scope)))
            pos += 1
        return pos, ""

    def branches(pos: int, cond: str, scope: dict, out: list[str]) -> int:
        taken = False
        while True:
            sink: list[str] = [] if taken or not truth(cond, scope) else out
            taken = taken or sink is out
            pos, stop = block(pos + 1, scope, sink)
            if stop == "end":
                return pos
            cond = stop[len("else if "):].strip() if stop.startswith("else if ") else '"x"'

    out: list[str] = []
    block(0, data, out)
    return "".join(out)


def ollama_data(messages: list[dict]) -> dict:
    """What Ollama hands the template: .Messages with Go field names."""
    return {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}


def golden_prompts() -> list[tuple[str, list[dict]]]:
    """Every golden conversation cut before each assistant turn: what the template renders at inference."""
    return [(f"{name}@{i}", conv[:i]) for name, conv in GOLDEN for i, m in enumerate(conv) if m["role"] == "assistant"]


@pytest.mark.parametrize("name", [n for n, t in TEMPLATES.items() if t.ollama])
def test_ollama_template_renders_the_jinja_prompt(name, checked):
    tok = checked["tok"]
    saved = tok.chat_template
    try:
        tok.chat_template = TEMPLATES[name].jinja
        template = ollama_template(tok)
        for label, messages in golden_prompts():
            want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            assert go_template(template, ollama_data(messages)) == want, (name, label)
    finally:
        tok.chat_template = saved


def test_modelfile_points_at_a_gguf_and_carries_template_system_and_stop(exported, checked):
    text = (exported / "models" / "final" / "Modelfile").read_text()
    fields = {k: v for k, v in re.findall(r'^(FROM|SYSTEM|TEMPLATE) """(.*?)"""', text, re.M | re.S)}
    fields["FROM"] = re.search(r"^FROM (\S+)$", text, re.M).group(1)
    assert (exported / "models" / "final" / fields["FROM"]).is_file() and fields["FROM"].endswith("q8_0.gguf")
    assert fields["SYSTEM"] == "You are Vex. Cold and brief."
    assert 'PARAMETER stop "<|eot_id|>"' in text
    for label, messages in golden_prompts():
        want = checked["tok"].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert go_template(fields["TEMPLATE"], ollama_data(messages)) == want, label


def test_go_template_renderer_is_not_lenient():
    """The renderer itself: conditionals, ranges and a wrong template giving a different prompt."""
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    t = '{{ range .Messages }}{{ if eq .Role "user" }}U:{{ .Content }}{{ else }}A:{{ .Content }}{{ end }}{{ end }}!'
    assert go_template(t, ollama_data(msgs)) == "U:aA:b!"
    assert go_template("{{- range .Messages }} {{ .Role }} {{- end }}", ollama_data(msgs)) == " user assistant"
    assert go_template(TEMPLATES["chatml"].ollama, ollama_data(msgs)) != go_template(
        TEMPLATES["llama3"].ollama.replace("{bos}", ""), ollama_data(msgs))


# --------------------------------------------------------------------------- model card and publishing


def test_model_card_has_metadata_eval_drift_recipe_and_lineage(exported):
    from huggingface_hub import ModelCard

    card = ModelCard.load(exported / "models" / "final" / "README.md")
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert "tuneforge" in card.data.tags and card.data.base_model is None  # tiny: built from scratch
    text = card.text
    assert "| dpo | 1.5 |" in text  # reports/eval.md embedded
    for name in ("hf-float32", "gguf-f16", "gguf-q8_0"):
        assert f"| {name} |" in text
    assert "beta: 0.1" in text and "provider `offline`" in text and "`models/dpo`: `0123abcd.dir`" in text
    assert "ollama create vex -f Modelfile" in text and "AutoModelForCausalLM" in text


class FakeHub:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, **kw):
        self.calls.append(("create_repo", kw))
        return f"https://huggingface.co/{kw['repo_id']}"

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", {**kw, "files": sorted(p.name for p in Path(kw["folder_path"]).iterdir())}))


def test_push_uploads_models_final(exported):
    hub = FakeHub()
    url = ex.push(exported / "models" / "final", "someone/vex", private=True, api=hub)
    assert url == "https://huggingface.co/someone/vex"
    (c1, create), (c2, upload) = hub.calls
    assert c1 == "create_repo" and create["repo_id"] == "someone/vex" and create["private"] and create["exist_ok"]
    assert c2 == "upload_folder" and Path(upload["folder_path"]) == exported / "models" / "final"
    assert {"README.md", "model.safetensors", "tokenizer.json", "vex-q8_0.gguf", "Modelfile"} <= set(upload["files"])
    assert not any("token" in k for k in upload)  # the token never passes through tuneforge


def test_push_without_a_token_names_the_fix(exported, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty login store
    with pytest.raises(ex.InputError, match="HF_TOKEN"):
        ex.push(exported / "models" / "final", "someone/vex")


def test_a_16_bit_export_still_converts_from_the_fp32_merge(exported, tmp_path):
    """export.dtype float16: the HF copy is float16 (checked against its own tolerance), and the q8_0 GGUF is
    byte-identical to the fp32 export's: it was quantized from the fp32 merge, not from the 16-bit copy."""
    from tests.export_workspace import exported as run_export

    root = tmp_path / "ws16"
    shutil.copytree(exported, root, ignore=shutil.ignore_patterns("final"))
    rep = run_export(root, dtype="float16", gguf=["q8_0"])
    assert rep["passed"] and rep["formats"]["hf-float16"]["dtype"] == "float16"
    assert rep["formats"]["hf-float16"]["max_logprob_diff"] > rep["formats"]["hf-float16"]["tolerance"]["max_logprob_diff"] / 1e4
    name = "vex-q8_0.gguf"
    assert (root / "models/final" / name).read_bytes() == (exported / "models/final" / name).read_bytes()
