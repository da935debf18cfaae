"""Shape rehearsal: every stage under presets/rehearsal-8b-shapes.yaml (Llama-3.1-8B's 128,256-token vocabulary,
2,048-token rows, QLoRA, 4-bit DPO; small hidden size and layers) on this machine, each stage's peak RSS against
the memory model's prediction (stages/common/memory.py), and the model's prediction for the real 8B on one 24, 48
and 80 GB GPU.

Run: python bench/rehearsal.py [--workspace DIR] [--out reports/rehearsal.json] [--stages base,...,evaluate]
     python bench/rehearsal.py --logit-paths [--vocab 32768 --tokens 2048]   # the logit paths alone, V x T doubled
     python bench/rehearsal.py --table-only                                  # the 8B-on-one-GPU table

Each stage runs as `python -m stages.<name>` in a workspace (params.yaml = the repo's + the preset + a few long
user conversations in data.sources, so SFT, DPO, reference, merge and evaluate see rows near 2,048 tokens); its
peak RSS is the child's ru_maxrss (os.wait4), its CPU time user + sys. The runtime term of a prediction is
measured: the peak RSS of a child that only imports what the stage imports.
`--logit-paths` builds a 1-layer model, then for (V, T), (2V, T) and (V, 2T) measures in a fresh process how much
each logit path raises the peak RSS above what the process held before it (Linux VmHWM, reset through
/proc/self/clear_refs; large allocations mmap'd so freed memory leaves RSS): pair_logprobs, perplexity, merge's
held-out comparison, TRL's LM head on CPU (engine.TorchLogProb, forward + backward), and, as the control that
shows the measurement sees logits, one full-vocabulary log-softmax of the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.common import memory  # noqa: E402
from stages.common.config import deep_merge  # noqa: E402

PRESET = ROOT / "presets" / "rehearsal-8b-shapes.yaml"
STAGES = ("base", "generate", "validate", "format", "sft", "merge", "reference", "dpo", "evaluate", "export")
MODEL_STAGES = ("sft", "merge", "reference", "dpo", "evaluate", "export")
HEAVY_IMPORTS = "import torch, transformers, peft, trl, datasets, accelerate, bitsandbytes, stages.common.engine"
STAGE_IMPORTS = {"base": "import torch; from transformers import Trainer; import stages.base",
                 "generate": "import stages.generate",
                 "validate": "import torch; from transformers import AutoTokenizer; import stages.validate",
                 "format": "import torch; from transformers import AutoTokenizer; import stages.format"}
TOKENIZER_STAGES = ("base", "validate", "format", *MODEL_STAGES)  # they load (or build) the tokenizer


# ---------------------------------------------------------------------------------------------- workspace

def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("ANTHROPIC_API_KEY", None)
    env.update(extra)
    return env


def long_conversations(n_sft: int, n_dpo: int, words: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Multi-turn conversations of about `words` words in the persona's style (user files, `openai` and
    `preference` formats): each turn carries its own seeded notes, so no two conversations are near-duplicates."""
    from stages.common import offline
    from stages.common.config import HeldoutConfig

    cfg = HeldoutConfig()
    persona, generic = offline.builtin_persona(), offline.generic_register()
    rng = random.Random(seed)
    # training subtopics and frames only: these rows go to train and eval, and must not contaminate heldout
    questions = offline.questions(list(offline.SUBTOPICS), 400, seed, cfg, include_heldout=False)
    vocab = sorted({w for t in offline.sample_answers(persona, 200, seed, cfg) for w in t.split()})

    def turns(k: int, budget: int) -> list[dict[str, str]]:
        out, used = [], 0
        while used < budget:
            q = questions[(k * 97 + len(out)) % len(questions)]
            notes = " ".join(rng.choice(vocab) for _ in range(90))
            answer = offline.answer(persona, q, seed + k * 31 + len(out), cfg)[0]
            out += [{"role": "user", "content": f"Notes {k}.{len(out)}: {notes}\n{q.text}"},
                    {"role": "assistant", "content": answer}]
            used += 90 + len(q.text.split()) + len(answer.split())
        return out

    sft = [{"id": f"long-sft-{k}", "messages": turns(k, words)} for k in range(n_sft)]
    dpo = []
    for k in range(n_dpo):
        conv = turns(1000 + k, words)
        q = questions[(k * 13 + 7) % len(questions)]
        dpo.append({"id": f"long-dpo-{k}", "prompt": [*conv[:-1]], "chosen": offline.answer(persona, q, k, cfg)[0],
                    "rejected": offline.answer(generic, q, k, cfg)[0]})
    return sft, dpo


