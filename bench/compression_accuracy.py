"""Accuracy under compression: the quickstart federation with each uplink codec setting.

    .venv/bin/python bench/compression_accuracy.py                       # SmolLM2 quickstart, ~25 min
    .venv/bin/python bench/compression_accuracy.py --scenario scenarios/tiny.toml --rounds 3

Every row is one full federation with the same scenario and seed; only `[compression]` differs.
It prints the final central accuracy and loss, the mean uplink bytes per client update, and
the compression ratio against the lossless float32 row (the baseline, same command). fp16 is
the plain-quantiser baseline to beat; the 8-bit absmax baseline's ratio (4×) is in
bench/compression.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsim.cli import quiet_libraries  # noqa: E402
from fedsim.rundir import RunDir, read_metrics  # noqa: E402
from fedsim.scenario import load_scenario  # noqa: E402
from fedsim.simulation import run_simulation  # noqa: E402

SETTINGS = {  # label: compression overrides
    "none float32 (d=1.0, off)": [],
    "none float16": ["compression.dtype='float16'"],
    **{
        f"compeft d={d}{' +EF' if ef else ''}": [
            "compression.method='compeft'", f"compression.density={d}", f"compression.error_feedback={str(ef).lower()}"
        ]
        for d in (0.2, 0.1, 0.05)
        for ef in (False, True)
    },
}


def run(scenario_path: str, rounds: int, overrides: list[str]) -> tuple[float, float, float]:
    scenario = load_scenario(scenario_path, [f"rounds={rounds}", "name=compression", *overrides])
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = RunDir.create(Path(tmp), scenario)
        run_simulation(scenario, run_dir)
        metrics = read_metrics(run_dir.path)
    final = metrics[(metrics["kind"] == "eval_central") & (metrics["round"] == rounds)].iloc[0]
    up = metrics[(metrics["kind"] == "train") & (metrics["status"] == "ok")]["bytes_up"].mean()
    return float(final["accuracy"]), float(final["loss"]), float(up)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", default=str(ROOT / "scenarios" / "quickstart.toml"))
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    quiet_libraries()
    results = {}
    for label, overrides in SETTINGS.items():
        results[label] = run(args.scenario, args.rounds, overrides)
        print(f"done: {label}", flush=True)
    base_acc, _, base_up = results["none float32 (d=1.0, off)"]
    print(f"\n{'uplink codec':<28} {'accuracy':>8} {'Δ points':>8} {'loss':>7} {'bytes/update':>13} {'ratio':>6}")
    for label, (acc, loss, up) in results.items():
        print(f"{label:<28} {acc:>8.3f} {100 * (acc - base_acc):>+8.1f} {loss:>7.4f} {up:>13,.0f} {base_up / up:>6.1f}")


if __name__ == "__main__":
    main()
