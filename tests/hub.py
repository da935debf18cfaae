"""A Hugging Face hub cache on disk (models--org--name/{refs,snapshots,blobs}) holding local model folders, so
`HF_HUB_OFFLINE=1` resolution (huggingface_hub.snapshot_download) can be tested without a hub."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def add_to_hub_cache(cache: Path, repo_id: str, source: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put every file of `source` into `cache` as repo `repo_id` at `commit` (40 hex digits), with `refs` (branch
    names) pointing at it; blobs are content-addressed and the snapshot's files link to them, as the hub's cache
    does. Returns the snapshot folder."""
    assert len(commit) == 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for f in sorted(p for p in source.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / f.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot
