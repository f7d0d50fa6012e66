"""Fleet size vs cost: the tiny model with 100, 1,000 and 10,000 clients, 10 sampled per round.

    .venv/bin/python bench/scale.py                 # all three sizes
    .venv/bin/python bench/scale.py --sizes 100,1000

For each size, one federation on Flower's engine (Ray backend) prints: time to start (Ray,
actors, discovering the clients), mean wall time per round, and the peak resident memory of
the whole run (this process plus every Ray process it started, sampled every 0.2 s). The
ratios against the 100-client run are the figures to watch: the per-round cost should not grow
with the fleet, since only the sampled clients do any work and client state lives in Flower's
per-node context, not in per-client Python objects.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsim.cli import quiet_libraries  # noqa: E402
from fedsim.config.scenario import load_scenario  # noqa: E402
from fedsim.results.rundir import RunDir  # noqa: E402
from fedsim.runtime.simulation import run_simulation  # noqa: E402


class PeakMemory:
    """Peak of the summed RSS of this process and all its descendants (Ray's raylet, GCS, workers)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(size: int, rounds: int, per_round: int) -> dict[str, float]:
    overrides = [
        f"name=scale-{size}", f"rounds={rounds}", f"clients.num_clients={size}", f"clients.per_round={per_round}",
        "clients.eval_per_round=0", "data.num_examples=30000", "data.central_test_size=16", "train.local_steps=4",
    ]  # fmt: skip
    scenario = load_scenario(ROOT / "scenarios" / "tiny.toml", overrides)
    with tempfile.TemporaryDirectory() as tmp, PeakMemory() as mem:
        run_dir = RunDir.create(Path(tmp), scenario)
        start = time.time()
        run_simulation(scenario, run_dir)
        events = [json.loads(line) for line in (run_dir.path / "events.jsonl").read_text().splitlines()]
    ends = [e["time"] for e in events if e["event"] == "round_end"]
    return {
        "startup_s": ends[0] - start,
        "round_s": statistics.mean(b - a for a, b in zip(ends, ends[1:])),
        "peak_gib": mem.peak / 1024**3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=10)
    args = parser.parse_args()
    quiet_libraries()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {n: measure(n, args.rounds, args.per_round) for n in sizes}
    base = results[sizes[0]]
    print(f"{'clients':>8} {'startup s':>10} {'s/round':>8} {'peak GiB':>9} {'round ratio':>12} {'memory ratio':>13}")
    for n, r in results.items():
        print(
            f"{n:>8} {r['startup_s']:>10.1f} {r['round_s']:>8.2f} {r['peak_gib']:>9.2f} "
            f"{r['round_s'] / base['round_s']:>12.2f} {r['peak_gib'] / base['peak_gib']:>13.2f}"
        )


if __name__ == "__main__":
    main()
