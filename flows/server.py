"""A throwaway local `prefect server start` (SQLite, telemetry off, PREFECT_HOME in a given dir).

For the integration test and the overhead benchmark; for interactive use run `prefect server start`
yourself (see the README). Stopped by its own PID (its process group) on exit.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(home: Path, api_url: str) -> dict[str, str]:
    """Environment for the server, workers and flow processes that talk to it."""
    return dict(
        os.environ,
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_LOCAL_STORAGE_PATH=str(home / "storage"),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        DVC_NO_ANALYTICS="1",
    )


def prefect_cli() -> list[str]:
    """This interpreter's `prefect` CLI, so it works without an activated venv."""
    return [str(Path(sys.executable).parent / "prefect")]


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 20) -> None:
    """Stop a process started with start_new_session=True (and its children) by its own PID."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass


def wait_healthy(api_url: str, proc: subprocess.Popen, timeout: float = 90) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode} before becoming healthy")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server at {api_url} not healthy after {timeout:.0f} s")


@contextmanager
def local_server(home: Path, log_file: Path | None = None) -> Iterator[dict[str, str]]:
    """Start `prefect server start` on 127.0.0.1 and a free port; yield the env to reach it."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = server_env(home, f"http://127.0.0.1:{port}/api")
    out = open(log_file or home / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [*prefect_cli(), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off"],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        seconds = wait_healthy(env["PREFECT_API_URL"], proc)
        log.info("prefect server pid %d healthy on port %d after %.1f s", proc.pid, port, seconds)
        yield env
    finally:
        stop(proc)
        out.close()
