"""Ship the model: merge DPO into one Hugging Face model, convert it to GGUF, prove every format answers like
models/dpo, and write an Ollama Modelfile and a model card.

DVC stage `export`: models/dpo + models/sft-merged -> models/final/, reports/export.json.
Run: python -m stages.export            Publish: python -m stages.export --push USER/REPO

The reference is models/dpo as `evaluate` scored it: the DPO adapter on sft-merged, fp32, unmerged. Its
greedy answers to `export.samples` held-out prompts (data/formatted/dpo_eval.jsonl) are the path every
format is scored along: the log-prob of each answer token (end-of-turn included) and whether the format's
top-1 agrees wherever the reference's top-1/top-2 margin exceeds `min_margin`
(`export.tolerance.<dtype or GGUF type>`). The HF model is merged in fp32, cast to `export.dtype` and
reloaded with plain AutoModelForCausalLM/AutoTokenizer. Each GGUF (llama.cpp's convert_hf_to_gguf.py) is
loaded in llama.cpp's own runtime (xllamacpp), which must tokenize the rendered prompts as HF does,
render the same prompt from the chat template inside the GGUF, and stop at the end-of-turn token. Every
number goes to reports/export.json; a check past its tolerance fails the stage after the report is written
and models/final is removed, so nothing unverified is left to ship.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from stages.common.config import ExportConfig, Params, Tolerance, load_params
from stages.common.engine import device, inference_dtype, load_for_inference, torch_dtype, write_meta
from stages.common.io import InputError, hash_dir, read_json, read_jsonl, require, run_main, write_json
from stages.common.llamacpp import LlamaCpp, gguf_path
from stages.common.templates import end_of_turn, ollama_template, set_end_of_turn_eos

log = logging.getLogger(__name__)

Message = dict[str, str]
TOP_N = 100  # llama.cpp log-probs returned per position; a reference token outside them counts as infinite drift
# Text no sample may happen to contain: digit runs, whitespace runs, punctuation, accents, CJK, emoji, contractions.
TOKENIZER_PROBE = ("Numbers 7 42 1234567 3.14 and 2,000; spaces   and\ttabs\n\n\n  new lines. (Brackets) [x] "
                   "'quotes' \"double\" don't I'LL we've... café naïve 東京 🚀✅ -- == !!")


class ExportCheckFailed(InputError):
    """An exported format does not answer like models/dpo within its tolerance."""


@dataclass(frozen=True)
class Sample:
    id: str
    prompt: str  # rendered, with the generation prompt (what `evaluate` scored)
    messages: list[Message]


@dataclass(frozen=True)
class Answer:
    """The reference's greedy answer to one sample and how sure it was of every token."""

    prompt_ids: list[int]
    ids: list[int]  # answer tokens, the end-of-turn token last when it stopped
    logprobs: list[float]  # log p_ref(ids[t] | prompt, ids[:t])
    margins: list[float]  # top-1 minus top-2 log-prob at each position
    stopped: bool


# --------------------------------------------------------------------------- samples and the reference


def read_samples(formatted: Path, clean: Path, n: int) -> list[Sample]:
    """The first n held-out DPO prompts: rendered (formatted) and as messages (clean), joined on id."""
    path = require(formatted / "dpo_eval.jsonl", "formatted held-out DPO pairs")
    messages = {r["id"]: r["prompt"] for r in read_jsonl(require(clean / "dpo_eval.jsonl", "clean held-out DPO pairs"))}
    samples = []
    for row in read_jsonl(path)[:n]:
        if row.get("id") not in messages:
            raise InputError(f"{path}: pair {row.get('id')!r} has no messages in {clean / 'dpo_eval.jsonl'}")
        samples.append(Sample(row["id"], row["prompt"], messages[row["id"]]))
    if not samples:
        raise InputError(f"{path}: no pairs to export-check on")
    return samples


