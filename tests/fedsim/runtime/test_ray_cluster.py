"""`simulation.ray_address`: the federation runs on an existing Ray cluster instead of starting
its own. The test starts a one-machine cluster (`ray start --head --block`, its own temp dir)
and stops it at the end, whatever happens. The federation runs as `fedsim run` in its own
process, as a user connects to a cluster: in the suite's process, after the earlier tests' own
Ray sessions, Ray's driver once crashed the whole pytest run (segmentation fault, CI on a clean
clone) where this file alone passed."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests_support.processes import BIN, free_port, stop_group, venv_env

from fedsim.results.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def ray_cluster() -> Iterator[tuple[str, Path]]:
    temp = Path(tempfile.mkdtemp(prefix="/tmp/fsray"))  # short: Ray's socket paths have a length limit
    port = free_port()
    env = venv_env()
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 90
        while not list(temp.glob("session_*/logs/raylet.out")):
            if time.time() > deadline or proc.poll() is not None:
                pytest.fail("the Ray head did not start within 90 s")
            time.sleep(0.5)
        time.sleep(2)
        yield f"127.0.0.1:{port}", temp
    finally:
        stop_group(proc)
        shutil.rmtree(temp, ignore_errors=True)


def test_runs_on_an_existing_ray_cluster(ray_cluster: tuple[str, Path], tmp_path: Path) -> None:
    address, temp = ray_cluster
    command = [
        str(BIN / "fedsim"),
        "run",
        str(ROOT / "scenarios" / "tiny.toml"),
        "--out",
        str(tmp_path),
        "--set",
        "rounds=1",
        "--set",
        f"simulation.ray_address='{address}'",
    ]
    done = subprocess.run(command, env=venv_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (run_path,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    metrics = read_metrics(run_path)
    assert (metrics[metrics["kind"] == "train"]["status"] == "ok").sum() == 2
    # The clients ran as workers of *that* cluster: their logs are in its session folder.
    assert list(temp.glob("session_*/logs/worker-*")), "no worker of the existing cluster ran a client"
