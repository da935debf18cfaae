"""Known-harmless library log lines, dropped at their source; every other warning stays visible.

Each entry names the logger that emits the line, a pattern of that exact message and why it is harmless
here. The filters sit on the emitting loggers themselves, so they hold however logging is configured
later; `stages/__init__.py` registers them before any stage imports torch, transformers or bitsandbytes.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Harmless:
    logger: str
    pattern: str
    why: str


HARMLESS = (
    Harmless("torchao", r"^Failed to load \S*torchao/_C\w*\.\S*so: ",
             "torchao's prebuilt CUDA kernels (mxfp8, cutlass sm90a) do not load into a CPU or older-CUDA torch; "
             "transformers and peft import torchao only to probe it, and tuneforge uses none of its kernels"),
    Harmless("bitsandbytes.backends.cpu.ops",
             r"^Failed to load CPU gemm_4bit_forward from kernels-community: .*pip install kernels",
             "on AVX512-BF16 CPUs bitsandbytes tries an optional Hub-downloaded 4-bit kernel and falls back to "
             "its own one (QLoRA on CPU is correct, just slower)"),
    Harmless("torch.utils._pytree", r"is an Enum subclass and is now natively supported by torch\.compile",
             "torchao registers its enums through a torch API that torch 2.13 deprecates; nothing here calls it"),
)


class _Drop(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def silence_harmless() -> None:
    """Attach each HARMLESS filter to its logger (once; calling again changes nothing)."""
    for entry in HARMLESS:
        logger = logging.getLogger(entry.logger)
        if not any(isinstance(f, _Drop) and f.pattern.pattern == entry.pattern for f in logger.filters):
            logger.addFilter(_Drop(entry.pattern))