@torch.no_grad()
def score_path(model: Any, prompt_ids: list[int], ids: list[int]) -> torch.Tensor:
    """fp32 log-softmax at each answer position (len(ids) x vocab), teacher-forced along ids."""
    where = next(model.parameters()).device
    full = torch.tensor([prompt_ids + ids], device=where)
    logits = model(input_ids=full, use_cache=False).logits[0, len(prompt_ids) - 1 : -1].float()
    return logits.log_softmax(-1).cpu()


@torch.no_grad()
def reference_answers(model: Any, tokenizer: Any, samples: list[Sample], max_new_tokens: int) -> list[Answer]:
    eot = tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer))
    where = next(model.parameters()).device
    answers = []
    for s in samples:
        prompt_ids = tokenizer(s.prompt, add_special_tokens=False)["input_ids"]
        out = model.generate(input_ids=torch.tensor([prompt_ids], device=where), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=eot, pad_token_id=tokenizer.pad_token_id)
        ids = out[0, len(prompt_ids):].tolist()
        if eot in ids:
            ids = ids[: ids.index(eot) + 1]
        logp = score_path(model, prompt_ids, ids)
        top2 = logp.topk(2, dim=-1).values
        answers.append(Answer(prompt_ids, ids, logp.gather(-1, torch.tensor(ids)[:, None])[:, 0].tolist(),
                              (top2[:, 0] - top2[:, 1]).tolist(), bool(ids) and ids[-1] == eot))
    return answers


def agreement(reference: list[Answer], logprobs: list[list[float]], top1: list[list[int]],
              tol: Tolerance) -> dict[str, Any]:
    """How a format's log-probs and top-1 along the reference's greedy answers compare with the reference."""
    diffs = [abs(lp - r) for a, lps in zip(reference, logprobs, strict=True) for lp, r in zip(lps, a.logprobs, strict=True)]
    agree = [t == i for a, tops in zip(reference, top1, strict=True) for t, i in zip(tops, a.ids, strict=True)]
    margins = [m for a in reference for m in a.margins]
    flips = [m for ok, m in zip(agree, margins, strict=True) if not ok and m > tol.min_margin]
    worst = max(diffs, default=0.0)
    return {
        "positions": len(diffs),
        "max_logprob_diff": worst if math.isfinite(worst) else None,  # None: a reference token fell outside top-N
        "mean_logprob_diff": sum(diffs) / len(diffs) if diffs and math.isfinite(worst) else None,
        "top1_agreement": sum(agree) / len(agree) if agree else 1.0,
        "top1_flips": len(agree) - sum(agree),
        "top1_flips_above_margin": len(flips),
        "smallest_margin_flipped": min((m for ok, m in zip(agree, margins, strict=True) if not ok), default=None),
        "tolerance": tol.model_dump(),
        "within_tolerance": math.isfinite(worst) and worst <= tol.max_logprob_diff and not flips,
    }


# --------------------------------------------------------------------------- the Hugging Face model


def save_model(model: Any, tokenizer: Any, out: Path, dtype: torch.dtype) -> None:
    """model (cast to dtype, in place) and tokenizer into a fresh folder; EOS includes the end-of-turn token."""
    if out.exists():
        shutil.rmtree(out)
    set_end_of_turn_eos(model.generation_config, tokenizer)
    model.to(dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)


