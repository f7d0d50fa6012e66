"""`flwr run .` drives the same ServerApp/ClientApp as `fedsim run`, through a real SuperLink.

The test owns everything it starts: its own FLWR_HOME, a SuperLink on a free port (stopped by
PID at the end), and the run directory under tmp_path.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests_support.processes import BIN, free_port, stop_group, venv_env

from fedsim.results.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def superlink(tmp_path: Path) -> Iterator[tuple[dict[str, str], str]]:
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = venv_env(FLWR_HOME=str(home))  # the SuperLink starts `flower-superexec` by name
    proc = subprocess.Popen(
        [
            str(BIN / "flower-superlink"),
            "--insecure",
            "--simulation",
            "--disable-runtime-dependency-installation",
            "--port",
            str(port),
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        else:
            pytest.fail("SuperLink did not open its port within 60 s")
        yield env, "sim"
    finally:
        stop_group(proc)


def test_flwr_run_dot_runs_the_tiny_scenario(superlink: tuple[dict[str, str], str], tmp_path: Path) -> None:
    env, federation = superlink
    out = tmp_path / "runs"
    run_config = f'scenario="scenarios/tiny.toml" overrides="rounds=2;name=via-flwr" out="{out}"'
    result = subprocess.run(
        [
            str(BIN / "flwr"),
            "run",
            ".",
            federation,
            "--run-config",
            run_config,
            "--federation-config",
            "num-supernodes=4 client-resources-num-cpus=1",
            "--stream",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = read_metrics(out / "via-flwr")
    assert sorted(metrics["round"].unique()) == [0, 1, 2]
    assert (metrics[metrics["kind"] == "train"]["status"] == "ok").sum() == 4
    assert (out / "via-flwr" / "adapter" / "adapter_model.safetensors").is_file()
    shutil.rmtree(out)