def prepare(workspace: Path, overrides: dict[str, Any] | None = None, long_rows: tuple[int, int] = (8, 8),
            words: int = 650, preset: Path = PRESET) -> dict[str, Any]:
    """params.yaml (repo + preset + long user files + overrides) and data/user/ in `workspace`."""
    workspace.mkdir(parents=True, exist_ok=True)
    sft, dpo = long_conversations(*long_rows, words=words, seed=7)
    user = workspace / "data" / "user"
    user.mkdir(parents=True, exist_ok=True)
    for name, rows in (("long_sft.jsonl", sft), ("long_dpo.jsonl", dpo)):
        (user / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()), yaml.safe_load(preset.read_text()))
    params = deep_merge(params, {"data": {"sources": [
        {"path": "data/user/long_sft.jsonl", "kind": "sft", "format": "openai"},
        {"path": "data/user/long_dpo.jsonl", "kind": "dpo", "format": "preference"}]}})
    params = deep_merge(params, overrides or {})
    persona = params.get("generate", {}).get("persona", {})
    if persona.get("offline") and not Path(persona["offline"]).is_absolute():  # the repo's register files
        persona["offline"] = str(ROOT / persona["offline"])
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def run_child(cmd: list[str], cwd: Path, log: Path | None = None) -> dict[str, Any]:
    """Run a child to the end; its own peak RSS (os.wait4's rusage), wall time and CPU time."""
    out = log.open("w") if log else subprocess.DEVNULL
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=child_env(), stdout=out, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if log:
        out.close()
    return {"returncode": proc.returncode, "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "wall_s": round(time.perf_counter() - started, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}


def import_baseline(code: str, cwd: Path) -> float:
    """Peak RSS (bytes) of a process that only runs `code` (the imports a stage makes)."""
    return run_child([sys.executable, "-c", code], cwd)["peak_rss_mb"] * memory.MiB


# ---------------------------------------------------------------------------------------------- predictions

def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.open() if line.strip()]


def workspace_shape(workspace: Path, params: dict[str, Any]) -> memory.ModelShape:
    """The shape of the base model the workspace trains (the tiny one built by `base`, or the hub / local base)."""
    from stages.common.base_ref import base_model_id
    from stages.common.config import parse_params

    cwd = Path.cwd()
    os.chdir(workspace)  # base_ref.json may name the base relative to the workspace
    try:
        weights = Path(base_model_id(parse_params(params).paths.base)).resolve()
    finally:
        os.chdir(cwd)
    return memory.ModelShape.from_config(json.loads((weights / "config.json").read_text()))


