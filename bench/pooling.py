"""Pooling a profile's evidence: cumulative regret of the pooled controllers on synthetic fleets.

    .venv/bin/python bench/pooling.py                          # ucb1 and sucb, ~3 min
    .venv/bin/python bench/pooling.py --names thompson discounted_ucb sliding_window_ucb --doc /tmp/pooling.md

No federation: each device has known means per arm (one best at 0.9, the others uniform in
[0.1, 0.7], Gaussian rewards σ = 0.1, as the controller tests' problems), a round samples some
devices, and the regret is the sum over the sampled devices of best mean − chosen mean. Each
row is one fleet; each column one `pool_pulls` C (`fedsim.controllers.base`: the peers lend a
device N·C/(N + C) pulls' worth of their mean), beside `alone` (pool = "none") and one learner
per profile (C = ∞, approximated by 1e9). Means over `--seeds`. The fleets:

- homogeneous: the devices of a profile share their means up to a per-device jitter σ = 0.03
  (0.15 in the `jitter` row), which is what pooling assumes;
- own best: every device has its own means, so pooling can only bias it;
- Jetson shapes: profiles of 30 / 40 / 10 like `scenarios/fedspine-jetson-80.toml` (the 2 × 2 grid,
  c = 0.2 and round-normalised rewards of that scenario in the short rows), and the lean
  8-Jetson fleet (3 / 4 / 1) of docs/results/fedspine-lean.md, every device every round.
The figures `fedsim/config/controller.py` quotes for `pool_pulls` = 10 come from this script.
The table and the command go to `--doc` (default docs/results/pooling.md), whose "## Reading"
section is kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.printed import keep_printed, write_printed  # noqa: E402
from fedsim.controllers import ControllerConfig, build_controller  # noqa: E402

NOISE, BEST = 0.1, 0.9
JETSONS = (30, 40, 10)
CORNERS = dict(ranks=[4, 16], ratios=[0.0, 0.2], sucb_depth=2, ucb_c=0.2, round_max=True)
FLEETS = {
    "homogeneous, 60 in 3, 6 x 200": dict(sizes=(20, 20, 20), sampled=6, rounds=200, ucb_c=0.3),
    "jitter 0.15, 60 in 3, 6 x 200": dict(sizes=(20, 20, 20), sampled=6, rounds=200, ucb_c=0.3, jitter=0.15),
    "own best, 60 in 3, 6 x 200": dict(sizes=(20, 20, 20), sampled=6, rounds=200, ucb_c=0.3, own=True),
    "own best, 24 in 3, all x 300": dict(sizes=(8, 8, 8), sampled=24, rounds=300, ucb_c=0.3, own=True),
    "lean Jetsons 3/4/1, all x 10": dict(sizes=(3, 4, 1), sampled=8, rounds=10, **CORNERS),
    "80 Jetsons, 10 x 6": dict(sizes=JETSONS, sampled=10, rounds=6, **CORNERS),
    "80 Jetsons, 10 x 12": dict(sizes=JETSONS, sampled=10, rounds=12, **CORNERS),
    "80 Jetsons, 10 x 100, 16 arms": dict(sizes=JETSONS, sampled=10, rounds=100, ucb_c=0.3),
}


def regret(
    name: str,
    seed: int,
    sizes: tuple[int, ...],
    sampled: int,
    rounds: int,
    jitter: float = 0.03,
    own: bool = False,
    round_max: bool = False,
    **config,
) -> float:
    """Cumulative regret of one seeded run (devices of profile g: the g-th run of `sizes`)."""
    groups = np.repeat(np.arange(len(sizes)), sizes)
    devices = len(groups)
    ctrl = build_controller(ControllerConfig(name=name, **config), devices, groups, None, seed)
    rng = np.random.default_rng(1000 + seed)
    rows = np.arange(devices) if own else groups
    means = rng.uniform(0.1, 0.7, (int(rows.max()) + 1, ctrl.grid.num_arms))
    means[np.arange(len(means)), rng.integers(0, ctrl.grid.num_arms, len(means))] = BEST
    means = means[rows] + jitter * rng.standard_normal((devices, ctrl.grid.num_arms))
    total = 0.0
    for t in range(rounds):
        chosen = np.sort(rng.choice(devices, sampled, replace=False))
        ranks, ratios = ctrl.choose(chosen, t)
        mu = means[chosen, ctrl.grid.arm_of(ranks, ratios)]
        total += float((means[chosen].max(axis=1) - mu).sum())
        reward = mu + NOISE * rng.standard_normal(sampled)
        ctrl.update(chosen, ranks, ratios, reward / reward.max() if round_max else reward, np.ones(sampled, dtype=bool))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", nargs="+", default=["ucb1", "sucb"], help="pooled controllers to measure")
    parser.add_argument(
        "--pulls", type=float, nargs="+", default=[5, 10, 20, 50, 1e9], help="pool_pulls values (columns)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument(
        "--doc",
        type=Path,
        default=ROOT / "docs" / "results" / "pooling.md",
        help="where the table and the command are written",
    )
    args = parser.parse_args()
    columns = {"alone": dict(pool="none")} | {
        f"C={c:g}" if c < 1e9 else "C=inf": dict(pool="profile", pool_pulls=c) for c in args.pulls
    }
    with keep_printed() as printed:
        print(f"cumulative regret, mean over seeds {args.seeds}")
        print(f"{'controller':<18} {'fleet':<31} " + " ".join(f"{c:>8}" for c in columns))
        for name in args.names:
            for label, fleet in FLEETS.items():
                cells = [
                    np.mean([regret(name, seed, **fleet, **pool) for seed in args.seeds]) for pool in columns.values()
                ]
                print(f"{name:<18} {label:<31} " + " ".join(f"{v:8.1f}" for v in cells), flush=True)
    write_printed(args.doc, "Pooling a profile's evidence: regret on synthetic fleets", printed.getvalue())


if __name__ == "__main__":
    main()