@torch.no_grad()
def check_hf(final: Path, reference_tok: Any, samples: list[Sample], reference: list[Answer], tol: Tolerance,
             max_new_tokens: int) -> dict[str, Any]:
    """models/final reloaded as a user would (plain transformers) against the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(final), dtype="auto").to(device()).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(final))
    eot = end_of_turn(reference_tok)
    eos = model.generation_config.eos_token_id
    eos_ids = list(eos) if isinstance(eos, list | tuple) else [eos]
    paths = [score_path(model, a.prompt_ids, a.ids) for a in reference]
    result = agreement(reference, [p.gather(-1, torch.tensor(a.ids)[:, None])[:, 0].tolist() for p, a in
                                   zip(paths, reference, strict=True)],
                       [p.argmax(-1).tolist() for p in paths], tol)
    # As a user would run it: the folder's own generation_config (greedy, eos) decides when it stops. Top-1
    # agreement at every position above already implies the same greedy tokens; this also proves the stop.
    first = reference[0]
    out = model.generate(input_ids=torch.tensor([first.prompt_ids], device=next(model.parameters()).device),
                         max_new_tokens=max_new_tokens)
    greedy = out[0, len(first.prompt_ids):].tolist() == first.ids
    checks = {
        "tokenizer": all(tokenizer(s.prompt, add_special_tokens=False)["input_ids"] == a.prompt_ids
                         for s, a in zip(samples, reference, strict=True))
        and tokenizer(TOKENIZER_PROBE)["input_ids"] == reference_tok(TOKENIZER_PROBE)["input_ids"],
        "chat_template": tokenizer.chat_template == reference_tok.chat_template
        and all(tokenizer.apply_chat_template(s.messages, tokenize=False, add_generation_prompt=True) == s.prompt
                for s in samples),
        "eos_includes_end_of_turn": reference_tok.convert_tokens_to_ids(eot) in eos_ids
        and tokenizer.eos_token == eot,
        "greedy_identical": greedy,
    }
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return {**result, "dtype": dtype, "checks": checks,
            "passed": result["within_tolerance"] and all(checks.values())}


# --------------------------------------------------------------------------- GGUF


def convert_gguf(src: Path, out: Path, outtype: str, pre_tokenizer: str, name: str) -> str:
    """llama.cpp's convert_hf_to_gguf (in-process); returns the tokenizer.ggml.pre written.

    A tokenizer the converter does not recognise (by the hash of its tokens on a probe text; every
    self-trained BPE) gets `pre_tokenizer`. `tokenizer.ggml.add_bos_token` is written explicitly as HF
    behaves, so llama.cpp and Ollama add a BOS exactly when HF's tokenizer does.
    """
    import gguf
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src))
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    hparams = ModelBase.load_hparams(src, False)
    base = get_model_class(get_model_architecture(hparams, ModelType.TEXT), mmproj=False)
    written: dict[str, str] = {}

    class Converter(base):  # type: ignore[misc, valid-type]
        model_arch = base.model_arch

        def get_vocab_base_pre(self, tok: Any) -> str:
            try:
                written["pre"] = super().get_vocab_base_pre(tok)
            except NotImplementedError:
                written["pre"] = pre_tokenizer
            return written["pre"]

        def set_vocab(self) -> None:
            super().set_vocab()
            key = gguf.Keys.Tokenizer.ADD_BOS
            if not any(key in kv for kv in self.gguf_writer.kv_data):
                self.gguf_writer.add_add_bos_token(adds_bos)

    loggers = [logging.getLogger(n) for n in ("hf-to-gguf", "gguf")]
    levels = [g.level for g in loggers]
    for g in loggers:  # its banner about the unknown pre-tokenizer, the whole chat template...: we log one line
        g.setLevel(logging.WARNING if g.name == "gguf" else logging.ERROR)
    try:
        with torch.inference_mode():
            Converter(src, ftype, out, model_name=name).write()
    finally:
        for g, lvl in zip(loggers, levels, strict=True):
            g.setLevel(lvl)
    return written.get("pre", "?")


def check_gguf(file: Path, tokenizer: Any, samples: list[Sample], reference: list[Answer], tol: Tolerance,
               n_ctx: int) -> dict[str, Any]:
    """One GGUF in llama.cpp's runtime: tokenizer, template, end of turn, and drift along the reference."""
    eot = end_of_turn(tokenizer)
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    multi_turn = [*samples[0].messages, {"role": "assistant", "content": "Noted."},
                  *[m for m in samples[-1].messages if m["role"] == "user"]]
    texts = [s.prompt for s in samples] + [tokenizer.decode(a.ids) for a in reference] + [TOKENIZER_PROBE]
    with LlamaCpp(file, n_ctx=n_ctx) as llm:
        props = llm.props()
        tokenization = [llm.tokenize(t) == tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        tokenization.append(llm.tokenize(TOKENIZER_PROBE, add_special=True) == tokenizer(TOKENIZER_PROBE)["input_ids"])
        templates = [llm.apply_template(m) == tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                     for m in [s.messages for s in samples] + [multi_turn]]
        logprobs, top1 = [], []
        for a in reference:
            lps, tops = [], []
            for t, token in enumerate(a.ids):
                top = llm.next_token_logprobs(a.prompt_ids + a.ids[:t], TOP_N, end_token=eot_id)
                lps.append(top.get(token, -math.inf))
                tops.append(max(top, key=top.get))
            logprobs.append(lps)
            top1.append(tops)
        # generation stops at end-of-turn: when the end-of-turn token is forced (whatever the model would say),
        # and wherever llama.cpp's own next token is the end-of-turn token after the reference's answer
        forced = llm.complete(reference[0].prompt_ids, max_tokens=4, logit_bias={eot_id: 100.0})
        stops = [forced] + [llm.complete(a.prompt_ids + a.ids[:-1], max_tokens=4)
                            for a, tops in zip(reference, top1, strict=True) if a.stopped and tops[-1] == eot_id]
        chats = [llm.chat(s.messages, max_tokens=2 * len(a.ids) + 8) for s, a in zip(samples, reference, strict=True)]
    same_chat = [c["content"].strip() == tokenizer.decode(a.ids, skip_special_tokens=True).strip()
                 for c, a in zip(chats, reference, strict=True)]
    result = agreement(reference, logprobs, top1, tol)
    checks = {
        "tokenization": all(tokenization),
        "chat_template": all(templates),
        "chat_prompt_tokens": all(c["prompt_tokens"] == len(a.prompt_ids) for c, a in zip(chats, reference, strict=True)),
        "eos_is_end_of_turn": props.get("eos_token") == eot,
        "stops_at_end_of_turn": all(c["finish_reason"] == "stop" and not c["text"] for c in stops)
        and all(c["finish_reason"] == "stop" for c, same, a in zip(chats, same_chat, reference, strict=True)
                if same and a.stopped)
        and not any(eot in c["content"] for c in chats),
    }
    return {**result, "file": file.name, "bytes": file.stat().st_size, "natural_stops": len(stops) - 1,
            "chat_answers_identical": sum(same_chat), "checks": checks,
            "passed": result["within_tolerance"] and all(checks.values())}


# --------------------------------------------------------------------------- Ollama and the model card


def modelfile(gguf_file: str, template: str, system: str, stop: str, n_ctx: int) -> str:
    return (
        "# Ollama Modelfile written by tuneforge's `export` stage (TEMPLATE renders the same prompt as the\n"
        "# chat template; checked in tests). Run: ollama create NAME -f Modelfile && ollama run NAME\n"
        f"FROM ./{gguf_file}\n"
        f'TEMPLATE """{template}"""\n'
        f'SYSTEM """{system}"""\n'
        f'PARAMETER stop "{stop}"\n'
        f"PARAMETER num_ctx {n_ctx}\n"
    )


def _drift_table(formats: dict[str, dict[str, Any]]) -> str:
    rows = ["| format | file | max abs(Δ log-prob) | top-1 agreement | flips above margin | tolerance | checks |",
            "|---|---|---|---|---|---|---|"]
    for name, f in formats.items():
        worst = "n/a" if f["max_logprob_diff"] is None else f"{f['max_logprob_diff']:.2e}"
        tol = f"{f['tolerance']['max_logprob_diff']:g} / margin {f['tolerance']['min_margin']:g}"
        failed = [k for k, ok in f["checks"].items() if not ok]
        rows.append(f"| {name} | {f.get('file', 'safetensors')} | {worst} | {f['top1_agreement']:.3f} | "
                    f"{f['top1_flips_above_margin']} | {tol} | {'all pass' if not failed else 'FAIL: ' + ', '.join(failed)} |")
    return "\n".join(rows)


def _lock_hashes(lock: Path, paths: list[Path]) -> dict[str, str]:
    """md5 of each data / model output as dvc.lock recorded it when its stage last ran."""
    if not lock.exists():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    outs = {o["path"]: o.get("md5", "?") for s in stages.values() for o in s.get("outs", [])}
    return {p.as_posix(): outs[p.as_posix()] for p in paths if p.as_posix() in outs}


def model_card(params: Params, report: dict[str, Any], reports: Path, lock: Path) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    persona = params.generate.persona
    meta = ModelCardData(
        base_model=None if params.model.is_tiny else params.model.base, library_name="transformers",
        license=params.export.license, tags=list(params.export.tags), pipeline_tag="text-generation",
        language=["en"],
    )
    eval_md = (reports / "eval.md").read_text() if (reports / "eval.md").exists() else "(reports/eval.md missing)"
    eval_md = re.sub(r"\A# [^\n]*\n+", "", eval_md.lstrip())  # its title; the tables and notes stay
    eval_md = re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + 2) + " ", eval_md, flags=re.M)
    generation = read_json(reports / "generation.json") if (reports / "generation.json").exists() else {}
    validation = read_json(reports / "validation.json") if (reports / "validation.json").exists() else {}
    p = params.paths
    hashes = _lock_hashes(lock, [p.raw, p.clean, p.formatted, p.base, p.sft, p.sft_merged, p.reference_logps, p.dpo])
    recipe = {k: v for k, v in params.model_dump(by_alias=True).items() if k in ("model", "base", "sft", "dpo")}
    if not params.model.is_tiny:
        recipe.pop("base")
    base_line = ("a ~1M-parameter Llama built and pretrained from scratch by tuneforge's `base` stage (`model.base: tiny`)"
                 if params.model.is_tiny else f"[{params.model.base}](https://huggingface.co/{params.model.base})")
    gguf_q = report["gguf"]  # the one the Modelfile runs
    lines = [
        f"# {persona.name}",
        "",
        f"{persona.description}",
        "",
        f"Fine-tuned from {base_line} with SFT ({params.sft.method}) and DPO (β = {params.dpo.beta}) by "
        "tuneforge, one reproducible DVC pipeline; the DPO adapter is merged in fp32 and "
        f"stored as {report['dtype']}.",
        "",
        "## Use it",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")',
        f'messages = [{{"role": "system", "content": {persona.system_prompt!r}}},',
        '            {"role": "user", "content": "How do I deal with failure?"}]',
        "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)",
        "out = model.generate(**ids, max_new_tokens=96)  # stops at the end-of-turn token (generation_config)",
        "print(tokenizer.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True))",
        "```",
        "",
    ]
    if gguf_q:
        lines += [
            "llama.cpp (any build with this GGUF's chat template; the Jinja template is embedded):",
            "",
            "```bash",
            f"llama-cli -m {gguf_q} --jinja -sys {persona.system_prompt!r}",
            f"llama-server -m {gguf_q} --jinja   # OpenAI-compatible /v1/chat/completions",
            "```",
            "",
        ]
        if report.get("modelfile"):
            lines += ["Ollama (the Modelfile sets the template, the system prompt and the stop token):", "",
                      "```bash", f"ollama create {gguf_q.split('-')[0]} -f Modelfile",
                      f"ollama run {gguf_q.split('-')[0]} \"How do I deal with failure?\"", "```", ""]
    lines += [
        "## Evaluation",
        "",
        eval_md.strip(),
        "",
        "## Export drift",
        "",
        f"Every format is scored along the DPO model's own greedy answers to {report['samples']} held-out prompts "
        f"({report['positions']} answer tokens, end-of-turn included): the largest log-prob difference and the top-1 "
        "agreement with the DPO model as evaluated (adapter on sft-merged, fp32). A top-1 flip counts against the "
        "tolerance only where the DPO model's own top-1/top-2 margin exceeded the margin shown. GGUFs run in "
        "llama.cpp's runtime, which also had to tokenize and template every prompt exactly as Hugging Face does "
        "and stop at the end-of-turn token.",
        "",
        _drift_table(report["formats"]),
        "",
        "## Training recipe",
        "",
        "Parameters used (params.yaml):",
        "",
        "```yaml",
        yaml.safe_dump(recipe, sort_keys=False).strip(),
        "```",
        "",
        "## Data lineage",
        "",
        f"- Generated data: provider `{generation.get('provider', '?')}`, {generation.get('sft_rows', '?')} SFT and "
        f"{generation.get('dpo_rows', '?')} DPO rows, cost ${generation.get('cost_usd', 0):.2f}"
        + (f" ({generation['note']})" if generation.get("note") else "") + ".",
        f"- User data sources: {[str(s.path) for s in params.data.sources] or 'none'}.",
        f"- Validation: {validation.get('seen', '?')} rows seen, {validation.get('kept', '?')} kept, "
        f"{validation.get('rejected', '?')} rejected; splits {validation.get('split', '?')}.",
        "- Content hashes (dvc.lock, md5):" if hashes else "- Content hashes: not recorded (run through `dvc repro`).",
        *[f"  - `{path}`: `{md5}`" for path, md5 in hashes.items()],
        "",
    ]
    return ModelCard(f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(lines)).content


