"""Typed view of params.yaml: parsed once, unknown keys are errors that name the key.

Apply a preset (deep-merged over params.yaml):
    python -m stages.common.config --apply presets/recipe-llama-3.1-8b.yaml
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PARAMS_FILE = Path("params.yaml")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(Strict):
    base_corpus: Path
    base: Path
    raw: Path
    clean: Path
    formatted: Path
    sft: Path
    sft_merged: Path
    dpo: Path
    reference_logps: Path = Path("data/reference_logps")  # the `reference` stage's stored DPO reference log-probs
    checkpoints: Path
    reports: Path
    cache: Path


class ModelConfig(Strict):
    base: str = "tiny"
    revision: str = "main"  # hub base: branch, tag or commit; `base` resolves it to a commit (base_ref.json)
    # attention for every model load; packing is honoured where it keeps packed examples apart (all four do)
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    # auto = the base tokenizer's own template (llama3 when it has none); a name overrides it
    chat_template: Literal["auto", "chatml", "llama3", "llama2", "zephyr", "plain"] = "auto"
    max_seq_length: int = Field(256, gt=0)
    seed: int = 3407

    @property
    def is_tiny(self) -> bool:
        return self.base == "tiny"


class BaseConfig(Strict):
    vocab_size: int = Field(1024, ge=300)
    # trained: byte-level BPE with tuneforge's Llama-3-style template; llama-3.1: Llama-3.1-8B's tokenizer shape
    # (256 special tokens at the top ids, its chat template, BOS added by the tokenizer) padded to vocab_size
    tokenizer: Literal["trained", "llama-3.1"] = "trained"
    hidden_size: int = Field(128, gt=0)
    intermediate_size: int = Field(352, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(2, gt=0)
    corpus_size: int = Field(1500, gt=0)
    epochs: float = Field(2, gt=0)
    batch_size: int = Field(16, gt=0)
    learning_rate: float = Field(3e-3, gt=0)
    seed: int = 0


class PersonaConfig(Strict):
    name: str
    description: str


class ModelPrice(Strict):
    """USD per million tokens."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cache_read: float = Field(ge=0)
    cache_write: float = Field(ge=0)


def _default_prices() -> dict[str, ModelPrice]:
    return {
        "claude-sonnet-4-6": ModelPrice(input=3.0, output=15.0, cache_read=0.3, cache_write=3.75),
        "claude-haiku-4-5": ModelPrice(input=1.0, output=5.0, cache_read=0.1, cache_write=1.25),
    }


class BatchPollConfig(Strict):
    poll_interval: float = Field(10.0, gt=0)      # seconds before the first poll; grows by poll_backoff
    poll_backoff: float = Field(1.5, ge=1)
    poll_max_interval: float = Field(120.0, gt=0)
    max_requests: int = Field(10_000, gt=0, le=100_000)  # per batch
    max_rounds: int = Field(4, ge=1)              # errored/expired/re-asked requests go to a later batch


class AnthropicConfig(Strict):
    model: str = "claude-sonnet-4-6"
    mode: Literal["online", "batch"] = "online"   # batch = Message Batches API, half price, slower
    max_tokens: int = Field(1024, gt=0)
    # null = the model's default; newer models reject any other value (the SDK sends it via extra_body)
    temperature: float | None = Field(None, ge=0, le=1)
    concurrency: int = Field(8, gt=0)
    requests_per_minute: int = Field(1000, ge=0)  # client-side limit; 0 = none
    tokens_per_minute: int = Field(400_000, ge=0)  # input + output, client-side; 0 = none
    timeout: float = Field(120.0, gt=0)           # seconds per HTTP attempt
    max_retries: int = Field(4, ge=0)             # SDK retries of 408/409/429/5xx/529 and dropped connections
    max_failure_share: float = Field(0.05, ge=0, le=1)  # the stage fails above this share of failed requests
    subtopics_per_category: int = Field(8, gt=0, le=50)
    questions_per_request: int = Field(5, gt=0, le=50)
    batch: BatchPollConfig = BatchPollConfig()
    prices: dict[str, ModelPrice] = Field(default_factory=_default_prices)


