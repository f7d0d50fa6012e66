"""FedSpine's prune-and-tune on a client: prune events between LoRA recovery steps.

The server sends a pruned client three things in the train config (`fedsim.protocol`): the keep
of the model it holds (`PRUNE_KEEP`, the unpruned model's heads and channels it kept so far; "" =
none removed), its target ratio (`PRUNE_TARGET`) and how many local steps it has trained in the
run (`PRUNE_STEPS`). The client builds that model from its process's cached unpruned one
(`surgery.pruned_copy`: the cache stays whole, for the next client of the process), loads the
adapter slice it was sent, and trains.

With `pruning.where = "client"` (the default) the client also prunes during the round: before
each step at which `fedsim.pruning.schedule` puts an event, it scores the structures it still
holds, selects the ones to keep at the event's ratio within what it held (`select_keep(...,
within=keep)`: a ratio only grows), cuts the model and its LoRA factors (`apply_keep`) and goes
on training the smaller model with a fresh optimizer (AdamW's moments of the removed rows are
gone; the kept ones restart, as in LoRAPrune's iterative pruning). Scores:

- lora_grad (default): the moving average (β = `pruning.ema_beta`) of LoRAPrune's score over the
  last `pruning.score_steps` training steps before the event, read from the gradients those steps
  computed anyway; an event with no step before it in the round (the first step of a round)
  scores one backward pass on the batch about to be trained.
- activation, first_order: one pass on the batch about to be trained; magnitude: no pass.

The scoring passes are counted in the FLOPs the client reports (one training step each); the
lora_grad average itself (a few matrix products per adapted linear) is not.

The reply names the keep the client ended with (`fedsim.protocol.PRUNE_RECORD`), and its
update covers that keep's slice: local − (what it was sent, cut to the final keep).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from flwr.app import ConfigRecord

from clients.records import scalar
from fedsim.config.scenario import PruningConfig
from fedsim.fleet.costs import ModelShape, train_step_flops
from fedsim.protocol import PRUNE_KEEP, PRUNE_STEPS, PRUNE_TARGET
from fedsim.pruning.importance import ImportanceEMA, importance_scores, lora_grad_scores
from fedsim.pruning.schedule import events_in
from fedsim.pruning.select import select_keep
from fedsim.pruning.structure import Keep, LayerGeometry, Scores
from fedsim.pruning.surgery import apply_keep


@dataclass(frozen=True)
class PruneOrder:
    """What the server asked of this client's model for one message."""

    keep: Keep  # of the unpruned model: what the client holds at the start
    target: float  # ratio the schedule grows toward
    steps: int  # local steps this client trained in the run so far

    @classmethod
    def from_config(cls, config: ConfigRecord, layers: list[LayerGeometry]) -> PruneOrder | None:
        """The order in a message's config; None when this client is not pruned."""
        text, target = str(config.get(PRUNE_KEEP, "")), float(scalar(config, PRUNE_TARGET, 0.0))
        if not text and target == 0:
            return None
        keep = Keep.from_json(text) if text else Keep.everything(layers)
        return cls(keep, target, int(scalar(config, PRUNE_STEPS, 0)))


@dataclass
class PruneAndTune:
    """The prune events of one round, as `training.train_lora` step hooks."""

    model: torch.nn.Module  # the client's own pruned copy, cut further in place
    layers: list[LayerGeometry]  # of the unpruned model: keeps and scores live in its index space
    keep: Keep
    config: PruningConfig
    events: dict[int, float]  # step of the round → ratio to reach before it
    step_cost: tuple[int, int, int, tuple[str, ...]]  # (batch, seq_len, rank, targets) of a scoring pass
    flops: float = 0.0  # scoring passes, at the model size they ran on
    ema: ImportanceEMA | None = None
    shape: ModelShape = field(init=False)

    def __post_init__(self) -> None:
        self.shape = ModelShape.from_model(self.model)

    @classmethod
    def for_round(
        cls,
        model: torch.nn.Module,
        layers: list[LayerGeometry],
        order: PruneOrder,
        config: PruningConfig,
        steps: int,
        step_cost: tuple[int, int, int, tuple[str, ...]],
    ) -> PruneAndTune:
        """This round's events (none when the server prunes: `pruning.where = "server"`)."""
        planned = (
            events_in(order.steps, steps, order.target, config.interval_steps, config.events)
            if config.where == "client"
            else []
        )
        return cls(model, layers, order.keep, config, dict(planned), step_cost)

    def step_flops(self, batch: int, seq_len: int) -> float:
        """A training step's FLOPs at the model's current size."""
        _, _, rank, targets = self.step_cost
        return train_step_flops(self.shape, batch=batch, seq_len=seq_len, rank=rank, targets=targets)

    def after_backward(self, step: int) -> None:
        """lora_grad: fold this step's gradients into the average, if an event is near."""
        upcoming = [t for t in self.events if t > step]
        if self.config.importance != "lora_grad" or not upcoming or min(upcoming) - step > self.config.score_steps:
            return
        if self.ema is None:
            self.ema = ImportanceEMA(self.config.ema_beta)
        self.ema.update(lora_grad_scores(self.model).scatter(self.keep, fill=0.0))

    def before_step(self, step: int, batch: dict[str, torch.Tensor]) -> bool:
        """Prune if an event falls before this step; True when the model's parameters changed."""
        if step not in self.events:
            return False
        scores = self.ema.value if self.ema is not None and self.ema.value is not None else self._score(batch)
        keep = select_keep(scores, self.layers, self.events[step], self.config.mode, within=self.keep)
        self.ema = None
        if keep == self.keep:
            return False
        apply_keep(self.model, keep.within(self.keep))
        self.keep, self.shape = keep, ModelShape.from_model(self.model)
        return True

    def _score(self, batch: dict[str, torch.Tensor]) -> Scores:
        name = self.config.importance
        if name != "magnitude":  # a forward and backward pass on the coming batch
            self.flops += self.step_flops(*batch["input_ids"].shape)
        device = next(self.model.parameters()).device
        scores = importance_scores(
            self.model, name, input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        )
        return scores.scatter(self.keep, fill=0.0)

    def ratio(self) -> float:
        """Share of the unpruned model's prunable parameters this client has removed."""
        return self.keep.ratio(self.layers)
