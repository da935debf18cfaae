"""A tiny training workspace for the training-stage tests: a 2-block Llama, a few dozen formatted rows.

`build_tiny(dest)` writes models/base and data/formatted once (a session fixture in tests/conftest.py);
`workspace(tiny, dest, overrides)` links them into a fresh folder with its own params.yaml, so each
test writes its own models/, reports/ and checkpoints/. Stages run there in-process (chdir) or as
`python -m stages.<name>` subprocesses (`run_stage`), which keeps unsloth's global patches out of the
test process.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from stages.common.config import BaseConfig, deep_merge

ROOT = Path(__file__).resolve().parents[1]

TINY_BASE = BaseConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                       num_kv_heads=1)
MAX_SEQ_LENGTH = 256

# Small and quick: 24 train rows, batch 4 -> 6 optimizer steps an epoch.
TINY_PARAMS: dict[str, Any] = {
    "model": {"max_seq_length": MAX_SEQ_LENGTH},
    "sft": {
        "engine": "transformers",
        "method": "lora",
        "trainer": {
            "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "num_train_epochs": 2,
            "learning_rate": 1.0e-2, "eval_steps": 4, "save_steps": 4, "logging_steps": 1,
            "save_total_limit": 2,
        },
    },
    "dpo": {
        "trainer": {
            "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "num_train_epochs": 2,
            "eval_steps": 4, "save_steps": 4, "logging_steps": 1, "learning_rate": 1.0e-3,
        },
    },
}


def conversations(n: int, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """n SFT conversations and n DPO pairs in the clean-data schema (persona answers vs generic ones)."""
    from stages.common import offline
    from stages.common.config import HeldoutConfig

    cfg = HeldoutConfig()
    persona, generic = offline.builtin_persona(), offline.generic_register()
    questions = offline.questions(["strategy and competition", "life advice"], n, seed, cfg)
    sft = [{"id": f"s{i}", "source": "test", "messages": [
        *([{"role": "system", "content": "Be brief."}] if i % 2 else []),
        {"role": "user", "content": q.text},
        {"role": "assistant", "content": offline.answer(persona, q, seed, cfg)[0]},
    ]} for i, q in enumerate(questions)]
    dpo = [{"id": f"d{i}", "source": "test", "prompt": [{"role": "user", "content": q.text}],
            "chosen": offline.answer(persona, q, seed, cfg)[0], "rejected": offline.answer(generic, q, seed, cfg)[0]}
           for i, q in enumerate(questions)]
    return sft, dpo


def build_tiny(dest: Path, train_rows: int = 24, eval_rows: int = 8) -> Path:
    """models/base (random-init tiny Llama + trained BPE tokenizer) and data/formatted under dest."""
    import tempfile

    import torch
    from transformers import AutoTokenizer

    from stages import base, format
    from stages.common import offline
    from stages.common.config import HeldoutConfig
    from stages.common.io import write_jsonl
    from stages.common.templates import LLAMA3

    torch.manual_seed(0)
    sft_rows, dpo_rows = conversations(train_rows + eval_rows, seed=1)
    texts = [m["content"] for r in sft_rows for m in r["messages"]] + [r["rejected"] for r in dpo_rows]
    texts += [r.text for r in offline.base_corpus(150, 0, HeldoutConfig(), offline.builtin_persona())
              if r.kind == "document"]
    tokenizer = base.build_tokenizer(texts, TINY_BASE.vocab_size, LLAMA3)
    tokenizer.model_max_length = MAX_SEQ_LENGTH
    model = base.build_model(TINY_BASE, tokenizer, MAX_SEQ_LENGTH)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(dest / "models/base")
    tokenizer.save_pretrained(dest / "models/base")

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        saved = AutoTokenizer.from_pretrained(tmp)
    clean = {"sft_train": sft_rows[:train_rows], "sft_eval": sft_rows[train_rows:],
             "dpo_train": dpo_rows[:train_rows], "dpo_eval": dpo_rows[train_rows:]}
    result = format.format_data(tokenizer, saved, clean, MAX_SEQ_LENGTH)
    out = dest / "data/formatted"
    for name, rows in result.splits.items():
        write_jsonl(out / f"{name}.jsonl", rows)
    tokenizer.save_pretrained(out / format.TOKENIZER_DIR)
    return dest


def workspace(tiny: Path, dest: Path, overrides: dict[str, Any] | None = None) -> Path:
    """A folder with the tiny base and formatted data linked in and params.yaml = the repo's + TINY_PARAMS
    + overrides; outputs (models/sft, reports, checkpoints) land inside it."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "models").mkdir(exist_ok=True)
    (dest / "data").mkdir(exist_ok=True)
    for rel in ("models/base", "data/formatted"):
        if not (dest / rel).exists():
            (dest / rel).symlink_to(tiny / rel, target_is_directory=True)
    params = deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY_PARAMS)
    params = deep_merge(params, overrides or {})
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join([str(ROOT), out.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    out.setdefault("HF_HUB_OFFLINE", "1")
    out.update(extra)
    return out


def run_stage(module: str, cwd: Path, check: bool = True, timeout: float = 600,
              **extra_env: str) -> subprocess.CompletedProcess:
    """`python -m <module>` in cwd (a workspace); stdout+stderr in .stdout; AssertionError when it fails."""
    result = subprocess.run([sys.executable, "-m", module], cwd=cwd, env=env(**extra_env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"python -m {module} failed ({result.returncode}):\n{result.stdout[-6000:]}")
    return result


def curve(live: Path, metric: str) -> dict[int, float]:
    """step -> value of one DVCLive metric (e.g. train/loss) a stage logged into its folder (paths.dvclive/<stage>)."""
    with (live / "plots" / "metrics" / f"{metric}.tsv").open() as fh:
        return {int(r["step"]): float(r[metric.rsplit("/", 1)[-1]]) for r in csv.DictReader(fh, delimiter="\t")}


def run_python(code: str, cwd: Path, timeout: float = 300) -> str:
    """Run a snippet in a fresh interpreter (no unsloth patches from this process); its stdout."""
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env(), capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"snippet failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-6000:]}")
    return result.stdout


# Loads models/sft (an adapter) onto models/base with plain transformers + peft, in a process where
# unsloth was never imported; prints one JSON line.
LOAD_ADAPTER = """
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base = AutoModelForCausalLM.from_pretrained("models/base")
model = PeftModel.from_pretrained(base, "models/sft").eval()
ids = AutoTokenizer.from_pretrained("models/sft")("Decide.", return_tensors="pt")["input_ids"]
with torch.no_grad():
    logits = model(ids).logits
assert "unsloth" not in sys.modules and "unsloth_zoo" not in sys.modules
print(json.dumps({"finite": bool(torch.isfinite(logits).all()), "shape": list(logits.shape),
                  "lora_tensors": sum("lora_" in n for n, _ in model.named_parameters())}))
"""
