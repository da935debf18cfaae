"""The README's commands and tables, run or checked as a new user would meet them."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from pathlib import Path

import pytest

from flows.server import free_port, stop, wait_healthy
from tests.repo import env as venv_env

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_block(containing: str) -> str:
    """The README's ```bash block that contains `containing`."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"expected one README bash block with {containing!r}, found {len(found)}"
    return found[0]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_prefect_dashboard_on_a_non_default_port_is_told_the_right_api_url(tmp_path):
    """The README's sequence, as written, on a free port: the dashboard must be given that port's API."""
    block = code_block("prefect server start")
    port = free_port()
    assert "PORT=4200" in block
    lines = [line for line in block.replace("PORT=4200", f"PORT={port}").splitlines() if line.strip()]
    assert lines[-1].startswith("prefect server start")  # the server starts last, after the settings
    script = "set -e\n" + "\n".join(lines[:-1] + ["exec " + lines[-1]]) + "\n"
    env = {k: v for k, v in venv_env().items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # the profile `prefect config set` writes
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        api = f"http://127.0.0.1:{port}/api"
        wait_healthy(api, proc, timeout=240)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=10) as resp:
            settings = json.loads(resp.read())
        assert settings["api_url"] == api, settings  # what the dashboard calls: 4200 here means "Can't connect"
        profile = (tmp_path / "prefect-home" / "profiles.toml").read_text()
        assert f'PREFECT_API_URL = "{api}"' in profile  # flows and workers started later find the server too
    finally:
        stop(proc)
        log.close()


TOY_STAGE = '''import json
import yaml

p = yaml.safe_load(open("params.yaml"))
json.dump({"dpo": {"reward_margin": 1 - p["dpo"]["beta"]}}, open("eval.json", "w"))
'''


def _exp_show(repo: Path, *args: str) -> list[dict[str, str]]:
    import csv
    import io

    from tests.repo import dvc

    out = dvc("exp", "show", "--csv", *args, cwd=repo).stdout
    return list(csv.DictReader(io.StringIO(out)))


@pytest.mark.slow
def test_experiments_from_a_fresh_clone_need_the_committed_baseline_and_s_keeps_values(tmp_path):
    """The README's experiment steps on the real params.yaml with a one-stage DVC pipeline."""
    import yaml

    from tests.repo import dvc, run

    repo = tmp_path / "clone"
    repo.mkdir()
    (repo / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (repo / "toy.py").write_text(TOY_STAGE)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"evaluate": {
        "cmd": "python toy.py", "deps": ["toy.py"], "params": ["dpo.beta"], "metrics": ["eval.json"]}}}))
    (repo / ".gitignore").write_text("eval.json\n")
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.email", "t@tuneforge.invalid"],
                ["git", "config", "user.name", "t"]):
        run(cmd, cwd=repo)
    dvc("init", "-q", cwd=repo)
    run(["git", "add", "-A"], cwd=repo)
    run(["git", "commit", "-qm", "clone"], cwd=repo)
    keep = ["--drop", ".*", "--keep", "Experiment|rev|dpo.reward_margin|dpo.beta"]

    dvc("repro", cwd=repo)  # make run
    rows = {r["rev"]: r for r in _exp_show(repo, *keep)}
    assert rows["main"]["dpo.reward_margin"] == "!"  # nothing to compare against yet
    run(["git", "add", "dvc.lock"], cwd=repo)  # the README's step
    run(["git", "commit", "-qm", "baseline run"], cwd=repo)
    rows = {r["rev"]: r for r in _exp_show(repo, *keep)}
    assert rows["main"]["dpo.reward_margin"] == "0.9"

    before = (repo / "params.yaml").read_text()
    dvc("exp", "run", "-S", "dpo.beta=0.05", cwd=repo)
    after = (repo / "params.yaml").read_text()
    changed = _exp_show(repo, "--only-changed")
    assert {"dpo.beta", "dpo.reward_margin"} <= set(changed[0]) and "sft.lora.r" not in changed[0]
    assert sorted(r["dpo.beta"] for r in changed) == ["0.05", "0.05", "0.1"]  # workspace, experiment, main

    # what the README says -S does: every other value and every comment kept, the layout rewritten
    old, new = yaml.safe_load(before), yaml.safe_load(after)
    assert new["dpo"].pop("beta") == 0.05 and old["dpo"].pop("beta") == 0.1 and new == old
    comments = [line.split("#", 1)[1].strip() for line in before.splitlines() if line.lstrip().startswith("#")]
    assert all(c in after for c in comments)
    assert "target_modules: [q_proj" not in after and "temperature: null" not in after  # re-laid out
    assert len(set(before.splitlines()) - set(after.splitlines())) > 50  # "a few hundred changed lines"


def test_readme_names_the_keys_of_every_input_format():
    from stages.common.readers import KIND_OF_FORMAT, REQUIRED_KEYS

    rows = re.findall(r"^\| `(\w+)` \| (sft|dpo) \| (.+) \|$", README, flags=re.M)
    table = {fmt: (kind, keys) for fmt, kind, keys in rows}
    assert set(table) == set(REQUIRED_KEYS)
    for fmt, keys in REQUIRED_KEYS.items():
        kind, text = table[fmt]
        assert kind == KIND_OF_FORMAT[fmt], fmt
        assert all(f"`{k}`" in text for k in keys), (fmt, keys)
