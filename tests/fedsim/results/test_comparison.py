"""`fedsim compare`'s tables from fabricated run directories (no training): every number against
a direct computation over the per-seed finals and the per-example results."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedsim.config.scenario import Scenario, load_scenario
from fedsim.results.comparison import comparison, mean_curves, read_results
from fedsim.results.rundir import RunDir, metrics_frame
from fedsim.runtime.compare import write_outputs

ROOT = Path(__file__).resolve().parents[3]
TINY = str(ROOT / "scenarios" / "tiny.toml")
T_975_DF2 = 4.302652729749462  # Student t quantile t_{0.975, 2}, from a table
EXAMPLES, CURVE_EXAMPLES, SEEDS = 200, 8, (0, 1, 2)
EARLY = (0.1, 0.25)  # central accuracy at rounds 0 and 1; the final round's is the examples' mean
PNG = b"\x89PNG\r\n\x1a\n"
BETTER, SAME = "hetlora", "flexlora"  # names the scenario accepts; the results are fabricated


def per_example(strategy: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(correct, loss, n_tokens) of EXAMPLES held-out examples: BETTER gets right everything
    fedit does plus about 15 % more with a 0.3 lower loss; SAME swaps a few answers both ways and
    jitters the loss, so it cannot be told from fedit."""
    rng = np.random.default_rng(seed)
    correct = rng.random(EXAMPLES) < 0.4 + 0.05 * seed
    loss, tokens = rng.uniform(1.0, 3.0, EXAMPLES), rng.integers(2, 12, EXAMPLES)
    other = np.random.default_rng(100 + seed)
    if strategy == BETTER:
        return correct | (other.random(EXAMPLES) < 0.25), loss - 0.3, tokens
    if strategy == SAME:
        flip = other.choice(EXAMPLES, 10, replace=False)
        swapped = correct.copy()
        swapped[flip] = ~swapped[flip]
        return swapped, loss + other.normal(0, 0.01, EXAMPLES), tokens
    return correct, loss, tokens


def fake_run(
    root: Path,
    strategy: str,
    seed: int,
    *,
    task: str = "sentiment",
    final_eval: bool = True,
    n: int = EXAMPLES,
    energy: bool = True,
) -> Scenario:
    """A finished 2-round run directory `root/<strategy>-seed<seed>`, as `fedsim compare` leaves it
    (`energy`: the fleet's joules known, 1000 J a round + 10 J·seed so far; else unknown, NaN)."""
    name = f"{strategy}-seed{seed}"
    path = root / name
    path.mkdir(parents=True)
    (path / "scenario.toml").write_text(
        f'name = "{name}"\nseed = {seed}\nrounds = 2\n\n[data]\ntask = "{task}"\n\n[strategy]\nname = "{strategy}"\n'
    )
    correct, loss, tokens = (a[:n] for a in per_example(strategy, seed))
    rows = []
    for k in range(3):
        if k:
            rows.append(
                {
                    "round": k,
                    "client_id": 0,
                    "kind": "train",
                    "num_examples": 16,
                    "loss": 2.0,
                    "bytes_up": 1000 * (1 + seed),
                    "bytes_down": 2000,
                }
            )
            rows.append(
                {"round": k, "client_id": 1, "kind": "eval_client", "num_examples": 8, "accuracy": 0.5 + 0.1 * seed}
            )
        final = k == 2
        accuracy = float(correct.mean()) if final else EARLY[k] + 0.01 * seed
        central_loss = float((loss * tokens).sum() / tokens.sum()) if final else 3.0 - 0.1 * k
        rows.append({"round": k, "client_id": -1, "kind": "eval_central",
                     "num_examples": len(correct) if final else CURVE_EXAMPLES, "loss": central_loss,
                     "accuracy": accuracy, "wall_time_s": 10.0 * k, "sim_time_s": 60.0 * k + seed,
                     "sim_energy_j": 1000.0 * k + 10 * seed if energy else math.nan})  # fmt: skip
    metrics_frame(rows).to_parquet(path / "metrics.parquet", index=False)
    if final_eval:
        RunDir(path).save_final_eval(2, loss.tolist(), tokens.tolist(), correct.tolist())
    return load_scenario(TINY, [f"strategy.name='{strategy}'", f"name='{name}'"], seed=seed)


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Scenario]]:
    root = tmp_path_factory.mktemp("compare")
    return root, [fake_run(root, s, seed) for s in ("fedit", BETTER, SAME) for seed in SEEDS]


def _row(table: pd.DataFrame, strategy: str, metric: str) -> pd.Series:
    return table[(table["strategy"] == strategy) & (table["metric"] == metric)].iloc[0]


