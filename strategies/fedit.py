"""FedIT: federated instruction tuning with LoRA (Zhang et al., 2024, arXiv:2305.05644).

Rule (FedAvg of the LoRA factors, per adapted layer), on factors zero-padded to r_max and with
each client's scaling folded into B (`strategies.lora_strategy`):

    A ← Σ_k p_k pad(A_k),   B ← Σ_k p_k (s_k / s_g) pad(B_k),   p_k = n_k / Σ_j n_j

where n_k is client k's number of training examples. The averaging *is* Flower's FedAvg, run on
the aligned factors; with equal ranks it is FedAvg of A and B. The paper assumes one rank for all;
with mixed ranks the default `padding` is "holders": each rank of A and B is averaged over the
clients that hold it (their missing ranks filled with that mean before FedAvg), so a round in
which every client returns what it was sent changes nothing; "zeros" is plain zero padding. It is biased
(mean(B)·mean(A) ≠ mean(B·A)), which the other strategies of this package correct.

Flower's server optimisers and client-drift methods compose with it: pass `optimizer` (a Flower
FedProx, FedAdam, FedYogi, FedAdagrad or FedAvgM) and FedIT hands it the global adapter to
configure the round (FedProx adds μ to the config, `fedsim.protocol.PROXIMAL_MU`; FedOpt records
the current arrays) and the aligned factors to aggregate, so Flower's own update rule runs unchanged.
Both go in key order (`in_key_order`: FedAvgM pairs arrays by position), and the optimizer's state
across rounds is FedIT's `state_dict` (`strategies.flower_optimizers.optimizer_state`).
Pruned clients: each one's pruned-away coordinates are filled with the example-weighted mean of
the clients that kept them (`LoraStrategy.aligned`), so FedAvg's mean is the mask-aware one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsim.model.adapter import AdapterState, from_record
from fedsim.protocol import ARRAYS_RECORD, METRICS_RECORD
from strategies.flower_optimizers import load_optimizer_state, optimizer_state
from strategies.lora_strategy import LoraStrategy


def in_key_order(state: AdapterState) -> AdapterState:
    """`state`'s tensors sorted by key: the one order Flower's rules (FedAvg, the optimisers) see,
    in every round and after a resume (a checkpoint loads in safetensors' sorted order, a fresh
    adapter in PEFT's); the averages are per key, so the order changes no value."""
    return {k: state[k] for k in sorted(state)}


class FedIT(LoraStrategy):
    """Sample-weighted FedAvg of zero-padded, scale-folded LoRA factors, optionally through a
    Flower server optimiser."""

    def __init__(
        self, rank: int, alpha: float, seed: int = 0, optimizer: FedAvg | None = None, padding: str | None = None
    ) -> None:
        super().__init__(rank, alpha, seed, padding)
        self.optimizer = optimizer

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.optimizer is None:
            return super().configure_train(server_round, arrays, config, grid)
        self.current = from_record(arrays)
        ordered = ArrayRecord(in_key_order(self.current))
        return self._per_node(self.optimizer.configure_train(server_round, ordered, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        clients = [self.client_adapter(r) for r in replies]
        states = self.aligned(clients, [c.weight for c in clients]) if clients else []
        # New messages for Flower's rule (which reads only their content), the replies left as received.
        aligned = [
            Message(
                RecordDict(
                    {ARRAYS_RECORD: ArrayRecord(in_key_order(state)), METRICS_RECORD: reply.content[METRICS_RECORD]}
                ),
                reply_to=reply,
            )
            for reply, state in zip(replies, states)
        ]
        if self.optimizer is not None:
            return self.optimizer.aggregate_train(server_round, aligned)
        return FedAvg.aggregate_train(self, server_round, aligned)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The server optimiser's state across rounds (`flower_optimizers.optimizer_state`); {}
        without one, or with FedProx."""
        return optimizer_state(self.optimizer) if self.optimizer is not None else {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Put back what `state_dict` returned (`flower_optimizers.load_optimizer_state`)."""
        if self.optimizer is not None:
            load_optimizer_state(self.optimizer, state)
        else:
            super().load_state_dict(state)
