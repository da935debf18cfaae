"""Shared fixtures: the tiny training workspace (tests/tiny.py) built once per session."""

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