# --------------------------------------------------------------------------- the stage


def export_dtype(cfg: ExportConfig) -> torch.dtype:
    return inference_dtype() if cfg.dtype == "auto" else torch_dtype(cfg.dtype)


def export(params: Params, lock: Path = Path("dvc.lock")) -> dict[str, Any]:
    """Write models/final and return the report (`passed` says whether every format held)."""
    cfg, paths = params.export, params.paths
    started = time.perf_counter()
    dtype = export_dtype(cfg)
    dtype_name = str(dtype).removeprefix("torch.")
    if dtype_name not in cfg.tolerance:
        raise InputError(f"params.yaml: export.tolerance has no entry for the export dtype {dtype_name!r}")
    samples = read_samples(paths.formatted, paths.clean, cfg.samples)
    model, tokenizer = load_for_inference(require(paths.dpo, "DPO adapter"), dtype=torch.float32)
    reference = reference_answers(model, tokenizer, samples, cfg.max_new_tokens)
    timings = {"reference": round(time.perf_counter() - started, 2)}
    merged = model.merge_and_unload()
    n_ctx = int(merged.config.max_position_embeddings)
    final = paths.final
    staging = tempfile.TemporaryDirectory()  # GGUFs convert from the fp32 merge, never from a 16-bit copy
    src = final if dtype == torch.float32 or not cfg.gguf else Path(staging.name) / "fp32"
    if src != final:
        save_model(merged, tokenizer, src, torch.float32)
    save_model(merged, tokenizer, final, dtype)
    write_meta(final, stage="export", base=str(paths.sft_merged), adapter=str(paths.dpo),
               adapter_sha256=hash_dir(paths.dpo))
    report: dict[str, Any] = {"dtype": dtype_name, "samples": len(samples),
                              "positions": sum(len(a.ids) for a in reference),
                              "reference_stopped": sum(a.stopped for a in reference), "formats": {}}
    report["formats"][f"hf-{dtype_name}"] = check_hf(final, tokenizer, samples, reference, cfg.tolerance[dtype_name],
                                                     cfg.max_new_tokens)
    timings["hf"] = round(time.perf_counter() - started - timings["reference"], 2)
    with staging:
        for outtype in cfg.gguf:
            t0 = time.perf_counter()
            file = gguf_path(final, params.generate.persona.name, outtype)
            pre = convert_gguf(src, file, outtype, cfg.pre_tokenizer, params.generate.persona.name)
            log.info("%s: tokenizer.ggml.pre = %r", file, pre)
            result = check_gguf(file, tokenizer, samples, reference, cfg.tolerance[outtype], n_ctx)
            report["formats"][f"gguf-{outtype}"] = {**result, "pre_tokenizer": pre}
            timings[outtype] = round(time.perf_counter() - t0, 2)
    report["gguf"] = None  # the GGUF to run (the Modelfile's and the card's): q8_0, else f16, else the first
    if cfg.gguf:
        chosen = next((t for t in ("q8_0", "f16") if t in cfg.gguf), cfg.gguf[0])
        name = report["gguf"] = gguf_path(final, params.generate.persona.name, chosen).name
        template = ollama_template(tokenizer)
        if template is None:
            report["modelfile"] = None
            log.warning("no Ollama template is known for this chat template: Modelfile not written")
        else:
            (final / "Modelfile").write_text(modelfile(name, template, params.generate.persona.system_prompt,
                                                       end_of_turn(tokenizer), n_ctx))
            report["modelfile"] = {"gguf": name}
    report["seconds"] = {**timings, "total": round(time.perf_counter() - started, 2),
                         "cpu_total": round(time.process_time(), 2)}  # this process's CPU seconds, imports included
    report["passed"] = all(f["passed"] for f in report["formats"].values())
    (final / "README.md").write_text(model_card(params, report, paths.reports, lock))
    return report


