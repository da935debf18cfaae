"""Resumable training (stages/common/training.py): run keys, checkpoint hygiene, and real kills.

The slow tests SIGKILL a running `dvc repro` (its whole process group, as an OOM killer or a lost
machine would) once the first checkpoint is on disk, run `dvc repro` again and check that it resumed
from that checkpoint and that the loss curve matches an uninterrupted run's.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from stages.common.config import TrainConfig, deep_merge, load_params
from stages.common.io import InputError
from stages.common.training import (
    checkpoint_dir,
    finish_run,
    last_checkpoint,
    launch_command,
    relaunch_distributed,
    run_key,
    trl_config,
)
from tests.repo import REDUCED, VENV_BIN, dvc, make_repo, stages_run
from tests.repo import env as repo_env
from tests.tiny import ROOT, curve, run_python, run_stage, workspace
from tests.tiny import env as tiny_env


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_run_key_changes_with_data_and_params(tmp_path):
    data = write(tmp_path / "train.jsonl", '{"input_ids": [1, 2]}\n')
    key = run_key([data], {"lr": 1e-3})
    assert key == run_key([data], {"lr": 1e-3})
    assert key != run_key([data], {"lr": 2e-3})
    write(data, '{"input_ids": [1, 3]}\n')
    assert key != run_key([data], {"lr": 1e-3})


def test_checkpoint_dir_removes_checkpoints_of_other_runs(tmp_path):
    old = write(tmp_path / "sft/aaaa/checkpoint-4/trainer_state.json", "{}").parents[1]
    other_stage = write(tmp_path / "dpo/cccc/checkpoint-2/trainer_state.json", "{}").parents[1]
    out = checkpoint_dir(tmp_path, "sft", "bbbb")
    assert out == tmp_path / "sft/bbbb" and out.is_dir()
    assert not old.exists() and other_stage.exists()
    assert last_checkpoint(out) is None


def test_last_checkpoint_is_the_newest_complete_one(tmp_path):
    write(tmp_path / "checkpoint-2/trainer_state.json", "{}")
    write(tmp_path / "checkpoint-10/trainer_state.json", "{}")
    write(tmp_path / "checkpoint-12/adapter_model.safetensors", "")  # killed while saving
    (tmp_path / "checkpoint-x").mkdir()
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert last_checkpoint(tmp_path / "missing") is None


def test_resume_loads_the_trained_adapter_beside_trl_reference_copy(tmp_path):
    """PEFT keeps `default` at the top and TRL's `ref` in a subfolder; transformers would load only `ref`."""
    ckpt = tmp_path / "checkpoint-2"
    write(ckpt / "trainer_state.json", "{}")
    write(ckpt / "adapter_model.safetensors", "trained")
    write(ckpt / "adapter_config.json", "{}")
    write(ckpt / "ref/adapter_model.safetensors", "initial")
    assert last_checkpoint(tmp_path) == str(ckpt)
    assert (ckpt / "default/adapter_model.safetensors").read_text() == "trained"
    assert (ckpt / "default/adapter_config.json").exists()


def test_finish_run_removes_the_run_checkpoints(tmp_path):
    folder = write(tmp_path / "sft/k/checkpoint-2/trainer_state.json", "{}").parents[1]
    finish_run(folder)
    assert not folder.exists()


def test_launch_command_is_accelerate_launch_of_the_stage(tmp_path):
    cmd = launch_command("stages.sft", TrainConfig(num_processes=2))
    assert cmd[1:4] == ["-m", "accelerate.commands.launch", "--num_processes"] and cmd[4] == "2"
    assert "--multi_gpu" in cmd and cmd[-2:] == ["-m", "stages.sft"]
    cfg = write(tmp_path / "fsdp.yaml", "distributed_type: FSDP\n")
    cmd = launch_command("stages.dpo", TrainConfig(num_processes=4, accelerate_config=cfg, mixed_precision="bf16"))
    assert cmd[cmd.index("--config_file") + 1] == str(cfg) and "--multi_gpu" not in cmd
    assert cmd[cmd.index("--mixed_precision") + 1] == "bf16"