class GenerateConfig(Strict):
    provider: Literal["auto", "anthropic", "offline"] = "auto"
    sft_count: int = Field(1000, ge=0)
    dpo_count: int = Field(200, ge=0)
    seed: int = 42
    persona: PersonaConfig
    categories: list[str] = Field(min_length=1)
    anthropic: AnthropicConfig = AnthropicConfig()


DataFormat = Literal[
    "auto", "alpaca", "sharegpt", "openai", "dolly", "prompt_completion", "instruction_response", "preference"
]


class DataSource(Strict):
    path: Path
    kind: Literal["sft", "dpo"]
    format: DataFormat = "auto"


class DataConfig(Strict):
    sources: list[DataSource] = Field(default_factory=list)  # user files merged with data/raw


class ValidateConfig(Strict):
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 42
    min_chars: int = Field(2, ge=1)
    max_tokens: int = Field(256, gt=0)
    max_reject_share: float = Field(0.2, ge=0, le=1)
    near_dup_threshold: float = Field(0.8, gt=0, le=1)
    shingle_size: int = Field(5, gt=0)
    num_perm: int = Field(128, ge=16, le=1024)
    semantic_dedup: bool = False
    semantic_threshold: float = Field(0.95, gt=0, le=1)
    dpo_max_similarity: float = Field(0.95, gt=0, le=1)
    dpo_max_length_ratio: float = Field(8.0, ge=1)
    refusal_patterns: list[str] = Field(default_factory=list)
    identity_patterns: list[str] = Field(default_factory=list)
    extra_control_strings: list[str] = Field(default_factory=list)
    report_examples: int = Field(3, ge=0)


class FormatConfig(Strict):
    golden_check: bool = True


