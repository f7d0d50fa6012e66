"""`fedsim compare`: one scenario, several strategies and seeds, one table and three plots.

    <out>/<scenario>-compare/<strategy>-seed<k>/     a normal run directory per run
    <out>/<scenario>-compare/comparison.csv|.md      per strategy, over seeds (`fedsim.results.comparison`)
    <out>/<scenario>-compare/accuracy_vs_round.png, accuracy_vs_sim_time.png, loss_vs_round.png

`plan` checks every input before anything runs or is written and raises `CompareError` listing
every problem: `--seeds` below 1, strategy names that are not in `strategies.STRATEGIES`, a
`--baseline` that is not among the strategies, the scenario's own problems under each
strategy (e.g. a pruning scenario that flexlora refuses), and what `fedsim.server.preflight`
finds for each run (its fleet files, its model, its data under its seed).

A run that fails while running is recorded in its own directory: a `run_failed` event and its
traceback in `error.log` (`run_all` returns each with its run directory).

Resumable: a run whose events.jsonl ends with `run_end` is kept and not run again (if it ran
with other settings than planned, the command refuses before anything runs: `kept_problems`); a run that
was interrupted midway is removed and run again (its directory is fedsim's own, inside the
comparison folder). All pending runs share one Flower simulation (`run_simulations`): Ray, the
client actors and the model load are paid once, and the actors are sized for the largest need of
the runs (with packing on, a strategy whose clients train alone, such as FedSpeed, needs fewer at
once than one that packs: `fedsim.server.packs.client_resources`).
"""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from fedsim.config.errors import InputError
from fedsim.config.names import STRATEGIES
from fedsim.config.scenario import Scenario, ScenarioError, load_scenario
from fedsim.results.comparison import comparison, markdown, mean_curves, read_results
from fedsim.results.plots import compare_accuracy_png, compare_loss_png, compare_sim_time_png
from fedsim.results.rundir import RunDir, last_event
from fedsim.results.tracking import flatten
from fedsim.server.preflight import preflight


class CompareError(InputError):
    """`fedsim compare` arguments or scenario that cannot run; `problems` lists every reason."""

    what = "fedsim compare on"


def argument_problems(strategies: Sequence[str], seeds: int, baseline: str, known: Sequence[str]) -> list[str]:
    """What is wrong with the command's own arguments (`known`: the strategy names there are)."""
    problems = [f"`--seeds` must be >= 1, got {seeds}"] if seeds < 1 else []
    if not strategies:
        problems.append("`--strategies` names no strategy")
    unknown = [s for s in dict.fromkeys(strategies) if s not in known]
    if unknown:
        names = ", ".join(repr(s) for s in unknown)
        problems.append(f"`--strategies`: unknown strategy {names}; known: {', '.join(sorted(known))}")
    twice = [s for s in dict.fromkeys(strategies) if strategies.count(s) > 1]
    if twice:
        problems.append(f"`--strategies` names {', '.join(repr(s) for s in twice)} more than once")
    if strategies and baseline not in strategies:
        problems.append(
            f"`--baseline` must be one of the --strategies ({', '.join(dict.fromkeys(strategies))}), got {baseline!r}"
        )
    return problems


def plan(
    scenario_path: str, strategies: Sequence[str], seeds: int, overrides: Sequence[str], baseline: str
) -> list[Scenario]:
    """Every run's scenario, strategy by strategy and seed by seed from the scenario's seed on;
    `CompareError` with every problem (`argument_problems`, and the scenario's under each known
    strategy) before anything runs."""
    problems = argument_problems(strategies, seeds, baseline, list(STRATEGIES))
    first: dict[str, Scenario] = {}
    refused: dict[str, list[str]] = {}
    for strategy in dict.fromkeys(s for s in strategies if s in STRATEGIES):
        try:
            first[strategy] = load_scenario(scenario_path, [*overrides, f"strategy.name='{strategy}'"])
        except ScenarioError as exc:
            refused[strategy] = exc.problems
    problems += _per_strategy(refused, len(first) + len(refused))
    if problems:
        raise CompareError(scenario_path, problems)
    base = next(iter(first.values())).seed
    runs = []
    for strategy in first:
        for seed in range(base, base + seeds):
            extra = [*overrides, f"strategy.name='{strategy}'", f"name='{strategy}-seed{seed}'"]
            runs.append(load_scenario(scenario_path, extra, seed=seed))
    problems = preflight_problems(runs, scenario_path)
    if problems:
        raise CompareError(scenario_path, problems)
    return runs


