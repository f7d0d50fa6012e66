"""Accuracy under uplink compression, with intervals: writes docs/results/compression.md.

    .venv/bin/python bench/compression_accuracy.py                  # SmolLM2 quickstart, 4 codecs x 3 seeds, ~20 min
    .venv/bin/python bench/compression_accuracy.py --scenario scenarios/tiny.toml --seeds 1 --set rounds=1 \
        --doc /tmp/c.md

Every run is the quickstart federation (4 rounds) with one `[compression]` setting and one seed;
the final round is scored on 256 held-out examples (per-round curves on the first 48). Per
setting: final central accuracy and loss, mean over seeds with the Student-t 95 % interval and the
pooled bootstrap over the (seed, example) pairs (`fedsim.results.comparison`), the paired difference from
the lossless float32 row, the mean uplink bytes per client update and the ratio to float32's. The
"≤ 1 point" column reads the accuracy difference's pooled interval: yes when all of it lies above
−1 point, no when all of it lies below, "?" otherwise. The runs are kept under --out (resumable);
the doc's "## Reading" section and what follows it is kept on a rerun.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from bench.results_doc import write_result  # noqa: E402
from fedsim.cli import quiet_libraries  # noqa: E402
from fedsim.config.scenario import Scenario, load_scenario  # noqa: E402
from fedsim.results.comparison import RunResult, comparison, read_results  # noqa: E402
from fedsim.results.rundir import read_metrics  # noqa: E402
from fedsim.runtime.compare import run_all  # noqa: E402
from fedsim.runtime.simulation import run_simulations  # noqa: E402

BASELINE = "float32 (lossless)"
SETTINGS = {  # label: (run-name slug, compression overrides)
    BASELINE: ("f32", []),
    **{
        f"compeft d={d} +EF": (
            f"compeft{d}",
            ["compression.method='compeft'", f"compression.density={d}", "compression.error_feedback=true"],
        )
        for d in (0.2, 0.1, 0.05)
    },
}
EVAL = ["data.central_test_size=256", "eval.central_examples=48"]


def plan(scenario: str, seeds: int, overrides: list[str]) -> dict[str, list[Scenario]]:
    """Each setting's runs, seed by seed from the scenario's seed on (validated before any run)."""
    base = load_scenario(scenario, [*EVAL, *overrides]).seed
    return {
        label: [
            load_scenario(scenario, [*EVAL, *overrides, *extra, f"name='{slug}-seed{s}'"], seed=s)
            for s in range(base, base + seeds)
        ]
        for label, (slug, extra) in SETTINGS.items()
    }


def bytes_per_update(root: Path, runs: list[Scenario]) -> float:
    """Mean uplink payload of a kept client update over the runs."""
    frames = [read_metrics(root / s.name) for s in runs]
    train = pd.concat([m[(m["kind"] == "train") & (m["status"] == "ok")] for m in frames])
    return float(train["bytes_up"].mean())


def cell(estimate: float, lo: float, hi: float, points: bool = False) -> str:
    """ "x [lo, hi]": a share to 3 decimals, or (points) a difference in accuracy points, signed."""
    if not math.isfinite(estimate):
        return "–"
    if points:
        return f"{100 * estimate:+.1f}" + (f" [{100 * lo:+.1f}, {100 * hi:+.1f}]" if math.isfinite(lo) else "")
    return f"{estimate:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if math.isfinite(lo) else "")


def within_one_point(lo: float, hi: float) -> str:
    if not math.isfinite(lo):
        return "?"
    return "yes" if lo > -0.01 else "no" if hi < -0.01 else "?"


def table(results: list[RunResult], sizes: dict[str, float]) -> list[str]:
    stats = comparison(results, BASELINE).set_index(["strategy", "metric"])
    head = ["uplink codec", "accuracy, seeds", "accuracy, pooled", "Δ accuracy (points), pooled", "≤ 1 point",
            "loss, pooled", "bytes / update", "× fewer than float32"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in SETTINGS:
        acc, loss = stats.loc[(label, "central_accuracy")], stats.loc[(label, "central_loss")]
        diff = ("–", "–") if label == BASELINE else (
            cell(acc["diff_pooled"], acc["diff_pooled_lo"], acc["diff_pooled_hi"], points=True),
            within_one_point(acc["diff_pooled_lo"], acc["diff_pooled_hi"]),
        )  # fmt: skip
        lines.append("| " + " | ".join([
            label, cell(acc["mean"], acc["seed_lo"], acc["seed_hi"]),
            cell(acc["pooled"], acc["pooled_lo"], acc["pooled_hi"]),
            *diff, cell(loss["pooled"], loss["pooled_lo"], loss["pooled_hi"]),
            f"{sizes[label]:,.0f}", f"{sizes[BASELINE] / sizes[label]:.1f}",
        ]) + " |")  # fmt: skip
    return lines


def write_doc(doc: Path, command: str, seeds: list[int], lines: list[str]) -> None:
    write_result(doc, "\n".join([
        "# Accuracy under uplink compression", "", "```", command, "```", "",
        f"Seeds {', '.join(map(str, seeds))}; final round scored on 256 held-out examples. Intervals: 95 %;"
        " seeds: Student t over the per-seed values; pooled: percentile bootstrap over the (seed, example) pairs,"
        f" a difference paired with `{BASELINE}` on the same example (`fedsim/results/stats.py`).", "",
        *lines,
    ]))  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", default="scenarios/quickstart.toml")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / "compression"))
    parser.add_argument("--doc", default=str(ROOT / "docs" / "results" / "compression.md"))
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="scenario override (repeatable)"
    )
    args = parser.parse_args()
    quiet_libraries()
    runs = plan(args.scenario, args.seeds, args.set)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    failures = run_all([s for r in runs.values() for s in r], root, print, run_simulations)
    if failures:
        print(f"{len(failures)} run(s) failed; see their run directories under {root}", file=sys.stderr)
        return 1
    results = [
        dataclasses.replace(r, strategy=label) for label, rs in runs.items() for r in read_results(rs, root, 0.0)
    ]
    lines = table(results, {label: bytes_per_update(root, rs) for label, rs in runs.items()})
    print("\n".join(lines))
    doc = Path(args.doc)
    write_doc(
        doc,
        shlex.join([".venv/bin/python", "bench/compression_accuracy.py", *sys.argv[1:]]),
        sorted({s.seed for s in runs[BASELINE]}),
        lines,
    )
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
