"""Each client's LoRA rank: from the scenario (per client, per device profile, else `lora.rank`),
whether the model's layers can hold it, and the ranks HetLoRA clients kept when they self-pruned.

The global adapter lives at r_max = `lora.rank`; a client of rank r_k ≤ r_max trains its own
rank-r_k adapter (the strategy sends it the part its rank calls for, see
`strategies.lora_strategy`). This is the scenario's static assignment; with a controller, the
bandit assigns ranks per round (`fedsim.server.control`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fedsim.config.scenario import Scenario
from fedsim.fleet.costs import ModelShape, linear_shapes
from fedsim.fleet.fleet import Fleet, per_client


def client_ranks(scenario: Scenario, fleet: Fleet) -> np.ndarray:
    """(N,) rank of each client id: `lora.client_ranks`, else `lora.profile_ranks` of its device,
    else `lora.rank`."""
    lora = scenario.lora
    return per_client(fleet, lora.rank, lora.profile_ranks, lora.client_ranks, np.int64)


@dataclass
class ClientRanks:
    """Each client's LoRA rank during a run: `assigned[c]` (the scenario's, or the controller's arm,
    written in place each round `c` is sampled), capped by `kept[c]`, the rank `c` kept when it last
    self-pruned (HetLoRA), so that a pruned rank never grows back."""

    assigned: np.ndarray  # (N,) int
    kept: dict[int, int] = field(default_factory=dict)

    def of(self, cid: int) -> int:
        assigned = int(self.assigned[cid])
        return min(assigned, self.kept.get(cid, assigned))

    def of_many(self, ids: np.ndarray) -> np.ndarray:
        """`of` for each client in `ids`, vectorised (the caps are few: only self-pruned clients)."""
        ranks = self.assigned[ids].astype(np.int64)
        if self.kept:
            caps = np.array([self.kept.get(int(c), r) for c, r in zip(ids, ranks)], dtype=np.int64)
            ranks = np.minimum(ranks, caps)
        return ranks

    def keep(self, cid: int, rank: int) -> None:
        """Client `cid` kept `rank` when it self-pruned; it trains at most that from now on."""
        self.kept[cid] = rank


def rank_limit_problems(shape: ModelShape, scenario: Scenario, ranks: np.ndarray | None = None) -> list[str]:
    """A LoRA rank cannot exceed min(in, out) of a layer it adapts (B·A would be over-parameterised
    and the SVD-based strategies undefined): one problem per offending rank, naming the first
    layer that cannot hold it and that layer's limit."""
    used = sorted({scenario.lora.rank, *(int(r) for r in ranks)} if ranks is not None else {scenario.lora.rank})
    targets = scenario.lora.target_modules
    limits = [
        (min(i, o), f"layer {n} {name} ({i}→{o})")
        for n, layer in enumerate(shape.layers)
        for name, (i, o) in linear_shapes(layer, shape.hidden).items()
        if name in targets
    ]
    if not limits:
        return []
    limit, where = min(limits)
    return [
        f"LoRA rank {r} is larger than {where} allows: the rank must be <= min(in, out) = {limit}"
        for r in used
        if r > limit
    ]


def kept_ranks(metrics: pd.DataFrame) -> dict[int, int]:
    """client id → the rank it kept when it last self-pruned (HetLoRA), from a run's metric rows:
    its kept train rows (status ok) whose `rank_kept` is below `lora_rank`, the last one by round
    (what `ClientRanks.kept` held after those rounds). Metrics without the column name
    none."""
    if "rank_kept" not in metrics.columns:
        return {}
    rows = metrics[
        (metrics["kind"] == "train")
        & (metrics["status"] == "ok")
        & (metrics["rank_kept"] > 0)
        & (metrics["rank_kept"] < metrics["lora_rank"])
    ]
    return {int(c): int(r) for c, r in rows.sort_values("round").groupby("client_id")["rank_kept"].last().items()}
