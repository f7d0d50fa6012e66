"""Privacy–utility of DP-FedAvg, central and local, on the tiny model: writes docs/results/privacy.md.

    .venv/bin/python bench/privacy.py                                 # 7 settings x 3 seeds, about 30 min on 2 cores
    .venv/bin/python bench/privacy.py --seeds 1 --set rounds=2 --doc /tmp/privacy.md  # a smoke run

Settings: privacy off (ε = ∞: FedIT, example-weighted, fixed-size samples, no clipping), and central and
local DP (`fedsim.privacy`) at target ε = 8, 4 and 1 after the run's rounds, δ = 1/n^1.1 (the default),
every update clipped to `CLIP`. The scenario is scenarios/tiny.toml with `BASE`'s overrides: 200 clients,
20 expected per round (q = 0.1), 20 rounds; the held-out set of 128 examples scores the last round
whole. Every run shares one Flower simulation (`fedsim.runtime.simulation.run_simulations`, as
`fedsim compare` does) and is kept under --out, so an interrupted bench resumes where it stopped.
Per setting: the ε the run spent and the noise multiplier that reached it; the final central loss
and accuracy with the Student-t 95 % interval over seeds and the bootstrap over (seed, held-out
example) pairs, and their difference from ε = ∞ paired by seed and example (`fedsim.results.comparison`);
the simulated time. The doc's "## Reading" section is the person's: a rerun keeps it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.printed import command as bench_command  # noqa: E402
from bench.results_doc import write_result  # noqa: E402
from fedsim.config.scenario import Scenario, load_scenario  # noqa: E402
from fedsim.privacy import default_delta  # noqa: E402
from fedsim.results.comparison import RunResult, comparison, read_results  # noqa: E402
from fedsim.results.rundir import read_metrics  # noqa: E402
from fedsim.results.stats import t_interval  # noqa: E402
from fedsim.runtime.compare import preflight_problems, run_all  # noqa: E402
from fedsim.runtime.simulation import run_simulations  # noqa: E402

SCENARIO = "scenarios/tiny.toml"
BASE = [
    "clients.num_clients=200", "clients.per_round=20", "clients.eval_per_round=0", "rounds=20",
    "data.num_examples=4000", "data.central_test_size=128", "eval.central_examples=32", "train.lr=1e-2",
]  # fmt: skip
CLIP = 3.0  # about the clients' median update norm without privacy after round 2 (2.9; 4.6 in round 1)
EPSILONS = (8.0, 4.0, 1.0)
BASELINE = "off"


def settings() -> dict[str, list[str]]:
    """Label → the privacy overrides of that setting."""
    out: dict[str, list[str]] = {BASELINE: []}
    for mode in ("central", "local"):
        for eps in EPSILONS:
            out[f"{mode}-eps{eps:g}"] = [
                f"privacy.mode='{mode}'",
                f"privacy.clip={CLIP}",
                f"privacy.target_epsilon={eps}",
            ]
    return out


def plan_runs(seeds: int, extra: list[str]) -> dict[str, list[Scenario]]:
    """Label → its runs, seed 0..seeds-1, each named `<label>-seed<k>`."""
    return {
        label: [
            load_scenario(ROOT / SCENARIO, [*BASE, *extra, *o, f"name='{label}-seed{k}'"], seed=k) for k in range(seeds)
        ]
        for label, o in settings().items()
    }


def privacy_event(path: Path) -> dict[str, float]:
    """The run's `privacy` event ({} with privacy off)."""
    events = [json.loads(line) for line in (path / "events.jsonl").read_text().splitlines()]
    return next((e for e in events if e["event"] == "privacy"), {})


