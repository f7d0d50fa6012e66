"""Prune-and-tune end to end on Flower's simulation engine with the tiny model (issue #5).

Two federations: clients pruning themselves between LoRA steps (`pruning.where = "client"`,
two profiles with targets 0.25 and 0.5), and the server making the cuts (`where = "server"`).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from fedsim.cli import main
from fedsim.config.scenario import load_scenario
from fedsim.data.partitions import central_test_set
from fedsim.fleet.costs import ModelShape, train_step_flops
from fedsim.fleet.fleet import build_fleet
from fedsim.fleet.keeps import pruned_shape
from fedsim.model.loader import load_model
from fedsim.model.training import evaluate
from fedsim.pruning.structure import Keep, geometry
from fedsim.results.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "scenarios" / "tiny.toml"
PRUNED = [
    "rounds=3",
    'fleet.groups=[{profile="laptop-cpu", count=2}, {profile="phone-highend", count=2}]',
    "pruning.ratio=0.5",
    "pruning.profile_ratios={laptop-cpu=0.25}",
    "pruning.interval_steps=4",
    "pruning.events=2",
]


def _run(out: Path, overrides: list[str]) -> tuple[Path, str]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["run", str(TINY), "--out", str(out), *[a for o in overrides for a in ("--set", o)]])
    assert code == 0, buffer.getvalue()
    return out / "tiny", buffer.getvalue()


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return _run(tmp_path_factory.mktemp("runs"), PRUNED)


def _keeps(run: Path) -> dict[int, Keep]:
    book = json.loads((run / "keeps.json").read_text())
    return {int(c): Keep.from_json(k) for c, k in book["keeps"].items()}


def test_clients_reach_their_profiles_target_ratio(pruned_run: tuple[Path, str]) -> None:
    train = read_metrics(pruned_run[0]).query("kind == 'train' and status == 'ok'")
    targets = train.groupby("device")["prune_target"].first().to_dict()
    assert targets == {"laptop-cpu": 0.25, "phone-highend": 0.5}
    # Events at steps 0 and 4 of a client's first round (8 steps, interval 4, 2 events): the
    # first round already ends at the target, within one structure's share of the layer.
    assert ((train["prune_ratio"] - train["prune_target"]).abs() < 0.03).all(), train[["device", "prune_ratio"]]
    layers = geometry(load_model("tiny-llama")[0])
    total = sum(g.params for g in layers)
    for cid, keep in _keeps(pruned_run[0]).items():
        last = train[train["client_id"] == cid].sort_values("round").iloc[-1]
        assert keep.removed_params(layers) / total == pytest.approx(last["prune_ratio"])


def test_pruned_clients_receive_and_compute_less(pruned_run: tuple[Path, str]) -> None:
    metrics = read_metrics(pruned_run[0])
    train = metrics.query("kind == 'train' and status == 'ok'").sort_values(["client_id", "round"])
    # A returning client holds a keep and is sent its slice; a first-timer the whole adapter.
    # (Compared within a round: the messages are deflated, and round 1's B = 0 packs small.)
    first = ~train.sort_values("round")["client_id"].duplicated()
    compared = 0
    for _, rows in train.assign(first=first).groupby("round"):
        new, back = rows[rows["first"]], rows[~rows["first"]]
        if len(new) and len(back):
            assert back["bytes_down"].max() < new["bytes_down"].min()
            compared += 1
    assert compared > 0
    # A returning client trains its final keep all round (its two events were in its first round):
    # its FLOPs are those of that pruned shape, at most 8 full-length steps of it, which is well
    # under one unpruned step's share.
    scenario = load_scenario(pruned_run[0] / "scenario.toml")
    full = ModelShape.from_model(load_model("tiny-llama")[0])
    step = dict(
        batch=8, seq_len=scenario.train.max_seq_len, rank=scenario.lora.rank, targets=scenario.lora.target_modules
    )
    keeps = _keeps(pruned_run[0])
    back = train.assign(first=first)[lambda t: ~t["first"]]
    assert len(back)
    for row in back.itertuples():
        pruned = train_step_flops(pruned_shape(full, keeps[row.client_id]), **step)
        assert row.flops <= 8 * pruned < 8 * train_step_flops(full, **step)


def test_report_and_export_score_each_ratios_pruned_model(
    pruned_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, stdout = pruned_run
    assert "pruned models" in stdout
    rows = read_metrics(run).query("kind == 'eval_export'").set_index("prune_target")
    assert sorted(rows.index) == [0.25, 0.5]
    assert main(["report", str(run)]) == 0
    assert "final adapter on each target ratio's pruned model" in capsys.readouterr().out
    assert main(["export", str(run), "--device", "phone-highend", "--out", str(tmp_path / "phone")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "phone")  # plain transformers
    manifest = json.loads((tmp_path / "phone" / "fedsim-export.json").read_text())
    assert manifest["ratio"] == pytest.approx(rows.loc[0.5, "prune_ratio"])
    scenario = load_scenario(run / "scenario.toml")
    examples = list(central_test_set(scenario.data, scenario.seed))
    tokenizer = load_model("tiny-llama")[1]
    e = scenario.eval
    res = evaluate(
        model,
        tokenizer,
        examples,
        max_new_tokens=e.max_new_tokens,
        batch_size=e.batch_size,
        max_len=scenario.train.max_seq_len,
    )
    assert res.loss == pytest.approx(rows.loc[0.5, "loss"], abs=1e-4)  # the exported model is the one the server scored
    assert res.accuracy == pytest.approx(rows.loc[0.5, "accuracy"])


def test_export_refuses_an_unknown_profile(
    pruned_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", str(pruned_run[0]), "--device", "jetson-tx2", "--out", str(tmp_path / "x")]) == 2
    assert "no client of the run has device profile 'jetson-tx2'" in capsys.readouterr().err


def test_export_ships_each_device_the_model_its_deployed_score_used(tmp_path: Path) -> None:
    """Deploy ratios, nobody trains pruned: a phone ships the server's cut to 0.5 (not the unpruned
    model), scored as the run scored it; a laptop, whose profile deploys whole, the unpruned one.
    Both cut by `deploy_importance`, not by the clients' `importance` (which would cut another keep)."""
    run, _ = _run(tmp_path / "runs", [
        "rounds=2", "clients.eval_per_round=0",
        'fleet.groups=[{profile="laptop-cpu", count=2}, {profile="phone-highend", count=2}]',
        "pruning.deploy_ratios={phone-highend=0.5}", 'pruning.deploy_importance="magnitude"',
        'pruning.importance="activation"',
    ])  # fmt: skip
    final = read_metrics(run).query("kind == 'eval_central'").sort_values("round").iloc[-1]
    cut_loss = 2 * final["deployed_loss"] - final["loss"]  # half the fleet deploys whole, half the cut
    scenario = load_scenario(run / "scenario.toml")
    phones = [c for c, d in enumerate(build_fleet(scenario).device) if d == "phone-highend"]
    losses = {}
    for name, which in (("phone", ["--client", str(phones[0])]), ("laptop", ["--device", "laptop-cpu"])):
        assert main(["export", str(run), *which, "--out", str(tmp_path / name)]) == 0
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        examples = list(central_test_set(scenario.data, scenario.seed))
        e = scenario.eval
        losses[name] = evaluate(
            model,
            load_model("tiny-llama")[1],
            examples,
            max_new_tokens=e.max_new_tokens,
            batch_size=e.batch_size,
            max_len=scenario.train.max_seq_len,
        ).loss
        manifest = json.loads((tmp_path / name / "fedsim-export.json").read_text())
        assert (manifest["ratio"] > 0.4) == (name == "phone"), manifest["ratio"]
    assert losses["phone"] == pytest.approx(cut_loss, abs=1e-4)
    assert losses["laptop"] == pytest.approx(final["loss"], abs=1e-4)
    assert abs(losses["phone"] - losses["laptop"]) > 1e-3  # the two models score apart: the check above can fail
    assert main(["export", str(run), "--client", "9", "--out", str(tmp_path / "x")]) == 2


def test_server_side_pruning_sends_each_client_its_cut(tmp_path: Path) -> None:
    run, _ = _run(tmp_path, [*PRUNED, 'pruning.where="server"', 'pruning.importance="magnitude"', "rounds=2"])
    train = read_metrics(run).query("kind == 'train' and status == 'ok'").sort_values("round")
    # The server cuts before each round, by the schedule: a client's first round is at event 1,
    # ρ·(1 − (1/2)³) = 7/8 ρ, its next at event 2, ρ; it trains that model unchanged, so the ratio
    # it reports is the one it was sent.
    first = ~train["client_id"].duplicated()
    expected = train["prune_target"].where(~first, train["prune_target"] * 7 / 8)
    assert ((train["prune_ratio"] - expected).abs() < 0.03).all(), train[["client_id", "prune_target", "prune_ratio"]]
    assert (~first).any()  # some client came back and was cut further
