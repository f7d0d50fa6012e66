"""bench/fedspine.py in CI-sized form: the tiny model, one round, the four corner arms. Checks the
experiment runs end to end and that its table holds every row, and that `--keep` reuses finished
rows instead of running them again."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
ARGS = [
    "--tiny", "--rounds", "1", "--arms", "corners", "--ranks", "2", "8", "--ratios", "0", "0.5",
    "--set", "clients.num_clients=6", "--set", "clients.per_round=6", "--set", "clients.eval_per_round=0",
    "--set", "train.local_steps=2", "--set", "data.central_test_size=8",
    "--set",
    'fleet.groups=[{profile="jetson-tx2", count=2}, {profile="jetson-xavier-nx", count=3}, '
    '{profile="jetson-agx-orin", count=1}]',
]  # fmt: skip
ROWS = ["bandit (sucb)", "fixed 2/0", "fixed 2/0.5", "fixed 8/0", "fixed 8/0.5", "per-profile", "fedit"]


def bench(*extra: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fedspine.py"), *ARGS, *extra],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_experiment_runs_every_row_and_reuses_kept_ones(tmp_path: Path) -> None:
    part = bench("--keep", str(tmp_path), "--rows", "bandit*", "fixed 2/0", "fedit")
    assert "not yet in" in part and "fixed 8/0.5, per-profile" in part  # the missing rows are named
    assert (
        "\nfixed 8/0 " not in part[part.index("row ") :] and "vs best fixed arm finished (fixed 2/0)" in part
    )  # its best is of the finished rows
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 3
    first = bench("--keep", str(tmp_path))  # runs the four rows left, reuses the three
    assert "not yet in" not in first and "vs best fixed arm (" in first
    table = first[first.index("row ") :]
    for label in ROWS:
        assert f"\n{label}" in table
    assert "(best fixed)" in table and "(worst fixed)" in table and "vs best fixed arm" in table
    runs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert len(runs) == len(ROWS)
    stamps = {p: (tmp_path / p / "metrics.parquet").stat().st_mtime_ns for p in runs}
    again = bench("--keep", str(tmp_path), "--rows", "bandit*")  # everything finished: nothing runs
    assert again[again.index("row ") :] == table
    assert {p: (tmp_path / p / "metrics.parquet").stat().st_mtime_ns for p in runs} == stamps


def test_the_per_profile_row_takes_the_arms_given() -> None:
    """`--profile-arms` replaces the hand-tuned default (slower profiles smaller and more pruned)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import fedspine

    given = fedspine.settings("corners", ["sucb"], [2, 8], [0.0, 0.5], profile_arms='{"jetson-xavier-nx" = [2, 0.5]}')[
        "per-profile"
    ]
    default = fedspine.settings("corners", ["sucb"], [2, 8], [0.0, 0.5])["per-profile"]
    assert 'controller.profile_arms={"jetson-xavier-nx" = [2, 0.5]}' in given
    assert (
        'controller.profile_arms={"jetson-tx2" = [2, 0.5], "jetson-xavier-nx" = [2, 0.0], "jetson-agx-orin" = [8, 0.0]}'
        in default
    )


def test_a_fixed_row_that_fell_back_is_measured() -> None:
    """`fixed` plays the nearest arm that fits a device; the table footnotes the share of client-rounds it did."""
    import pandas as pd

    sys.path.insert(0, str(ROOT / "bench"))
    import fedspine

    rows = pd.DataFrame({
        "kind": ["eval_central", "train", "train", "train", "train"],
        "arm_rank": [None, 4, 4, 4, 4], "arm_ratio": [None, 0.0, 0.2, 0.0, 0.2],
    })  # fmt: skip
    assert fedspine.off_arm(rows, "fixed 4/0") == 0.5
    assert fedspine.off_arm(rows, "fixed 4/0.2") == 0.5
    assert fedspine.off_arm(rows[rows["arm_ratio"] != 0.2], "fixed 4/0") == 0.0
    assert fedspine.off_arm(rows, "per-profile") == 0.0


def test_a_window_scores_each_round_by_its_last_evaluations() -> None:
    """`--window K`: the final figure is the last K rounds' mean and the time to target is when that mean first
    reaches it."""
    import pandas as pd

    sys.path.insert(0, str(ROOT / "bench"))
    import fedspine

    rows = pd.DataFrame({
        "kind": ["eval_central"] * 5 + ["train"], "round": [0, 1, 2, 3, 4, 1],
        "sim_time_s": [0.0, 1.0, 2.0, 3.0, 4.0, 9.9], "loss": [4.0, 1.4, 2.0, 1.4, 1.6, 0.1],
        "accuracy": [0.0, 0.2, 0.1, 0.3, 0.2, 1.0],
    })  # fmt: skip
    _, loss, acc = fedspine.central(rows, window=2)
    np.testing.assert_allclose(loss, [4.0, 2.7, 1.7, 1.7, 1.5])
    np.testing.assert_allclose(acc, [0.0, 0.1, 0.15, 0.2, 0.25])
    assert fedspine.time_to(rows, "loss", 1.5) == 1.0  # one round's dip
    assert fedspine.time_to(rows, "loss", 1.5, window=2) == 4.0  # the first two rounds in a row that average 1.5
    assert math.isnan(fedspine.time_to(rows, "loss", 1.0, window=2))  # never reached
    assert fedspine.central(rows)[1].tolist() == [4.0, 1.4, 2.0, 1.4, 1.6]


def test_a_window_below_one_is_refused_before_anything_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fedspine.py"), *ARGS, "--window", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "--window must be >= 1, got 0" in done.stderr