def test_relaunch_is_a_no_op_for_one_process_or_inside_a_launch(monkeypatch):
    relaunch_distributed("stages.sft", TrainConfig(num_processes=1))  # returns: train here
    monkeypatch.setenv("LOCAL_RANK", "1")
    relaunch_distributed("stages.sft", TrainConfig(num_processes=2))  # already launched: train here


# --- TRL's configs from params: the stage's keys, the user's keys, report_to -------------------------------

def _sft_config(trainer: dict, tmp_path: Path):
    from trl import SFTConfig

    return trl_config(SFTConfig, "sft.trainer", trainer, output_dir=str(tmp_path), max_length=64, use_cpu=True)


def test_trainer_keys_pass_through_to_trl_with_dvclive_by_default(tmp_path):
    args = _sft_config({"weight_decay": 0.25, "optim": "adafactor", "bf16": None}, tmp_path)
    assert args.weight_decay == 0.25 and args.optim == "adafactor"  # fields tuneforge never declares
    assert args.report_to == ["dvclive"] and args.max_length == 64  # the default tracker; the stage's own key
    assert args.bf16 is False and args.fp16 is False  # null = TRL's default, which on CPU is fp32 here
    assert _sft_config({"report_to": ["tensorboard"]}, tmp_path).report_to == ["tensorboard"]  # instead
    assert _sft_config({"report_to": "none"}, tmp_path).report_to == []


@pytest.mark.parametrize(("trainer", "message"), [
    ({"max_seq_length": 512}, r"sft\.trainer: .*unexpected keyword argument 'max_seq_length'"),  # not a TRL 1.x key
    ({"eval_strategy": "sometimes"}, r"sft\.trainer: sometimes is not a valid IntervalStrategy"),
    ({"report_to": ["nope"]}, r"sft\.trainer\.report_to: nope is not supported, only .*dvclive"),
    ({"report_to": ["mlflow"]}, r"sft\.trainer\.report_to: mlflow is not installed here"),
])
def test_keys_trl_rejects_are_input_errors_naming_the_section(trainer, message, tmp_path):
    with pytest.raises(InputError, match=rf"^params\.yaml: {message}"):
        _sft_config(trainer, tmp_path)


@pytest.mark.slow
def test_checkpoints_of_other_data_or_params_are_never_resumed(tiny, tmp_path, monkeypatch):
    from stages import sft as sft_stage

    ws = workspace(tiny, tmp_path, {"sft": {"trainer": {"max_steps": 2, "eval_strategy": "no", "save_steps": 1,
                                                        "load_best_model_at_end": False}}})
    stale = write(ws / "checkpoints/sft/0123456789abcdef/checkpoint-1/trainer_state.json",
                  json.dumps({"global_step": 1})).parents[1]
    monkeypatch.chdir(ws)
    params = load_params(ws / "params.yaml")
    report = sft_stage.sft(params.sft, params.model, params.paths)
    assert report["resumed_from_step"] == 0 and report["steps"] == 2
    assert not stale.exists()
    assert list((ws / "checkpoints/sft").iterdir()) == []  # the finished run removed its own checkpoints


# --- several processes: DDP on CPU, and why not FSDP ------------------------------------------------------

FSDP2 = ROOT / "presets/accelerate/fsdp2.yaml"
# Evaluated every 3 steps one row at a time, so a 2-process eval (rows split between ranks, then averaged)
# and a 1-process eval average the same per-row losses.
SAME_BATCH = {"num_train_epochs": 2, "eval_strategy": "steps", "eval_steps": 3, "save_strategy": "no",
              "load_best_model_at_end": False, "per_device_eval_batch_size": 1}

