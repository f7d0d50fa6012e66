"""The bandit controller in the round loop: an arm per sampled client before a round, a reward per
client after it.

Before the round's feasibility check, `assign` asks the controller (`fedsim.controllers`) for each
sampled client's arm (LoRA rank, pruning ratio) and makes it that client's rank (`ClientRanks.assigned`)
and target ratio (`PruneBook.targets`), so the memory check, the simulated clock and the message
all follow the arm (`PruneBook.retarget`): a new ratio restarts the client's pruning schedule from
the model it holds, toward the new target; a ratio below what it holds cannot be reached by pruning
more, so the client then starts over from the unpruned model, which it can, since every client
builds its pruned model from the unpruned one each round. In the run's last `commit_rounds` rounds
(0 by default, `controllers.config`) the controller explores no more (`choose(exploit=True)`).

After the round, `observe` turns each sampled client's row into an observation — time (simulated or
measured, `sim_compute_s + sim_comm_s`), local loss before/after, ratio reached, the update's norm,
its contribution to the global model (scored by the server on held-out examples,
`rounds.contributions`, when the reward weighs it), and feasibility (`infeasible` rows; on real
devices a failure that names memory) — computes the rewards (`fedsim.controllers.reward`) and
updates the controller. Dropped clients and other failures teach nothing about the arm and are
skipped. Each train row gains `arm_rank`, `arm_ratio` and `reward`.

Pace screen (`controller.screen`, `fedsim.controllers.pace`): each observed round also teaches the
device's pace (seconds per FLOP, per LoRA parameter sent), the server's `price` of every arm (FLOPs
of a round, LoRA parameters) turns it into a predicted round time per arm, and `assign` asks the
controller to avoid, this round, the arms predicted to hold the round far past the deadline, or
past the fastest round seen or predicted for the round's devices, so they are not explored at the
whole round's expense. Each train row gains `arm_predicted_s`, the predicted time of the arm it
played (NaN before its profile was seen).

The controller knows the devices' profile names only (a device says what it is), no speeds,
memories or bandwidths: those it learns. Its state (arrays) is saved with every round's
checkpoint (`controller.npz`), the pace and the reward's state with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.config.scenario import Scenario
from fedsim.controllers import Controller, ControllerConfig, Observations, RewardState, build_controller, rewards
from fedsim.controllers.pace import Pace, fastest_round, hopeless, worst_ratio
from fedsim.fleet.fleet import Fleet
from fedsim.fleet.keeps import PruneBook

STATE_FILE = "controller.npz"
PriceFn = Callable[[int, float], tuple[float, float]]  # (rank, ratio) → (FLOPs of a round, LoRA parameters sent)


@dataclass
class ArmControl:
    """The run's controller, its reward state (baseline, fastest round), the devices' pace and this round's arms."""

    controller: Controller
    scenario: Scenario
    price: PriceFn | None = None  # the server's cost of an arm; None: no pace, no screen
    reward_state: RewardState = field(default_factory=RewardState)
    arms: dict[int, tuple[int, float]] = field(default_factory=dict)  # client id → (rank, ratio), this round
    predicted: dict[int, float] = field(default_factory=dict)  # client id → predicted seconds of its arm, this round
    pace: Pace = field(init=False)

    def __post_init__(self) -> None:
        self.pace = Pace.unknown(self.controller.profiles)

    @classmethod
    def build(cls, scenario: Scenario, fleet: Fleet, price: PriceFn | None = None) -> ArmControl | None:
        if scenario.controller is None:
            return None
        names, profiles = np.unique(fleet.device.astype(str), return_inverse=True)
        ctrl = build_controller(
            scenario.controller,
            fleet.size,
            profiles.astype(np.int64),
            None,
            scenario.seed,
            profile_names=[str(n) for n in names],
        )
        return cls(ctrl, scenario, price)

    @property
    def config(self) -> ControllerConfig:
        """The scenario's `controller` table (`build` makes an ArmControl only for a scenario with one)."""
        if self.scenario.controller is None:
            raise ValueError("ArmControl needs a scenario with a `controller` table (see ArmControl.build)")
        return self.scenario.controller

    @property
    def scores_contributions(self) -> bool:
        """Whether the reward needs each reply's contribution to the global model
        (`rounds.contributions`): not for a controller whose choices ignore rewards (`fixed`)."""
        c = self.scenario.controller
        return c is not None and self.controller.uses_rewards and c.reward.contribution_weight > 0

    @property
    def screens(self) -> bool:
        """Whether `assign` keeps arms predicted too slow from being tried (not for `fixed`)."""
        c = self.scenario.controller
        return c is not None and c.screen and self.price is not None and self.controller.uses_rewards

    def assign(self, chosen: np.ndarray, server_round: int, ranks: np.ndarray, book: PruneBook | None) -> None:
        """Give each client in `chosen` its arm: `ranks[c]` and `book.targets[c]` (in place)."""
        if len(chosen) == 0:
            self.arms, self.predicted = {}, {}
            return
        avoid = None
        if self.screens:
            times = self.pace.predict(chosen, *self._point_costs)
            threshold = self.scenario.fleet.deadline_s or min(self.reward_state.fastest_s, fastest_round(times))
            avoid = hopeless(times, threshold, self.config.screen_slack, worst_ratio(*self._point_costs))
        last = self.scenario.rounds - self.config.commit_rounds
        arm_ranks, arm_ratios = self.controller.choose(chosen, server_round, avoid, exploit=server_round > last)
        ranks[chosen] = arm_ranks
        if book is not None:
            for c, ratio in zip(chosen, arm_ratios):
                book.retarget(int(c), float(ratio))
        self.arms = {int(c): (int(r), float(p)) for c, r, p in zip(chosen, arm_ranks, arm_ratios)}
        self.predicted = {}
        if self.price is not None:
            flops, params = self._costs(arm_ranks, arm_ratios)
            seconds = self.pace.predict(chosen, flops[:, None], params[:, None])[:, 0]
            self.predicted = {int(c): float(t) for c, t in zip(chosen, seconds)}

    def observe(self, rows: list[dict[str, Any]]) -> None:
        """Rewards for this round's arms from its train rows; updates the controller and the rows."""
        seen = [r for r in rows if r["kind"] == "train" and r["client_id"] in self.arms and _informative(r)]
        for r in rows:
            if r["kind"] == "train" and r["client_id"] in self.arms:
                r["arm_rank"], r["arm_ratio"] = self.arms[r["client_id"]]
                r["arm_predicted_s"] = self.predicted.get(r["client_id"], float("nan"))
        if not seen:
            return
        feasible = np.array([r["status"] in ("ok", "straggler") for r in seen])
        obs = Observations(
            loss_before=np.array([r.get("loss_before", np.nan) for r in seen]),
            loss_after=np.array([r.get("loss_after", np.nan) for r in seen]),
            time_s=np.where(feasible, [r.get("sim_compute_s", 0.0) + r.get("sim_comm_s", 0.0) for r in seen], np.nan),
            feasible=feasible,
            ratio_reached=np.array([r.get("prune_ratio", 0.0) for r in seen]),
            ratio_target=np.array([self.arms[r["client_id"]][1] for r in seen]),
            update_norm=np.array([r.get("update_norm", 0.0) for r in seen]),
            deadline_s=self.scenario.fleet.deadline_s,
            contribution=np.array([r.get("contribution", np.nan) for r in seen]),
            ratio_deployed=self._deployed(seen),
            energy_j=np.array([r.get("energy_j", np.nan) for r in seen]),
        )
        reward, self.reward_state = rewards(obs, self.config.reward, self.reward_state)
        devices = np.array([r["client_id"] for r in seen], dtype=np.int64)
        arm = np.array([self.arms[int(c)] for c in devices])
        self.controller.update(devices, arm[:, 0].astype(np.int64), arm[:, 1], reward, feasible)
        for r, x in zip(seen, reward):
            r["reward"] = float(x)
        if self.price is not None and feasible.any():
            flops, params = self._costs(arm[feasible, 0], arm[feasible, 1])
            ran = [r for r, f in zip(seen, feasible) if f]
            self.pace.observe(
                devices[feasible],
                flops,
                params,
                np.array([r.get("sim_compute_s", np.nan) for r in ran]),
                np.array([r.get("sim_comm_s", np.nan) for r in ran]),
            )

    def _deployed(self, rows: list[dict[str, Any]]) -> np.ndarray | None:
        """Each row's deploy ratio, its device profile's (0 for a profile without one); None if the run has none."""
        ratios = self.scenario.pruning.deploy_ratios
        return np.array([ratios.get(r["device"], 0.0) for r in rows]) if ratios else None

    @cached_property
    def _point_costs(self) -> tuple[np.ndarray, np.ndarray]:
        """(FLOPs (K,), LoRA parameters (K,)) of the controller's points, which never change."""
        return self._costs(self.controller.point_ranks, self.controller.point_ratios)

    def _costs(self, ranks: np.ndarray, ratios: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(FLOPs, LoRA parameters) of each arm (rank, ratio), by the server's `price`."""
        assert self.price is not None
        each = [self.price(int(r), float(p)) for r, p in zip(ranks, ratios)]
        return np.array([e[0] for e in each], dtype=float), np.array([e[1] for e in each], dtype=float)

    def save(self, folder: Path) -> None:
        """The controller's state and the reward's, as arrays, in `folder / STATE_FILE`."""
        r = self.reward_state
        state = {
            **self.controller.state_dict(),
            "reward_state": np.array([r.mean, r.weight, r.fastest_s]),
            "pace": self.pace.state(),
        }
        tmp = folder / (STATE_FILE + ".tmp.npz")
        np.savez(tmp, allow_pickle=True, **state)  # numpy's default, spelled out: else mypy matches **state to it
        tmp.rename(folder / STATE_FILE)

    def load(self, folder: Path) -> None:
        """Restore what `save` wrote (the controller continues exactly where it was)."""
        with np.load(folder / STATE_FILE) as data:
            state = {k: data[k] for k in data.files}
        saved = (
            state.pop("reward_state") if "reward_state" in state else [*state.pop("baseline"), np.inf]
        )  # a checkpoint without reward_state: (mean, weight) as "baseline", fastest round unknown
        mean, weight, fastest = saved
        if "pace" in state:  # a checkpoint without it starts the pace over
            self.pace.load(state.pop("pace"))
        self.controller.load_state_dict(state)
        self.reward_state = RewardState(float(mean), float(weight), float(fastest))


def _informative(row: dict[str, Any]) -> bool:
    """Rows that say something about the arm: trained (kept or late), or did not fit."""
    return row["status"] in ("ok", "straggler", "infeasible") or (
        row["status"] == "failed" and "memory" in row.get("reason", "").lower()
    )
