"""The engine layer on the tiny model: qlora is NF4 + double quant, partial really freezes, both engines
write adapters that plain transformers + peft load."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from stages.common.config import LoraConfig, PartialConfig, QuantizationConfig
from stages.common.engine import TrainSpec, freeze_all_but_last_blocks, load_for_training
from stages.common.io import InputError
from tests.tiny import LOAD_ADAPTER, TINY_BASE, curve, run_python, run_stage, workspace


def spec(tiny, method: str, **kw) -> TrainSpec:
    return TrainSpec(model=str(tiny / "models/base"), tokenizer=tiny / "data/formatted/tokenizer", method=method,
                     engine="transformers", lora=LoraConfig(r=4, alpha=8),
                     quantization=kw.pop("quantization", QuantizationConfig()),
                     partial=kw.pop("partial", PartialConfig()), max_seq_length=256, seed=1)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_qlora_is_nf4_with_double_quant_and_compute_dtype_from_params(tiny, compute_dtype):
    import bitsandbytes as bnb

    q = QuantizationConfig(double_quant=True, compute_dtype=compute_dtype)
    model, _, engine = load_for_training(spec(tiny, "qlora", quantization=q))
    assert engine == "transformers"
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 7 * TINY_BASE.num_layers  # q k v o gate up down in every block
    for module in linear4:
        assert module.weight.quant_type == "nf4"
        assert module.weight.quant_state.nested  # double quantisation: the absmax scales are quantised too
        assert module.compute_dtype == getattr(torch, compute_dtype)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_qlora_without_double_quant(tiny):
    import bitsandbytes as bnb

    model, _, _ = load_for_training(spec(tiny, "qlora", quantization=QuantizationConfig(double_quant=False)))
    module = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert not module.weight.quant_state.nested


def test_partial_trains_only_last_blocks_norm_and_head(tiny):
    model, _, _ = load_for_training(spec(tiny, "partial", partial=PartialConfig(last_n_blocks=1)))
    last = TINY_BASE.num_layers - 1
    for name, param in model.named_parameters():
        expected = name.startswith((f"model.layers.{last}.", "model.norm.", "lm_head."))
        assert param.requires_grad == expected, name
    assert any(p.requires_grad for n, p in model.named_parameters() if n.startswith("lm_head."))


def test_partial_more_blocks_than_the_model_names_the_key(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny / "models/base"))
    with pytest.raises(InputError, match=r"sft\.partial\.last_n_blocks=5 > 2"):
        freeze_all_but_last_blocks(model, 5)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["unsloth", "transformers"])
def test_both_engines_train_and_write_adapters_plain_peft_loads(tiny, tmp_path, engine):
    """Same data, seed and params through each engine (own process: unsloth patches globally)."""
    if engine == "unsloth" and importlib.util.find_spec("unsloth") is None:  # never import it here
        pytest.skip("unsloth is not installed")
    ws = workspace(tiny, tmp_path / engine, {"sft": {"engine": engine, "trainer": {
        "learning_rate": 3.0e-2, "num_train_epochs": 2, "eval_strategy": "no", "save_strategy": "no",
        "load_best_model_at_end": False}}})
    run_stage("stages.sft", ws)
    report = json.loads((ws / "reports/sft.json").read_text())
    assert report["engine"] == engine and report["method"] == "lora"
    losses = list(curve(ws / "dvclive/sft", "train/loss").values())  # DVCLive, the stage's default tracker
    assert len(losses) == report["steps"] and losses[-1] < losses[0], losses
    # the same tokens carry the loss whichever engine prepared the data (assistant-only by default)
    masks = [json.loads(line)["assistant_masks"] for line in (tiny / "data/formatted/sft_train.jsonl").open()]
    assert report["loss_tokens"] == sum(map(sum, masks)) < report["train_tokens"]
    assert (ws / "models/sft/adapter_config.json").exists()
    assert json.loads((ws / "models/sft/tuneforge.json").read_text())["engine"] == engine
    loaded = json.loads(run_python(LOAD_ADAPTER, ws).strip().splitlines()[-1])
    assert loaded["finite"] and loaded["lora_tensors"] > 0
