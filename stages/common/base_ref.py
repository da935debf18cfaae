"""Which weights models/base stands for: base_ref.json, written by the `base` stage for a real base model.

A hub base is pinned to the commit its `model.revision` (branch, tag or commit) resolved to when `base` ran; a
local folder is recorded by its content hash. The training stages load exactly that: the hub snapshot at the
commit (from the Hugging Face cache, or downloaded when online), or the local folder after checking it is
unchanged. DVC sees a new commit or new local weights only when `base` runs again (`model.revision` is one of
its params; `dvc repro --force base` re-resolves a moving branch such as `main`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from stages.common.config import ModelConfig
from stages.common.io import InputError, hash_dir, require

log = logging.getLogger(__name__)

BASE_REF = "base_ref.json"

# What a training stage fetches of a hub base at its pinned commit: weights, configs, tokenizer; never the
# original/ consolidated checkpoints or other formats some repos carry beside the safetensors.
HUB_IGNORE = ["original/*", "*.pth", "*.gguf", "*.onnx", "*.msgpack", "*.h5", "*.ot"]


def hub_snapshot(repo_id: str, revision: str, weights: bool = True) -> Path:
    """The local snapshot folder of `repo_id` at `revision` (a branch, tag or commit), downloaded when needed and
    allowed, found in the Hugging Face cache when HF_HUB_OFFLINE=1. Its folder name is the resolved commit."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RevisionResolutionError

    patterns = None if weights else ["*.json", "*.jinja", "*.model", "*.txt", "tokenizer*"]
    try:  # offline, a commit is looked up in the cache only (huggingface_hub would otherwise list its files online)
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                      ignore_patterns=HUB_IGNORE if weights else None,
                                      local_files_only=constants.HF_HUB_OFFLINE))
    except (EntryNotFoundError, HfHubHTTPError, RevisionResolutionError, OSError, ValueError) as err:
        raise InputError(f"params.yaml: model.base={repo_id!r} at model.revision={revision!r} cannot be found (not in "
                         f"the Hugging Face cache while offline, or no such repo / revision?): {err}") from None


def file_stats(folder: Path) -> list[list[Any]]:
    """(name, size, mtime_ns) of every file: a cheap check that a local base is still what was hashed."""
    return [[str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns]
            for f in sorted(p for p in folder.rglob("*") if p.is_file())]


def base_model_id(base_dir: Path | str) -> str:
    """The weights behind models/base: the folder itself (tiny), a hub base's snapshot at the commit `base`
    resolved (base_ref.json), or a local base after checking it is the folder `base` hashed."""
    base_dir = require(base_dir, "base model")
    ref_file = Path(base_dir) / BASE_REF
    if not ref_file.exists():
        return str(base_dir)
    ref = json.loads(ref_file.read_text())
    if "commit" in ref:
        return str(hub_snapshot(ref["base"], ref["commit"]))
    if "sha256" in ref:
        folder = require(ref["base"], "local base model (model.base)")
        if file_stats(folder) != ref["files"] and hash_dir(folder) != ref["sha256"]:
            raise InputError(f"{folder}: the local base model changed since the `base` stage hashed it "
                             f"({ref_file}); run `dvc repro --force base` to record it (and retrain on it)")
    return ref["base"]


def resolve_base(model_cfg: ModelConfig) -> tuple[dict, Path]:
    """What base_ref.json records, so that DVC sees any change of the weights in models/base (a local folder's
    content hash and file stats for a cheap check at load time, or a hub base's resolved commit), and the folder
    holding its tokenizer (the local folder, or the hub snapshot at that commit without its weights)."""
    local = Path(model_cfg.base)
    if local.is_dir():
        return {"base": str(local), "sha256": hash_dir(local), "files": file_stats(local)}, local
    if local.exists() or model_cfg.base.startswith((".", "/")):
        raise InputError(f"params.yaml: model.base={model_cfg.base!r}: not a folder holding a model")
    snapshot = hub_snapshot(model_cfg.base, model_cfg.revision, weights=False)
    log.info("model.base %s at revision %s = commit %s", model_cfg.base, model_cfg.revision, snapshot.name)
    return {"base": model_cfg.base, "revision": model_cfg.revision, "commit": snapshot.name}, snapshot
