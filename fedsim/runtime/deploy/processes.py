"""Processes of a deployment: free ports, waiting for one to open, stopping a process group, and
running a few long-lived programs together (a SuperLink with its proxy, a SuperNode with its
ClientApp runner) so that when one ends, the others do too."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether `host:port` can be listened on now."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60, host: str = "127.0.0.1") -> None:
    """Return once `host:port` accepts connections; RuntimeError if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            program = proc.args[0] if isinstance(proc.args, Sequence) else proc.args
            raise RuntimeError(
                f"{Path(str(program)).name} exited with code {proc.returncode} before opening port {port}"
            )
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout:g} s")


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM the process group `proc` leads (started with start_new_session=True) and the
    groups its children detached into (the SuperLink's SuperExec); SIGKILL what is left once
    the leader has exited or `timeout` has passed."""
    groups = [proc.pid, *_detached_children(proc.pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pgid in groups:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    proc.wait()


def _detached_children(pid: int) -> list[int]:
    """Direct children of `pid` leading a session of their own (Linux /proc; [] elsewhere)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [int(c) for c in children if os.getpgid(int(c)) == int(c)]
    except (OSError, ValueError):
        return []


class Together:
    """Long-lived programs run side by side in this process group: `wait()` returns when the first
    one ends (or on SIGTERM / SIGINT), after ending the others; its code is the first one's."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._signalled: int | None = None

    def start(self, name: str, cmd: Sequence[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(list(cmd), env=self.env)
        self.procs.append((name, proc))
        return proc

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signalled = signum

    def wait(self, poll_s: float = 0.2) -> tuple[str, int]:
        """(name of the program that ended first, its exit code); 0 when a signal stopped them."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while self._signalled is None:
                ended = [(name, p.returncode) for name, p in self.procs if p.poll() is not None]
                if ended:
                    return ended[0]
                time.sleep(poll_s)
            return "signal", 0
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM every program still running (newest first), SIGKILL after `timeout`."""
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
