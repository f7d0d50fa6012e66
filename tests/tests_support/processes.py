"""Processes a test starts: the venv's tools, a free loopback port, waiting, and stopping a
whole process group (the last two are fedsim.runtime.deploy's own, which `fedsim deploy local` uses)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fedsim.runtime.deploy.processes import free_port, stop_group

BIN = Path(sys.executable).parent  # the venv's bin: flwr, flower-superlink, ray

__all__ = ["BIN", "free_port", "stop_group", "venv_env", "wait_until"]


def venv_env(**extra: str) -> dict[str, str]:
    """This environment with the venv first on PATH (servers start their helpers by name)."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def wait_until(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.5) -> None:
    """Return once `condition()` holds; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)
