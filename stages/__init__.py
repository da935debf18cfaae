"""tuneforge's DVC stages (`python -m stages.<name>`).

Importing the package first drops the known-harmless library log lines listed in stages/common/quiet.py,
before any stage imports torch, transformers or bitsandbytes; real warnings stay visible.
"""

from stages.common.quiet import silence_harmless

silence_harmless()