# Loads models/sft in a fresh process (no unsloth patches), compares its tensors with another run's and with
# the base, and evaluates it with TRL on the formatted eval rows as the stage's trainer did; one JSON line.
SAVED = """
import json, sys, torch
from pathlib import Path
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
from stages.common.engine import use_torch_logprob_without_cuda
from stages.common.training import load_rows
use_torch_logprob_without_cuda()  # as the stage's engine does on CPU
other = Path(sys.argv[1])
name = "adapter_model.safetensors" if Path("models/sft/adapter_config.json").exists() else "model.safetensors"
mine, theirs = load_file(f"models/sft/{name}"), load_file(other / "models/sft" / name)
assert mine.keys() == theirs.keys()
base = load_file("models/base/model.safetensors")
moved = max(float((t - base[k]).abs().max()) if k in base else float(t.abs().max())
            for k, t in mine.items() if "lora_A" not in k)
model = AutoModelForCausalLM.from_pretrained("models/base" if name.startswith("adapter") else "models/sft")
if name.startswith("adapter"):
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, "models/sft")
rows = Dataset.from_list(load_rows(Path("data/formatted/sft_eval.jsonl"), ("input_ids", "assistant_masks")))
args = SFTConfig(output_dir="/tmp/tuneforge-saved-eval", report_to=[], use_cpu=True, bf16=False,
                 per_device_eval_batch_size=1, max_length=256)
trainer = SFTTrainer(model=model, args=args, train_dataset=rows, eval_dataset=rows,
                     processing_class=AutoTokenizer.from_pretrained("models/sft"))
print(json.dumps({"max_diff": max(float((t - theirs[k]).abs().max()) for k, t in mine.items()),
                  "moved": moved, "eval_loss": trainer.evaluate()["eval_loss"]}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_sft_on_two_processes_trains_as_one_process_at_the_same_effective_batch(method, tiny, tmp_path):
    """2 processes over gloo with batch 4 each against 1 process with batch 4 x 2 accumulation steps: accelerate
    hands the processes alternate batches of one seeded sampler, so each optimizer step sees the same 8 rows.
    The loss curves, eval losses and saved weights must agree; rank 0 alone writes, and the saved model
    evaluates to the eval loss rank 0 reported.

    lora runs as the pipeline does (train.num_processes: 2, the stage relaunches itself: DDP). full is launched
    with presets/accelerate/fsdp2.yaml directly, as `accelerate launch --config_file ... -m stages.sft` would,
    past the stage's refusal: accelerate 1.15 sets up MULTI_CPU for it, plain DDP, without a word, which is
    why the stage refuses FSDP without CUDA. If that assertion fails because accelerate now shards on CPU,
    lift check_accelerate_config's refusal: the rest of this test then checks FSDP."""
    common = {"sft": {"method": method, "engine": "transformers", "trainer": SAME_BATCH,
                      "lora": {"dropout": 0.0}}}  # dropout masks are drawn per process: off, to compare
    two = workspace(tiny, tmp_path / "two", deep_merge(common, {"train": {"num_processes": 2}}))
    one = workspace(tiny, tmp_path / "one", deep_merge(common, {"sft": {"trainer": {"gradient_accumulation_steps": 2}}}))
    if method == "lora":
        out = run_stage("stages.sft", two).stdout
        assert "accelerate.commands.launch --num_processes 2" in out
    else:
        cmd = launch_command("stages.sft", TrainConfig(num_processes=2, accelerate_config=FSDP2, mixed_precision="no"))
        proc = subprocess.run(cmd, cwd=two, env=tiny_env(TUNEFORGE_LAUNCHED="1"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=600)
        out = proc.stdout
        assert proc.returncode == 0, out[-4000:]
    assert out.count("sft done") == 1  # only rank 0 reports
    run_stage("stages.sft", one)
    r2, r1 = (json.loads((ws / "reports/sft.json").read_text()) for ws in (two, one))
    assert (r2["processes"], r2["distributed_backend"], r2["distributed_type"]) == (2, "gloo", "MULTI_CPU")
    assert (r1["processes"], r1["distributed_type"]) == (1, "NO")
    assert r2["steps"] == r1["steps"] == 6  # 24 rows / 8 per step x 2 epochs
    for metric in ("train/loss", "eval/loss"):  # DVCLive's curves (rank 0 alone logs)
        c2, c1 = (curve(ws / "dvclive/sft", metric) for ws in (two, one))
        assert c2.keys() == c1.keys() and len(c2) >= (6 if metric == "train/loss" else 2)
        for step, loss in c1.items():
            assert c2[step] == pytest.approx(loss, rel=1e-4), (metric, step, c2[step], loss)
    losses = curve(two / "dvclive/sft", "train/loss")
    assert losses[max(losses)] < losses[min(losses)]  # it trains

    saved = json.loads(run_python(SAVED.replace("sys.argv[1]", repr(str(one))), two).strip().splitlines()[-1])
    assert saved["max_diff"] < 1e-5, saved  # the 2-process model is the 1-process model
    assert saved["moved"] > 1e-3, saved  # ... and both moved away from the base
    assert saved["eval_loss"] == pytest.approx(curve(two / "dvclive/sft", "eval/loss")[6], rel=1e-5)


def test_an_fsdp_accelerate_config_is_refused_without_cuda(tmp_path, monkeypatch):
    from stages.common import training

    monkeypatch.setattr(training, "device", lambda: "cpu")
    with pytest.raises(InputError, match="fsdp2.yaml: train.accelerate_config asks for FSDP, but there is no CUDA"):
        relaunch_distributed("stages.sft", TrainConfig(num_processes=2, accelerate_config=FSDP2))
    ddp = write(tmp_path / "ddp.yaml", "distributed_type: MULTI_GPU\n")
    training.check_accelerate_config(TrainConfig(num_processes=2, accelerate_config=ddp))
    monkeypatch.setattr(training, "device", lambda: "cuda")
    training.check_accelerate_config(TrainConfig(num_processes=2, accelerate_config=FSDP2))  # GPUs: FSDP


@pytest.mark.slow
def test_dpo_with_two_processes_under_accelerate_launch(tiny, tmp_path):
    """DPO on stored reference log-probs under DDP: each process gets its share of the pairs with their stored
    log-probs; rank 0 alone writes the adapter and the report."""
    ws = workspace(tiny, tmp_path, {"train": {"num_processes": 2}, "dpo": {"trainer": {
        "num_train_epochs": 1, "eval_strategy": "no", "save_strategy": "no", "load_best_model_at_end": False}}})
    shutil.copytree(ws / "models/base", ws / "models/sft-merged")  # the tiny base stands in for SFT-merged
    run_stage("stages.reference", ws)
    out = run_stage("stages.dpo", ws).stdout
    assert "accelerate.commands.launch --num_processes 2" in out
    report = json.loads((ws / "reports/dpo.json").read_text())
    assert report["processes"] == 2
    assert report["train_pairs"] == 24 and report["steps"] == 6  # 24 pairs / (batch 2 x 2 processes)
    assert report["ref_logps"].startswith("stored")
    assert out.count("dpo done") == 1  # only rank 0 reports
    assert sorted(curve(ws / "dvclive/dpo", "train/loss")) == [1, 2, 3, 4, 5, 6]  # rank 0 alone logs, once a step
    assert (ws / "models/dpo/adapter_config.json").exists()


# --- real kills under DVC -------------------------------------------------------------------------------

RESUME = {
    **REDUCED,
    "base": {"corpus_size": 200, "epochs": 1, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
             "num_heads": 2, "num_kv_heads": 1},
    "generate": {"sft_count": 60, "dpo_count": 40},
    "sft": {"trainer": {"num_train_epochs": 1, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                        "eval_steps": 4, "save_steps": 4, "logging_steps": 1}},
    "dpo": {"trainer": {"num_train_epochs": 1, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                        "eval_steps": 8, "save_steps": 2, "logging_steps": 1}},
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A reduced copy of the project with everything up to `format` built."""
    path = make_repo(tmp_path_factory.mktemp("resume") / "repo", RESUME)
    dvc("repro", "format", cwd=path)
    return path


def kill_after_first_checkpoint(repo: Path, stage: str, timeout: float = 600) -> int:
    """Start `dvc repro stage`, SIGKILL its process group once a checkpoint is complete; that step."""
    log = (repo / f"killed-{stage}.log").open("w")
    proc = subprocess.Popen([str(VENV_BIN / "dvc"), "repro", stage], cwd=repo, env=repo_env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if sorted((repo / "checkpoints" / stage).glob("*/checkpoint-*/trainer_state.json")):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                # the newest complete checkpoint once the run is dead: a fast run may have saved (and rotated)
                # more between the poll and the kill, and the resume picks the newest
                done = (repo / "checkpoints" / stage).glob("*/checkpoint-*/trainer_state.json")
                return max(json.loads(p.read_text())["global_step"] for p in done)
            if proc.poll() is not None:
                raise AssertionError(f"{stage} ended before a checkpoint appeared:\n"
                                     f"{(repo / f'killed-{stage}.log').read_text()[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"no {stage} checkpoint within {timeout}s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def check_resume(repo: Path, stage: str) -> None:
    """A run killed mid-way then `dvc repro` again resumes; its loss curve matches an uninterrupted run's."""
    report = repo / f"reports/{stage}.json"
    live = repo / f"dvclive/{stage}"  # DVCLive's curve: a resumed run logs its checkpoint's history first
    killed_at = kill_after_first_checkpoint(repo, stage)
    assert killed_at > 0
    assert not (repo / f"models/{stage}/tuneforge.json").exists()  # the killed run wrote no output

    out = dvc("repro", stage, cwd=repo)
    assert stages_run(out.stdout) == [stage], out.stdout
    text = out.stdout + out.stderr
    assert "resuming from" in text and f"checkpoint-{killed_at}" in text, text[-3000:]
    if stage == "sft":  # dpo's report is owned by stages/dpo.py
        assert json.loads(report.read_text())["resumed_from_step"] == killed_at
    resumed = curve(live, "train/loss")
    assert "up to date" in dvc("status", stage, cwd=repo).stdout

    shutil.rmtree(repo / "checkpoints" / stage, ignore_errors=True)  # (a finished sft run already did)
    out = dvc("repro", "-f", "-s", stage, cwd=repo)  # uninterrupted, from scratch (-f: no run-cache)
    assert "resuming from" not in out.stdout + out.stderr
    reference = curve(live, "train/loss")
    assert len(reference) >= 8 and killed_at < max(reference)
    assert resumed.keys() == reference.keys()
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-3, abs=1e-3), (step, resumed[step], loss)


@pytest.mark.slow
def test_sft_killed_mid_run_resumes_from_its_last_checkpoint(repo):
    check_resume(repo, "sft")
    assert not any((repo / "checkpoints/sft").iterdir())  # a finished run leaves no checkpoints behind


@pytest.mark.slow
def test_dpo_killed_mid_run_resumes_from_its_last_checkpoint(repo):
    check_resume(repo, "dpo")  # the killed `dvc repro dpo` first builds sft, merge and the rest upstream


def _bos_adding(tok):
    """The tiny tokenizer made to add BOS by itself, as Llama 3's tokenizer does."""
    from tokenizers import processors

    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    assert tok("a")["input_ids"][:1] == [bos] and tok("a", add_special_tokens=False)["input_ids"][:1] != [bos]
    return tok


def _dpo_rows(tok):
    from stages.format import render_dpo

    rows = [{"id": f"p{i}", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}],
             "chosen": a, "rejected": "Great question! " + a} for i, (q, a) in
            enumerate([("Should I quit?", "State the cost."), ("What is failure?", "Failure is data.")])]
    return [render_dpo(tok, r, "<|eot_id|>") for r in rows]


