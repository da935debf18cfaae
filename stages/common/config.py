"""Typed view of params.yaml: parsed once, unknown keys are errors that name the key.

Check params.yaml (schema, and that the files it lists exist) without running anything:
    python -m stages.common.config
Apply a preset (deep-merged over params.yaml):
    python -m stages.common.config --apply presets/recipe-llama-3.1-8b.yaml
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

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
    dvclive: Path = Path("dvclive")  # DVCLive's step metrics of sft and dpo (<dvclive>/<stage>), a DVC output
    tensorboard: Path = Path("runs")  # TensorBoard event files (<tensorboard>/<stage>/<run key>) when reported to
    final: Path = Path("models/final")  # the `export` stage's model: HF folder, GGUFs, Modelfile, model card
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
    documents: int = Field(150, ge=0)  # plain prose in the persona's register, besides the conversations
    epochs: float = Field(2, gt=0)
    batch_size: int = Field(16, gt=0)
    learning_rate: float = Field(3e-3, gt=0)
    seed: int = 0


class PersonaExample(Strict):
    question: str = Field(min_length=1)
    answer: str = Field(min_length=1)


class PersonaConfig(Strict):
    """The persona card. `style_guide` and `examples` go only to Claude (the persona-answer template's cached
    system block and the judge's rubric): the training rows' system turn stays `You are {name}. {description}`."""

    name: str
    description: str
    style_guide: str = ""  # how the persona writes: voice, register, reasoning moves, length, what it never does
    examples: list[PersonaExample] = Field(default_factory=list)  # fixed worked examples (question -> answer)
    # The offline provider's register for this persona (stages/common/offline.py): a YAML file of
    # vocabulary and sentence frames that records the persona card it was written for. `generate`
    # refuses to write offline data for a persona the register was not written for; null = no register.
    offline: Path | None = None

    @property
    def system_prompt(self) -> str:
        """The system prompt the data is written under; `chat` and the exported Modelfile use it too."""
        return f"You are {self.name}. {self.description}"


class HeldoutConfig(Strict):
    """The held-out evaluation split (stages/common/splits.py); read by base, generate and validate."""

    seed: int = 7
    subtopic_share: float = Field(0.2, ge=0, lt=1)  # subtopics no training data (pretraining included) uses
    frame_share: float = Field(0.25, ge=0, lt=1)  # offline grammar frames kept for held-out rows only
    pretrain_share: float = Field(0.5, gt=0, lt=1)  # training questions reserved for the base's pretraining


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
    # offline rows that carry the persona's system prompt (seeded per question); the rest have none, so the
    # persona does not hinge on the prompt being rendered with it
    system_prompt_share: float = Field(1.0, ge=0, le=1)
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
    # the system turn given to this file's rows that have none: persona = the persona's system prompt (as
    # generated rows carry), none = no system turn, any other text = that text. A row's own system turn is kept.
    system_prompt: str = Field("persona", min_length=1)
    # auto = validate's seeded random train/eval split; train | eval | heldout pins every row of the file
    split: Literal["auto", "train", "eval", "heldout"] = "auto"


class DataConfig(Strict):
    sources: list[DataSource] = Field(default_factory=list)  # user files merged with data/raw


class ContaminationLimits(Strict):
    """Largest share of flagged rows per evaluation split before validate fails; null = report only."""

    eval: float | None = Field(None, ge=0, le=1)
    heldout: float | None = Field(0.0, ge=0, le=1)


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
    # contamination: longest token n-gram each eval/heldout row shares with any training source
    contamination_ngram: int = Field(13, ge=2)  # a shared n-gram this long flags the row (GPT-3 / Llama: 13)
    max_contamination: ContaminationLimits = Field(default_factory=lambda: ContaminationLimits())


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


# Keys of sft.trainer / dpo.trainer that the stage sets itself, and where to set them instead. Every other key goes
# to TRL's own config class (trl.SFTConfig / trl.DPOConfig), which validates it.
OWNED_TRAINER_KEYS = {
    "output_dir": "checkpoints go to paths.checkpoints/<stage>/<run key>: set paths.checkpoints",
    "max_length": "set model.max_seq_length",
    "use_cpu": "the stage trains on a CUDA device when there is one: hide it with CUDA_VISIBLE_DEVICES= for the CPU",
    "resume_from_checkpoint": "the stage resumes from its own last complete checkpoint by itself",
    "hub_token": "a secret never goes into params.yaml: set HF_TOKEN or log in with `hf auth login`",
}
SFT_OWNED_KEYS = {**OWNED_TRAINER_KEYS, "assistant_only_loss": "set sft.assistant_only_loss",
                  "gradient_checkpointing": "set sft.gradient_checkpointing (the engine prepares the model for it)"}
DPO_OWNED_KEYS = {
    **OWNED_TRAINER_KEYS,
    "gradient_checkpointing": "set dpo.gradient_checkpointing (the engine prepares the model for it)",
    "beta": "set dpo.beta",
    "precompute_ref_log_probs": "the `reference` stage computes and stores them (paths.reference_logps)",
    "precompute_ref_batch_size": "set reference.batch_size",
}


def refuse_owned_keys(trainer: dict[str, Any], section: str, owned: dict[str, str]) -> dict[str, Any]:
    """A trainer section without the keys its stage owns; else one error naming each key and where it goes."""
    found = [f"{section}.{key}: set by the stage, not here ({owned[key]})" for key in trainer if key in owned]
    if found:
        raise PydanticCustomError("owned_key", "\n".join(found))
    return trainer


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
    trainer: dict[str, Any] = Field(default_factory=dict)  # validated by trl.SFTConfig; report_to: [dvclive] unless set

    @field_validator("trainer")
    @classmethod
    def _stage_keys(cls, trainer: dict[str, Any]) -> dict[str, Any]:
        return refuse_owned_keys(trainer, "sft.trainer", SFT_OWNED_KEYS)


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
    trainer: dict[str, Any] = Field(default_factory=dict)  # validated by trl.DPOConfig; report_to: [dvclive] unless set

    @field_validator("trainer")
    @classmethod
    def _stage_keys(cls, trainer: dict[str, Any]) -> dict[str, Any]:
        return refuse_owned_keys(trainer, "dpo.trainer", DPO_OWNED_KEYS)


class TrainConfig(Strict):
    """How `sft` and `dpo` run: one process, or N under `accelerate launch` (DDP; FSDP/DeepSpeed via a config)."""

    num_processes: int = Field(1, ge=1)  # > 1: the stage re-launches itself under `accelerate launch`
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None  # None = accelerate's default / the config file's
    accelerate_config: Path | None = None  # an `accelerate config` YAML (FSDP, DeepSpeed, multi-node ...)


class GatesConfig(Strict):
    """Checked on the `heldout` split (on `eval` when there is no heldout data)."""

    dpo_margin_above_sft: bool = True  # DPO reward margin > SFT's, summed and per token
    sft_margin_above_base: bool = True  # SFT reward margin > base's, summed and per token
    base_margin_below_zero: bool = True  # the base prefers the generic answer (summed and per-token margin < 0)
    style_above_base: bool = True  # SFT's and DPO's style scores > the base's
    dpo_max_style_drop: float | None = Field(0.05, ge=0)  # DPO style score >= SFT's - this; null = off
    mention_at_least_base: bool = True  # SFT and DPO mention the question's subject at least as often as base
    dpo_max_repetition_rise: float | None = Field(0.05, ge=0)  # DPO repeated-4-gram share <= SFT's + this
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
    # null = the 95th percentile of the held-out answers' token counts (end-of-turn included): answers that
    # fit are not cut off; run.generation in eval.json counts those that hit the limit
    max_new_tokens: int | None = Field(None, gt=0)
    seed: int = 3407
    embedding: Literal["minilm", "tfidf"] = "minilm"  # style-score embeddings; tfidf is also the fallback
    judge: Literal["none", "claude"] = "none"  # claude: pairwise win-rates through stages/common/claude.py
    judge_prompts: int = Field(20, ge=1)
    judge_model: str | None = None  # null = generate.anthropic.model (its prices and client settings apply)
    judge_max_tokens: int = Field(512, gt=0)
    judge_temperature: float | None = Field(None, ge=0, le=1)  # null = the model's default (newer models reject others)
    judge_max_failure_share: float = Field(0.05, ge=0, le=1)  # more failed judge requests than this fail the stage
    gates: GatesConfig = GatesConfig()


GgufType = Literal["f32", "f16", "bf16", "q8_0"]


class Tolerance(Strict):
    """How far an exported format may drift from models/dpo, along the DPO model's own greedy answers."""

    max_logprob_diff: float = Field(gt=0)  # max |log p_export(t) - log p_dpo(t)| over every answer token t
    min_margin: float = Field(ge=0)  # top-1 must agree wherever the DPO model's top-1/top-2 gap exceeds this (nats)


def _default_tolerances() -> dict[str, Tolerance]:
    # Justified in README ("Export"): a few times the drift measured on the default run, far below what a
    # wrong model, template or tokenizer produces (> 1 nat).
    return {
        "float32": Tolerance(max_logprob_diff=1e-3, min_margin=0.0),
        "float16": Tolerance(max_logprob_diff=0.05, min_margin=0.1),
        "bfloat16": Tolerance(max_logprob_diff=0.25, min_margin=0.5),
        "f32": Tolerance(max_logprob_diff=0.05, min_margin=0.1),
        "f16": Tolerance(max_logprob_diff=0.05, min_margin=0.1),
        "bf16": Tolerance(max_logprob_diff=0.25, min_margin=0.5),
        "q8_0": Tolerance(max_logprob_diff=0.5, min_margin=0.25),
    }


class ExportConfig(Strict):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # models/final; auto = 16-bit on CUDA
    gguf: list[GgufType] = Field(default_factory=lambda: ["f16", "q8_0"])  # [] = no GGUF, no Modelfile
    pre_tokenizer: str = "gpt-2"  # tokenizer.ggml.pre when the converter does not recognise the tokenizer
    samples: int = Field(4, gt=0)  # held-out prompts (formatted dpo_eval) the checks answer greedily
    max_new_tokens: int = Field(64, gt=0)
    tolerance: dict[str, Tolerance] = Field(default_factory=_default_tolerances)  # per dtype / GGUF type
    license: str = "apache-2.0"  # model card metadata
    tags: list[str] = Field(default_factory=lambda: ["tuneforge", "dpo", "lora", "persona"])

    @model_validator(mode="after")
    def _every_gguf_type_has_a_tolerance(self) -> ExportConfig:
        missing = [t for t in self.gguf if t not in self.tolerance]
        if missing:
            raise ValueError(f"export.tolerance has no entry for {missing} (listed in export.gguf)")
        return self


PoolName = Annotated[str, StringConstraints(min_length=1, pattern=r"^[^/%&><]+$")]  # a Prefect work pool name


class PlacementConfig(Strict):
    """Where the Prefect flow runs each stage (flows/placement.py). No stage reads it: placement never
    changes a result, only which machine computes it."""

    default: PoolName | None = None  # work pool for stages not in `stages`; null = the flow's own workspace
    stages: dict[str, PoolName | None] = Field(default_factory=dict)  # stage -> pool (null = here)
    git_remote: str = "origin"  # the git server the workers fetch commits from

    def pool(self, stage: str) -> str | None:
        return self.stages[stage] if stage in self.stages else self.default


class Params(Strict):
    paths: PathsConfig
    model: ModelConfig = ModelConfig()
    base: BaseConfig = BaseConfig()
    heldout: HeldoutConfig = HeldoutConfig()
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
    export: ExportConfig = ExportConfig()
    placement: PlacementConfig = PlacementConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @property
    def validate(self) -> ValidateConfig:  # type: ignore[override]
        return self.validate_


class ParamsError(ValueError):
    """params.yaml is unreadable or does not match the schema; the message names file and key."""


def _describe(err: ValidationError, source: Path) -> str:
    lines: list[str] = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]).replace("validate_", "validate")
        if e["type"] == "owned_key":  # the message names the full key(s) itself
            lines += [f"  {line.strip()}" for line in e["msg"].splitlines()]
        elif e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (misspelt? see the schema in stages/common/config.py)")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join([f"{source}: {len(lines)} invalid parameter(s)", *lines])


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


def missing_files(params: Params) -> list[str]:
    """One line per file params.yaml lists that does not exist (paths relative to the working directory)."""
    listed = [(f"data.sources.{i}.path", s.path) for i, s in enumerate(params.data.sources)]
    if params.train.accelerate_config is not None:
        listed.append(("train.accelerate_config", params.train.accelerate_config))
    return [f"  {key}: file not found: {path}" for key, path in listed if not Path(path).is_file()]


def check_params(path: Path | str = PARAMS_FILE) -> Params:
    """load_params plus missing_files: what `python -m stages.common.config` checks; raises ParamsError."""
    path = Path(path)
    params = load_params(path)
    if missing := missing_files(params):
        raise ParamsError("\n".join([f"{path}: {len(missing)} invalid parameter(s)", *missing]))
    return params


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
        check_params(args.params)
        print(f"{args.params}: ok")


if __name__ == "__main__":
    # through the importable module, so its ParamsError is the class run_main reports in one line
    from stages.common import config
    from stages.common.io import run_main

    run_main(config.main)