def test_means_and_seed_intervals_are_the_t_formula_over_the_seeds(compared: tuple[Path, list[Scenario]]) -> None:
    table = comparison(read_results(compared[1], compared[0], target=0.2), "fedit")

    for strategy in ("fedit", BETTER):
        finals = np.array([per_example(strategy, s)[0].mean() for s in SEEDS])
        half = T_975_DF2 * finals.std(ddof=1) / math.sqrt(len(SEEDS))
        row = _row(table, strategy, "central_accuracy")
        assert row["n"] == 3 and row["mean"] == pytest.approx(finals.mean())
        assert (row["seed_lo"], row["seed_hi"]) == (
            pytest.approx(finals.mean() - half),
            pytest.approx(finals.mean() + half),
        )
    client = _row(table, "fedit", "client_accuracy")
    assert client["mean"] == pytest.approx(0.6)
    assert math.isnan(client["pooled_lo"])  # no per-example results for the clients' evaluation
    reached = _row(table, "fedit", "time_to_target_s")  # 0.25 + 0.01·seed ≥ 0.2 at round 1: 60 s + seed
    assert reached["n"] == 3 and reached["mean"] == pytest.approx(61.0)
    spent = _row(table, "fedit", "energy_to_target_j")  # by round 1: 1000 J + 10 J·seed
    half = T_975_DF2 * np.std([1000.0, 1010.0, 1020.0], ddof=1) / math.sqrt(3)
    assert spent["n"] == 3 and spent["mean"] == pytest.approx(1010.0)
    assert (spent["seed_lo"], spent["seed_hi"]) == (pytest.approx(1010.0 - half), pytest.approx(1010.0 + half))


def test_pooled_intervals_and_differences_are_over_the_seed_example_pairs(
    compared: tuple[Path, list[Scenario]],
) -> None:
    table = comparison(read_results(compared[1], compared[0], target=0.2), "fedit")
    pooled = {
        s: [np.concatenate(a) for a in zip(*(per_example(s, seed) for seed in SEEDS))] for s in ("fedit", BETTER, SAME)
    }

    acc = _row(table, BETTER, "central_accuracy")
    assert acc["pooled"] == pytest.approx(pooled[BETTER][0].mean())
    assert acc["pooled_lo"] < acc["pooled"] < acc["pooled_hi"]
    loss = _row(table, BETTER, "central_loss")
    correct, losses, tokens = pooled[BETTER]
    assert loss["pooled"] == pytest.approx((losses * tokens).sum() / tokens.sum())  # token-weighted
    per_seed = [per_example(BETTER, s)[0].mean() - per_example("fedit", s)[0].mean() for s in SEEDS]
    assert acc["diff"] == pytest.approx(np.mean(per_seed)) and acc["diff_n"] == 3
    assert acc["diff_pooled"] == pytest.approx(pooled[BETTER][0].mean() - pooled["fedit"][0].mean())
    assert 0 < acc["diff_pooled_lo"] < acc["diff_pooled"] < acc["diff_pooled_hi"]
    assert acc["distinguishable"] and _row(table, BETTER, "central_loss")["distinguishable"]
    for metric in ("central_accuracy", "central_loss"):
        same = _row(table, SAME, metric)
        assert same["diff_pooled_lo"] < 0 < same["diff_pooled_hi"] and not same["distinguishable"], metric
    base = _row(table, "fedit", "central_accuracy")
    assert math.isnan(base["diff"]) and pd.isna(base["distinguishable"])


def test_with_one_seed_only_the_bootstrap_decides(tmp_path: Path) -> None:
    runs = [fake_run(tmp_path, s, 0) for s in ("fedit", BETTER, SAME)]

    table = comparison(read_results(runs, tmp_path, target=0.2), "fedit")

    better = _row(table, BETTER, "central_accuracy")
    assert math.isnan(better["seed_lo"]) and math.isnan(better["diff_seed_lo"])
    assert better["distinguishable"] and not _row(table, SAME, "central_accuracy")["distinguishable"]
    assert not _row(table, BETTER, "bytes_up")["distinguishable"]  # no interval at all: cannot tell


