"""Shared training plumbing for `sft` and `dpo`: TRL configs from params, experiment tracking (DVCLive by default,
through TRL's `report_to`), resumable checkpoints, multi-process launch."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from stages.common.config import PathsConfig, TrainConfig
from stages.common.engine import device
from stages.common.io import InputError, iter_jsonl, require

log = logging.getLogger(__name__)

LAUNCHED = "TUNEFORGE_LAUNCHED"  # set for the processes `relaunch_distributed` starts
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def launched() -> bool:
    """Inside a process started by `accelerate launch` / torchrun (ours or the user's own)."""
    return bool(os.environ.get(LAUNCHED) or os.environ.get("LOCAL_RANK") or os.environ.get("ACCELERATE_LAUNCHED"))


def is_main_process() -> bool:
    """Rank 0 of a launched group, or the only process: the one that writes outputs and reports."""
    return int(os.environ.get("RANK", "0")) == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(module: str, cfg: TrainConfig) -> list[str]:
    """`accelerate launch` of `python -m module` with cfg.num_processes processes (DDP unless the
    user's accelerate config says FSDP / DeepSpeed / ...)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(cfg.num_processes)]
    if cfg.accelerate_config is not None:
        cmd += ["--config_file", str(require(cfg.accelerate_config, "train.accelerate_config"))]
    else:
        # DDP over torchrun; on a machine without CUDA every process trains on CPU (gloo backend).
        cmd += ["--multi_gpu", "--num_machines", "1", "--main_process_port", str(_free_port())]
    if cfg.mixed_precision is not None:
        cmd += ["--mixed_precision", cfg.mixed_precision]
    return [*cmd, "-m", module]


def relaunch_distributed(module: str, cfg: TrainConfig) -> None:
    """With train.num_processes > 1 and not yet launched: re-run `module` under `accelerate launch` and
    exit with its status. Otherwise return and let the caller train in this process."""
    if cfg.num_processes <= 1 or launched():
        return
    cmd = launch_command(module, cfg)
    log.info("train.num_processes=%d: %s", cfg.num_processes, " ".join(cmd))
    env = {**os.environ, LAUNCHED: "1"}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.num_processes)))
    raise SystemExit(subprocess.call(cmd, env=env))


def precision(trainer: dict[str, Any]) -> dict[str, bool]:
    """bf16 / fp16 for TRL's SFTConfig / DPOConfig: as the trainer section says; on CPU fp32 unless it
    says otherwise (TRL would default to bf16 autocast, which is slower and less precise there). Unset or null on
    a GPU: TRL's default (bf16 unless fp16)."""
    if device() == "cpu":
        return {"bf16": bool(trainer.get("bf16")), "fp16": bool(trainer.get("fp16"))}
    return {k: trainer[k] for k in ("bf16", "fp16") if trainer.get(k) is not None}


def mixed_precision(trainer: dict[str, Any]) -> str:
    flags = precision(trainer)
    fp16 = flags.get("fp16", False)
    return "bf16" if flags.get("bf16", not fp16) else "fp16" if fp16 else "fp32"  # TRL: bf16 unless fp16


DEFAULT_REPORT_TO = ["dvclive"]  # sft.trainer.report_to / dpo.trainer.report_to when the section does not set it


def trl_config(config_cls: type, section: str, trainer: dict[str, Any], **owned: Any) -> Any:
    """TRL's own config (trl.SFTConfig / trl.DPOConfig) from the params section `section` plus the keys the stage
    owns (config validation has refused those in the section). TRL validates every other key itself; a key it
    rejects, or a report_to integration that is unknown or not installed, is an InputError naming the section."""
    user = {k: v for k, v in trainer.items() if not (k in ("bf16", "fp16") and v is None)}  # null = TRL's default
    try:
        args = config_cls(**{"report_to": DEFAULT_REPORT_TO, **user, **precision(trainer)}, **owned)
    except (TypeError, ValueError) as err:
        raise InputError(f"params.yaml: {section}: {err}") from None
    from transformers.integrations import (
        get_available_reporting_integrations,
        get_reporting_integration_callbacks,
    )

    try:
        get_reporting_integration_callbacks(args.report_to)  # transformers' own check of the names
    except ValueError as err:
        raise InputError(f"params.yaml: {section}.report_to: {err}") from None
    available = get_available_reporting_integrations()
    missing = [name for name in args.report_to if name not in available]
    if missing:  # refused here, before a model is loaded or trained, rather than by the trainer
        raise InputError(f"params.yaml: {section}.report_to: {', '.join(missing)} is not installed here (installed: "
                         f"{', '.join(available) or 'none'}; e.g. pip install -e \".[wandb]\")")
    return args


def _live_callback(folder: Path) -> Any:
    from dvclive.plots import Metric
    from transformers.integrations import DVCLiveCallback

    class LiveCallback(DVCLiveCallback):
        """transformers' DVCLive integration with what a DVC stage needs: its own folder and no dvc.yaml or
        experiment of its own (dvc.yaml declares the folder; `dvc repro` / `dvc exp run` record the run), and the
        trainer's global step as DVCLive's step (transformers counts log calls), so train and eval curves share
        their x-axis. A resumed run first logs the checkpoint's history: its curve is an uninterrupted run's."""

        def setup(self, args: Any, state: Any, model: Any) -> None:
            if state.is_world_process_zero and self.live is None:
                from dvclive import Live

                self.live = Live(dir=str(folder), dvcyaml=None, save_dvc_exp=False)
                if "data" in getattr(self.live, "_studio_events_to_skip", ()):
                    # No DVC Studio configured: DVCLive would still re-read params.yaml and every curve so far at
                    # each step to build the update it then drops (quadratic in the steps logged).
                    self.live.post_data_to_studio = lambda: None
            super().setup(args, state, model)

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            super().on_train_begin(args, state, control, model=model, **kwargs)
            for logs in state.log_history:  # empty unless resumed from a checkpoint
                self._log(state, logs["step"], logs)

        def on_log(self, args: Any, state: Any, control: Any, model: Any = None, logs: Any = None,
                   **kwargs: Any) -> None:
            if not self._initialized:
                self.setup(args, state, model)
            self._log(state, state.global_step, logs or {})

        def _log(self, state: Any, step: int, logs: dict[str, Any]) -> None:
            if not state.is_world_process_zero or "train_runtime" in logs:  # end-of-run summary: reports/<stage>.json
                return
            self.live.step = step
            for key, value in logs.items():
                name = f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"
                timing = key.endswith(("_runtime", "_per_second"))  # differs every run: no metric to compare
                if key != "step" and name != "eval/epoch" and not timing and Metric.could_log(value):
                    self.live.log_metric(name, value)
            self.live.next_step()  # writes metrics.json (the latest value of each) at this step

    return LiveCallback()


def report_to_trackers(trainer: Any, paths: PathsConfig, stage: str, key: str) -> None:
    """Point the integrations TRL set up from report_to at the stage's folders.

    DVCLive (the default) writes step metrics to paths.dvclive/<stage> (plots/metrics/{train,eval}/*.tsv and the
    latest values in metrics.json); TensorBoard writes to paths.tensorboard/<stage>/<run key> unless
    TENSORBOARD_LOGGING_DIR says otherwise (its own default is inside the checkpoints, removed after the run);
    W&B and the rest keep their own settings (WANDB_PROJECT, WANDB_MODE ...). Without DVCLive the folder DVC
    expects holds an empty metrics.json."""
    from transformers.integrations import DVCLiveCallback, TensorBoardCallback

    folder = paths.dvclive / stage
    live = False
    for callback in list(trainer.callback_handler.callbacks):
        if type(callback) is DVCLiveCallback:
            trainer.remove_callback(callback)
            trainer.add_callback(_live_callback(folder))
            live = True
        elif isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(paths.tensorboard / stage / key)
    if not live and is_main_process():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text("{}\n")
        log.info("report_to has no dvclive: %s holds no curves", folder)


def file_digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()


def run_key(inputs: list[Path], settings: dict[str, Any]) -> str:
    """Identity of a training run: its input files' bytes and its settings. A checkpoint from a run
    with another key is never resumed (no resuming onto different data or params)."""
    h = hashlib.sha256(file_digest(*inputs).encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def checkpoint_dir(root: Path, stage: str, key: str) -> Path:
    """checkpoints/<stage>/<key>; stale keys of the same stage are removed."""
    stage_root = root / stage
    if stage_root.exists() and is_main_process():
        for old in stage_root.iterdir():
            if old.name != key:
                log.info("removing checkpoints of an earlier %s run with other data/params: %s", stage, old)
                shutil.rmtree(old, ignore_errors=True)
    out = stage_root / key
    out.mkdir(parents=True, exist_ok=True)
    return out


def last_checkpoint(folder: Path) -> str | None:
    """The newest complete checkpoint-N in folder (trainer_state.json is the trainer's last write, so a
    checkpoint without it was cut off mid-save and is skipped), or None."""
    found = []
    if folder.exists():
        found = sorted((int(m.group(1)), p) for p in folder.iterdir()
                       if p.is_dir() and (m := _CHECKPOINT.match(p.name)))
    for step, path in reversed(found):
        if (path / "trainer_state.json").exists():
            log.info("resuming from %s (step %d)", path, step)
            _expose_default_adapter(path)
            return str(path)
        log.warning("skipping incomplete checkpoint %s (no trainer_state.json: killed while saving)", path)
    return None


def _expose_default_adapter(checkpoint: Path) -> None:
    """PEFT saves the `default` adapter at the top of a checkpoint and any other adapter (TRL's DPO `ref`
    copy) in a subfolder; on resume transformers then loads only the subfolders and silently restarts the
    policy from its initial weights. A `default/` subfolder copy makes it load the trained adapter too."""
    weights = checkpoint / "adapter_model.safetensors"
    others = [d for d in checkpoint.iterdir() if d.is_dir() and (d / "adapter_model.safetensors").exists()]
    target = checkpoint / "default"
    if not weights.exists() or not others or target.exists():
        return
    target.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy2(checkpoint / name, target / name)
    log.info("checkpoint holds adapters %s besides the trained one: exposing it as %s",
             sorted(d.name for d in others), target)


def finish_run(folder: Path) -> None:
    """After the outputs are written: drop the run's checkpoints (they only serve a resume)."""
    if is_main_process() and folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
        log.info("run finished: removed its checkpoints %s", folder)


def load_rows(path: Path, columns: tuple[str, ...]) -> list[dict[str, Any]]:
    """Read formatted rows keeping only the given columns; a missing column names file and line."""
    rows = []
    for lineno, row in iter_jsonl(path):
        missing = [c for c in columns if c not in row]
        if missing:
            raise InputError(f"{path}:{lineno}: missing {missing} (re-run the `format` stage)")
        rows.append({c: row[c] for c in columns})
    if not rows:
        raise InputError(f"{path}: no rows")
    return rows


def trl_text_rows(tokenizer: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rendered DPO rows as TRL's DPOTrainer must receive them to see the tokens `format` checked.

    TRL tokenizes a plain-text prompt with the tokenizer's default special tokens. A tokenizer that adds BOS
    by itself (Llama 3's does) would put a second BOS before a rendered prompt, which already starts with
    one, while SFT and evaluation see one. For such a tokenizer the rendered BOS is left to the tokenizer.
    """
    bos = tokenizer.bos_token
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    auto = tokenizer("a")["input_ids"]
    if not bos or auto[:1] != [tokenizer.bos_token_id] or auto[1 : 1 + len(plain)] != plain:
        return rows
    out = [{**r, "prompt": r["prompt"].removeprefix(bos)} for r in rows]
    for before, after in zip(rows[:3], out[:3], strict=True):  # the same tokens, checked, not assumed
        rendered = tokenizer(before["prompt"], add_special_tokens=False)["input_ids"]
        if tokenizer(after["prompt"])["input_ids"] != rendered:
            raise InputError(f"DPO row {before.get('id', '?')}: the prompt does not tokenize the same with the "
                             "tokenizer's own BOS as with the rendered one; check the chat template")
    return out