def preflight_problems(runs: Sequence[Scenario], source: str) -> list[str]:
    """`preflight`'s problems of every run, each said once: as is when every run has it, else
    after the names of the runs that have it."""
    found: dict[str, list[str]] = {}
    for scenario in runs:
        try:
            preflight(scenario, source)
        except ScenarioError as exc:
            for problem in exc.problems:
                found.setdefault(problem, []).append(scenario.name)
    return [p if len(names) == len(runs) else f"{', '.join(names)}: {p}" for p, names in found.items()]


def kept_problems(runs: Sequence[Scenario], root: Path) -> list[str]:
    """A finished run under `root` that ran with other settings than planned would be kept and
    compared as if it had not (`run_all` keeps what finished): each is a problem naming the settings
    that differ. Nothing is removed: the person decides."""
    problems = []
    for scenario in runs:
        path = root / scenario.name
        if last_event(path).get("event") != "run_end" or not (path / "scenario.toml").is_file():
            continue
        try:
            kept = load_scenario(path / "scenario.toml")
        except ScenarioError as exc:
            problems.append(f"{path} finished, but its scenario.toml no longer loads ({exc.problems[0]})")
            continue
        old, new = flatten(kept.model_dump(mode="json")), flatten(scenario.model_dump(mode="json"))
        differ = [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in sorted(old | new) if old.get(k) != new.get(k)]
        if differ:
            shown = ", ".join(differ[:5]) + (f" and {len(differ) - 5} more" if len(differ) > 5 else "")
            problems.append(
                f"{path} finished with other settings ({shown}): move it away or use another --out, "
                "so that it is not compared as this run"
            )
    return problems


def _per_strategy(refused: dict[str, list[str]], strategies: int) -> list[str]:
    """Scenario problems by strategy: one every strategy has is listed once, the others each
    with the strategy it comes with."""
    lists = list(refused.values())
    common = (
        [p for p in lists[0] if all(p in ps for ps in lists)] if strategies > 1 and len(lists) == strategies else []
    )
    return common + [f"with strategy {s!r}: {p}" for s, ps in refused.items() for p in ps if p not in common]


def run_all(
    runs: Sequence[Scenario],
    root: Path,
    say: Callable[[str], None],
    run: Callable[[list[tuple[Scenario, RunDir]]], list[tuple[RunDir, Exception]]],
) -> list[tuple[RunDir, Exception]]:
    """Run what is not done yet (`plan` checked it), all in one call of `run` (one simulation:
    `run_simulations`, which records each failed run in its directory, `RunDir.fail`); returns
    each failed run's directory with its exception."""
    todo = []
    for scenario in runs:
        path = root / scenario.name
        if last_event(path).get("event") == "run_end":
            say(f"{scenario.name}: done already, kept")
            continue
        if path.exists():
            say(f"{scenario.name}: interrupted earlier, running it again")
            shutil.rmtree(path)
        todo.append(scenario)
    if not todo:
        return []
    say(f"running {', '.join(s.name for s in todo)} in one simulation")
    return run([(s, RunDir.create(root, s)) for s in todo])


def write_outputs(runs: Sequence[Scenario], root: Path, target: float, baseline: str, command: Sequence[str]) -> str:
    """Write comparison.csv, comparison.md (opening with `command`, the argv that produced it) and
    the plots under `root`; returns the Markdown. ValueError when runs at one seed were scored on
    different held-out sets."""
    results = read_results(runs, root, target)
    table = comparison(results, baseline)
    table.to_csv(root / "comparison.csv", index=False)
    text = markdown(table, results, baseline, target, shlex.join(command))
    (root / "comparison.md").write_text(text)
    curves = mean_curves(results)
    (root / "accuracy_vs_round.png").write_bytes(compare_accuracy_png(curves))
    (root / "accuracy_vs_sim_time.png").write_bytes(compare_sim_time_png(curves))
    (root / "loss_vs_round.png").write_bytes(compare_loss_png(curves))
    return text
