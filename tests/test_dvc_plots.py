"""`dvc plots`' assets in .dvc/: the offline HTML page (`make plots-page`) and the margin-by-model template. The
pipeline's own plots are rendered in tests/test_dag.py."""

from __future__ import annotations

import configparser
import re

import pytest

from tests.browser import marks, render
from tests.repo import ROOT

PLOTS = ROOT / ".dvc" / "plots"


def offline_page() -> str:
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    page = ROOT / ".dvc" / config["plots"]["html_template"]  # DVC reads it relative to .dvc/
    assert page == PLOTS / "offline.html"
    if not page.exists():
        pytest.fail(f"{page} is missing: `make install` (or `make plots-page`) builds it")
    return page.read_text()


def test_the_page_template_carries_vega_itself_and_loads_nothing():
    page = offline_page()
    assert "{plot_divs}" in page and "{scripts}" not in page  # {scripts}: DVC's CDN <script> tags
    pinned = re.search(r"^VEGA_LIBS\s*\?=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    assert re.findall(r'<script data-lib="([^"]+)">', page) == pinned == [
        "vega@5.33.1", "vega-lite@5.23.0", "vega-embed@6.29.0"]
    assert len(page) > 500_000  # the libraries themselves, not links to them
    assert not re.search(r"<script[^>]*\bsrc=", page) and "cdn.jsdelivr" not in page


@pytest.mark.slow
def test_margin_by_model_draws_a_bar_per_model_and_split(tmp_path):
    """The bar chart, as dvc.yaml configures it (x: reward_margin, y: model): one bar per model, from zero, and one
    panel per split when margins.csv has a `split` column; rendered with no network."""
    from dvc_render.html import render_html
    from dvc_render.vega import VegaRenderer

    offline_page()
    charts = {}
    for name, splits in {"plain": [None], "split": ["eval", "heldout"]}.items():
        rows = [{"model": m, "reward_margin": v, "rev": "workspace", **({"split": s} if s else {})}
                for s in splits for m, v in (("base", -85.4), ("sft", 41.1), ("dpo", 163.8))]
        charts[name] = VegaRenderer(rows, f"{name}.csv", x="reward_margin", y="model", template="margin_by_model",
                                    template_dir=str(PLOTS), title=name)
    page = render_html(list(charts.values()), tmp_path / "index.html", html_template=str(PLOTS / "offline.html"))
    drawn = marks(render(page, tmp_path / "chromium")[0])
    assert sorted(drawn) == ["plain_csv", "split_csv"]
    for name, renderer in charts.items():
        bars = drawn[f"{name}_csv"]
        assert [b["mark"] for b in bars] == ["rect"] * len(renderer.datapoints)
        labels = " | ".join(b["label"] for b in bars)
        for row in renderer.datapoints:  # vega writes a minus sign
            assert f"reward_margin: {row['reward_margin']:.1f}".replace("-", "\u2212") in labels
        assert labels.count("model: dpo") == (2 if name == "split" else 1)
