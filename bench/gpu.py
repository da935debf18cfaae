"""What bench/gpu.sh checks before it spends GPU time: a CUDA device torch can use, and whether unsloth (the
recipe's engine) imports. Run: python -m bench.gpu"""

from __future__ import annotations


def check() -> str:
    """One line describing the GPU and the engines; SystemExit with a clear message when there is no CUDA device."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.sh: no CUDA device visible to torch (torch "
                         f"{torch.__version__}, CUDA build {torch.version.cuda}); this script needs a GPU -- "
                         "on CPU run bench/rehearsal.py, bench/train.py and bench/evaluate.py")
    name = torch.cuda.get_device_name(0)
    total = torch.cuda.get_device_properties(0).total_memory / 1024**3
    line = f"GPU: {name}, {total:.1f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 " \
           f"{'yes' if torch.cuda.is_bf16_supported() else 'no'}"
    try:
        import unsloth  # noqa: F401  (imported before trl/transformers, as the engine layer does)

        line += f", unsloth {unsloth.__version__}"
    except Exception as err:  # noqa: BLE001 - the transformers rows still run
        raise SystemExit(f"bench/gpu.sh: unsloth does not import ({err}); install the `unsloth` extra") from None
    return line


if __name__ == "__main__":
    print(check())
