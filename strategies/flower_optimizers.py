"""Flower's own server optimisers and client-drift methods, composed with FedIT.

fedsim's global model is the LoRA adapter, a plain dict of arrays, so Flower's strategies work on
it unchanged: each of these is FedIT (`strategies.fedit`) handing the aligned factors to Flower's
own class, which then does its usual update on them:

- fedprox  (Li et al., 2020, arXiv:1812.06127): clients minimise loss + μ/2·‖θ − θ_global‖² over
  the LoRA parameters θ; Flower's FedProx sends μ in the config (`fedsim.protocol.PROXIMAL_MU`)
  and the ClientApp adds the term.
- fedadam / fedyogi / fedadagrad (Reddi et al., 2021, arXiv:2003.00295): Δ = mean(θ_k) − θ,
  m ← β₁m + (1−β₁)Δ, v ← Adam/Yogi/Adagrad's second moment, θ ← θ + η·m/(√v + τ).
- fedavgm  (Hsu et al., 2019, arXiv:1909.06335): v ← βv + Δ, θ ← θ + η·v.

The server-side optimisers keep state across rounds, so they cannot be combined with
`compression.alpha = "auto"`, which aggregates several candidates per round (refused at load).
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi

from strategies.lora_strategy import RECORD_KEYS, SAMPLING


def fedprox(mu: float) -> FedAvg:
    return FedProx(proximal_mu=mu, **SAMPLING, **RECORD_KEYS)


def server_optimizer(name: str, lr: float, momentum: float, beta_1: float, beta_2: float, tau: float) -> FedAvg:
    if name == "fedavgm":
        return FedAvgM(server_learning_rate=lr, server_momentum=momentum, **SAMPLING, **RECORD_KEYS)
    cls = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}[name]
    kwargs: dict[str, Any] = {"eta": lr, "tau": tau}
    if name != "fedadagrad":
        kwargs |= {"beta_1": beta_1, "beta_2": beta_2}
    return cls(**kwargs, **SAMPLING, **RECORD_KEYS)
