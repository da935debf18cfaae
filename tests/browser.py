"""Headless Chromium (Debian's `chromium`) for tests that look at a page as a person would: the DOM after its
scripts ran, and a screenshot. The network is cut off (every request goes to a dead proxy), so a page that needs a
CDN shows nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path

import pytest


def chromium() -> str:
    """The chromium executable; where there is none, a skip (a failure under CI, which installs it)."""
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: .ci/run installs it with `make chromium` before the tests")
        pytest.skip("Chromium is not installed here (`make chromium` installs Debian's package; needs root)")
    return path


def render(page: Path, out: Path, width: int = 1200, height: int = 3000) -> tuple[str, Path]:
    """(the DOM once the page's scripts ran, a PNG screenshot) of a local page, offline."""
    out.mkdir(parents=True, exist_ok=True)
    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
            f"--user-data-dir={out / 'profile'}", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
            "--virtual-time-budget=20000", f"--window-size={width},{height}"]
    dom = subprocess.run([*base, "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True,
                         timeout=180, check=True).stdout
    shot = out / f"{page.stem}.png"
    subprocess.run([*base, f"--screenshot={shot}", page.resolve().as_uri()], capture_output=True, timeout=180,
                   check=True)
    assert shot.stat().st_size > 0
    return dom, shot


class _Marks(HTMLParser):
    """Vega's SVG marks per chart: each mark vega drew (bar, line, point ...) is a `path` with a non-empty `d`."""

    def __init__(self) -> None:
        super().__init__()
        self.charts: dict[str, list[dict[str, str]]] = defaultdict(list)
        self.chart: str | None = None
        self.kind: list[str] = []  # the mark type of each open <g>, or ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "div" and "vega-embed" in a.get("class", "") and a.get("id"):
            self.chart = a["id"]
        elif tag == "g":
            cls = a.get("class", "").split()
            self.kind.append(next((c.removeprefix("mark-") for c in cls if c.startswith("mark-")), "")
                             if "role-mark" in cls else "")
        elif tag == "path" and self.chart and self.kind and self.kind[-1] not in ("", "group", "text"):
            if a.get("d", "").startswith("M"):
                self.charts[self.chart].append({"mark": self.kind[-1], "label": a.get("aria-label", "")})

    def handle_endtag(self, tag: str) -> None:
        if tag == "g" and self.kind:
            self.kind.pop()


def marks(dom: str) -> dict[str, list[dict[str, str]]]:
    """chart id (DVC's div id, from the plot's name) -> the marks drawn in it: {"mark": "rect" | "line" | ...,
    "label": the mark's aria-label, e.g. "reward_margin: 41.1; model: sft; rev: workspace"}."""
    parser = _Marks()
    parser.feed(dom)
    return dict(parser.charts)


def colour_share(png: Path, rgb: tuple[int, int, int]) -> float:
    """Share of the screenshot's pixels of one colour (e.g. DVC's first revision colour #945dd6)."""
    from PIL import Image

    with Image.open(png) as image:
        pixels = list(image.convert("RGB").getdata())
    return sum(p == rgb for p in pixels) / len(pixels)
