"""The memory model (stages/common/memory.py): its parameter and byte counts against real models, token budgets,
and the 8B-on-one-GPU predictions against what is known of the recipe."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stages.common import memory


def _config(**kw) -> LlamaConfig:
    return LlamaConfig(vocab_size=kw.get("vocab", 512), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=kw.get("tied", False))


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_is_the_models(tied):
    model = LlamaForCausalLM(_config(tied=tied))
    shape = memory.ModelShape.from_config(model.config)
    assert shape.params == model.num_parameters()
    assert shape.linear_params == sum(m.weight.numel() for n, m in model.named_modules()
                                      if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    model = model.to(torch.bfloat16)
    assert memory.weight_bytes(shape, "bfloat16") == sum(p.numel() * p.element_size() for p in model.parameters())


def test_llama_3_1_8b_shape_is_the_published_one():
    assert memory.LLAMA_3_1_8B.params == 8_030_261_248  # Llama-3.1-8B's model card: 8.03B parameters
    assert memory.LLAMA_3_1_8B.lora_params(16, memory.ALL_LINEARS) == 41_943_040  # PEFT's count for r=16, all linears


def test_four_bit_bytes_match_bitsandbytes(tmp_path):
    """NF4 + double quantisation: the model's count of a real 4-bit load (CPU bitsandbytes) within 2%."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    cfg = _config(vocab=256)
    cfg.hidden_size, cfg.intermediate_size = 256, 512
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=q, dtype=torch.float32,
                                                 device_map={"": "cpu"})
    shape = memory.ModelShape.from_config(model.config)
    predicted = memory.weight_bytes(shape, "float32", four_bit=True)
    held = model.get_memory_footprint(return_buffers=False)
    assert predicted == pytest.approx(held, rel=0.02), (predicted, held)
    assert predicted < 0.5 * memory.weight_bytes(shape, "float32")


def test_token_budgets():
    assert memory.rows_within(8192, 2048, 16) == 4 and memory.rows_within(8192, 9000, 16) == 1
    assert memory.rows_within(None, 2048, 16) == 16
    widths = [2000, 1500, 300, 200, 100, 50]
    assert memory.rows_for_tokens(widths, 4000, 4) == [2, 4] and sum(memory.rows_for_tokens(widths, None, 4)) == 6
    for budget in (1000, 4096):
        start = 0
        for n in memory.rows_for_tokens(widths, budget, 8):
            assert n == 1 or n * widths[start] <= budget
            start += n


def test_logit_chunk_stays_within_its_budget():
    for vocab in (400, 32768, 128256):
        rows = memory.logit_chunk_tokens(vocab)
        assert rows * vocab * 4 * memory.LOGIT_COPIES <= memory.LOGIT_CHUNK_BYTES
    assert memory.logit_chunk_tokens(10**9) == 1


def test_recipe_predictions_agree_with_what_is_known_of_8b():
    """QLoRA SFT of an 8B model fits a 24 GB GPU (the recipe's premise); full fine-tuning with AdamW does not fit an
    80 GB one (~16 bytes per parameter before activations); checkpointing is what makes 2 x 2,048 tokens fit."""
    opts = {(o.stage, o.settings): o.prediction for o in memory.recipe_options()}
    qlora = opts[("sft", "qlora, unsloth, batch 2 x 2048, checkpointing")]
    assert memory.fits(qlora, 24) and 5 < memory.gib(qlora.model_bytes) < 6
    assert not memory.fits(opts[("sft", "full bf16 + AdamW, batch 1 x 2048, checkpointing")], 80)
    assert not memory.fits(opts[("sft", "qlora, unsloth, batch 2 x 2048, no checkpointing")], 24)
    assert all(memory.fits(p, 80) for (stage, s), p in opts.items() if "full" not in s and "no checkpointing" not in s)
