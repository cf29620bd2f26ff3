"""A local Prefect server for the flow: start ``prefect server start`` on 127.0.0.1 in the background with
``PREFECT_HOME`` under the project, wait for its ``/api/health``, stop it again (``grounding prefect up`` /
``down``). The server takes about 18 s to answer on 2 cores; clients started before that die with
``httpx.ConnectError``, so everything here waits for the health endpoint first.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"  # never another address: the server has no authentication
STATE = "server.json"  # under PREFECT_HOME: {"pid", "port", "api_url"} of the server `up` started


def free_port(preferred: int = 4200) -> int:
    """``preferred`` when nothing listens on it on 127.0.0.1, else a free port the OS picks."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port on 127.0.0.1")


def api_url(port: int) -> str:
    return f"http://{HOST}:{port}/api"


def is_healthy(url: str) -> bool:
    """True when ``{url}/health`` answers 200 (``url`` is a PREFECT_API_URL, ending in ``/api``)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=2) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def wait_healthy(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll ``{url}/health`` once a second for up to ``timeout`` seconds; ``TimeoutError`` (one line naming
    the URL and what to do) when it never answers, ``RuntimeError`` when ``proc`` (the server) exits."""
    deadline = time.monotonic() + timeout
    while True:
        if is_healthy(url):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with code {proc.returncode} before {url}/health answered")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no Prefect server answered {url}/health within {timeout:.0f} s; start one with "
                               f"`eval \"$(grounding prefect up)\"` (or point PREFECT_API_URL at a running one)")
        time.sleep(1)


def _prefect_exe() -> str:
    here = Path(sys.executable).with_name("prefect")  # the venv's, beside this python
    return str(here) if here.is_file() else (shutil.which("prefect") or "prefect")


def running(home: Path) -> dict | None:
    """The state of the server ``up`` started under ``home`` when it still answers, else ``None``."""
    try:
        st = json.loads((home / STATE).read_text())
        os.kill(int(st["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return st if is_healthy(st["api_url"]) else None


def up(home: Path, port: int | None = None, timeout: float = 120) -> dict:
    """Start the server under ``home`` (a new session, log in ``home/server.log``) on ``port`` (default:
    4200 when free, else a free one), wait for its health; return ``{"pid", "port", "api_url"}``. An
    already running one started here is returned as is."""
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    st = running(home)
    if st is not None:
        return st
    port = free_port() if port is None else port
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    with open(home / "server.log", "ab") as log:
        proc = subprocess.Popen([_prefect_exe(), "server", "start", "--host", HOST, "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    st = {"pid": proc.pid, "port": port, "api_url": api_url(port)}
    try:
        wait_healthy(st["api_url"], timeout, proc)
    except (TimeoutError, RuntimeError) as e:
        _stop(proc.pid)
        raise RuntimeError(f"{e} (log: {home / 'server.log'})") from None
    (home / STATE).write_text(json.dumps(st) + "\n")
    return st


def _stop(pid: int, timeout: float = 30) -> None:
    """SIGTERM the process group of ``pid`` (the session ``up`` started), SIGKILL after ``timeout`` s."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        try:  # reap it when it is our child
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    os.killpg(pid, signal.SIGKILL)


def down(home: Path) -> dict | None:
    """Stop the server ``up`` started under ``home``; its state, or ``None`` when none was recorded."""
    path = home.resolve() / STATE
    try:
        st = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if _is_prefect(int(st["pid"])):  # a stale record's pid may belong to another process by now
        _stop(int(st["pid"]))
    path.unlink(missing_ok=True)
    return st


def _is_prefect(pid: int) -> bool:
    try:
        return b"prefect" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
