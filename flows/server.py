"""The temporary Prefect server of `python -m flows build-shards`, owned by the CLI.

Prefect starts its own temporary server (uvicorn, about 200 MB) when no API URL is set, and
stops it from an atexit hook: a CLI killed with SIGKILL leaves it running for good. So the CLI
starts the same server itself, as a child that the kernel kills when the CLI dies
(prctl PR_SET_PDEATHSIG, Linux), kill -9 included, and starts it first thing, so that its
start overlaps the CLI's own imports and the indexing of the source.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import tomllib

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
ADDRESS_IN_USE = 3  # uvicorn's exit status when its port was taken meanwhile
_owned: TemporaryServer | None = None


def prefect_defaults() -> None:
    # The temporary server's first start (database migration) can take longer than Prefect's
    # default wait on a busy machine; and its telemetry only logs errors where there is no internet.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def configured_api_url() -> str | None:
    """The Prefect API this process is told to use, found without importing Prefect where it
    is not imported yet: PREFECT_API_URL, else the active profile's (profiles.toml)."""
    if "prefect.settings" in sys.modules:  # e.g. inside a test harness's temporary settings
        from prefect.settings import get_current_settings

        return get_current_settings().api.url
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml")).expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    return profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with(parent: int) -> Callable[[], None]:
    """A preexec_fn: the child gets SIGKILL when `parent` (its forking thread: the CLI's main
    thread) dies, and exits at once if the parent is already gone."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not in the child
    except (OSError, AttributeError):  # not Linux: the CLI's exit path still stops the server
        prctl = None

    def preexec() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class TemporaryServer:
    """Prefect's ephemeral API server (the same uvicorn command Prefect runs), as our child."""

    def __init__(self) -> None:
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> None:
        """Start it (call from the main thread, before other threads exist). Does not wait."""
        global _owned
        import importlib.util

        prefect_dir = Path(importlib.util.find_spec("prefect").origin).parent  # without importing Prefect
        self.port = _free_port()
        args = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect_dir.parent), "--factory"]
        args += ["prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--log-level", "error", "--lifespan", "on"]
        env = os.environ | {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        self.proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, preexec_fn=_die_with(os.getpid()))
        _owned = self

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until it answers /health; start it again on another port if its port was taken."""
        timeout = timeout or float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code == ADDRESS_IN_USE:
                self.start()
            elif code is not None:
                raise RuntimeError(f"the temporary Prefect server exited with status {code} while starting")
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                urllib.request.urlopen(f"{self.api_url}/health", timeout=5) as r,
            ):
                if r.status == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"the temporary Prefect server did not answer within {timeout:.0f}s")

    def stop(self) -> None:
        """Kill it without waiting: it holds nothing but a SQLite database, which survives a kill."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()


def abandon(server: TemporaryServer) -> None:
    """Stop `server` and forget it: another server is in use, so the CLI exits normally
    (waiting on Prefect's teardown, whose flushes that server must get)."""
    global _owned
    server.stop()
    if _owned is server:
        _owned = None


def owned_server() -> TemporaryServer | None:
    """The temporary server this process started, if any."""
    return _owned
