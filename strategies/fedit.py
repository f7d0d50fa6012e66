"""FedIT: federated instruction tuning with LoRA (Zhang et al., 2024, arXiv:2305.05644).

Rule (FedAvg of the LoRA factors, per adapted layer):

    A ← Σ_k p_k A_k,   B ← Σ_k p_k B_k,   p_k = n_k / Σ_j n_j

where n_k is client k's number of training examples (``num-examples`` in its reply). This is
exactly Flower's FedAvg applied to the adapter tensors, so FedIT *is* `FedAvg` with LoRA state as
its arrays; it is biased (mean(B)·mean(A) ≠ mean(B·A)), which is what the other strategies in
this package correct.

Client side: train the LoRA factors it received, return them whole (not a difference).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg


class FedIT(FedAvg):
    """Sample-weighted FedAvg of LoRA A and B tensors (the FedIT baseline)."""

    def __init__(self) -> None:
        # fedsim chooses the participants itself (seeded, by client id) and hands the strategy a
        # grid holding only them, so FedAvg must take every node it sees and never wait for more.
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=0,
            min_evaluate_nodes=0,
            min_available_nodes=0,
        )
