"""The `sft` stage on the tiny model: all four methods, assistant-only loss, packing, failure cases.

Runs in this process with the transformers engine (unsloth is exercised in its own process by
tests/stages/common/test_engine.py, since importing it patches transformers/trl globally).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from stages import sft as sft_stage
from stages.common.config import load_params
from stages.common.engine import load_for_inference
from stages.common.io import InputError
from tests.tiny import TINY_BASE, curve, workspace

QUICK = {"num_train_epochs": 1, "eval_strategy": "no", "save_strategy": "no", "load_best_model_at_end": False}


def run_sft(ws, monkeypatch) -> dict:
    monkeypatch.chdir(ws)
    params = load_params(ws / "params.yaml")
    return sft_stage.sft(params.sft, params.model, params.paths)


def masks(tiny) -> list[list[int]]:
    return [json.loads(line)["assistant_masks"] for line in (tiny / "data/formatted/sft_train.jsonl").open()]


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """method -> workspace after one quick SFT run with that method (built on first use)."""
    done: dict = {}

    def get(method: str):
        if method not in done:
            ws = workspace(tiny, tmp_path_factory.mktemp(method), {"sft": {"method": method, "trainer": QUICK}})
            with pytest.MonkeyPatch.context() as mp:
                done[method] = (ws, run_sft(ws, mp))
        return done[method]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora", "full", "partial"])
def test_every_method_trains_and_loads_with_plain_transformers(trained, method, monkeypatch):
    ws, report = trained(method)
    monkeypatch.chdir(ws)  # tuneforge.json names the base relative to the workspace
    assert report["method"] == method and report["engine"] == "transformers"
    assert report["gradient_checkpointing"] is True  # sft.gradient_checkpointing, on every method by default
    assert report["steps"] == 6 and sorted(curve(ws / "dvclive/sft", "train/loss")) == [1, 2, 3, 4, 5, 6]
    adapter = (ws / "models/sft/adapter_config.json").exists()
    assert adapter == (method in ("lora", "qlora"))
    model, tokenizer = load_for_inference(ws / "models/sft")
    with torch.no_grad():
        logits = model(**tokenizer("Decide.", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
    if method == "qlora":  # the adapter is trained on the 4-bit base but loads onto the 16-bit one
        assert "Linear4bit" not in {type(m).__name__ for m in model.modules()}


@pytest.mark.slow
def test_dvclive_is_the_default_tracker_at_trainer_steps(trained):
    """DVCLive (report_to: [dvclive], the default) logs loss, learning rate and grad norm at every trainer step into
    dvclive/sft; metrics.json holds the last values, which `dvc metrics show` / `dvc exp show` read."""
    ws, report = trained("lora")
    live = ws / "dvclive/sft"
    loss, lr, grad = (curve(live, f"train/{m}") for m in ("loss", "learning_rate", "grad_norm"))
    assert list(loss) == list(lr) == list(grad) == [1, 2, 3, 4, 5, 6] == list(range(1, report["steps"] + 1))
    assert len(set(loss.values())) > 1 and max(lr.values()) > lr[6] > 0  # real values: warmup, cosine decay
    summary = json.loads((live / "metrics.json").read_text())
    assert summary["step"] == 6 and summary["train"]["loss"] == pytest.approx(loss[6])
    assert "runtime" not in json.dumps(summary)  # timings differ every run: kept out of the compared metrics
    assert not (live / "dvc.yaml").exists()  # the project's dvc.yaml declares the folder, DVCLive writes none


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of an offline W&B run, from its .wandb transaction log (LevelDB log format: 7-byte
    file header, 32 KiB blocks, records of crc32 / length / type headers carrying wandb's protobuf Records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("*.wandb")).read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, pending, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too short for a record header: padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
    return rows


def tensorboard_scalars(folder: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


@pytest.mark.slow
def test_report_to_tensorboard_and_wandb_alongside_dvclive(tiny, tmp_path, monkeypatch):
    """sft.trainer.report_to as TRL documents it, with W&B offline: each tracker read back from its own files
    holds the same loss at the same trainer steps."""
    pytest.importorskip("tensorboard", reason="the dev extra installs tensorboard")
    wandb = pytest.importorskip("wandb", reason="the dev extra installs wandb")
    ws = workspace(tiny, tmp_path / "ws", {"sft": {"trainer": {**QUICK, "max_steps": 3,
                                                               "report_to": ["dvclive", "tensorboard", "wandb"]}}})
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(key, value)
    try:
        run_sft(ws, monkeypatch)
    finally:
        wandb.finish()  # transformers leaves the run open after training
    live = curve(ws / "dvclive/sft", "train/loss")
    assert sorted(live) == [1, 2, 3]
    [tb_run] = (ws / "runs/sft").iterdir()  # paths.tensorboard/sft/<run key>: outlives the run's checkpoints
    assert tensorboard_scalars(tb_run, "train/loss") == pytest.approx(live, rel=1e-6)
    [wb_run] = (tmp_path / "wandb").glob("offline-run-*")
    wb = {row["train/global_step"]: row["train/loss"] for row in wandb_history(wb_run) if "train/loss" in row}
    assert wb == pytest.approx(live, rel=1e-6)


@pytest.mark.slow
def test_report_to_tensorboard_instead_of_dvclive(tiny, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="the dev extra installs tensorboard")
    ws = workspace(tiny, tmp_path, {"sft": {"trainer": {**QUICK, "max_steps": 2, "report_to": ["tensorboard"]}}})
    run_sft(ws, monkeypatch)
    assert sorted(tensorboard_scalars(next((ws / "runs/sft").iterdir()), "train/loss")) == [1, 2]
    # no DVCLive: the folder dvc.yaml declares holds no curves, and an empty metrics.json
    assert [p.name for p in (ws / "dvclive/sft").iterdir()] == ["metrics.json"]
    assert json.loads((ws / "dvclive/sft/metrics.json").read_text()) == {}


@pytest.mark.slow
def test_partial_frozen_weights_are_bit_identical_after_training(trained, tiny):
    ws, report = trained("partial")
    before = load_file(str(tiny / "models/base/model.safetensors"))
    after = load_file(str(ws / "models/sft/model.safetensors"))
    assert before.keys() == after.keys()
    last = TINY_BASE.num_layers - 1
    trainable = {k for k in before if k.startswith((f"model.layers.{last}.", "model.norm.", "lm_head."))}
    frozen = set(before) - trainable
    assert frozen and trainable
    for name in frozen:
        assert torch.equal(before[name], after[name]), f"frozen weight changed: {name}"
    changed = [name for name in trainable if not torch.equal(before[name], after[name])]
    assert "lm_head.weight" in changed and any(n.startswith(f"model.layers.{last}.") for n in changed)
    assert report["trainable_parameters"] == sum(before[n].numel() for n in trainable)


@pytest.mark.slow
@pytest.mark.parametrize("assistant_only", [True, False])
def test_loss_on_assistant_tokens_only_unless_switched_off(tiny, tmp_path, monkeypatch, assistant_only):
    ws = workspace(tiny, tmp_path, {"sft": {"assistant_only_loss": assistant_only,
                                            "trainer": {**QUICK, "max_steps": 1}}})
    report = run_sft(ws, monkeypatch)
    total = sum(len(m) for m in masks(tiny))
    assert report["train_tokens"] == total
    if assistant_only:  # labels are -100 everywhere the formatted mask is 0
        assert report["loss_tokens"] == sum(map(sum, masks(tiny))) < total
    else:
        assert report["loss_tokens"] == total


def test_labels_follow_the_assistant_mask(tiny, tmp_path):
    """TRL builds labels from the assistant_masks column the stage passes: -100 exactly where it is 0."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from stages.common.engine import load_tokenizer
    from stages.common.training import load_rows

    rows = load_rows(tiny / "data/formatted/sft_train.jsonl", ("input_ids", "assistant_masks"))[:3]
    model, tokenizer = load_for_inference(tiny / "models/base")
    args = SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_length=256)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=load_tokenizer(tiny / "data/formatted/tokenizer"))
    for row, prepared in zip(rows, trainer.train_dataset, strict=True):
        expected = [t if m else -100 for t, m in zip(row["input_ids"], row["assistant_masks"], strict=True)]
        assert prepared["labels"] == expected
        assert prepared["labels"][0] == -100 and prepared["labels"][-1] != -100  # system/user masked, eot kept
    assert sft_stage.loss_tokens(trainer.train_dataset)[0] == sum(sum(r["assistant_masks"]) for r in rows)


