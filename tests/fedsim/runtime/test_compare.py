"""`fedsim compare`: bad input refused at once, a run per strategy and seed, a table with intervals
and plots, resumable between runs."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from fedsim.cli import EXIT_BAD_INPUT, EXIT_FAILED, main
from fedsim.config.scenario import Scenario
from fedsim.results.rundir import RunDir, read_final_eval, read_metrics

ROOT = Path(__file__).resolve().parents[3]
TINY = str(ROOT / "scenarios" / "tiny.toml")
PNG = b"\x89PNG\r\n\x1a\n"


def test_unknown_strategy_is_refused_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["compare", TINY, "--strategies", "fedit,fedmagic", "--out", str(tmp_path)])
    assert code == EXIT_BAD_INPUT
    assert "unknown strategy 'fedmagic'; known: afa_cd, afa_cs, fedadagrad, fedadam" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("args", "problems"),
    [
        (["--seeds", "0"], ["`--seeds` must be >= 1, got 0"]),
        (["--seeds", "-2"], ["`--seeds` must be >= 1, got -2"]),
        (
            ["--strategies", "fedit,hetlora", "--baseline", "fedavg"],
            ["`--baseline` must be one of the --strategies (fedit, hetlora), got 'fedavg'"],
        ),
        (
            ["--strategies", "hetlora,flexlora"],
            ["`--baseline` must be one of the --strategies (hetlora, flexlora), got 'fedit'"],
        ),
        (
            ["--strategies", "fedit,fedprx,hetlora,flexlroa"],
            [
                "`--strategies`: unknown strategy 'fedprx', 'flexlroa'; known: afa_cd, afa_cs, fedadagrad, fedadam, "
                "fedavgm"
            ],
        ),
        (["--strategies", "fedit,hetlora,fedit"], ["`--strategies` names 'fedit' more than once"]),
        (  # a pruning scenario: every strategy that refuses it is named at once
            ["--strategies", "fedit,flexlora,flora,hetlora", "--set", "pruning.ratio=0.3"],
            [
                "with strategy 'flexlora': `strategy.name` = 'flexlora' cannot aggregate pruned clients",
                "with strategy 'flora': `strategy.name` = 'flora' cannot",
            ],
        ),
        (
            ["--set", "clients.per_round=99"],
            ["`clients.per_round` must be <= clients.num_clients"],
        ),  # every strategy's: said once
        (  # all of it in one message
            [
                "--strategies",
                "fedit,fedmagic,flexlora",
                "--seeds",
                "0",
                "--baseline",
                "hetlora",
                "--set",
                "pruning.ratio=0.3",
            ],
            [
                "`--seeds` must be >= 1",
                "unknown strategy 'fedmagic'",
                "`--baseline` must be one of",
                "with strategy 'flexlora'",
            ],
        ),
    ],
)
def test_bad_arguments_are_all_reported_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], problems: list[str]
) -> None:
    argv = [
        "compare",
        TINY,
        "--strategies",
        "fedit,hetlora",
        "--out",
        str(tmp_path / "out"),
        *args,
    ]  # a later --strategies wins

    code = main(argv)

    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert err.startswith(f"fedsim compare on {TINY} has {len(problems)} problem(s):"), err
    for problem in problems:
        assert problem in err
    assert not (tmp_path / "out").exists()


def test_a_data_file_that_cannot_be_used_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"foo": i}) + "\n" for i in range(50)))
    out = tmp_path / "out"

    code = main(["compare", TINY, "--strategies", "fedit,hetlora", "--out", str(out), "--set", f"data.task='{data}'"])

    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert f"fedsim compare on {TINY} has 1 problem(s):\n  - `data.task`: {data}: no prompt field" in err  # once
    assert not out.exists()


def test_a_run_that_fails_is_named_with_its_traceback_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedsim.runtime.simulation

    def one_fails(jobs: list[tuple[Scenario, RunDir]], **kwargs: object) -> list[tuple[RunDir, Exception]]:
        failures: list[tuple[RunDir, Exception]] = []
        for scenario, run_dir in jobs:  # as run_simulations(keep_going=True) records a failed run
            try:
                if scenario.strategy.name == "hetlora":
                    raise ValueError("no rank left")
            except Exception as exc:
                run_dir.fail(exc)
                failures.append((run_dir, exc))
        return failures

    monkeypatch.setattr(fedsim.runtime.simulation, "run_simulations", one_fails)

    code = main(["compare", TINY, "--strategies", "fedit,hetlora", "--seeds", "1", "--out", str(tmp_path)])

    run = tmp_path / "tiny-compare" / "hetlora-seed0"
    first, hint = capsys.readouterr().err.splitlines()
    assert code == EXIT_FAILED
    assert first == f"fedsim: run hetlora-seed0 failed: ValueError: no rank left (traceback in {run / 'error.log'})"
    assert "run the command again to retry them" in hint
    log = (run / "error.log").read_text()
    assert "in one_fails" in log and log.rstrip().endswith("ValueError: no rank left")
    assert not (tmp_path / "tiny-compare" / "fedit-seed0" / "error.log").exists()


def test_compare_reports_intervals_over_seeds_and_held_out_examples(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 2 strategies x 2 seeds, one round; each round is scored on 8 held-out examples, the last on all 32
    args = ["compare", TINY, "--strategies", "fedit,hetlora", "--seeds", "2", "--out", str(tmp_path), "--target", "0.0",
            "--set", "rounds=1", "--set", "eval.central_examples=8", "--set", "clients.eval_per_round=1"]  # fmt: skip

    assert main(args) == 0

    root = tmp_path / "tiny-compare"
    out = capsys.readouterr().out
    assert "curves 8 per round; final: 32" in out
    text = (root / "comparison.md").read_text()
    assert (
        text.startswith("# fedsim compare\n\n```\nfedsim " + shlex.join(args) + "\n```\n")
        and "Seeds 0, 1 (2 run(s) per strategy)" in text
    )
    table = pd.read_csv(root / "comparison.csv")
    assert set(table["strategy"]) == {"fedit", "hetlora"}
    accuracy = table.set_index(["strategy", "metric"]).loc[("hetlora", "central_accuracy")]
    assert accuracy["n"] == 2 and accuracy["diff_n"] == 2
    for column in ("seed_lo", "seed_hi", "pooled_lo", "pooled_hi", "diff_seed_lo", "diff_pooled_lo"):
        assert np.isfinite(accuracy[column]), column
    for run in ("fedit-seed0", "fedit-seed1", "hetlora-seed0", "hetlora-seed1"):
        final = read_final_eval(root / run)
        central = read_metrics(root / run).query("kind == 'eval_central'").set_index("round")
        assert len(final) == 32 and list(final["example"]) == list(range(32)) and (final["round"] == 1).all()
        assert central["num_examples"].tolist() == [8, 32]
        assert central.loc[1, "accuracy"] == final["correct"].mean()
        assert central.loc[1, "loss"] == pytest.approx(
            (final["loss"] * final["n_tokens"]).sum() / final["n_tokens"].sum()
        )
    assert (root / "loss_vs_round.png").read_bytes().startswith(PNG)


MIXED = str(ROOT / "scenarios" / "tiny-mixed-rank.toml")
ZOO = ["fedit", "hetlora", "flexlora", "flora", "ffa_lora", "fedsa_lora", "fedex_lora", "lora_fair", "fedadam"]


def test_compare_runs_the_strategy_zoo_on_mixed_ranks_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "compare",
        MIXED,
        "--strategies",
        ",".join(ZOO),
        "--seeds",
        "1",
        "--out",
        str(tmp_path),
        "--target",
        "0.0",
        "--set",
        "rounds=2",
    ]
    assert main(args) == 0
    root = tmp_path / "tiny-mixed-rank-compare"
    table = pd.read_csv(root / "comparison.csv").set_index(["strategy", "metric"])
    assert list(dict.fromkeys(table.index.get_level_values("strategy"))) == ZOO
    assert (table.xs("central_accuracy", level="metric")["n"] == 1).all()
    assert (table.xs("time_to_target_s", level="metric")["n"] == 1).all()  # every run reached the target
    text = (root / "comparison.md").read_text()
    assert "| fedit |" in text and "With one seed the t interval is undefined" in text
    for plot in ("accuracy_vs_round.png", "accuracy_vs_sim_time.png", "loss_vs_round.png"):
        assert (root / plot).read_bytes().startswith(PNG)
    runs = {name: read_metrics(root / f"{name}-seed0") for name in ZOO}
    for name, m in runs.items():
        train = m[m["kind"] == "train"]
        assert (train["status"] == "ok").all(), (name, train["reason"].tolist())
        central = m[m["kind"] == "eval_central"].set_index("round")
        if name != "fedsa_lora":  # its server holds the shared A with B = 0: no global model
            assert central.loc[2, "loss"] < central.loc[0, "loss"], name
        # every client trained at its profile's rank, and a rank-2 update is smaller than a rank-8 one
        assert set(zip(train["device"], train["lora_rank"])) <= {
            ("phone-midrange", 2),
            ("jetson-xavier-nx", 4),
            ("laptop-cpu", 8),
        }
        up = train.groupby("lora_rank")["bytes_up"].mean()
        assert up[2] < up[8], (name, up.to_dict())
    # FFA-LoRA uploads B alone, FedSA-LoRA A alone: fewer bytes than FedIT's A and B
    fedit_up = runs["fedit"][runs["fedit"]["kind"] == "train"].groupby("lora_rank")["bytes_up"].mean()
    for name in ("ffa_lora", "fedsa_lora"):
        up = runs[name][runs[name]["kind"] == "train"].groupby("lora_rank")["bytes_up"].mean()
        assert (up < 0.8 * fedit_up).all(), (name, up.to_dict(), fedit_up.to_dict())
    # FLoRA and FedEx-LoRA merge into the base: the dense deltas travel down and are checkpointed
    for name in ("flora", "fedex_lora"):
        assert (root / f"{name}-seed0" / "adapter" / "base_delta.safetensors").is_file()
        down = runs[name][(runs[name]["kind"] == "train") & (runs[name]["round"] == 2)]["bytes_down"].mean()
        assert (
            down
            > 2 * runs["fedit"][(runs["fedit"]["kind"] == "train") & (runs["fedit"]["round"] == 2)]["bytes_down"].mean()
        )
    assert not (root / "fedit-seed0" / "adapter" / "base_delta.safetensors").exists()
    # FFA-LoRA's A never moves
    a0, a2 = (
        load_file(str(root / "ffa_lora-seed0" / "checkpoints" / f"round_{k}" / "adapter_model.safetensors"))
        for k in (1, 2)
    )
    assert all(torch.equal(a0[k], a2[k]) for k in a0 if "lora_A" in k) and any(
        not torch.equal(a0[k], a2[k]) for k in a0 if "lora_B" in k
    )
    # aggregation bias is logged per round: FedIT's averaging is biased with mixed clients
    assert runs["fedit"][runs["fedit"]["kind"] == "eval_central"]["aggregation_bias"].iloc[1:].gt(0).all()
    capsys.readouterr()

    # interrupted: lora_fair's run lost its end; only it runs again, with the same result
    events = root / "lora_fair-seed0" / "events.jsonl"
    events.write_text("\n".join(events.read_text().splitlines()[:-1]) + "\n")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "fedit-seed0: done already, kept" in out
    assert "lora_fair-seed0: interrupted earlier, running it again" in out
    again = pd.read_csv(root / "comparison.csv").set_index(["strategy", "metric"])
    for metric in ("central_accuracy", "central_loss", "bytes_up"):  # same seed, same result
        pd.testing.assert_series_equal(
            again.xs(metric, level="metric")["mean"], table.xs(metric, level="metric")["mean"]
        )

    # asked again with other settings: the finished runs are not compared as if they were the new ones
    assert main([*args, "--set", "train.lr=0.002"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "fedit-seed0 finished with other settings (train.lr: 0.003 → 0.002)" in err
    assert "move it away or use another --out" in err
    pd.testing.assert_frame_equal(pd.read_csv(root / "comparison.csv").set_index(["strategy", "metric"]), again)
