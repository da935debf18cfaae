"""Fixtures for the flow tests: offline environment, toy DVC repo."""

from __future__ import annotations

from pathlib import Path

import pytest
from dvc_toy import make_toy_repo


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)


@pytest.fixture
def toy_repo(tmp_path: Path) -> Path:
    return make_toy_repo(tmp_path / "toy")
