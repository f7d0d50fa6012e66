"""Differential privacy end to end, on the tiny model with fedsim's own ClientApp in this process
(`tests_support.inprocess`):

- every update the server sums is within the clip, for every strategy that allows DP, with mixed
  ranks and a pruned client: the client's clip (what arrives, in the global coordinates) and the
  server's re-clip (what is summed), also when a codec raised the norm past the clip;
- the round loop adds the noise once per round with the stated std (clients whose update is zero:
  the global adapter moves by the noise alone), or, local mode, each client adds its own;
- the run's ε is dp_accounting's for the Poisson-sampled rounds, and the sample is Poisson's;
- a resumed run goes on spending the same budget from the same adaptive clip;
- bad input is refused before anything runs, exit 2, by its dotted path.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dp_accounting as dp
import pandas as pd
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from tests_support.inprocess import InProcessGrid
from tests_support.scenarios import QUICK

import clients.app
from fedsim.cli import main
from fedsim.config.names import STRATEGIES
from fedsim.config.privacy import DP_REFUSED
from fedsim.config.scenario import load_scenario
from fedsim.model.adapter import load_adapter_state
from fedsim.privacy import add_noise, l2_norm, noise_generator, poisson_sample
from fedsim.privacy import book as book_module
from fedsim.results.rundir import PRIVACY_FILE, RunDir, read_metrics
from fedsim.server import rounds
from fedsim.server.federation import run_federation
from fedsim.server.resume import resume_point

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "scenarios" / "tiny.toml"
SMALL = QUICK
CENTRAL = ['privacy.mode="central"', "privacy.noise_multiplier=1.0"]
ALLOWED = [s for s in STRATEGIES if s not in DP_REFUSED]


pytestmark = pytest.mark.usefixtures("task_identity")  # Flower's Message() reads the running task's identity


def run(tmp: Path, overrides: list[str], resume: Any = None, run_dir: RunDir | None = None) -> Path:
    scenario = load_scenario(TINY, [*SMALL, *overrides])
    run_dir = run_dir or RunDir.create(tmp, scenario)
    run_federation(InProcessGrid(scenario), scenario, run_dir, resume=resume)  # type: ignore[arg-type]
    return run_dir.path


class Recorder:
    """The updates of each round as they arrive in the global coordinates (`to_global`) and as the
    server sums them (after the re-clip), captured around the round loop's own calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.arrived: list[dict[str, torch.Tensor]] = []
        self.summed: list[dict[str, torch.Tensor]] = []
        to_global, noised_mean = rounds.to_global, book_module.noised_mean

        def arrived(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
            self.arrived.append(out := to_global(*args, **kwargs))
            return out

        def summed(clipped: Any, like: Any, *args: Any) -> dict[str, torch.Tensor]:
            self.summed += list(clipped)
            self.like = like
            return noised_mean(clipped, like, *args)

        monkeypatch.setattr(rounds, "to_global", arrived)
        monkeypatch.setattr(book_module, "noised_mean", summed)


MIXED = [
    "clients.num_clients=4", "clients.per_round=4",  # q = 1: every client in every round
    'lora.client_ranks={"1" = 2, "2" = 4}', 'pruning.client_ratios={"0" = 0.5}', 'pruning.where="server"',
    "privacy.clip=0.01",  # far below the tiny model's update norms: every update is clipped
]  # fmt: skip


@pytest.mark.parametrize("strategy", ALLOWED)
def test_every_update_the_server_sums_is_within_the_clip(
    strategy: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = Recorder(monkeypatch)

    path = run(tmp_path, [*CENTRAL, *MIXED, f"strategy.name='{strategy}'", "rounds=1"])

    train = read_metrics(path).query("kind == 'train'").set_index("client_id")
    assert (train["status"] == "ok").all(), train["reason"].to_dict()
    assert train["lora_rank"].tolist() == [8, 2, 4, 8] and train.loc[0, "prune_ratio"] > 0  # mixed and pruned
    assert len(seen.arrived) == len(seen.summed) == 4
    for update in seen.arrived:  # the client's clip, as the server sums it (folded, padded, scattered)
        assert l2_norm(update) <= 0.01 * (1 + 1e-5)
    for update in seen.summed:  # the server's re-clip
        assert l2_norm(update) <= 0.01
        assert {k: v.shape for k, v in update.items()} == {k: v.shape for k, v in seen.like.items()}


def test_the_server_re_clips_what_a_codec_raised_past_the_clip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = Recorder(monkeypatch)

    run(tmp_path, [*CENTRAL, *MIXED, "compression.method='compeft'", "compression.alpha=4.0", "rounds=1"])

    assert any(l2_norm(u) > 0.011 for u in seen.arrived)  # ComPEFT's α·σ·sign raised the norm
    assert all(l2_norm(u) <= 0.01 for u in seen.summed)


@pytest.fixture()
def zero_updates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients that train nothing: each one's update is exactly zero."""
    result = SimpleNamespace(
        steps=0, train_loss=1.0, loss_before=1.0, loss_after=1.0, tokens=1, flops=1.0, wall_time_s=0.0
    )
    monkeypatch.setattr(clients.app, "train_lora", lambda *args, **kwargs: result)


NOISE = ["clients.num_clients=8", "clients.per_round=4", "privacy.clip=0.5", "rounds=3", "seed=7"]


def uploaded(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}


def test_the_round_loop_adds_the_noise_once_per_round_with_the_stated_std(tmp_path: Path, zero_updates: None) -> None:
    path = run(tmp_path, [*CENTRAL, *NOISE])

    states = [uploaded(load_adapter_state(path / "checkpoints" / f"round_{t}")) for t in (1, 2, 3)]
    for t in (2, 3):
        moved = {k: states[t - 1][k] - states[t - 2][k] for k in states[0]}
        zero = {k: torch.zeros_like(v) for k, v in moved.items()}
        draw = add_noise(zero, 1.0 * 0.5, noise_generator(7, t, "dp-noise"))  # z·C, round t's one draw
        for k in moved:
            torch.testing.assert_close(moved[k], draw[k] / 4, rtol=0, atol=1e-6)  # over m = 4
        values = torch.cat([v.flatten() for v in moved.values()])
        assert values.std().item() == pytest.approx(0.5 / 4, rel=0.03)


def test_local_mode_noise_is_each_clients_own_and_the_server_adds_none(
    tmp_path: Path, zero_updates: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = Recorder(monkeypatch)

    path = run(tmp_path, ['privacy.mode="local"', "privacy.noise_multiplier=2.0", *NOISE])

    train = read_metrics(path).query("kind == 'train' and status == 'ok'")
    assert len(seen.arrived) == len(train) == 12  # fixed-size samples of 4
    for update, (t, cid) in zip(seen.arrived, train[["round", "client_id"]].itertuples(index=False)):
        zero = {k: torch.zeros_like(v) for k, v in update.items()}
        draw = add_noise(zero, 2.0 * 0.5, noise_generator(7, int(t), int(cid), "dp-local-noise"))
        for k in update:
            torch.testing.assert_close(update[k], draw[k], rtol=0, atol=1e-6)
        assert torch.cat([v.flatten() for v in update.values()]).std().item() == pytest.approx(1.0, rel=0.03)
    states = [uploaded(load_adapter_state(path / "checkpoints" / f"round_{t}")) for t in (2, 3)]
    third = seen.arrived[8:]
    for k in states[0]:  # round 3: the mean of the clients' noise over m, nothing added
        torch.testing.assert_close(states[1][k] - states[0][k], sum(u[k] for u in third) / 4, rtol=0, atol=1e-6)


def direct_epsilon(q: float, z: float, rounds: int, delta: float) -> float:
    event = dp.SelfComposedDpEvent(dp.PoissonSampledDpEvent(q, dp.GaussianDpEvent(z)), rounds)
    return (
        RdpAccountant(neighboring_relation=dp.NeighboringRelation.ADD_OR_REMOVE_ONE).compose(event).get_epsilon(delta)
    )


def test_the_runs_epsilon_is_dp_accountings_for_its_poisson_sampled_rounds(tmp_path: Path) -> None:
    path = run(tmp_path, [*CENTRAL, *NOISE])

    metrics = read_metrics(path)
    central = metrics.query("kind == 'eval_central'").set_index("round")
    delta = 8**-1.1
    assert central.loc[0, "dp_epsilon"] == 0.0
    for t in (1, 2, 3):
        assert central.loc[t, "dp_epsilon"] == pytest.approx(direct_epsilon(0.5, 1.0, t, delta), rel=1e-9)
        sampled = metrics.query(f"kind == 'train' and round == {t}")["client_id"].tolist()
        assert sampled == poisson_sample(range(8), 8, 0.5, 7, t)
    assert (central.loc[1:, "dp_clip"] == 0.5).all()
    said = next(json.loads(e) for e in (path / "events.jsonl").read_text().splitlines() if '"privacy"' in e)
    assert (said["mode"], said["delta"], said["sampling"]) == ("central", pytest.approx(delta), "poisson, q = 0.5")
    assert said["weighting"].startswith("equal")


ADAPTIVE = [
    'privacy.mode="central"', "privacy.noise_multiplier=0.1", "privacy.adaptive=true", "privacy.clip=0.05",
    "clients.num_clients=8", "clients.per_round=4",
]  # fmt: skip


def test_a_resumed_run_goes_on_spending_the_same_budget_from_the_same_clip(tmp_path: Path) -> None:
    straight = run(tmp_path / "a", [*ADAPTIVE, "rounds=2", "name=dp-run"])
    stopped = run(tmp_path / "b", [*ADAPTIVE, "rounds=1", "name=dp-run"])
    assert (stopped / "checkpoints" / "round_1" / PRIVACY_FILE).is_file()

    scenario = load_scenario(TINY, [*SMALL, *ADAPTIVE, "rounds=2", "name=dp-run"])
    opened = RunDir.open(stopped)
    run(tmp_path, [*ADAPTIVE, "rounds=2", "name=dp-run"], resume_point(opened, scenario), opened)

    resumed, whole = (read_metrics(p).drop(columns="wall_time_s") for p in (stopped, straight))
    pd.testing.assert_frame_equal(resumed, whole)
    central = whole.query("kind == 'eval_central'").set_index("round")
    assert central.loc[2, "dp_clip"] != central.loc[1, "dp_clip"]  # the clip moved, and the resume took it up


def test_a_calibrated_noise_cannot_stretch_over_more_rounds_on_resume(tmp_path: Path) -> None:
    target = ['privacy.mode="central"', "privacy.target_epsilon=8.0", "privacy.clip=0.5", "rounds=1"]
    path = run(tmp_path, target)

    more = load_scenario(TINY, [*SMALL, *target, "rounds=3"])
    with pytest.raises(ValueError, match=r"`privacy`: .*privacy.json: .*set privacy.noise_multiplier = \d"):
        resume_point(RunDir.open(path), more)


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (['privacy.mode="central"', "privacy.noise_multiplier=1.0"], "`privacy.clip` is required"),
        ([*CENTRAL, "privacy.clip=-1"], "`privacy.clip` must be greater than 0"),
        ([*CENTRAL, "privacy.clip=1", "privacy.delta=1"], "`privacy.delta` must be less than 1"),
        (
            [
                'privacy.mode="local"',
                "privacy.target_epsilon=1e-4",
                "privacy.delta=1e-5",
                "privacy.clip=1",
                "rounds=1000",
            ],
            "`privacy.target_epsilon`: no noise multiplier up to 1000 reaches",
        ),
        ([*CENTRAL, "privacy.clip=1", "strategy.name='flexlora'"], "`strategy.name` = 'flexlora' cannot run"),
    ],
)
def test_bad_input_is_refused_by_its_dotted_path_before_anything_runs(
    overrides: list[str], problem: str, tmp_path: Path
) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["run", str(TINY), "--out", str(tmp_path), *[a for o in overrides for a in ("--set", o)]])

    assert code == 2 and problem in err.getvalue(), err.getvalue()
    assert not any(tmp_path.iterdir())  # nothing written


def test_the_shipped_quickstart_dp_scenario_reaches_its_stated_epsilon() -> None:
    from fedsim.privacy import plan

    scenario = load_scenario(ROOT / "scenarios" / "quickstart-dp.toml")
    p = scenario.privacy
    k = scenario.clients

    planned = plan(p, k.num_clients, k.per_round, scenario.rounds)

    assert p.mode == "central" and p.target_epsilon is not None and planned.epsilon <= p.target_epsilon
    assert k.per_round >= 10  # enough clients a round for the noise on the mean to mean something
