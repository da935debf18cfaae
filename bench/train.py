"""Benchmark training: SFT throughput of the `sft` stage vs a plain TRL script, packing, peak memory by method,
and DPO peak memory with and without stored reference log-probs.

Run: python bench/train.py [--workspace DIR] [--sft-count 240] [--repeats 2] [--engines transformers,unsloth]
                           [--only throughput,packing,rss,dpo] [--size tiny|medium] [--out reports/bench_train.json]

The workspace (a params.yaml + models/base + data/formatted, plus sft-merged and data/reference_logps for the DPO
part) is built once with the pipeline's own stages, offline, and reused on later runs. Every measurement
runs in its own child process, back to back: throughput = non-padding training tokens / trainer.train()
wall time, over one epoch of the same rows with the same batch size (so both sides train the same steps on
the same tokens); peak RSS = the child's ru_maxrss (and peak CUDA memory where there is a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH = 8
TRAINER = {"per_device_train_batch_size": BATCH, "gradient_accumulation_steps": 1, "num_train_epochs": 1,
           "learning_rate": 2e-3, "lr_scheduler_type": "constant", "warmup_steps": 0, "eval_strategy": "no",
           "save_strategy": "no", "logging_steps": 10, "seed": 3407, "load_best_model_at_end": False,
           "packing": False}
SIZES = {  # `medium` makes memory differences between methods visible above the ~1 GB of imported libraries
    "tiny": {},
    "medium": {"hidden_size": 512, "intermediate_size": 1408, "num_layers": 8, "num_heads": 8, "num_kv_heads": 4,
               "corpus_size": 60, "epochs": 0.05},
}


# ---------------------------------------------------------------------------------------------- workspace

def child_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TUNEFORGE_LOG_LEVEL": "WARNING", "TQDM_DISABLE": "1"}
    env.pop("ANTHROPIC_API_KEY", None)
    return env


def stage(workspace: Path, name: str) -> None:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=workspace, env=child_env(),
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"stage {name} failed in {workspace}:\n{proc.stderr[-3000:]}")
    print(f"  built {name} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)


def prepare(workspace: Path, sft_count: int, size: str, dpo: bool) -> None:
    """params.yaml + the stages' own outputs up to data/formatted (and sft-merged + data/reference_logps for DPO)."""
    from stages.common.config import deep_merge

    workspace.mkdir(parents=True, exist_ok=True)
    params = workspace / "params.yaml"
    if not params.exists():
        data = deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()), {
            "base": {**SIZES[size]},
            "generate": {"provider": "offline", "sft_count": sft_count, "dpo_count": 48},
            "validate": {"eval_fraction": 0.1},
            "sft": {"method": "lora", "engine": "transformers", "trainer": {**TRAINER, "max_steps": 4}},
            "dpo": {"trainer": {"max_steps": 4, "eval_strategy": "no", "save_strategy": "no"}},
        })
        persona = data["generate"]["persona"]  # the repo's register file, from outside the repo
        if persona.get("offline") and not Path(persona["offline"]).is_absolute():
            persona["offline"] = str(ROOT / persona["offline"])
        params.write_text(yaml.safe_dump(data, sort_keys=False))
    wanted = ["base", "generate", "validate", "format"] + (["sft", "merge", "reference"] if dpo else [])
    done = {"base": "models/base/config.json", "generate": "data/raw/dpo.jsonl",
            "validate": "data/clean/sft_train.jsonl", "format": "data/formatted/sft_train.jsonl",
            "sft": "models/sft/adapter_config.json", "merge": "models/sft-merged/config.json",
            "reference": "data/reference_logps/tuneforge.json"}
    for name in wanted:
        if not (workspace / done[name]).exists():
            stage(workspace, name)


# ---------------------------------------------------------------------------------------------- children

def peak() -> dict[str, float]:
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    import torch

    if torch.cuda.is_available():
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def non_padding_tokens(path: Path) -> int:
    return sum(len(json.loads(line)["input_ids"]) for line in path.open() if line.strip())


def final_train_loss(live: Path) -> float | None:
    """The last training loss DVCLive logged for a stage run (its metrics.json)."""
    return json.loads((live / "metrics.json").read_text()).get("train", {}).get("loss")


