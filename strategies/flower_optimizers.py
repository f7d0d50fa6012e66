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
That state is, in Flower's attributes: FedAdam/FedYogi/FedAdagrad (`FedOpt`) the moments `m_t`
and `v_t` (their `current_arrays` is set afresh by every `configure_train`); FedAvgM its
`momentum_vector` and `current_arrays`, the model it steps from, which it sets once and then
updates itself; FedProx none. `optimizer_state` names it as arrays and `load_optimizer_state`
puts it back, so a resumed run steps exactly as an uninterrupted one (`fedsim.server.resume`).
FedAvgM pairs its arrays with the aggregate's by position, so FedIT hands Flower's optimisers
every state in one order, sorted by key, whatever order the global state was loaded in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi
from flwr.serverapp.strategy.fedopt import FedOpt

from strategies.lora_strategy import RECORD_KEYS, SAMPLING

FEDOPT_PARTS = ("m_t", "v_t")  # FedOpt's moments, key → array
FEDAVGM_PARTS = ("current", "momentum")  # FedAvgM's current_arrays and momentum_vector, key → array


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


def optimizer_state(optimizer: FedAvg) -> dict[str, np.ndarray]:
    """What `optimizer` carries from one round to the next, as arrays named "<part>/<array key>"
    (parts: `FEDOPT_PARTS` or `FEDAVGM_PARTS`), in the optimizer's own order; {} for one that keeps
    nothing (FedProx) or has not aggregated yet."""
    if isinstance(optimizer, FedOpt):
        return {**_named("m_t", optimizer.m_t or {}), **_named("v_t", optimizer.v_t or {})}
    if isinstance(optimizer, FedAvgM) and optimizer.current_arrays is not None:
        current = {k: a.numpy() for k, a in optimizer.current_arrays.items()}
        momentum = optimizer.momentum_vector or []  # by position, in current_arrays' order (module docstring)
        return {**_named("current", current), **_named("momentum", dict(zip(current, momentum, strict=True)))}
    return {}


def load_optimizer_state(optimizer: FedAvg, state: Mapping[str, np.ndarray]) -> None:
    """Put back what `optimizer_state` returned, into an optimizer of the same kind and settings;
    ValueError for parts it does not keep (or momentum for arrays it does not hold)."""
    parts = _parts(state)
    if isinstance(optimizer, FedOpt):
        _only(optimizer, parts, FEDOPT_PARTS)
        optimizer.m_t, optimizer.v_t = parts.get("m_t") or None, parts.get("v_t") or None
    elif isinstance(optimizer, FedAvgM):
        _only(optimizer, parts, FEDAVGM_PARTS)
        current, momentum = parts.get("current", {}), parts.get("momentum", {})
        if momentum and momentum.keys() != current.keys():
            raise ValueError("FedAvgM state: `momentum` must name the arrays of `current`, no other")
        optimizer.current_arrays = ArrayRecord({k: Array(v) for k, v in current.items()}) if current else None
        optimizer.momentum_vector = [momentum[k] for k in current] if momentum else None
    else:
        _only(optimizer, parts, ())


def _named(part: str, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{part}/{k}": v for k, v in arrays.items()}


def _parts(state: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Arrays named "<part>/<array key>" → part → array key → array, in `state`'s order."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    for name, array in state.items():
        part, _, key = name.partition("/")
        parts.setdefault(part, {})[key] = array
    return parts


def _only(optimizer: FedAvg, parts: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(parts) - set(allowed))
    if unknown:
        raise ValueError(f"{type(optimizer).__name__} keeps no {unknown} across rounds (it keeps {list(allowed)})")