def cell(i: tuple[float, float, float], digits: int = 3) -> str:
    mean, lo, hi = i
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def table(runs: dict[str, list[Scenario]], results: list[RunResult], root: Path) -> list[str]:
    """The doc's two tables: each setting's final figures, and its difference from ε = ∞."""
    comp = comparison(results, BASELINE).set_index(["strategy", "metric"])
    lines = [
        "| setting | ε spent (δ) | z | central loss | pooled | central accuracy | pooled | sim time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, scenarios in runs.items():
        paths = [root / s.name for s in scenarios]
        said = [privacy_event(p) for p in paths]
        eps = [float(read_metrics(p).query("kind == 'eval_central'")["dp_epsilon"].iloc[-1]) for p in paths]
        sim = t_interval([float(read_metrics(p).query("kind == 'eval_central'")["sim_time_s"].iloc[-1]) for p in paths])
        spent = "∞ (off)" if not said[0] else f"{max(eps):.3g} ({said[0]['delta']:.2g})"
        z = "–" if not said[0] else f"{said[0]['noise_multiplier']:.3g}"
        loss, acc = comp.loc[(label, "central_loss")], comp.loc[(label, "central_accuracy")]
        lines.append(
            f"| {label} | {spent} | {z} | {cell((loss['mean'], loss['seed_lo'], loss['seed_hi']))} "
            f"| {cell((loss['pooled'], loss['pooled_lo'], loss['pooled_hi']))} "
            f"| {cell((acc['mean'], acc['seed_lo'], acc['seed_hi']))} "
            f"| {cell((acc['pooled'], acc['pooled_lo'], acc['pooled_hi']))} "
            f"| {cell((sim.estimate, sim.lo, sim.hi), 2)} |"
        )
    lines += ["", f"## Difference from ε = ∞ (`{BASELINE}`), paired by seed", ""]
    lines += ["| setting | central loss | pooled | central accuracy | pooled |", "|---|---|---|---|---|"]
    for label in list(runs)[1:]:
        loss, acc = comp.loc[(label, "central_loss")], comp.loc[(label, "central_accuracy")]
        told = lambda r: "" if r["distinguishable"] else " ~"  # noqa: E731
        lines.append(
            f"| {label} | {cell((loss['diff'], loss['diff_seed_lo'], loss['diff_seed_hi']))}{told(loss)} "
            f"| {cell((loss['diff_pooled'], loss['diff_pooled_lo'], loss['diff_pooled_hi']))} "
            f"| {cell((acc['diff'], acc['diff_seed_lo'], acc['diff_seed_hi']))}{told(acc)} "
            f"| {cell((acc['diff_pooled'], acc['diff_pooled_lo'], acc['diff_pooled_hi']))} |"
        )
    return lines


def write_doc(runs: dict[str, list[Scenario]], root: Path, doc: Path) -> None:
    everything = [s for scenarios in runs.values() for s in scenarios]
    labels = {s.name: label for label, scenarios in runs.items() for s in scenarios}
    results = [dataclasses.replace(r, strategy=labels[r.name]) for r in read_results(everything, root, target=1.0)]
    first = everything[0]
    n, m = first.clients.num_clients, first.clients.per_round
    seeds = sorted({s.seed for s in everything})
    text = [
        "# privacy: DP-FedAvg's privacy–utility on the tiny model",
        "",
        f"Written by `{bench_command()}`.",
        "",
        f"Setup: {SCENARIO} with {' '.join(BASE)}: {n} clients, {m} expected per round (q = {m / n:g}), "
        f"{first.rounds} rounds of {first.train.local_steps} local steps; FedIT. Every DP setting clips updates to "
        f"{CLIP:g} and calibrates z to its target ε after {first.rounds} rounds at δ = 1/{n}^1.1 = "
        f"{default_delta(n):.3g}; central DP samples each client with probability q (Poisson), local DP a fixed "
        f"{m} a round. Seeds {', '.join(map(str, seeds))}; the last round is scored on all "
        f"{first.data.central_test_size} held-out examples.",
        "",
        "## Final round, mean [95 % interval]",
        "",
        *table(runs, results, root),
        "",
        "[lo, hi]: Student-t 95 % interval over seeds (of the per-seed differences, for a difference). pooled: "
        "percentile bootstrap 95 % interval over the (seed, held-out example) pairs (`fedsim.results.stats`). ~: "
        "cannot be told apart from ε = ∞ (an interval contains 0). ε spent: the largest over the seeds' last "
        "`dp_epsilon` (they are equal: the accountant counts rounds); z: the calibrated noise multiplier. sim "
        "time: simulated seconds of the whole run on the fleet.",
    ]
    write_result(doc, "\n".join(text))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--out", default=str(ROOT / "runs" / "bench-privacy"), help="where the runs are kept (resumable)"
    )
    parser.add_argument("--doc", default=str(ROOT / "docs" / "results" / "privacy.md"))
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="scenario override (repeatable)"
    )
    args = parser.parse_args()
    runs = plan_runs(args.seeds, args.set)
    everything = [s for scenarios in runs.values() for s in scenarios]
    if problems := preflight_problems(everything, SCENARIO):
        print("\n".join(problems), file=sys.stderr)
        return 2
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    failed = run_all(everything, root, lambda line: print(f"bench: {line}", flush=True), run_simulations)
    if failed:
        print(f"bench: {len(failed)} run(s) failed: {', '.join(r.path.name for r, _ in failed)}", file=sys.stderr)
        return 1
    doc = Path(args.doc)
    write_doc(runs, root, doc)
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
