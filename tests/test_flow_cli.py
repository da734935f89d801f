"""`python -m flows build-shards` as a user runs it: a real process with its own temporary
Prefect server. Killed with SIGKILL mid-build, it leaves nothing running (not the server, not
a pool process) and its lock is free for the next build."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from shards.lock import LOCK_NAME, output_lock

ROOT = Path(__file__).resolve().parents[1]


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.add(c)
            todo.append(c)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(what: str, check, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the CLI exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_kill_9_of_the_cli_leaves_nothing_running(prefect_harness, tmp_path):
    from prefect.settings import get_current_settings

    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    # No API URL: the CLI starts its own server. On the harness's database, already migrated,
    # so that server starts as it does for a user's second run, not after a fresh migration.
    database = get_current_settings().server.database.connection_url.get_secret_value()
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(ROOT)}
    env |= {"PREFECT_API_DATABASE_CONNECTION_URL": database, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    args = ["build-shards", "--dataset", "demo", "--output", str(out), "--shard-samples", "40"]
    args += ["--train-per-class", "60", "--val-per-class", "4", "--demo-size", "64", "--workers", "2"]
    cli = subprocess.Popen(
        [sys.executable, "-m", "flows", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        # Mid-build: the server answered, the flow holds the lock, the pool writes shards.
        wait_until("the first shard", lambda: any(out.glob("demo-*.tar")), 180, cli)
        below = descendants(cli.pid)
        assert len(below) >= 3, below  # the temporary server and two pool processes at least
        cli.send_signal(signal.SIGKILL)
        cli.wait(timeout=30)
        wait_until("every process the CLI started to end", lambda: not any(alive(p) for p in below), 60)
    finally:
        cli.kill()
    assert (out / LOCK_NAME).exists()  # left by the killed build, and free: the next build takes it over
    with output_lock(str(out)):
        pass


def test_a_server_in_the_active_profile_is_used_not_a_temporary_one(tmp_path):
    """The quick look (no Prefect import) finds PREFECT_API_URL in the environment or the active profile."""
    (tmp_path / "profiles.toml").write_text(
        'active = "team"\n[profiles.team]\nPREFECT_API_URL = "http://prefect.example:4200/api"\n[profiles.ephemeral]\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {"PREFECT_HOME": str(tmp_path)}
    probe = (
        "import sys; from flows.server import configured_api_url; print(configured_api_url(), 'prefect' in sys.modules)"
    )

    def look(**extra: str) -> str:
        run = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env | extra, capture_output=True, text=True)
        return run.stdout.strip()

    assert look() == "http://prefect.example:4200/api False"
    assert look(PREFECT_PROFILE="ephemeral") == "None False"
    assert look(PREFECT_API_URL="http://other:1/api") == "http://other:1/api False"
