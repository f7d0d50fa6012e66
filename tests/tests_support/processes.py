"""Processes a test starts: a free loopback port, and stopping a whole process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's bin: flwr, flower-superlink, ray


def venv_env(**extra: str) -> dict[str, str]:
    """This environment with the venv first on PATH (servers start their helpers by name)."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def detached_children(pid: int) -> list[int]:
    """Direct children of `pid` that lead a session of their own (Flower's SuperLink starts its
    SuperExec so): stopping `pid`'s group does not reach them. Linux /proc; [] elsewhere."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [int(c) for c in children if os.getpgid(int(c)) == int(c)]
    except (OSError, ValueError):
        return []


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """SIGTERM the process group `proc` leads (started with start_new_session=True), then
    SIGKILL if it has not exited within `timeout`; groups its children detached into are
    signalled too. A group that is already gone (a process the test killed) is fine."""
    groups = [proc.pid, *detached_children(proc.pid)]
    for pgid in groups:
        _signal_group(pgid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    for pgid in groups:  # whatever is left: children that outlived their leader, or a hung leader
        _signal_group(pgid, signal.SIGKILL)
    proc.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def wait_until(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.5) -> None:
    """Return once `condition()` holds; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)
