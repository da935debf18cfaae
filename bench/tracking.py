"""Benchmark the cost of the default tracker: CPU seconds DVCLive (stages/common/training.py's callback) spends per
logged trainer step, for short and long runs, without any training around it.

Run: python bench/tracking.py [--steps 300,3000] [--metrics 7] [--studio-update]

Each run feeds the callback `steps` trainer logs of `metrics` numbers (an SFT log has 7: loss, grad_norm,
learning_rate, entropy, num_tokens, mean_token_accuracy, epoch; a DPO log ~15) into a fresh folder, as the trainer
would, and reports process CPU time (not wall time: the machine is shared) per logged step. A cost that grows with
the number of steps shows as a larger figure for the longer run. The setup line is DVCLive's one-off cost per
stage: creating `Live` (it opens the DVC repository when there is one) and writing the trainer's arguments.
`--studio-update` puts back what the callback switches off without DVC Studio: DVCLive building a Studio update
(re-reading params.yaml and every curve so far) at each step.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(steps: int, metrics: int, studio_update: bool = False) -> dict[str, float]:
    from transformers import TrainingArguments

    from stages.common.training import _live_callback

    folder = Path(tempfile.mkdtemp(prefix="bench-tracking-")) / "sft"
    args = TrainingArguments(output_dir=str(folder.parent / "out"), report_to=[], use_cpu=True)
    callback = _live_callback(folder)
    state = SimpleNamespace(is_world_process_zero=True, global_step=0, log_history=[], is_hyper_param_search=False)
    started = time.process_time()
    callback.on_train_begin(args, state, None)
    setup = time.process_time() - started
    if studio_update:
        callback.live.post_data_to_studio = type(callback.live).post_data_to_studio.__get__(callback.live)
    started = time.process_time()
    for step in range(1, steps + 1):
        state.global_step = step
        callback.on_log(args, state, None, logs={f"m{i}": 1.0 / (step + i) for i in range(metrics)})
    per_step = (time.process_time() - started) / steps
    rows = sum(1 for _ in (folder / "plots" / "metrics" / "train" / "m0.tsv").open()) - 1
    assert rows == steps, rows
    return {"steps": steps, "metrics": metrics, "studio_update": studio_update, "setup_cpu_s": round(setup, 3),
            "cpu_ms_per_logged_step": round(1000 * per_step, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="300,3000")
    parser.add_argument("--metrics", type=int, default=7)
    parser.add_argument("--studio-update", action="store_true")
    args = parser.parse_args()
    for steps in (int(s) for s in args.steps.split(",")):
        print(json.dumps(run(steps, args.metrics, args.studio_update)))


if __name__ == "__main__":
    main()