class LoraConfig(Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    bias: Literal["none", "all", "lora_only"] = "none"
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class QuantizationConfig(Strict):
    double_quant: bool = True
    # auto = bfloat16 (float16 without bf16 support) on CUDA, float32 on CPU
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"


class PartialConfig(Strict):
    last_n_blocks: int = Field(1, gt=0)


Engine = Literal["unsloth", "transformers", "auto"]
Method = Literal["lora", "qlora", "full", "partial"]


class SftConfig(Strict):
    engine: Engine = "auto"
    method: Method = "qlora"
    assistant_only_loss: bool = True
    lora: LoraConfig = LoraConfig()
    quantization: QuantizationConfig = QuantizationConfig()
    partial: PartialConfig = PartialConfig()
    gradient_checkpointing: bool = True  # both engines (unsloth's own; PEFT's on transformers)
    trainer: dict[str, Any] = Field(default_factory=dict)  # validated by trl.SFTConfig


class MergeConfig(Strict):
    tolerance: float = Field(1e-3, gt=0)  # max |logit diff| merged vs base + adapter (both fp32)
    tolerance_16bit: float = Field(0.25, gt=0)  # the same when the merge runs in merge.dtype = 16 bits
    held_out: int = Field(16, gt=0)  # held-out SFT conversations the check runs on
    batch_size: int = Field(4, gt=0)
    tokens_per_batch: int | None = Field(8192, gt=0)  # padded tokens per batch (null = batch_size alone)
    # stored dtype, and the dtype the merge runs in on the device; auto = 16-bit on CUDA, fp32 on CPU
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class ReferenceConfig(Strict):
    batch_size: int = Field(8, gt=0)  # pairs per forward pass when computing the reference log-probs
    tokens_per_batch: int | None = Field(8192, gt=0)  # caps batch_size: pairs x 2 x model.max_seq_length


class DpoConfig(Strict):
    beta: float = Field(0.1, gt=0)
    # how `reference` and `dpo` load sft-merged: auto = nf4 (sft.quantization) when sft.method is qlora
    quantization: Literal["auto", "nf4", "none"] = "auto"
    gradient_checkpointing: bool = True
    lora: LoraConfig = LoraConfig(r=8, alpha=16)
    trainer: dict[str, Any] = Field(default_factory=dict)  # validated by trl.DPOConfig


class TrainConfig(Strict):
    """How `sft` and `dpo` run: one process, or N under `accelerate launch` (DDP; FSDP/DeepSpeed via a config)."""

    num_processes: int = Field(1, ge=1)  # > 1: the stage re-launches itself under `accelerate launch`
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None  # None = accelerate's default / the config file's
    accelerate_config: Path | None = None  # an `accelerate config` YAML (FSDP, DeepSpeed, multi-node ...)


class GatesConfig(Strict):
    dpo_margin_above_sft: bool = True  # DPO reward margin > SFT's
    sft_margin_above_base: bool = True  # SFT reward margin > base's
    sft_max_ppl_ratio: float | None = Field(1.0, gt=0)  # SFT perplexity <= base's x this; null = off
    dpo_max_ppl_ratio: float | None = Field(None, gt=0)  # DPO perplexity <= SFT's x this; null = off
    min_dpo_accuracy: float | None = Field(None, ge=0, le=1)  # DPO preference accuracy >= this; null = off


class EvaluateConfig(Strict):
    batch_size: int = Field(16, gt=0)
    tokens_per_batch: int | None = Field(8192, gt=0)  # padded tokens per log-prob batch (null = batch_size alone)
    max_pairs: int = Field(200, gt=0)
    max_sft_examples: int = Field(200, gt=0)
    samples: int = Field(4, ge=0)  # prompts in reports/samples.md
    style_prompts: int = Field(32, ge=0)  # held-out prompts each model answers for the style score; 0 = off
    max_new_tokens: int = Field(96, gt=0)
    seed: int = 3407
    embedding: Literal["minilm", "tfidf"] = "minilm"  # style-score embeddings; tfidf is also the fallback
    judge: Literal["none", "claude"] = "none"  # claude: pairwise win-rates through stages/common/claude.py
    judge_prompts: int = Field(20, ge=1)
    judge_model: str | None = None  # null = generate.anthropic.model (its prices and client settings apply)
    judge_max_tokens: int = Field(512, gt=0)
    judge_temperature: float | None = Field(0.0, ge=0, le=1)  # null = the model's default
    gates: GatesConfig = GatesConfig()


class Params(Strict):
    paths: PathsConfig
    model: ModelConfig = ModelConfig()
    base: BaseConfig = BaseConfig()
    generate: GenerateConfig
    data: DataConfig = DataConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    format: FormatConfig = FormatConfig()
    sft: SftConfig = SftConfig()
    merge: MergeConfig = MergeConfig()
    reference: ReferenceConfig = ReferenceConfig()
    dpo: DpoConfig = DpoConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @property
    def validate(self) -> ValidateConfig:  # type: ignore[override]
        return self.validate_


class ParamsError(ValueError):
    """params.yaml is unreadable or does not match the schema; the message names file and key."""


def _describe(err: ValidationError, source: Path) -> str:
    lines = [f"{source}: {len(err.errors())} invalid parameter(s)"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]).replace("validate_", "validate")
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (misspelt? see the schema in stages/common/config.py)")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_params(data: dict[str, Any], source: Path = PARAMS_FILE) -> Params:
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ParamsError(_describe(err, source)) from None


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ParamsError(f"{path}: file not found (run from the repository root)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping")
    return data


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    path = Path(path)
    return parse_params(read_yaml(path), path)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return base with override merged in; mappings merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    parser.add_argument("--apply", type=Path, help="preset YAML deep-merged into --params")
    args = parser.parse_args()
    data = read_yaml(args.params)
    if args.apply:
        data = deep_merge(data, read_yaml(args.apply))
        parse_params(data, args.apply)
        args.params.write_text(yaml.safe_dump(data, sort_keys=False))
        print(f"applied {args.apply} to {args.params}")
    else:
        parse_params(data, args.params)
        print(f"{args.params}: ok")


if __name__ == "__main__":
    main()