def test_packing_only_where_attention_keeps_examples_apart():
    for impl, allowed in [("eager", True), ("sdpa", True), ("flash_attention_2", True), ("flex_attention", False)]:
        ok, why = sft_stage.packing_allowed(SimpleNamespace(config=SimpleNamespace(_attn_implementation=impl)))
        assert ok is allowed and impl in why
    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa"))
    ok, why = sft_stage.packing_allowed(model, {"packing_strategy": "wrapped"})
    assert not ok and "wrapped" in why  # cut mid-example, no boundaries in the position ids


@pytest.fixture(scope="module")
def packed_batch(tiny, tmp_path_factory):
    """One batch from TRL's own packing + padding-free collation of the tiny SFT rows, and the rows it holds."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from stages.common.engine import load_tokenizer
    from stages.common.training import load_rows

    rows = load_rows(tiny / "data/formatted/sft_train.jsonl", ("input_ids", "assistant_masks"))
    model, _ = load_for_inference(tiny / "models/base")
    args = SFTConfig(output_dir=str(tmp_path_factory.mktemp("packed")), report_to=[], use_cpu=True, max_length=1024,
                     packing=True, per_device_train_batch_size=2, bf16=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=load_tokenizer(tiny / "data/formatted/tokenizer"))
    batch = next(iter(trainer.get_train_dataloader()))
    return batch, rows


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_equals_unpacked_per_example(tiny, packed_batch, impl):
    """TRL's padding-free packing (position ids, no attention mask, no KV cache: TRL's training forward passes
    use_cache=False) on sdpa and eager: every packed example's logits and loss equal the example run alone. The
    same packed row with an all-ones mask, or with a KV cache (transformers then skips the packed-sequence check),
    lets examples attend to each other: the check can fail."""
    from transformers import AutoModelForCausalLM

    batch, rows = packed_batch
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1  # padding-free: one flat row
    model = AutoModelForCausalLM.from_pretrained(tiny / "models/base", attn_implementation=impl).eval()
    assert model.config._attn_implementation == impl
    ids, pos, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
    starts = (pos[0] == 0).nonzero().flatten().tolist()
    ends = [*starts[1:], int((pos[0] > 0).nonzero().max()) + 1]
    assert len(starts) >= 3  # several examples in the row
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        leaky = model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids), use_cache=False).logits[0]
        cached = model(input_ids=ids, position_ids=pos, use_cache=True).logits[0]
    by_ids = {tuple(r["input_ids"]): r for r in rows}
    worst = leak = cache_leak = 0.0
    for start, end in zip(starts, ends, strict=True):
        example = ids[0, start:end]
        assert tuple(example.tolist()) in by_ids  # a whole formatted row, not a cut
        with torch.no_grad():
            alone = model(input_ids=example[None]).logits[0]
        worst = max(worst, float((packed[start:end] - alone).abs().max()))
        leak = max(leak, float((leaky[start:end] - alone).abs().max()))
        cache_leak = max(cache_leak, float((cached[start:end] - alone).abs().max()))
        lab = labels[0, start + 1 : end]
        scored = lab != -100
        loss_packed = torch.nn.functional.cross_entropy(packed[start : end - 1][scored], lab[scored])
        loss_alone = torch.nn.functional.cross_entropy(alone[:-1][scored], lab[scored])
        assert float(loss_packed) == pytest.approx(float(loss_alone), abs=1e-5)
    assert worst < 1e-5, worst  # measured ~1e-7 (fp32)
    assert leak > 1e-3 and cache_leak > 1e-3, (leak, cache_leak)  # no block-diagonal mask: examples see each other


@pytest.mark.slow
def test_packing_requested_on_cpu_is_kept_on_sdpa(tiny, tmp_path, monkeypatch):
    ws = workspace(tiny, tmp_path, {"model": {"attn_implementation": "sdpa"},
                                    "sft": {"trainer": {**QUICK, "max_steps": 1, "packing": True}}})
    report = run_sft(ws, monkeypatch)
    assert report["packing"] is True and report["attn_implementation"] == "sdpa"


@pytest.mark.slow
def test_packing_with_a_strategy_that_cuts_examples_is_turned_off(tiny, tmp_path, monkeypatch, caplog):
    ws = workspace(tiny, tmp_path, {"sft": {"trainer": {**QUICK, "max_steps": 1, "packing": True,
                                                        "packing_strategy": "wrapped"}}})
    with caplog.at_level(logging.WARNING, logger="stages.sft"):
        report = run_sft(ws, monkeypatch)
    assert report["packing"] is False
    assert any("packing off" in r.message and "wrapped" in r.message for r in caplog.records)


def test_missing_formatted_data_names_the_file(tiny, tmp_path, monkeypatch):
    ws = workspace(tiny, tmp_path, {"paths": {"formatted": "data/nothing-here"}})
    with pytest.raises(InputError, match=r"data/nothing-here/sft_train\.jsonl: formatted SFT data not found"):
        run_sft(ws, monkeypatch)


def test_partial_larger_than_the_model_names_the_key(tiny, tmp_path, monkeypatch):
    ws = workspace(tiny, tmp_path, {"sft": {"method": "partial", "partial": {"last_n_blocks": 9}}})
    with pytest.raises(InputError, match=r"sft\.partial\.last_n_blocks=9"):
        run_sft(ws, monkeypatch)
    assert not (ws / "models/sft").exists()
