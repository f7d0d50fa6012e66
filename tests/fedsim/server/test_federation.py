"""End to end on Flower's real simulation engine (Ray backend) with the tiny model.

Three federations run in this module (each starts and stops its own Ray): the CLI run whose
outputs most tests inspect (its clients seated on a pool of nodes), a second run with the same seed
and a node per client (determinism, whichever nodes play the clients), and a run whose
clients misbehave (a NaN update, a crash).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from peft import PeftModel
from tests_support.grids import NodesOnly

from fedsim.cli import main
from fedsim.config.scenario import load_scenario
from fedsim.data.partitions import central_test_set
from fedsim.model.loader import load_model
from fedsim.model.training import evaluate
from fedsim.results.rundir import METRIC_COLUMNS, RunDir, read_metrics

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "scenarios" / "tiny.toml"
OVERRIDES = ["rounds=3"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("runs")
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["run", str(TINY), "--out", str(out), *[a for o in OVERRIDES for a in ("--set", o)]])
    assert code == 0, buffer.getvalue()
    return out / "tiny", buffer.getvalue()


def test_cli_shows_progress_and_summary(cli_run: tuple[Path, str]) -> None:
    _, stdout = cli_run
    assert "round   0/3" in stdout and "round   3/3" in stdout
    assert "central accuracy" in stdout and "final adapter" in stdout


def test_run_directory_layout(cli_run: tuple[Path, str]) -> None:
    run, _ = cli_run
    assert (run / "scenario.toml").is_file()
    assert load_scenario(run / "scenario.toml").rounds == 3
    for k in (1, 2, 3):
        assert (run / "checkpoints" / f"round_{k}" / "adapter_model.safetensors").is_file()
    assert (run / "adapter" / "adapter_config.json").is_file()
    events = [json.loads(line)["event"] for line in (run / "events.jsonl").read_text().splitlines()]
    assert events[0] == "run_start" and events[-1] == "run_end"
    assert events.count("round_end") == 4  # round 0 (initial evaluation) + 3 rounds


def test_metrics_schema(cli_run: tuple[Path, str]) -> None:
    metrics = read_metrics(cli_run[0])
    assert list(metrics.columns) == list(METRIC_COLUMNS)
    assert {str(t) for t in metrics.dtypes} >= {"int64", "float64", "string"}
    assert set(metrics["kind"]) == {"train", "eval_client", "eval_central"}
    per_round = metrics.groupby(["round", "kind"]).size().unstack(fill_value=0)
    assert per_round.loc[0].to_dict() == {"eval_central": 1, "eval_client": 0, "train": 0}
    for k in (1, 2, 3):
        assert per_round.loc[k].to_dict() == {"eval_central": 1, "eval_client": 2, "train": 2}
    assert (metrics["status"] == "ok").all()
    train = metrics[metrics["kind"] == "train"]
    assert (train["num_examples"] > 0).all() and (train["tokens"] > 0).all()


def test_aggregation_bias_is_logged_per_round(cli_run: tuple[Path, str]) -> None:
    central = read_metrics(cli_run[0]).query("kind == 'eval_central'").set_index("round")["aggregation_bias"]
    assert math.isnan(central[0])  # nothing aggregated before round 1
    assert all(0 < central[r] < 1 for r in (1, 2, 3)), central.to_dict()  # two different clients: FedIT is biased


def test_loss_falls(cli_run: tuple[Path, str]) -> None:
    metrics = read_metrics(cli_run[0])
    central = metrics[metrics["kind"] == "eval_central"].set_index("round")["loss"]
    assert central[3] < central[0] - 0.1, central.to_dict()
    train = metrics[metrics["kind"] == "train"]
    assert (train["loss_after"] < train["loss_before"]).all()


def test_final_adapter_loads_with_peft_and_reproduces_logged_metrics(cli_run: tuple[Path, str]) -> None:
    run, _ = cli_run
    scenario = load_scenario(run / "scenario.toml")
    base, tokenizer = load_model(scenario.model.name)
    model = PeftModel.from_pretrained(base, run / "adapter")
    examples = list(central_test_set(scenario.data, scenario.seed))
    e = scenario.eval
    res = evaluate(
        model,
        tokenizer,
        examples,
        max_new_tokens=e.max_new_tokens,
        batch_size=e.batch_size,
        max_len=scenario.train.max_seq_len,
    )
    metrics = read_metrics(run)
    logged = metrics[(metrics["kind"] == "eval_central") & (metrics["round"] == 3)].iloc[0]
    assert res.loss == pytest.approx(logged["loss"], abs=1e-5)
    assert res.accuracy == logged["accuracy"]


def test_report_prints_round_table(cli_run: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(cli_run[0])]) == 0
    out = capsys.readouterr().out
    assert "central_accuracy" in out and "train_loss" in out
    assert len([ln for ln in out.splitlines() if ln.strip()[:1].isdigit()]) == 4


def _nodes(run: Path) -> int:
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    return next(e["nodes"] for e in events if e["event"] == "clients")


def test_same_seed_same_metrics_on_a_pool_of_nodes_or_a_node_per_client(
    cli_run: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI's run seats each phase's clients on a pool of 2 nodes; the same scenario with a node
    per client (as when clients keep state) gives the same metrics."""
    from fedsim.runtime import simulation
    from fedsim.server import federation

    scenario = load_scenario(TINY, OVERRIDES)
    for module in (simulation, federation):
        monkeypatch.setattr(module, "node_pool_size", lambda s: s.clients.num_clients)
    run_dir = RunDir.create(tmp_path, scenario)
    simulation.run_simulation(scenario, run_dir)
    assert (_nodes(cli_run[0]), _nodes(run_dir.path)) == (2, 4)
    volatile = ["wall_time_s"]
    a = read_metrics(cli_run[0]).drop(columns=volatile)
    b = read_metrics(run_dir.path).drop(columns=volatile)
    pd.testing.assert_frame_equal(a, b)


