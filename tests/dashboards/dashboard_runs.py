"""A folder of runs with everything the dashboard must cope with, and the dashboard served over it
(imported by this folder's tests as `dashboard_runs`)."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests_support.fake_runs import SCENARIO, write_run

from dashboards.app import DashboardServer, serve

EVIL = "<script>alert(1)"
REAL = Path(__file__).with_name("data") / "fedspine-tiny"  # a real run's files (data/README.md)
COMPARED = {  # (strategy, seed) → central accuracy per round, in tiny-compare/
    ("fedit", 0): [0.25, 0.5, 0.625],
    ("fedit", 1): [0.25, 0.375, 0.75],
    ("flexlora", 0): [0.25, 0.5, 0.75],
    ("flexlora", 1): [0.25, 0.625, 0.875],
}


def make_root(root: Path, outside: Path) -> Path:
    """Runs at the top and in a `fedsim compare` folder, a real run, a run in progress (2 of 4
    rounds), a corrupt one, one with a privacy budget, names and files that try to inject HTML or
    leave the root."""
    last = {"event": "round_end", "round": 3, "rounds": 3, "central_accuracy": 0.625}
    write_run(root, "alpha", [0.25, 0.5, 0.75, 0.625], fleet=True, events=[{"event": "run_start"}, last])
    write_run(root, "beta", [0.125, 0.375, 0.5], strategy="flexlora")
    for (strategy, seed), accuracies in COMPARED.items():
        write_run(root, f"tiny-compare/{strategy}-seed{seed}", accuracies, strategy=strategy, seed=seed, fleet=True)
    live = SCENARIO.format(name="live", seed=0, rounds=4, strategy="fedit")
    write_run(root, "live", [0.25, 0.5, 0.5], fleet=True, scenario=live, status="running")
    write_run(root, "private", [0.25, 0.5], fleet=True, dp=True)
    write_run(root, "broken", [0.5]).joinpath("metrics.parquet").write_bytes(b"this is not parquet")
    write_run(root, EVIL, [0.5, 0.5], scenario='# </script><script>alert(2)</script>\nname = "<script>alert(3)"\n')
    shutil.copytree(REAL, root / "fedspine-tiny")
    write_run(outside, "elsewhere", [0.5, 0.5])
    (root / "escape").symlink_to(outside / "elsewhere", target_is_directory=True)
    (outside / "secret.txt").write_text("TOPSECRET")
    leaky = write_run(root, "leaky", [0.5, 0.5])
    (leaky / "scenario.toml").unlink()
    (leaky / "scenario.toml").symlink_to(outside / "secret.txt")
    return root


@dataclass(frozen=True)
class Served:
    base: str
    root: Path
    server: DashboardServer


@contextmanager
def served(root: Path, poll_s: float = 5.0) -> Iterator[Served]:
    """The dashboard over `root` on an ephemeral port, in a thread."""
    server = serve(root, port=0, poll_s=poll_s)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Served(server.url.rstrip("/"), root, server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
