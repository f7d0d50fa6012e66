"""Fleet size vs cost: the tiny model with 100, 10,000 and 100,000 clients, 10 sampled per round.

    .venv/bin/python bench/scale.py                 # 100, 10,000 and 100,000 clients
    .venv/bin/python bench/scale.py --sizes 100,1000

For each size, one federation on Flower's engine (Ray backend) prints: the Flower nodes it ran on
(a pool as large as a round: `fedsim.server.roster`), time to start (Ray, the model, the data, the
server's first central evaluation), wall time of round 1 (which starts the Ray actors, loads the
model and partitions the data in each), the mean of the later rounds and of all rounds, and the
peak resident memory of the whole run (this process plus every Ray process it started, sampled
every 0.2 s). Every client holds 3 examples or more (`data.num_examples` = max(30,000, 3 ×
clients)). The ratios against the first (smallest) size are the figures to watch: a round's cost
should not grow with the fleet, since only the sampled clients do any work, and startup sends no
message per node. Writes the table, with the command, to docs/results/scale.md (its "## Reading"
is kept).
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

from bench.printed import keep_printed, write_printed  # noqa: E402
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
        "clients.eval_per_round=0", f"data.num_examples={max(30000, 3 * size)}", "data.central_test_size=16",
        "train.local_steps=4",
    ]  # fmt: skip
    scenario = load_scenario(ROOT / "scenarios" / "tiny.toml", overrides)
    with tempfile.TemporaryDirectory() as tmp, PeakMemory() as mem:
        run_dir = RunDir.create(Path(tmp), scenario)
        start = time.time()
        run_simulation(scenario, run_dir)
        events = [json.loads(line) for line in (run_dir.path / "events.jsonl").read_text().splitlines()]
    ends = [e["time"] for e in events if e["event"] == "round_end"]
    rounds_s = [b - a for a, b in zip(ends, ends[1:])]
    return {
        "startup_s": ends[0] - start,
        "round_s": statistics.mean(rounds_s),
        "steady_s": statistics.mean(rounds_s[1:]) if len(rounds_s) > 1 else float("nan"),
        "first_round_s": rounds_s[0],
        "nodes": next(e["nodes"] for e in events if e["event"] == "clients"),
        "peak_gib": mem.peak / 1024**3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100,10000,100000")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "results" / "scale.md")
    args = parser.parse_args()
    quiet_libraries()
    sizes = [int(s) for s in args.sizes.split(",")]
    with keep_printed() as printed:
        results = {n: measure(n, args.rounds, args.per_round) for n in sizes}
        base = results[sizes[0]]
        print(f"{args.rounds} rounds, {args.per_round} clients sampled per round; ratios against {sizes[0]} clients")
        print(
            "| clients | nodes | startup (s) | round 1 (s) | rounds 2+ mean (s) | mean round (s) | peak memory (GiB) |"
            " round ratio | rounds 2+ ratio | memory ratio |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for n, r in results.items():
            print(
                f"| {n:,} | {r['nodes']:.0f} | {r['startup_s']:.1f} | {r['first_round_s']:.2f} | "
                f"{r['steady_s']:.2f} | {r['round_s']:.2f} | {r['peak_gib']:.2f} | "
                f"{r['round_s'] / base['round_s']:.2f} | {r['steady_s'] / base['steady_s']:.2f} | "
                f"{r['peak_gib'] / base['peak_gib']:.2f} |"
            )
    write_printed(args.doc, "Fleet size against cost (bench/scale.py)", printed.getvalue())


if __name__ == "__main__":
    main()