def predictions(workspace: Path, params: dict[str, Any], runtime: float, device: str = "cpu") -> dict[str, memory.Prediction]:
    """The memory model's peak for every model stage of this workspace, from its model shape, params and data
    (on CUDA: device memory, 16-bit compute, without the host-side runtime)."""
    from transformers import AutoTokenizer

    from stages.common.config import parse_params
    from stages.common.engine import resolve_engine
    from stages.common.logprobs import encode_pairs

    p = parse_params(params)
    shape = workspace_shape(workspace, params)
    dtype = "bfloat16" if device == "cuda" else "float32"
    runtime = memory.runtime_bytes(device, runtime)
    fmt = workspace / p.paths.formatted
    tok = AutoTokenizer.from_pretrained(fmt / "tokenizer")
    max_len = p.model.max_seq_length
    out: dict[str, memory.Prediction] = {}

    # base: the tiny pretraining, batches of base.batch_size rows padded to the longest
    from stages.common import offline

    register = offline.load_register(p.generate.persona.offline) if p.generate.persona.offline else None
    rows = offline.base_corpus(p.base.corpus_size, p.base.seed, p.heldout, register, p.base.documents)
    corpus = [tok.apply_chat_template(r.messages, tokenize=False) if r.kind == "chat" else r.text for r in rows]
    width = min(max_len, max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in corpus))
    if p.model.is_tiny:
        out["base"] = memory.pretrain(shape, rows=p.base.batch_size, width=width, runtime=runtime)

    sft_train = [len(r["input_ids"]) for r in _jsonl(fmt / "sft_train.jsonl")]
    trainer = p.sft.trainer
    rows = trainer.get("per_device_train_batch_size", 8)
    tokens = rows * (max_len if trainer.get("packing") else min(max_len, max(sft_train)))
    out["sft"] = memory.training("sft", shape, method=p.sft.method, dtype=dtype, tokens=tokens, device=device,
                                 engine=resolve_engine(p.sft.engine),
                                 lora_r=p.sft.lora.r, lora_targets=p.sft.lora.target_modules,
                                 gradient_checkpointing=p.sft.gradient_checkpointing,
                                 double_quant=p.sft.quantization.double_quant, runtime=runtime)

    held = sorted((len(r["input_ids"]) for r in _jsonl(fmt / "sft_eval.jsonl")[: p.merge.held_out]), reverse=True)
    batch = memory.rows_for_tokens(held, p.merge.tokens_per_batch, p.merge.batch_size)
    batch_tokens = max(n * held[sum(batch[:i])] for i, n in enumerate(batch))
    merge_dtype = dtype if p.merge.dtype == "auto" else p.merge.dtype
    out["merge"] = memory.merge(shape, dtype=merge_dtype, device=device, held_out_tokens=sum(held),
                                batch_tokens=batch_tokens, lora_params=shape.lora_params(p.sft.lora.r,
                                                                                          p.sft.lora.target_modules),
                                qlora=p.sft.method == "qlora", compute_dtype=dtype, runtime=runtime)

    pairs = _jsonl(fmt / "dpo_train.jsonl") + _jsonl(fmt / "dpo_eval.jsonl")
    prompts = [r["prompt"] for r in pairs]
    chosen = encode_pairs(tok, prompts, [r["chosen"] for r in pairs])
    rejected = encode_pairs(tok, prompts, [r["rejected"] for r in pairs])
    widths = sorted((min(max_len, max(len(c.input_ids), len(r.input_ids))) for c, r in zip(chosen, rejected,
                                                                                          strict=True)), reverse=True)
    four_bit = p.dpo.quantization == "nf4" or (p.dpo.quantization == "auto" and p.sft.method == "qlora")
    ref_rows = memory.rows_within(p.reference.tokens_per_batch, 2 * max_len, p.reference.batch_size)
    lora8 = shape.lora_params(p.dpo.lora.r, p.dpo.lora.target_modules)
    out["reference"] = memory.reference(shape, dtype=dtype, device=device, batch_tokens=2 * ref_rows * widths[0],
                                        four_bit=four_bit, lora_params=lora8, runtime=runtime)
    dpo_rows = p.dpo.trainer.get("per_device_train_batch_size", 8)
    out["dpo"] = memory.training("dpo", shape, method="qlora" if four_bit else "lora", dtype=dtype,
                                 tokens=2 * dpo_rows * widths[0], device=device, lora_r=p.dpo.lora.r,
                                 engine=resolve_engine(p.sft.engine),
                                 lora_targets=p.dpo.lora.target_modules,
                                 gradient_checkpointing=p.dpo.gradient_checkpointing, runtime=runtime)

    ev = p.evaluate
    eval_pairs = [r for split in ("dpo_eval", "dpo_heldout") if (fmt / f"{split}.jsonl").exists()  # both splits
                  for r in _jsonl(fmt / f"{split}.jsonl")[: ev.max_pairs]]
    enc = [encode_pairs(tok, [r["prompt"]], [r["chosen"]])[0] for r in eval_pairs]
    pw = sorted((len(e.input_ids) for e in enc), reverse=True)
    pair_tokens = max(n * pw[sum(b[:i])] for b in [memory.rows_for_tokens(pw, ev.tokens_per_batch, ev.batch_size)]
                      for i, n in enumerate(b))
    gen_width = max(len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) for r in eval_pairs) + ev.max_new_tokens
    gen_tokens = memory.rows_within(ev.tokens_per_batch, gen_width, ev.batch_size) * gen_width if ev.samples else 0
    out["evaluate"] = memory.evaluate(shape, dtype=dtype, device=device, pair_tokens=pair_tokens,
                                      generate_tokens=gen_tokens, lora_params=lora8, runtime=runtime)

    ex = p.export  # greedy answers to the first export.samples prompts of formatted dpo_eval, one at a time
    prompts_ex = _jsonl(fmt / "dpo_eval.jsonl")[: ex.samples]
    ex_tokens = max(len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) for r in prompts_ex) + ex.max_new_tokens
    ex_dtype = dtype if ex.dtype == "auto" else ex.dtype
    out["export"] = memory.export(shape, dtype=ex_dtype, device=device, tokens=ex_tokens, lora_params=lora8,
                                  runtime=runtime)
    return out