def child_sft_stage(args: argparse.Namespace) -> dict[str, Any]:
    """The `sft` stage's own function, with the benchmark's trainer settings."""
    from stages.common.config import load_params
    from stages.sft import sft

    params = load_params()
    out = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    trainer = {**TRAINER, "packing": args.packing}
    if args.max_steps:
        trainer["max_steps"] = args.max_steps
    cfg = params.sft.model_copy(update={"method": args.method, "engine": args.engine, "trainer": trainer})
    paths = params.paths.model_copy(update={"sft": out / "sft", "checkpoints": out / "ckpt", "reports": out,
                                            "dvclive": out / "dvclive", "tensorboard": out / "runs"})
    started = time.perf_counter()
    report = sft(cfg, params.model, paths)  # with the stage's default tracker (DVCLive): its cost is counted
    wall = time.perf_counter() - started
    final_loss = final_train_loss(out / "dvclive" / "sft")
    shutil.rmtree(out, ignore_errors=True)
    out = {"train_s": report["runtime_s"], "wall_s": round(wall, 2), "engine": report["engine"],
           "packing": report.get("packing"), "final_loss": final_loss, **peak()}
    if not args.max_steps:  # a whole epoch: every non-padding token of the training rows
        tokens = non_padding_tokens(params.paths.formatted / "sft_train.jsonl")
        out |= {"tokens": tokens, "tokens_per_s": round(tokens / report["runtime_s"], 1)}
    return out


def child_sft_trl(args: argparse.Namespace) -> dict[str, Any]:
    """What a user writes with plain transformers + peft + TRL: same model, rows, LoRA, batch and steps."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from stages.common.config import load_params
    from stages.common.engine import use_torch_logprob_without_cuda

    params = load_params()
    started = time.perf_counter()
    cpu = not torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(str(params.paths.base), dtype=torch.float32 if cpu else "auto")
    lora = params.sft.lora
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    if cpu:
        use_torch_logprob_without_cuda()  # TRL's Triton LM-head kernel has no CPU driver
    tokenizer = AutoTokenizer.from_pretrained(str(params.paths.formatted / "tokenizer"))
    rows = [json.loads(line) for line in (params.paths.formatted / "sft_train.jsonl").open() if line.strip()]
    train = Dataset.from_list([{"input_ids": r["input_ids"], "assistant_masks": r["assistant_masks"]} for r in rows])
    out = tempfile.mkdtemp(prefix="bench-trl-")
    trainer_args = {**TRAINER, "packing": args.packing}
    if args.max_steps:
        trainer_args["max_steps"] = args.max_steps
    trainer = SFTTrainer(model=model, train_dataset=train, processing_class=tokenizer,
                         args=SFTConfig(output_dir=out, max_length=params.model.max_seq_length, report_to=[],
                                        use_cpu=cpu, **trainer_args))
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    tokens = sum(len(r["input_ids"]) for r in rows)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_s": round(train_s, 2), "wall_s": round(time.perf_counter() - started, 2), "tokens": tokens,
            "tokens_per_s": round(tokens / train_s, 1), "engine": "transformers (plain TRL)", "packing": args.packing,
            "final_loss": losses[-1] if losses else None, **peak()}


def child_dpo(args: argparse.Namespace) -> dict[str, Any]:
    """The `dpo` stage with stored reference log-probs, TRL's implicit reference, or a second model copy."""
    from stages.common.config import load_params
    from stages.dpo import dpo

    params = load_params()
    out = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    cfg = params.dpo.model_copy(update={"trainer": {**params.dpo.trainer, "max_steps": args.max_steps or 8}})
    paths = params.paths.model_copy(update={"dpo": out / "dpo", "checkpoints": out / "ckpt", "reports": out,
                                            "dvclive": out / "dvclive", "tensorboard": out / "runs"})
    report = dpo(cfg, params.sft.model_copy(update={"engine": args.engine}), params.model, paths,
                 ref_logps=args.ref_logps)
    final_loss = final_train_loss(out / "dvclive" / "dpo")
    shutil.rmtree(out, ignore_errors=True)
    return {"train_s": report["runtime_s"], "final_loss": final_loss, **peak()}


CHILDREN = {"sft-stage": child_sft_stage, "sft-trl": child_sft_trl, "dpo": child_dpo}


def run_child(workspace: Path, kind: str, **opts: Any) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "child", kind]
    for k, v in opts.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.run(cmd, cwd=workspace, env=child_env(), capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(lines[-1][len("RESULT "):])


# ---------------------------------------------------------------------------------------------- report

def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    out = dict(max(ok, key=lambda r: r["tokens_per_s"]))
    out["tokens_per_s_runs"] = [r["tokens_per_s"] for r in ok]
    out["tokens_per_s_median"] = round(statistics.median(out["tokens_per_s_runs"]), 1)
    return out


def throughput(workspace: Path, engines: list[str], repeats: int, packing: bool) -> dict[str, Any]:
    """Back to back, alternating: plain TRL, then the stage on each engine, `repeats` times."""
    runs: dict[str, list[dict[str, Any]]] = {"plain TRL": []} | {f"sft stage ({e})": [] for e in engines}
    for _ in range(repeats):
        runs["plain TRL"].append(run_child(workspace, "sft-trl", packing=packing))
        for e in engines:
            runs[f"sft stage ({e})"].append(run_child(workspace, "sft-stage", engine=e, packing=packing))
    results = {name: best(r) for name, r in runs.items()}
    for name, r in results.items():  # ratio of each back-to-back pair, then the median (load changes between pairs)
        ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs[name], runs["plain TRL"], strict=True)
                  if "tokens_per_s" in a and "tokens_per_s" in b]
        if ratios:
            r["vs_plain_trl"] = round(statistics.median(ratios), 3)
            r["vs_plain_trl_pairs"] = [round(x, 3) for x in ratios]
    return results


