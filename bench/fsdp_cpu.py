"""What FSDP does on a CPU machine with 2 gloo processes (the README's FSDP findings), each probe in torchrun:

  torch FSDP2          torch's own `fully_shard` on a tiny Llama: does it train, does a full state dict gather?
  save on rank 0       `save_pretrained` on rank 0 alone of an FSDP2-sharded model (what sft.py / dpo.py do)
  accelerate FSDP2     which distributed type accelerate sets up for presets/accelerate/fsdp2.yaml
  accelerate FSDP1     the same config with fsdp_version: 1

    python -m bench.fsdp_cpu
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

COMMON = """
import datetime, json, sys, torch, torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1)
"""

TORCH_FSDP2 = COMMON + """
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = LlamaForCausalLM(cfg)
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
data = torch.randint(0, 400, (8, 32), generator=torch.Generator().manual_seed(1))
losses = []
for step in range(4):
    batch = data[rank * 4:(rank + 1) * 4]
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward(); opt.step(); opt.zero_grad()
    t = loss.detach().clone(); dist.all_reduce(t); losses.append(round(float(t) / 2, 4))
sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    print(json.dumps({"losses": losses, "full_state_dict_tensors": len(sd),
                      "embed_shape": list(sd["model.embed_tokens.weight"].shape)}))
dist.destroy_process_group()
"""

SAVE_ON_RANK0 = COMMON + """
from torch.distributed.fsdp import fully_shard
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
model = LlamaForCausalLM(cfg)
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
if dist.get_rank() == 0:
    try:
        model.save_pretrained(sys.argv[1])
        print(json.dumps({"saved": True}))
    except Exception as err:
        print(json.dumps({"saved": False, "error": f"{type(err).__name__}: {err}"}))
dist.barrier()
dist.destroy_process_group()
"""

ACCELERATE = """
import json
from accelerate import Accelerator
acc = Accelerator(cpu=True)  # as TRL's trainers create it on CPU (use_cpu=True)
if acc.is_main_process:
    plugin = getattr(acc.state, "fsdp_plugin", None)
    print(json.dumps({"distributed_type": str(acc.distributed_type.value),
                      "fsdp_version": getattr(plugin, "fsdp_version", None)}))
"""


def probe(code: str, tmp: Path, launcher: list[str], *args: str) -> str:
    script = tmp / "probe.py"
    script.write_text(textwrap.dedent(code))
    proc = subprocess.run([*launcher, str(script), *args], capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent),
                               "HF_HUB_OFFLINE": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if lines:
        return lines[-1]
    errors = [line for line in proc.stderr.splitlines() if "Error:" in line and "ChildFailedError" not in line]
    return f"exit {proc.returncode}: {errors[-1].strip() if errors else proc.stderr[-300:]}"


def main() -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    fsdp2 = yaml.safe_load((ROOT / "presets/accelerate/fsdp2.yaml").read_text())
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        rows.append(("torch FSDP2", probe(TORCH_FSDP2, tmp, torchrun)))
        rows.append(("save on rank 0", probe(SAVE_ON_RANK0, tmp, torchrun, str(tmp / "saved"))))
        for version in (2, 1):
            config = {**fsdp2, "num_processes": 2, "mixed_precision": "no",
                      "fsdp_config": {**fsdp2["fsdp_config"], "fsdp_version": version}}
            path = tmp / f"fsdp{version}.yaml"
            path.write_text(yaml.safe_dump(config))
            launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path)]
            rows.append((f"accelerate FSDP{version}", probe(ACCELERATE, tmp, launch)))
    import accelerate
    import torch
    import transformers

    print(f"\n2 processes, gloo; torch {torch.__version__}, accelerate {accelerate.__version__}, "
          f"transformers {transformers.__version__}\n")
    print("| probe | result |\n|---|---|")
    for name, result in rows:
        print(f"| {name} | `{result}` |")


if __name__ == "__main__":
    main()