# ---------------------------------------------------------------------------------------------- logit paths

LOGIT_CHILD = r'''
import gc, json, re, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from stages import merge as mg
from stages.common.engine import TorchLogProb
from stages.common.logprobs import Encoded, masked_logprobs, pair_logprobs

vocab, tokens = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
torch.set_num_threads(2)
model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192)).eval()
rows, width = 4, tokens // 4
ids = torch.randint(1, vocab, (rows, width))

class Ids:  # a tokenizer over space-separated ids, so any vocabulary size needs no trained tokenizer
    pad_token_id = 0
    def __call__(self, texts, **kw):
        return {"input_ids": [[int(t) for t in s.split()] for s in texts]}

def text(seq):
    return " ".join(map(str, seq.tolist())) + " "

prompt_len = width // 8
prompts = [text(r[:prompt_len]) for r in ids]
answers = [text(r[prompt_len:]) for r in ids]
seqs = [Encoded(r.tolist(), [0] * prompt_len + [1] * (width - prompt_len)) for r in ids]
data = mg.batches([{"input_ids": s.input_ids, "assistant_masks": s.mask} for s in seqs], rows, 0)
stored = mg.held_out(model, data, keep=True).stored
hidden = torch.randn(tokens, 64, requires_grad=True)
targets = torch.randint(0, vocab, (tokens,))

def kb(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))

def full_logits():  # the control: what the paths computed before they were chunked
    with torch.no_grad():
        return float(model(ids).logits.float().log_softmax(-1).max())

def torch_logprob():
    out = TorchLogProb.apply(hidden, model.lm_head.weight.detach(), None, targets, 1.0, 32768, None, 1.0,
                             ("log_probs", "entropy"))
    (out[0].sum() + out[1].sum()).backward()
    hidden.grad = None

paths = {
    "pair_logprobs": lambda: pair_logprobs(model, Ids(), prompts, answers, answers[::-1], batch_size=rows),
    "perplexity": lambda: masked_logprobs(model, seqs, batch_size=rows),
    "merge_check": lambda: mg.held_out(model, data, reference=stored),
    "trl_lm_head_cpu": torch_logprob,
    "full_logits_control": full_logits,
}
result = {}
for name, fn in paths.items():
    fn()  # warm-up: first-call allocations (thread pools, caches) are not the path's
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")
    before = kb("VmRSS")
    fn()
    result[name] = round((kb("VmHWM") - before) / 1024, 1)
print("RESULT " + json.dumps(result))
'''


