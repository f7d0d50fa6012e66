"""fedsim.server.deployed: the fleet's deployed models, each profile's cut to its ratio, scored as the
device-weighted mean, each device of a profile's panel on the keep it trained at or else the
server's cut."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.config.scenario import Scenario, ScenarioError, validate_scenario
from fedsim.data.partitions import central_test_set
from fedsim.fleet.fleet import build_fleet
from fedsim.fleet.keeps import PruneBook
from fedsim.model.adapter import AdapterState, attach_lora, get_state, set_state
from fedsim.model.loader import load_model
from fedsim.model.training import evaluate_loss
from fedsim.pruning.importance import magnitude_scores
from fedsim.pruning.select import select_keep
from fedsim.pruning.structure import Scores, geometry
from fedsim.pruning.surgery import pruned_copy
from fedsim.server.central import CentralEvaluator
from fedsim.server.deployed import Deployment
from fedsim.server.preflight import pruning_problems

DEVICES = np.array(["laptop-cpu", "phone-highend", "phone-highend", "phone-highend"])


def _scenario(strategy_name: str = "fedit", targets: list[str] | None = None, **pruning: object) -> Scenario:
    return validate_scenario({
        "strategy": {"name": strategy_name},
        "model": {"name": "tiny-llama"}, "data": {"task": "sentiment", "central_test_size": 16},
        "clients": {"num_clients": 4, "per_round": 2},
        "fleet": {"groups": [{"profile": "laptop-cpu", "count": 1}, {"profile": "phone-highend", "count": 3}]},
        "lora": {"rank": 4, "alpha": 8.0, "target_modules": targets or ["q_proj", "v_proj", "up_proj"]},
        "pruning": {"deploy_ratios": {"phone-highend": 0.5}, "importance": "magnitude", "events": 1, **pruning},
    })  # fmt: skip


@pytest.fixture(scope="module")
def setup() -> tuple[Scenario, Deployment, AdapterState]:
    scenario = _scenario()
    base, tokenizer = load_model("tiny-llama")
    model = attach_lora(base, scenario.lora, seed=0)
    g = torch.Generator().manual_seed(3)
    state = {
        k: 0.05 * torch.randn(v.shape, generator=g) for k, v in get_state(model).items()
    }  # B not zero: the adapter counts
    examples = list(central_test_set(scenario.data, scenario.seed))
    deploy = Deployment(
        scenario, DEVICES, model, tokenizer, examples, lambda s: (set_state(model, s), magnitude_scores(model))[1]
    )
    return scenario, deploy, state


def _reference_loss(deploy: Deployment, state: AdapterState, keep: object, examples: int) -> float:
    """The loss `fedsim export` would see: adapter loaded on the whole model, then cut."""
    set_state(deploy.model, state)
    model = pruned_copy(deploy.model, keep) if keep is not None else deploy.model
    return evaluate_loss(model, deploy.tokenizer, deploy.examples[:examples], batch_size=16, max_len=64)


def test_the_fleet_loss_is_the_device_weighted_mean_of_each_profiles_deployed_model(
    setup: tuple[Scenario, Deployment, AdapterState],
) -> None:
    scenario, deploy, state = setup
    deploy.plan(state, None)
    set_state(deploy.model, state)
    cut = select_keep(magnitude_scores(deploy.model), geometry(deploy.model), 0.5, scenario.pruning.mode)
    assert deploy.keeps == {
        "laptop-cpu": [None],
        "phone-highend": [cut] * 3,
    }  # no client trained at 0.5: the server cuts
    whole, pruned = _reference_loss(deploy, state, None, 16), _reference_loss(deploy, state, cut, 16)
    assert abs(pruned - whole) > 5e-4  # the cut matters (little, on a random model), so the mean below tells them apart
    assert deploy.loss(state, 16) == pytest.approx(0.25 * whole + 0.75 * pruned, abs=2e-5)
    loss, accuracy = deploy.evaluate(state)
    assert loss == pytest.approx(0.25 * whole + 0.75 * pruned, abs=2e-5) and 0.0 <= accuracy <= 1.0
    given, _ = deploy.evaluate(state, unpruned=(10.0, 0.5))  # the central evaluation's: not scored again
    assert given == pytest.approx(0.25 * 10.0 + 0.75 * pruned, abs=2e-5)


def test_each_device_deploys_the_keep_it_trained_at_and_the_others_the_servers_cut(
    setup: tuple[Scenario, Deployment, AdapterState],
) -> None:
    scenario, deploy, state = setup
    layers = geometry(deploy.model)
    book = PruneBook(scenario, layers, np.array([0.0, 0.5, 0.5, 0.25]))
    g = torch.Generator().manual_seed(1)
    magnitude = magnitude_scores(deploy.model)
    scores = Scores(
        tuple(torch.rand(t.shape, generator=g) for t in magnitude.groups),
        tuple(torch.rand(t.shape, generator=g) for t in magnitude.channels),
    )
    own, other = (
        select_keep(scores, layers, 0.5, scenario.pruning.mode),
        select_keep(scores, layers, 0.25, scenario.pruning.mode),
    )
    set_state(deploy.model, state)
    server = select_keep(magnitude_scores(deploy.model), layers, 0.5, scenario.pruning.mode)
    assert len({own, server}) == 2
    book.record(2, own, 16)
    book.record(3, other, 32)  # trained, at another ratio: runs the server's cut
    deploy.plan(state, book)
    assert deploy.keeps == {"laptop-cpu": [None], "phone-highend": [server, own, server]}  # client 1 has not trained
    whole, mine, cut = (_reference_loss(deploy, state, k, 16) for k in (None, own, server))
    assert abs(mine - cut) > 5e-4  # the two keeps score apart, so the mean below tells them apart
    assert deploy.loss(state, 16) == pytest.approx(0.25 * whole + 0.75 * (2 * cut + mine) / 3, abs=2e-5)
    book.retarget(2, 0.25)  # now trains toward another ratio: its keep no longer counts
    deploy.plan(state, book)
    assert deploy.keeps["phone-highend"] == [server] * 3


def test_a_profile_is_scored_on_a_seeded_panel_of_its_devices() -> None:
    scenario = _scenario(deploy_panel=2)
    model = attach_lora(load_model("tiny-llama")[0], scenario.lora, seed=0)
    panels = [Deployment(scenario, DEVICES, model, None, [], lambda s: {}).panel for _ in range(2)]  # type: ignore[arg-type]
    assert panels[0] == panels[1] and set(panels[0]) == {"phone-highend"}  # the laptop deploys whole: no panel
    assert len(panels[0]["phone-highend"]) == 2 and set(panels[0]["phone-highend"]) < {1, 2, 3}
    others = {
        tuple(
            Deployment(scenario.model_copy(update={"seed": s}), DEVICES, model, None, [], lambda s: {}).panel[
                "phone-highend"
            ]
        )
        for s in range(8)
    }  # type: ignore[arg-type]
    assert len(others) > 1  # drawn from the seed
    with pytest.raises(ScenarioError, match="deploy_panel"):
        _scenario(deploy_panel=0)


def test_a_score_before_a_plan_is_refused() -> None:
    scenario = _scenario()
    model = attach_lora(load_model("tiny-llama")[0], scenario.lora, seed=0)
    deploy = Deployment(scenario, DEVICES, model, None, [], lambda s: {})  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="plan must run"):
        deploy.loss(get_state(model))


def test_deploy_ratios_are_checked() -> None:
    with pytest.raises(ScenarioError, match=r"`pruning.deploy_ratios.phone-highend` = 1.5 must be in \[0, 0.95\]"):
        _scenario(deploy_ratios={"phone-highend": 1.5})
    with pytest.raises(ScenarioError, match="`pruning.deploy_ratios.toaster`: unknown device profile"):
        _scenario(deploy_ratios={"toaster": 0.2})


def test_a_deploy_ratio_for_a_profile_the_fleet_lacks_is_named() -> None:
    scenario = _scenario(deploy_ratios={"phone-midrange": 0.2})
    problems = pruning_problems(scenario, build_fleet(scenario))
    assert any(
        "`pruning.deploy_ratios.phone-midrange`: no device of the fleet has this profile" in p for p in problems
    ), problems


def test_deploy_ratios_alone_do_not_ask_the_strategy_to_aggregate_pruned_clients() -> None:
    """Only the server cuts (for scoring): flexlora, which refuses pruned clients, is fine; a lora_grad
    cut still needs its targets, and the clients' score is then not read."""
    _scenario(strategy_name="flexlora")
    with pytest.raises(ScenarioError, match=r"`pruning.deploy_importance` = 'lora_grad' scores heads and channels"):
        _scenario(deploy_importance="lora_grad", targets=["q_proj", "v_proj"])
    assert _scenario(importance="lora_grad", targets=["q_proj", "v_proj"]).pruning.deploy_importance == "first_order"


def test_the_servers_deploy_cut_reads_deploy_importance_not_the_clients_score() -> None:
    scenario = _scenario(importance="lora_grad", deploy_importance="magnitude")
    central = CentralEvaluator(scenario)
    state = central.initial_state()
    deployed, expected = central.deploy_importance(state), magnitude_scores(central.model)
    assert len(deployed.groups) == len(expected.groups) > 0
    for got, want in zip((*deployed.groups, *deployed.channels), (*expected.groups, *expected.channels)):
        assert torch.equal(got, want)
    clients = central.importance(state)  # lora_grad: another score
    assert any(not torch.allclose(got, want) for got, want in zip(clients.channels, expected.channels))
