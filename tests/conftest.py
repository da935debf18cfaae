"""Shared fixtures: the tiny training workspace (tests/tiny.py) built once per session, and the local Claude
API server (tests/claude_server.py) with the SDK pointed at it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on the hub


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """models/base (2-block random-init Llama) + data/formatted (24 train / 8 eval rows), built once."""
    from tests.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def claude_server(monkeypatch: pytest.MonkeyPatch):
    """A running tests/claude_server.py; ANTHROPIC_BASE_URL points at it, ANTHROPIC_API_KEY is TEST_KEY."""
    from tests.claude_server import TEST_KEY, ClaudeServer

    with ClaudeServer() as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", TEST_KEY)
        yield server


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> Path:
    """tests/export_workspace.py built and exported once (models/final with f16 and q8_0 GGUFs)."""
    from tests.export_workspace import build, exported

    root = build(tmp_path_factory.mktemp("export"))
    exported(root)
    return root
