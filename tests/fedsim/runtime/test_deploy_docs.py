"""The deployment walk-throughs run as written: docs/deploy.md's "One laptop, step by step" block,
line by line, and the README's one-command deployment, in a fresh folder that holds only the
checkout's `.venv` and `scenarios/` (as a user's checkout would), with a Flower home of its own."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests_support.processes import stop_group

from fedsim.results.rundir import last_event, read_metrics
from fedsim.runtime.deploy.processes import port_free
from fedsim.runtime.deploy.proxy import nginx_binary

ROOT = Path(__file__).resolve().parents[3]
pytestmark = [
    pytest.mark.deploy,
    pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed (install.sh installs it)"),
]


def shell_block(markdown: str, heading: str) -> list[str]:
    """The commands of the first ```bash block after `heading`, continuation lines joined."""
    section = markdown[markdown.index(heading) :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, f"no bash block after {heading!r}"
    return [line.strip() for line in block.group(1).replace("\\\n", " ").splitlines() if line.strip()]


@pytest.fixture
def checkout(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """A folder laid out like a fresh checkout, and an environment whose Flower home is its own."""
    for name in (".venv", "scenarios"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home")}
    yield tmp_path, env


def _ready(log: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """Wait until a long-running fedsim command says it is up (its first `fedsim` line)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if re.search(r"^fedsim", text, re.M):
            return
        assert proc.poll() is None, f"`{proc.args}` exited with {proc.returncode}:\n{text[-3000:]}"
        time.sleep(0.3)
    raise AssertionError(f"`{proc.args}` did not start in {timeout:g} s:\n{log.read_text()[-3000:]}")


def test_the_step_by_step_walkthrough_runs_as_written(checkout: tuple[Path, dict[str, str]]) -> None:
    folder, env = checkout
    if not all(port_free(p) for p in (9092, 9093, 9094, 9095)):
        pytest.skip("the walk-through's ports 9092-9095 are taken on this machine")
    lines = shell_block((ROOT / "docs" / "deploy.md").read_text(), "## 2. One laptop, step by step")
    background: list[subprocess.Popen[bytes]] = []
    try:
        for i, line in enumerate(lines):
            command, _, comment = line.partition("#")
            if command.startswith("export PATH="):
                env["PATH"] = f"{folder / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"
                continue
            if "terminal" in comment:  # a long-running command, in a terminal of its own
                log = folder / f"terminal-{i}.log"
                with log.open("wb") as out:
                    proc = subprocess.Popen(
                        ["bash", "-c", command], cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )  # fmt: skip
                background.append(proc)
                _ready(log, proc)
                continue
            done = subprocess.run(["bash", "-c", command], cwd=folder, env=env, capture_output=True, text=True)
            assert done.returncode == 0, f"`{command}` exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr}"
    finally:
        for proc in reversed(background):
            stop_group(proc)
    run = folder / "runs" / "tiny"
    assert last_event(run)["event"] == "run_end"
    train = read_metrics(run).query("kind == 'train'")
    assert sorted(train["round"].unique()) == [1, 2] and (train["status"] == "ok").all()


def test_the_readmes_one_command_deployment_runs_as_written(checkout: tuple[Path, dict[str, str]]) -> None:
    folder, env = checkout
    readme = (ROOT / "README.md").read_text()
    line = next(cmd for cmd in shell_block(readme, "## Deployment") if "deploy local" in cmd)
    done = subprocess.run(shlex.split(line), cwd=folder, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "central accuracy" in done.stdout  # the same summary as `fedsim run`
    assert last_event(folder / "runs" / "tiny")["event"] == "run_end"
