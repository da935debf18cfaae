"""Known-harmless library log lines are dropped at their source; real warnings stay visible."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import stages  # noqa: F401 - importing the package registers the filters
from stages.common.quiet import HARMLESS

ROOT = Path(__file__).resolve().parents[3]
# the lines as the libraries print them (torchao 0.x, bitsandbytes 0.50, torch 2.13)
NOISE = {
    "torchao": "Failed to load /venv/lib/python3.11/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: "
               "Could not load this library: /venv/lib/python3.11/site-packages/torchao/_C_mxfp8.cpython-310.so",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community: No module named "
                                     "'kernels'. Please make sure you already `pip install kernels` and the kernels "
                                     ">= 0.11.1",
    "torch.utils._pytree": "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by "
                           "torch.compile as an opaque value type. Calling register_constant() on Enum subclasses "
                           "is deprecated and will be an error in a future release.",
}


def test_every_harmless_line_is_dropped_and_other_warnings_of_the_same_loggers_are_kept(caplog):
    assert {h.logger for h in HARMLESS} == set(NOISE)
    with caplog.at_level(logging.WARNING):
        for name, line in NOISE.items():
            logging.getLogger(name).warning(line)
            logging.getLogger(name).warning("%s: a real problem", name)
    assert [r.getMessage() for r in caplog.records] == [f"{name}: a real problem" for name in NOISE]


# Runs the `base` stage (tiny sizes) as dvc.yaml does, then emits real warnings from the same loggers.
STAGE = """
import logging, runpy, warnings
runpy.run_module("stages.base", run_name="__main__")
logging.getLogger("torchao").warning("Failed to load /opt/custom/libmine.so: a real failure")
warnings.warn("a real Python warning", UserWarning)
"""


@pytest.mark.slow
def test_a_stage_run_prints_no_harmless_noise_but_real_warnings(tmp_path):
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["base"].update(vocab_size=300, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=1,
                        num_kv_heads=1, corpus_size=8, epochs=1, batch_size=8)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    shutil.copytree(ROOT / "stages/registers", tmp_path / "stages/registers")  # params name them from the repo root
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", STAGE], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "base ready in" in proc.stderr  # the stage ran (and imported transformers' Trainer, hence torchao)
    for needle in ("_C_mxfp8", "_C_cutlass", "pip install kernels", "is an Enum subclass"):
        assert needle not in proc.stderr, needle
    assert "Failed to load /opt/custom/libmine.so: a real failure" in proc.stderr
    assert "UserWarning: a real Python warning" in proc.stderr
