"""The reports' markdown tables (pandas DataFrame.to_markdown)."""

from __future__ import annotations

import pandas as pd

from stages.common.tables import markdown_table


def test_rows_become_a_pipe_table_with_numbers_right_aligned():
    table = markdown_table([{"model": "base", "margin": -0.5, "n": 3}, {"model": "sft", "margin": 0.123456}])
    lines = table.splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["model", "margin", "n"]
    assert lines[1].startswith("|:--") and lines[1].endswith("--:|")  # text left, numbers right
    assert [c.strip() for c in lines[2].strip("|").split("|")] == ["base", "-0.5000", "3"]
    assert [c.strip() for c in lines[3].strip("|").split("|")] == ["sft", "0.1235", ""]  # a gap is empty
    assert markdown_table([]) == ""


def test_a_frame_keeps_its_index_when_asked():
    frame = pd.DataFrame({"a.jsonl": {"duplicate": 2}, "b.jsonl": {"too_long": 1}}).fillna(0).astype(int)
    table = markdown_table(frame, index=True)
    assert "| duplicate" in table and "| too_long" in table and "a.jsonl" in table.splitlines()[0]