def test_outputs_open_with_the_command_and_mark_what_cannot_be_told_apart(
    compared: tuple[Path, list[Scenario]],
) -> None:
    root, runs = compared
    command = [
        "fedsim",
        "compare",
        "scenarios/tiny.toml",
        "--strategies",
        "fedit,hetlora,flexlora",
        "--set",
        "train.lr=1e-3 x",
    ]

    text = write_outputs(runs, root, 0.2, "fedit", command)

    assert text == (root / "comparison.md").read_text()
    assert text.startswith(
        "# fedsim compare\n\n```\nfedsim compare scenarios/tiny.toml --strategies fedit,hetlora,flexlora --set "
        "'train.lr=1e-3 x'\n```\n"
    )
    assert "Seeds 0, 1, 2 (3 run(s) per strategy); baseline `fedit`" in text
    assert (
        f"curves {CURVE_EXAMPLES} per round; final: {EXAMPLES} (the per-round curves are scored on fewer examples"
        in text
    )
    diffs = text.split("## Difference from `fedit`")[1]
    same = next(line for line in diffs.splitlines() if line.startswith("| flexlora |"))
    better = next(line for line in diffs.splitlines() if line.startswith("| hetlora |"))
    assert same.split("|")[2].strip().endswith("~") and not better.split("|")[2].strip().endswith("~")
    assert " pooled [" in better
    csv = pd.read_csv(root / "comparison.csv")
    assert len(csv) == 3 * 8
    assert csv.set_index(["strategy", "metric"]).loc[(BETTER, "central_accuracy"), "distinguishable"]
    for plot in ("accuracy_vs_round.png", "accuracy_vs_sim_time.png", "loss_vs_round.png"):
        assert (root / plot).read_bytes().startswith(PNG)


def test_curves_carry_the_t_band_over_seeds(compared: tuple[Path, list[Scenario]]) -> None:
    curves = mean_curves(read_results(compared[1], compared[0], target=0.2))

    fedit = curves["fedit"]
    accuracies = np.array([EARLY[1] + 0.01 * s for s in SEEDS])
    half = T_975_DF2 * accuracies.std(ddof=1) / math.sqrt(3)
    assert fedit.loc[1, "central_accuracy"] == pytest.approx(accuracies.mean())
    assert (fedit.loc[1, "central_accuracy_lo"], fedit.loc[1, "central_accuracy_hi"]) == (
        pytest.approx(accuracies.mean() - half),
        pytest.approx(accuracies.mean() + half),
    )
    assert fedit.loc[2, "sim_time_s"] == pytest.approx(121.0)
    assert fedit.loc[0, "central_loss_lo"] == fedit.loc[0, "central_loss_hi"] == 3.0  # the seeds agree


def test_a_run_without_per_example_results_has_no_pooled_interval(tmp_path: Path) -> None:
    runs = [fake_run(tmp_path, "fedit", s) for s in SEEDS] + [
        fake_run(tmp_path, BETTER, s, final_eval=s != 1) for s in SEEDS
    ]

    text = write_outputs(runs, tmp_path, 0.2, "fedit", ["fedsim", "compare"])

    table = pd.read_csv(tmp_path / "comparison.csv")
    better = table[(table["strategy"] == BETTER) & (table["metric"] == "central_accuracy")].iloc[0]
    assert math.isnan(better["pooled_lo"]) and math.isnan(better["diff_pooled_lo"])
    assert not math.isnan(better["seed_lo"])
    assert "No per-example results (final_eval.parquet) for hetlora-seed1" in text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"task": "arithmetic"}, r"differ in \[data\]"), ({"n": EXAMPLES - 1}, "scored different held-out examples")],
)
def test_runs_at_one_seed_must_share_the_held_out_set(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    runs = [fake_run(tmp_path, "fedit", 0), fake_run(tmp_path, BETTER, 0, **kwargs)]  # type: ignore[arg-type]

    with pytest.raises(ValueError, match=message):
        read_results(runs, tmp_path, target=0.2)


def test_energy_a_run_does_not_know_shows_as_n_a_not_0(tmp_path: Path) -> None:
    runs = [fake_run(tmp_path, strategy, s, energy=False) for strategy in ("fedit", BETTER) for s in SEEDS]

    text = write_outputs(runs, tmp_path, 0.2, "fedit", ["fedsim", "compare"])

    head, *rows = [line for line in text.split("## Difference")[0].splitlines() if line.startswith("| ")]
    column = [c.strip() for c in head.split("|")].index("energy to 0.2 (J)")
    assert [[c.strip() for c in r.split("|")][column] for r in rows] == ["n/a", "n/a"]
    diff = next(line for line in text.split("## Difference")[1].splitlines() if line.startswith("| hetlora |"))
    assert diff.split("|")[-2].strip() == "n/a"
    csv = pd.read_csv(tmp_path / "comparison.csv").set_index(["strategy", "metric"])
    assert csv.loc[("fedit", "energy_to_target_j"), "n"] == 0 and math.isnan(
        csv.loc[("fedit", "energy_to_target_j"), "mean"]
    )
