"""What each client's pruned model holds, as the server keeps track of it.

The server is the record of every client's pruning: its target ratio (from the scenario, or the
controller), the local steps it has trained in the run (its place on the schedule,
`fedsim.pruning.schedule`) and the keep it ended its last kept round with. Each train message
carries the three (`LoraStrategy.assign_pruning`), so a client holds no pruning state of its own
and the same ClientApp works on a SuperNode that restarted. A round whose update is discarded
(straggler, failure) leaves the record as it was: the client redoes that progress next time.

With `pruning.where = "server"` the server also makes each cut, between rounds, from the global
adapter's importance on its own held-out calibration batch (`plan_server_keeps`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedsim.config.scenario import Scenario
from fedsim.fleet.costs import LayerShape, ModelShape
from fedsim.fleet.fleet import Fleet, per_client
from fedsim.protocol import PRUNE_KEEP, PRUNE_STEPS, PRUNE_TARGET
from fedsim.pruning.schedule import ratio_before_step
from fedsim.pruning.select import budget_problems, select_keep
from fedsim.pruning.structure import Keep, LayerGeometry, Scores


def client_ratios(scenario: Scenario, fleet: Fleet) -> np.ndarray:
    """(N,) target pruning ratio of each client id: `pruning.client_ratios`, else
    `pruning.profile_ratios` of its device, else `pruning.ratio`."""
    p = scenario.pruning
    return per_client(fleet, p.ratio, p.profile_ratios, p.client_ratios, float)


def most_trained(ids: Iterable[int], steps: np.ndarray | Sequence[int]) -> int:
    """The client among `ids` that trained most steps (ties: the lowest id): whose keep stands for
    its ratio or profile (`fedsim.server.export`)."""
    return max(ids, key=lambda c: (steps[c], -c))


def pruned_shape(shape: ModelShape, keep: Keep | None) -> ModelShape:
    """The shape of the unpruned model `shape` after `keep` (what `apply_keep` would build)."""
    if keep is None:
        return shape
    layers = tuple(
        LayerShape(
            q_out=len(g) * keep.group_size * keep.head_dim,
            kv_out=len(g) * keep.head_dim,
            head_dim=keep.head_dim,
            mlp=len(c),
        )
        for g, c in zip(keep.groups, keep.channels, strict=True)
    )
    return ModelShape(shape.hidden, shape.vocab, layers, shape.tied_embeddings)


def ratio_problems(layers: list[LayerGeometry], scenario: Scenario, ratios: Iterable[float]) -> list[str]:
    """One problem per target ratio this model cannot reach (a layer would lose every head or channel)."""
    out = []
    for r in sorted({float(r) for r in ratios if r > 0}):
        out += [f"pruning ratio {r:g}: {msg}" for msg in budget_problems(r, layers, scenario.pruning.mode)]
    return out


@dataclass
class PruneBook:
    """Per client: target ratio, local steps trained, and the keep of its last kept round."""

    scenario: Scenario
    layers: list[LayerGeometry]  # of the unpruned model
    targets: np.ndarray  # (N,) float
    steps: np.ndarray = field(init=False)  # (N,) int
    cut_for: np.ndarray = field(init=False)  # (N,) float: the scheduled ratio of the server's last cut
    keeps: dict[int, Keep] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.steps = np.zeros(len(self.targets), dtype=np.int64)
        self.cut_for = np.zeros(len(self.targets))

    def reset(self, cid: int) -> None:
        """Forget client `cid`'s pruning: it starts over from the unpruned model."""
        self.keeps.pop(int(cid), None)
        self.steps[cid], self.cut_for[cid] = 0, 0.0

    def held(self, cid: int) -> Keep | None:
        return self.keeps.get(int(cid))

    def scheduled(self, cid: int) -> float:
        """The ratio the schedule puts the client at for its coming round."""
        p = self.scenario.pruning
        return ratio_before_step(int(self.steps[cid]), float(self.targets[cid]), p.interval_steps, p.events)

    def reached(self, cid: int) -> bool:
        """Whether the client's last step trained at its target (the schedule's last event is behind it)."""
        p = self.scenario.pruning
        target = float(self.targets[cid])
        return (
            self.steps[cid] >= 1
            and ratio_before_step(int(self.steps[cid]) - 1, target, p.interval_steps, p.events) >= target - 1e-9
        )

    def trained_at(self, cid: int, ratio: float) -> Keep | None:
        """The keep client `cid` trained at `ratio`: held, cut for that ratio and reached (the
        model it runs there, `fedsim.server.deployed`, `fedsim export`); None otherwise."""
        if abs(self.targets[cid] - ratio) > 1e-9 or not self.reached(cid):
            return None
        return self.held(cid)

    def ratio(self, keep: Keep | None) -> float:
        """Share of the unpruned model's prunable parameters `keep` removed."""
        return 0.0 if keep is None else keep.ratio(self.layers)

    def order(self, cid: int) -> dict[str, object]:
        """The train config entries that tell client `cid` what to hold and how to grow it."""
        keep = self.held(cid)
        return {
            PRUNE_KEEP: keep.to_json() if keep is not None else "",
            PRUNE_TARGET: float(self.targets[cid]),
            PRUNE_STEPS: int(self.steps[cid]),
        }

    def retarget(self, cid: int, target: float) -> None:
        """A target ratio for client `cid` (the controller's arm). The same target as before changes
        nothing: the held model was cut for it (selection overshoots a target by up to one
        structure, so the held ratio may exceed it slightly; that is no reason to start over). A
        lower target than before, below what it holds, starts over from the unpruned model; any
        other new target restarts the schedule from what it holds."""
        if abs(target - self.targets[cid]) <= 1e-9:
            return
        if target < self.targets[cid] and target + 1e-9 < self.ratio(self.held(cid)):
            self.reset(cid)
        else:
            self.steps[cid], self.cut_for[cid] = 0, self.ratio(self.held(cid))
        self.targets[cid] = target

    def record(self, cid: int, keep: Keep | None, steps: int) -> None:
        """A kept round: the client now holds `keep` and trained `steps` more steps."""
        if keep is not None:
            self.keeps[int(cid)] = keep
        self.steps[cid] += steps

    def to_json(self) -> str:
        return json.dumps({
            "steps": self.steps.tolist(), "targets": self.targets.tolist(), "cut_for": self.cut_for.tolist(),
            "keeps": {str(c): k.to_json() for c, k in sorted(self.keeps.items())},
        })  # fmt: skip

    def load(self, text: str) -> None:
        """Restore what `to_json` wrote (resuming a run)."""
        raw = json.loads(text)
        self.steps = np.array(raw["steps"], dtype=np.int64)
        self.targets = np.array(raw["targets"], dtype=float)
        self.cut_for = np.array(raw["cut_for"], dtype=float)
        self.keeps = {int(c): Keep.from_json(k) for c, k in raw["keeps"].items()}


def plan_server_keeps(book: PruneBook, chosen: Iterable[int], scores: Callable[[], Scores]) -> None:
    """`pruning.where = "server"`: cut each chosen client to its scheduled ratio, within what it
    holds, by the global importance (`scores()`, computed once, only if some client needs a cut)."""
    computed: list[Scores] = []
    for cid in chosen:
        ratio, held = book.scheduled(int(cid)), book.held(int(cid))
        if ratio <= book.cut_for[cid] + 1e-12:  # (not the ratio held: a cut lands within half a structure of it)
            continue
        if not computed:
            computed.append(scores())
        book.keeps[int(cid)] = select_keep(computed[0], book.layers, ratio, book.scenario.pruning.mode, within=held)
        book.cut_for[cid] = ratio
