"""Markdown tables for the reports, through pandas (`DataFrame.to_markdown`, which uses tabulate).

    markdown_table([{"model": "sft", "reward margin": 0.12}, ...])   # one dict per row, keys = columns
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd


def markdown_table(rows: Sequence[Mapping[str, Any]] | pd.DataFrame, floatfmt: str = ".4f",
                   index: bool = False) -> str:
    """A GitHub-style pipe table; numbers right-aligned, floats as `floatfmt`, missing cells empty."""
    # object columns keep each cell's own type (an int column with a gap stays ints), gaps become None
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), dtype=object)
    if frame.empty:
        return ""
    return frame.where(frame.notna(), None).to_markdown(index=index, floatfmt=floatfmt, missingval="")
