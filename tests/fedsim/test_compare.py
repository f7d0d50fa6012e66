"""`fedsim compare`: a run per strategy and seed, a table and plots, resumable between runs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from fedsim.cli import EXIT_BAD_INPUT, main
from fedsim.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "scenarios" / "tiny.toml")
PNG = b"\x89PNG\r\n\x1a\n"


def test_unknown_strategy_is_refused_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["compare", TINY, "--strategies", "fedit,fedmagic", "--out", str(tmp_path)])
    assert code == EXIT_BAD_INPUT
    assert "unknown strategy 'fedmagic'; known: fedadagrad, fedadam" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


MIXED = str(ROOT / "scenarios" / "tiny-mixed-rank.toml")
ZOO = ["fedit", "hetlora", "flexlora", "flora", "ffa_lora", "fedsa_lora", "fedex_lora", "lora_fair", "fedadam"]


def test_compare_runs_the_strategy_zoo_on_mixed_ranks_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compare", MIXED, "--strategies", ",".join(ZOO), "--out", str(tmp_path), "--target", "0.0", "--set", "rounds=2"]
    assert main(args) == 0
    root = tmp_path / "tiny-mixed-rank-compare"
    table = pd.read_csv(root / "comparison.csv", index_col="strategy")
    assert list(table.index) == ZOO
    assert (table["seeds"] == 1).all() and (table["runs_reaching_target"] == 1).all()
    assert "| fedit |" in (root / "comparison.md").read_text()
    for plot in ("accuracy_vs_round.png", "accuracy_vs_sim_time.png"):
        assert (root / plot).read_bytes().startswith(PNG)
    runs = {name: read_metrics(root / f"{name}-seed0") for name in ZOO}
    for name, m in runs.items():
        train = m[m["kind"] == "train"]
        assert (train["status"] == "ok").all(), (name, train["reason"].tolist())
        central = m[m["kind"] == "eval_central"].set_index("round")
        if name != "fedsa_lora":  # its server holds the shared A with B = 0: no global model
            assert central.loc[2, "loss"] < central.loc[0, "loss"], name
        # every client trained at its profile's rank, and a rank-2 update is smaller than a rank-8 one
        assert set(zip(train["device"], train["lora_rank"])) <= {("phone-midrange", 2), ("jetson-xavier-nx", 4), ("laptop-cpu", 8)}
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
        assert down > 2 * runs["fedit"][(runs["fedit"]["kind"] == "train") & (runs["fedit"]["round"] == 2)]["bytes_down"].mean()
    assert not (root / "fedit-seed0" / "adapter" / "base_delta.safetensors").exists()
    # FFA-LoRA's A never moves
    a0, a2 = (load_file(str(root / "ffa_lora-seed0" / "checkpoints" / f"round_{k}" / "adapter_model.safetensors")) for k in (1, 2))
    assert all(torch.equal(a0[k], a2[k]) for k in a0 if "lora_A" in k) and any(not torch.equal(a0[k], a2[k]) for k in a0 if "lora_B" in k)
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
    again = pd.read_csv(root / "comparison.csv", index_col="strategy")
    pd.testing.assert_series_equal(again["final_loss_mean"], table["final_loss_mean"])  # same seed, same result