def logit_path_peaks(vocab: int, tokens: int) -> dict[str, float]:
    """MB each logit path adds to the peak RSS for `tokens` scored tokens at vocabulary `vocab` (fresh process)."""
    env = child_env(MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", LOGIT_CHILD, str(vocab), str(tokens)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"logit-path child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def logit_paths(vocab: int, tokens: int) -> dict[str, dict[str, float]]:
    """The peaks at (V, T), (2V, T) and (V, 2T)."""
    return {f"V={v} T={t}": logit_path_peaks(v, t) for v, t in ((vocab, tokens), (2 * vocab, tokens),
                                                                 (vocab, 2 * tokens))}


# ---------------------------------------------------------------------------------------------- report

def table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def gpu_table() -> tuple[str, list[dict[str, Any]]]:
    rows, data = [], []
    for o in memory.recipe_options():
        p = o.prediction
        fit = ["yes" if memory.fits(p, g) else "no" for g in memory.GPUS_GB]
        rows.append([o.stage, o.settings, memory.gib(p.total), memory.gib(p.model_bytes), *fit])
        data.append({"stage": o.stage, "settings": o.settings, "predicted_gib": memory.gib(p.total),
                     "terms_gib": {k: memory.gib(v) for k, v in p.terms.items()},
                     "fits": dict(zip(map(str, memory.GPUS_GB), fit, strict=True))})
    return table(["stage", "settings", "predicted GiB", "weights GiB", *[f"{g} GB" for g in memory.GPUS_GB]],
                 rows), data


# --reduced: a handful of steps on offline data, for running a real preset (the recipe's 8B) quickly on a GPU
REDUCED: dict[str, Any] = {
    "generate": {"provider": "offline", "sft_count": 48, "dpo_count": 24},
    "sft": {"trainer": {"max_steps": 5, "eval_strategy": "no", "save_strategy": "no", "load_best_model_at_end": False,
                        "logging_steps": 1}},
    "dpo": {"trainer": {"max_steps": 5, "eval_strategy": "no", "save_strategy": "no", "logging_steps": 1}},
    "merge": {"held_out": 8},
    "evaluate": {"max_pairs": 8, "max_sft_examples": 8, "samples": 1, "style_prompts": 0, "max_new_tokens": 16,
                 "embedding": "tfidf", "gates": {"dpo_margin_above_sft": False, "sft_margin_above_base": False,
                                                  "base_margin_below_zero": False, "style_above_base": False,
                                                  "dpo_max_style_drop": None, "mention_at_least_base": False,
                                                  "dpo_max_repetition_rise": None, "sft_max_ppl_ratio": None,
                                                  "dpo_max_ppl_ratio": None, "min_dpo_accuracy": None}},
    "export": {"gguf": [], "samples": 1, "max_new_tokens": 16},
}
# On CUDA each stage reports torch's peak device memory when it exits
CUDA_STAGE = ("import atexit, runpy, sys, torch\n"
              "atexit.register(lambda: print('CUDA_PEAK', torch.cuda.max_memory_allocated(), "
              "torch.cuda.max_memory_reserved(), flush=True))\n"
              "sys.argv = ['-m']\nrunpy.run_module(sys.argv_module, run_name='__main__')")


def overrides(pairs: list[str]) -> dict[str, Any]:
    """--set a.b.c=value (value parsed as YAML) -> nested mapping."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        node = out
        *parents, leaf = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = yaml.safe_load(value)
    return out


def cuda_peak(log: Path) -> tuple[float, float] | None:
    lines = [ln.split() for ln in log.read_text().splitlines() if ln.startswith("CUDA_PEAK ")]
    return (float(lines[-1][1]), float(lines[-1][2])) if lines else None


def rehearse(args: argparse.Namespace) -> dict[str, Any]:
    """Every stage in the workspace, each in its own process; measured peaks against the memory model."""
    ws = args.workspace.resolve()
    if args.fresh and ws.exists():
        shutil.rmtree(ws)
    extra = deep_merge(REDUCED if args.reduced else {}, overrides(args.set))
    params = prepare(ws, extra, preset=args.preset)
    (ws / "logs").mkdir(exist_ok=True)
    heavy = import_baseline(HEAVY_IMPORTS, ws)
    measured: dict[str, Any] = {}
    for name in args.stages.split(","):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        log = ws / "logs" / f"{name}.log"
        cmd = [sys.executable, "-m", f"stages.{name}"]
        if args.device == "cuda":
            cmd = [sys.executable, "-c", CUDA_STAGE.replace("sys.argv_module", repr(f"stages.{name}"))]
        measured[name] = run_child(cmd, ws, log)
        if measured[name]["returncode"]:
            raise SystemExit(f"stage {name} failed: see {log}")
        if args.device == "cuda" and (peak := cuda_peak(log)):
            measured[name].update(cuda_allocated_mb=memory.mib(peak[0]), cuda_reserved_mb=memory.mib(peak[1]))
    runtime = {name: import_baseline(STAGE_IMPORTS[name], ws) if name in STAGE_IMPORTS else heavy for name in measured}
    pred = predictions(ws, params, heavy, args.device)
    vocab = workspace_shape(ws, params).vocab
    rows = []
    for name, m in measured.items():
        p = pred.get(name) or memory.Prediction(name, {}, runtime[name], "no model: imports and the tokenizer")
        if args.device == "cuda":
            if name not in pred or "cuda_reserved_mb" not in m:
                continue
            peak = m["cuda_reserved_mb"] * memory.MiB + memory.CUDA_RUNTIME_BYTES  # + the context torch does not see
        else:
            peak = m["peak_rss_mb"] * memory.MiB
            terms = {**p.terms, **({"tokenizer": memory.tokenizer_bytes(vocab)} if name in TOKENIZER_STAGES else {})}
            p = memory.Prediction(name, terms, runtime[name], p.settings)
        has_model = p.model_bytes > 0
        bound = 2.5 * p.model_bytes + p.activation_bytes
        m.update(predicted_mb=memory.mib(p.total), runtime_mb=memory.mib(p.runtime), ratio=round(peak / p.total, 2),
                 above_runtime_mb=memory.mib(peak - p.runtime), bound_mb=memory.mib(bound) if has_model else None,
                 terms_mb={k: memory.mib(v) for k, v in p.terms.items()}, settings=p.settings)
        m["within"] = 1 / 1.5 <= m["ratio"] <= 1.5 and (not has_model or peak - p.runtime <= bound)
        rows.append([name, memory.mib(peak), m["predicted_mb"], m["ratio"], m["runtime_mb"], m["above_runtime_mb"],
                     m["bound_mb"] or "", "yes" if m["within"] else "NO", m["wall_s"], m["cpu_s"], p.settings])
    measure = "CUDA peak (reserved + context) MB" if args.device == "cuda" else "peak RSS MB"
    print(f"rehearsal: {args.preset.name}, device {args.device}, {os.cpu_count()} CPUs, vocab {vocab}")
    print(table(["stage", measure, "predicted MB", "ratio", "runtime MB", "peak - runtime MB",
                 "2.5 x model + activations MB", "within", "wall s", "cpu s", "settings"], rows))
    return {"stages": measured, "preset": str(args.preset), "device": args.device, "overrides": extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=Path(tempfile.gettempdir()) / "tuneforge-rehearsal")
    parser.add_argument("--preset", type=Path, default=PRESET)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a param override (YAML)")
    parser.add_argument("--reduced", action="store_true", help="a handful of steps on offline data (REDUCED)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--fresh", action="store_true", help="delete the workspace first")
    parser.add_argument("--logit-paths", action="store_true")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "rehearsal.json")
    args = parser.parse_args()

    text, gpu = gpu_table()
    result: dict[str, Any] = {"command": "python bench/rehearsal.py " + " ".join(sys.argv[1:]), "gpu_8b": gpu}
    if args.logit_paths:
        peaks = logit_paths(args.vocab, args.tokens)
        result["logit_paths_mb"] = peaks
        names = list(next(iter(peaks.values())))
        print(table(["path", *peaks], [[n, *(peaks[k][n] for k in peaks)] for n in names]))
    elif not args.table_only:
        result |= rehearse(args)
    print("\nLlama-3.1-8B on one GPU (predicted by stages/common/memory.py):")
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
