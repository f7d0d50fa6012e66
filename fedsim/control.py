"""The bandit controller in the round loop (issue #6): an arm per sampled client before a round,
a reward per client after it.

Before the round's feasibility check, `assign` asks the controller (`fedsim.controllers`) for each
sampled client's arm (LoRA rank, pruning ratio) and makes it that client's rank (`RoundEnv.ranks`)
and target ratio (`PruneBook.targets`), so the memory check, the simulated clock and the message
all follow the arm (`PruneBook.retarget`): a new ratio restarts the client's pruning schedule from
the model it holds, toward the new target; a ratio below what it holds cannot be reached by pruning
more, so the client then starts over from the unpruned model, which it can, since every client
builds its pruned model from the unpruned one each round.

After the round, `observe` turns each sampled client's row into an observation — time (simulated
or measured, `sim_compute_s + sim_comm_s`), local loss before/after, ratio reached, the update's
norm, its contribution to the global model (scored by the server on held-out examples,
`rounds.contributions`, when the reward weighs it), and feasibility (`infeasible` rows; on real
devices a failure that names memory) — computes
the rewards (`fedsim.controllers.reward`) and updates the controller. Dropped clients and other
failures teach nothing about the arm and are skipped. Each train row gains `arm_rank`,
`arm_ratio` and `reward`.

The controller knows the devices' profile names only (a device says what it is), no speeds,
memories or bandwidths: those it learns. Its state (arrays) is saved with every round's
checkpoint (`controller.npz`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.controllers import Controller, Observations, RewardState, build_controller, rewards
from fedsim.fleet import Fleet
from fedsim.keeps import PruneBook
from fedsim.scenario import Scenario

STATE_FILE = "controller.npz"


@dataclass
class ArmControl:
    """The run's controller, its reward state (baseline, fastest round) and this round's arms."""

    controller: Controller
    scenario: Scenario
    reward_state: RewardState = field(default_factory=RewardState)
    arms: dict[int, tuple[int, float]] = field(default_factory=dict)  # client id → (rank, ratio), this round

    @classmethod
    def build(cls, scenario: Scenario, fleet: Fleet) -> ArmControl | None:
        if scenario.controller is None:
            return None
        names, profiles = np.unique(fleet.device.astype(str), return_inverse=True)
        ctrl = build_controller(scenario.controller, fleet.size, profiles.astype(np.int64), None, scenario.seed, profile_names=[str(n) for n in names])
        return cls(ctrl, scenario)

    @property
    def scores_contributions(self) -> bool:
        """Whether the reward needs each reply's contribution to the global model
        (`rounds.contributions`): not for a controller whose choices ignore rewards (`fixed`)."""
        c = self.scenario.controller
        return c is not None and self.controller.uses_rewards and c.reward.contribution_weight > 0

    def assign(self, chosen: np.ndarray, server_round: int, ranks: np.ndarray, book: PruneBook | None) -> None:
        """Give each client in `chosen` its arm: `ranks[c]` and `book.targets[c]` (in place)."""
        if len(chosen) == 0:
            self.arms = {}
            return
        arm_ranks, arm_ratios = self.controller.choose(chosen, server_round)
        ranks[chosen] = arm_ranks
        if book is not None:
            for c, ratio in zip(chosen, arm_ratios):
                book.retarget(int(c), float(ratio))
        self.arms = {int(c): (int(r), float(p)) for c, r, p in zip(chosen, arm_ranks, arm_ratios)}

    def observe(self, rows: list[dict[str, Any]]) -> None:
        """Rewards for this round's arms from its train rows; updates the controller and the rows."""
        seen = [r for r in rows if r["kind"] == "train" and r["client_id"] in self.arms and _informative(r)]
        for r in rows:
            if r["kind"] == "train" and r["client_id"] in self.arms:
                r["arm_rank"], r["arm_ratio"] = self.arms[r["client_id"]]
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
        )
        reward, self.reward_state = rewards(obs, self.scenario.controller.reward, self.reward_state)  # type: ignore[union-attr]
        devices = np.array([r["client_id"] for r in seen], dtype=np.int64)
        arm = np.array([self.arms[int(c)] for c in devices])
        self.controller.update(devices, arm[:, 0].astype(np.int64), arm[:, 1], reward, feasible)
        for r, x in zip(seen, reward):
            r["reward"] = float(x)

    def save(self, folder: Path) -> None:
        """The controller's state and the reward's, as arrays, in `folder / STATE_FILE`."""
        r = self.reward_state
        state = {**self.controller.state_dict(), "reward_state": np.array([r.mean, r.weight, r.fastest_s])}
        tmp = folder / (STATE_FILE + ".tmp.npz")
        np.savez(tmp, **state)
        tmp.rename(folder / STATE_FILE)

    def load(self, folder: Path) -> None:
        """Restore what `save` wrote (the controller continues exactly where it was)."""
        with np.load(folder / STATE_FILE) as data:
            state = {k: data[k] for k in data.files}
        saved = state.pop("reward_state") if "reward_state" in state else [*state.pop("baseline"), np.inf]  # runs saved before the fastest round was kept
        mean, weight, fastest = saved
        self.controller.load_state_dict(state)
        self.reward_state = RewardState(float(mean), float(weight), float(fastest))


def _informative(row: dict[str, Any]) -> bool:
    """Rows that say something about the arm: trained (kept or late), or did not fit."""
    return row["status"] in ("ok", "straggler", "infeasible") or (row["status"] == "failed" and "memory" in row.get("reason", "").lower())