def table(title: str, rows: dict[str, dict[str, Any]], columns: list[str]) -> str:
    lines = [f"\n{title}", "| run | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, r in rows.items():
        cells = [f"error: {r['error']}"] if "error" in r else [str(r.get(c, "")) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    child = sub.add_parser("child")
    child.add_argument("kind", choices=sorted(CHILDREN))
    child.add_argument("--method", default="lora")
    child.add_argument("--engine", default="transformers")
    child.add_argument("--packing", type=lambda s: s == "True", default=False)
    child.add_argument("--max-steps", type=int, default=0)
    child.add_argument("--ref-logps", default="stored")
    parser.add_argument("--workspace", type=Path, default=Path(tempfile.gettempdir()) / "tuneforge-bench-train")
    parser.add_argument("--sft-count", type=int, default=240)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--engines", default="transformers")
    parser.add_argument("--only", default="throughput,packing,rss,dpo")
    parser.add_argument("--rss-steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench_train.json")
    args = parser.parse_args()

    if args.cmd == "child":
        from stages.common.io import setup_logging

        setup_logging()
        print("RESULT " + json.dumps(CHILDREN[args.kind](args)), flush=True)
        return

    only = set(args.only.split(","))
    engines = args.engines.split(",")
    workspace = args.workspace.resolve()
    print(f"workspace {workspace}", file=sys.stderr)
    prepare(workspace, args.sft_count, args.size, dpo="dpo" in only)
    import torch

    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "torch_threads": torch.get_num_threads(), "size": args.size, "batch": BATCH,
        "train_rows": sum(1 for _ in (workspace / "data/formatted/sft_train.jsonl").open()),
        "command": "python bench/train.py " + " ".join(sys.argv[1:]),
    }
    cuda = ["peak_cuda_mb"] if torch.cuda.is_available() else []
    sft_rows: dict[str, dict[str, Any]] = {}  # one SFT table: throughput, packing, memory by method
    if "throughput" in only:
        results["throughput"] = throughput(workspace, engines, args.repeats, packing=False)
        sft_rows |= {f"{k}, lora, packing off": v for k, v in results["throughput"].items()}
    if "packing" in only:
        results["packing"] = throughput(workspace, engines, args.repeats, packing=True)
        sft_rows |= {f"{k}, lora, packing on": v for k, v in results["packing"].items()}
    if "rss" in only:
        results["rss"] = {e: {m: run_child(workspace, "sft-stage", method=m, engine=e, max_steps=args.rss_steps)
                              for m in ("lora", "qlora", "full", "partial")} for e in engines}
        sft_rows |= {f"sft stage ({e}), {m}, {args.rss_steps} steps": r
                     for e, by_method in results["rss"].items() for m, r in by_method.items()}
    out: list[str] = []
    if sft_rows:
        out.append(table("SFT: non-padding tokens/s over one epoch (best of repeats, median; vs plain TRL = median ratio of "
                         "back-to-back pairs), peak "
                         "memory. Packing on: TRL's padding-free packing (examples kept apart by their position ids "
                         "on sdpa / eager / flash attention)", sft_rows,
                         ["packing", "tokens_per_s", "tokens_per_s_median", "vs_plain_trl", "vs_plain_trl_pairs",
                          "train_s", "wall_s", "peak_rss_mb", *cuda]))
    if "dpo" in only:
        results["dpo"] = {f"reference {m}": run_child(workspace, "dpo", ref_logps=m, engine=engines[0])
                          for m in ("stored", "adapter", "model")}
        out.append(table("DPO (stage, 8 steps): stored reference log-probs vs TRL's implicit reference (adapter "
                         "off, a reference forward every step) vs a second reference model", results["dpo"],
                         ["peak_rss_mb", *cuda, "train_s", "final_loss"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{results['device']}, torch threads {results['torch_threads']}, model {args.size}, batch {BATCH}, "
          f"{results['train_rows']} training rows, 1 epoch" + "".join(out))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