def test_run_survives_bad_replies(tmp_path: Path) -> None:
    """Client 1 sends NaNs, client 2 crashes and client 3 sends a truncated payload in every
    round: all are recorded, none reaches the global model, and the run finishes."""
    from tests_support.faulty_client import app as faulty_app  # importable by Ray workers

    from fedsim.runtime.simulation import run_simulation

    scenario = load_scenario(TINY, ["rounds=2", "clients.per_round=4", "clients.eval_per_round=0"])
    run_dir = RunDir.create(tmp_path, scenario)
    run_simulation(scenario, run_dir, client_app=faulty_app)
    metrics = read_metrics(run_dir.path)
    train = metrics[metrics["kind"] == "train"].set_index(["round", "client_id"])
    for r in (1, 2):
        assert train.loc[(r, 0), "status"] == "ok"
        assert train.loc[(r, 1), "status"] == "rejected"
        assert "NaN" in train.loc[(r, 1), "reason"]
        assert train.loc[(r, 2), "status"] == "failed"
        assert "deliberate crash" in train.loc[(r, 2), "reason"]
        assert train.loc[(r, 3), "status"] == "rejected"
        assert "update payload rejected" in train.loc[(r, 3), "reason"]
    central = metrics[metrics["kind"] == "eval_central"].set_index("round")["loss"]
    assert all(math.isfinite(v) for v in central)
    assert central[2] < central[0]  # client 0's updates alone still trained the model


def test_assigning_clients_sends_no_message_and_seats_a_round_on_a_pool_of_nodes() -> None:
    from fedsim.server.federation import assign_clients

    nodes = [int(n) for n in np.random.default_rng(0).choice(2**62, size=12, replace=False)]
    scenario = load_scenario(
        TINY, ["clients.num_clients=100000", "data.num_examples=300000", "clients.per_round=10", "fleet.overcommit=0.2"]
    )
    roster = assign_clients(NodesOnly(nodes), scenario)  # type: ignore[arg-type]
    assert roster.nodes == sorted(nodes) and len(roster.ids) == 100_000
    roster.seat([99_999, 5, 70_000])
    assert [roster.node(c) for c in (5, 70_000, 99_999)] == sorted(nodes)[:3]
    assert roster.client(sorted(nodes)[1]) == 70_000


def test_clients_that_keep_state_get_a_node_each_the_ith_by_id_playing_client_i() -> None:
    from fedsim.server.federation import assign_clients

    nodes = [int(n) for n in np.random.default_rng(0).choice(2**62, size=1000, replace=False)]
    scenario = load_scenario(TINY, ["clients.num_clients=1000", "compression.error_feedback=true"])
    roster = assign_clients(NodesOnly(nodes), scenario)  # type: ignore[arg-type]
    roster.seat([3])  # a node per client: seating changes nothing
    assert [roster.node(c) for c in range(1000)] == sorted(nodes) and roster.client(sorted(nodes)[7]) == 7


def test_a_simulation_asks_no_node_who_it_is_and_each_plays_the_client_it_is_sent(tmp_path: Path) -> None:
    """Every node's query handler raises and its node config names another partition than the
    client it is sent: the run still trains and evaluates every client it samples, each reply
    from the client its node was addressed as (a wrong one would be rejected)."""
    from tests_support.no_query_client import app as no_query_app  # importable by Ray workers

    from fedsim.runtime.simulation import run_simulation

    scenario = load_scenario(TINY, ["rounds=2", "clients.per_round=3", "clients.eval_per_round=2"])
    run_dir = RunDir.create(tmp_path, scenario)
    run_simulation(scenario, run_dir, client_app=no_query_app)
    metrics = read_metrics(run_dir.path)
    clients = metrics[metrics["kind"].isin(["train", "eval_client"])]
    assert len(clients) == 2 * (3 + 2) and (clients["status"] == "ok").all(), clients[["status", "reason"]]


class _Registering(NodesOnly):
    """Nodes register over time, as in Flower's simulation: one more each time it is asked."""

    def __init__(self, nodes: list[int]) -> None:
        super().__init__(nodes)
        self.calls = 0

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        return self.nodes[: self.calls]


def test_assigning_clients_waits_for_the_nodes_still_registering(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from fedsim.server.federation import assign_clients

    monkeypatch.setattr(time, "sleep", lambda s: None)
    scenario = load_scenario(TINY, ["clients.num_clients=3", "clients.per_round=3"])
    roster = assign_clients(_Registering([30, 10, 20]), scenario)  # type: ignore[arg-type]
    assert roster.nodes == [10, 20, 30]
    monkeypatch.setenv("FEDSIM_NODE_WAIT_S", "0")
    with pytest.raises(RuntimeError, match="registered 1 nodes of the 3 that 3 clients need"):
        assign_clients(_Registering([30, 10, 20]), scenario)  # type: ignore[arg-type]