@pytest.mark.parametrize("adds_bos", [False, True])
def test_trl_dpo_sees_the_tokens_format_checked(adds_bos, tmp_path):
    """TRL's DPOTrainer tokenizes the rows to exactly the ids `format` and `evaluate` use: one BOS, whether or
    not the tokenizer adds BOS by itself."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    from stages.base import build_tokenizer
    from stages.common.templates import LLAMA3
    from stages.common.training import trl_text_rows

    tok = build_tokenizer(["State the cost. Failure is data. Great question!"] * 20, 300, LLAMA3)
    if adds_bos:
        tok = _bos_adding(tok)
    rows = _dpo_rows(tok)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_length=None)
    ref = copy.deepcopy(model)  # a reference model object, so TRL does not look for one on the hub
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, processing_class=tok,
                         train_dataset=Dataset.from_list(trl_text_rows(tok, rows)))
    for row, seen in zip(rows, trainer.train_dataset, strict=True):
        want = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        assert seen["prompt_ids"] == want
        assert seen["prompt_ids"][:2].count(tok.bos_token_id) == 1
        full = tok(row["prompt"] + row["chosen"], add_special_tokens=False)["input_ids"]
        assert seen["prompt_ids"] + seen["chosen_ids"] == full
    if adds_bos:  # without the hand-off, TRL would have put two BOS tokens in front of every prompt
        plain = DPOTrainer(model=model, ref_model=ref, args=args, processing_class=tok,
                           train_dataset=Dataset.from_list(rows))
        assert plain.train_dataset[0]["prompt_ids"][:2] == [tok.bos_token_id] * 2

