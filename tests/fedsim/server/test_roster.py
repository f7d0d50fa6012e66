"""Who plays which client: a node per client when clients keep state or a round has no size bound (central DP),
else a pool as large as a round."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsim.config.scenario import load_scenario
from fedsim.server.roster import Roster, client_state, node_pool_size

TINY = Path(__file__).resolve().parents[3] / "scenarios" / "tiny.toml"
FLEET = ["clients.num_clients=1000", "data.num_examples=3000", "clients.per_round=10"]


@pytest.mark.parametrize(
    ("overrides", "nodes"),
    [
        (["fleet.overcommit=0", "clients.eval_per_round=4"], 10),
        (["fleet.overcommit=0.25", "clients.eval_per_round=4"], 13),  # ⌈10·1.25⌉
        (["fleet.overcommit=0", "clients.eval_per_round=40"], 40),
        (["compression.error_feedback=true"], 1000),
        (["compression.downlink=true"], 1000),
        (["strategy.name=fedsa_lora"], 1000),
        (["privacy.mode='central'", "privacy.clip=1.0", "privacy.noise_multiplier=1.0"], 1000),  # Poisson: no bound
        (["privacy.mode='local'", "privacy.clip=1.0", "privacy.noise_multiplier=1.0"], 10),
    ],
)
def test_the_pool_is_a_round_unless_clients_keep_state(overrides: list[str], nodes: int) -> None:
    assert node_pool_size(load_scenario(TINY, FLEET + overrides)) == nodes


def test_each_reason_for_client_state_is_named() -> None:
    scenario = load_scenario(TINY, [*FLEET, "compression.error_feedback=true", "strategy.name=fedsa_lora"])
    reasons = client_state(scenario)
    assert len(reasons) == 2
    assert "compression.error_feedback" in reasons[0] and "fedsa_lora" in reasons[1] and "own B" in reasons[1]
    assert client_state(load_scenario(TINY, FLEET)) == []


def test_a_pool_seats_each_phase_anew_and_refuses_more_clients_than_nodes() -> None:
    roster = Roster.pooled(100, [30, 10, 20])
    roster.seat([42, 7])
    assert (roster.node(7), roster.node(42), roster.client(20)) == (10, 20, 42)
    roster.seat([99])
    assert roster.node(99) == 10
    with pytest.raises(KeyError, match="client 7 has no node"):
        roster.node(7)
    with pytest.raises(ValueError, match="4 clients cannot be seated on a pool of 3 nodes"):
        roster.seat([1, 2, 3, 4])
    assert roster.nodes == [10, 20, 30] and len(roster.ids) == 100