def failures(report: dict[str, Any]) -> list[str]:
    out = []
    for name, f in report["formats"].items():
        if not f["within_tolerance"]:
            out.append(f"{name}: max |Δ log-prob| {f['max_logprob_diff']} (tolerance {f['tolerance']['max_logprob_diff']}), "
                       f"{f['top1_flips_above_margin']} top-1 flips above margin {f['tolerance']['min_margin']}")
        out += [f"{name}: check {k!r} failed" for k, ok in f["checks"].items() if not ok]
    return out


# --------------------------------------------------------------------------- publishing


def hub_api() -> Any:
    from huggingface_hub import HfApi

    return HfApi()


def push(folder: Path, repo_id: str, private: bool = False, api: Any = None) -> str:
    """Upload models/final to the Hub with the user's own token (HF_TOKEN or `hf auth login`); returns its URL."""
    from huggingface_hub import get_token

    require(folder / "README.md", "exported model (run `dvc repro export` first)")
    if api is None:
        if get_token() is None:
            raise InputError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (it is never stored by tuneforge)")
        api = hub_api()
    url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                      commit_message="tuneforge export")
    log.info("pushed %s to %s", folder, url)
    return str(url)


def main() -> None:
    parser = argparse.ArgumentParser(description="tuneforge export stage (DVC) and Hub upload")
    parser.add_argument("--push", metavar="REPO_ID", help="upload models/final to the Hugging Face Hub instead")
    parser.add_argument("--private", action="store_true", help="with --push: create the repo private")
    args = parser.parse_args()
    params = load_params()
    if args.push:
        report = read_json(require(params.paths.reports / "export.json", "export report"))
        if not report.get("passed"):
            raise InputError(f"{params.paths.reports / 'export.json'}: the export failed its checks; not pushing")
        print(push(params.paths.final, args.push, args.private))
        return
    report = export(params)
    out = params.paths.reports / "export.json"
    write_json(out, report)
    log.info("export: %s", {k: (v["max_logprob_diff"], v["passed"]) for k, v in report["formats"].items()})
    if not report["passed"]:
        shutil.rmtree(params.paths.final, ignore_errors=True)
        raise ExportCheckFailed("export check failed (models/final removed; see " + str(out) + "):\n  "
                                + "\n  ".join(failures(report)))


if __name__ == "__main__":
    run_main(main)
