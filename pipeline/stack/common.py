"""Process, port and package helpers shared by the local stack's services."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import StackError

_apt_updated = False


def port_open(port: int, host: str = "127.0.0.1", timeout_s: float = 0.3) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def ensure_debian_packages(binaries: dict[str, str]) -> None:
    """Install the Debian package of every binary (name -> package) that is not on PATH.

    Uses apt-get as root; otherwise fails with the exact command to run. Service start on install is
    suppressed with policy-rc.d (the stack runs its own instances; the system's would only take ports).
    """
    missing = {binary: pkg for binary, pkg in binaries.items() if not find_binary(binary)}
    if not missing:
        return
    packages = sorted(set(missing.values()))
    command = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if os.geteuid() != 0:
        raise StackError(
            f"{', '.join(missing)} not installed; run: sudo apt-get update && sudo {' '.join(command)}"
        )
    global _apt_updated
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if made_policy:
        policy.write_text("#!/bin/sh\n# written by notify stack: do not start services during install\nexit 101\n")
        policy.chmod(0o755)
    try:
        print(f"installing Debian package(s) {', '.join(packages)} ...", flush=True)
        if not _apt_updated:
            _run_or_raise(["apt-get", "update", "-q"], env)
            _apt_updated = True
        _run_or_raise(command, env)
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)
    still = [b for b in missing if not find_binary(b)]
    if still:
        raise StackError(f"installed {', '.join(packages)} but {', '.join(still)} is still not found")


def _run_or_raise(command: Sequence[str], env: dict[str, str]) -> None:
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise StackError(f"`{' '.join(command)}` failed ({done.returncode}):\n{tail_text(done.stdout + done.stderr)}")


def find_binary(name: str) -> str | None:
    """A binary on PATH, or in a versioned Debian PostgreSQL folder (newest version first)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    return str(candidates[-1]) if candidates else None


def tail_text(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def tail_file(path: Path, lines: int = 40) -> str:
    try:
        return tail_text(path.read_text(errors="replace"), lines)
    except FileNotFoundError:
        return f"(no log at {path})"


def wait_until(check: Callable[[], bool], timeout_s: float, interval_s: float = 0.25,
               alive: Callable[[], bool] | None = None) -> bool:
    """Poll `check` until it is true (True), the deadline passes or `alive` turns false (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        if alive is not None and not alive():
            return check()
        time.sleep(interval_s)
    return False


# --- processes we started -------------------------------------------------------------------------------
# A pid alone can be reused by another program after a crash; the kernel's start time of the process makes
# "this is the one we started" exact, so `down` never signals a stranger.


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # fields after the parenthesised command name (which may contain spaces): state is field 3, start time 22
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):  # a zombie has exited; it only waits to be reaped
        _reap(pid)
        return None
    return int(fields[19])


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):  # not our child: init reaps it
        os.waitpid(pid, os.WNOHANG)


@dataclass(frozen=True)
class OwnedProcess:
    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> OwnedProcess | None:
        started = _start_time(pid)
        return None if started is None else cls(pid, started)

    def alive(self) -> bool:
        return _start_time(self.pid) == self.start_time

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"pid": self.pid, "start_time": self.start_time}))

    @classmethod
    def load(cls, path: Path) -> OwnedProcess | None:
        try:
            data = json.loads(path.read_text())
            return cls(int(data["pid"]), int(data["start_time"]))
        except (OSError, ValueError, KeyError):
            return None

    def terminate(self, timeout_s: float = 30.0) -> None:
        """SIGTERM, wait, then SIGKILL what is left."""
        if not self.alive():
            return
        os.kill(self.pid, signal.SIGTERM)
        if not wait_until(lambda: not self.alive(), timeout_s):
            os.kill(self.pid, signal.SIGKILL)
            wait_until(lambda: not self.alive(), 5.0)
