"""params.yaml parsing: every shipped config loads, and bad keys are named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stages.common.config import ParamsError, deep_merge, load_params, parse_params, read_yaml

ROOT = Path(__file__).resolve().parents[3]


def test_shipped_params_load():
    params = load_params(ROOT / "params.yaml")
    assert params.model.is_tiny
    assert params.validate.eval_fraction == pytest.approx(0.1)
    assert params.sft.lora.r == 16 and params.sft.lora.alpha == 32
    assert params.dpo.beta == pytest.approx(0.1)


@pytest.mark.parametrize("preset", sorted((ROOT / "presets").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads_and_trl_accepts_its_trainer_sections(preset):
    """As the stages build them: trl_config, the user's section plus the keys the stage owns."""
    from trl import DPOConfig, SFTConfig

    from stages.common.training import trl_config

    params = parse_params(deep_merge(read_yaml(ROOT / "params.yaml"), read_yaml(preset)), preset)
    sft = trl_config(SFTConfig, "sft.trainer", params.sft.trainer, output_dir="/tmp/unused", use_cpu=True,
                     max_length=params.model.max_seq_length)
    dpo = trl_config(DPOConfig, "dpo.trainer", params.dpo.trainer, output_dir="/tmp/unused", use_cpu=True,
                     beta=params.dpo.beta, max_length=params.model.max_seq_length)
    assert "dvclive" in sft.report_to and "dvclive" in dpo.report_to


@pytest.mark.parametrize(("section", "key", "where"), [
    ("sft", "output_dir", "paths.checkpoints"), ("sft", "max_length", "model.max_seq_length"),
    ("sft", "use_cpu", "CUDA_VISIBLE_DEVICES"), ("sft", "assistant_only_loss", "sft.assistant_only_loss"),
    ("sft", "hub_token", "HF_TOKEN"), ("dpo", "beta", "dpo.beta"), ("dpo", "max_length", "model.max_seq_length"),
    ("dpo", "precompute_ref_log_probs", "the `reference` stage"),
    ("dpo", "precompute_ref_batch_size", "reference.batch_size"),
    ("sft", "gradient_checkpointing", "sft.gradient_checkpointing"),
    ("dpo", "gradient_checkpointing", "dpo.gradient_checkpointing"),
])
def test_keys_the_stage_owns_are_refused_naming_where_to_set_them(section, key, where):
    data = read_yaml(ROOT / "params.yaml")
    data[section]["trainer"][key] = 1
    with pytest.raises(ParamsError) as err:
        parse_params(data)
    message = str(err.value)
    assert f"1 invalid parameter(s)\n  {section}.trainer.{key}: set by the stage" in message
    assert where in message and "Traceback" not in message


def test_every_owned_key_is_one_trl_knows():
    """A refused key is one TRL would take (not a typo of ours); the rest of TRL's fields pass through."""
    import dataclasses

    from trl import DPOConfig, SFTConfig

    from stages.common.config import DPO_OWNED_KEYS, SFT_OWNED_KEYS

    assert set(SFT_OWNED_KEYS) <= {f.name for f in dataclasses.fields(SFTConfig)}
    assert set(DPO_OWNED_KEYS) <= {f.name for f in dataclasses.fields(DPOConfig)}


def test_recipe_preset_is_the_reference_recipe():
    params = parse_params(deep_merge(read_yaml(ROOT / "params.yaml"),
                                     read_yaml(ROOT / "presets/recipe-llama-3.1-8b.yaml")))
    assert params.model.base == "unsloth/Llama-3.1-8B-Instruct"
    assert params.sft.method == "qlora" and params.sft.trainer["learning_rate"] == pytest.approx(2e-4)
    assert params.dpo.lora.r == 8 and params.dpo.trainer["learning_rate"] == pytest.approx(5e-5)


def test_unknown_key_is_named(tmp_path):
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["sft"]["lora"]["rr"] = 16
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError, match=r"sft\.lora\.rr: unknown key"):
        load_params(path)


def test_wrong_type_is_named_with_the_file(tmp_path):
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["dpo"]["beta"] = "high"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError, match=rf"{path}.*\n.*dpo\.beta"):
        load_params(path)


def test_missing_params_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match="nope.yaml: file not found"):
        load_params(tmp_path / "nope.yaml")


def test_deep_merge_merges_mappings_and_replaces_the_rest():
    assert deep_merge({"a": {"b": 1, "c": [1]}, "d": 1}, {"a": {"c": [2]}}) == {"a": {"b": 1, "c": [2]}, "d": 1}


def _check(tmp_path: Path, data: dict, module: str = "stages.common.config"):
    import os
    import subprocess
    import sys

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)


def _error_lines(tmp_path: Path, data: dict, module: str = "stages.common.config") -> list[str]:
    """stderr of a run that must fail as `run_main` fails: exit 2, no traceback."""
    proc = _check(tmp_path, data, module)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.splitlines()


def test_config_check_prints_one_line_per_error_like_a_stage(tmp_path):
    """`python -m stages.common.config`: no traceback, exit 2, the lines a stage run (`dvc repro`) prints."""
    data = read_yaml(ROOT / "params.yaml")
    data["sft"]["lora"]["rr"] = 16
    data["dpo"]["beta"] = "high"
    lines = _error_lines(tmp_path, data)
    assert lines == [
        "error: params.yaml: 2 invalid parameter(s)",
        "  sft.lora.rr: unknown key (misspelt? see the schema in stages/common/config.py)",
        "  dpo.beta: Input should be a valid number, unable to parse string as a number (got 'high')",
    ]
    assert _error_lines(tmp_path, data, "stages.generate") == lines


def test_config_check_names_listed_files_that_do_not_exist(tmp_path):
    data = read_yaml(ROOT / "params.yaml")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "here.jsonl").write_text("{}\n")
    data["data"]["sources"] = [{"path": "data/here.jsonl", "kind": "sft"}, {"path": "data/gone.jsonl", "kind": "dpo"}]
    data["train"]["accelerate_config"] = "fsdp.yaml"
    assert _error_lines(tmp_path, data) == [
        "error: params.yaml: 2 invalid parameter(s)",
        "  data.sources.1.path: file not found: data/gone.jsonl",
        "  train.accelerate_config: file not found: fsdp.yaml",
    ]
    data["data"]["sources"].pop()
    data["train"]["accelerate_config"] = None
    ok = _check(tmp_path, data)
    assert ok.returncode == 0 and ok.stdout.strip() == "params.yaml: ok", ok.stderr
