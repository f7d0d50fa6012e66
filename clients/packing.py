"""The ClientApp's packed path: a client of a pack hands its training job to one shared trainer.

In fedsim's simulation with packing on, the server puts each round's clients in packs
(`fedsim.server.packs`; `protocol.PACK_ID`, `PACK_SIZE`). A ClientApp whose message names a pack
builds its `PackedJob` from what `train_lora` would get (the adapter it loaded, its examples,
hyper-parameters, seed, frozen factors, FedProx's μ, HetLoRA's penalty), submits it to the run's
`PackServer` (a named Ray actor holding the base model once: `server_name`) and blocks; the actor
trains a pack when all its clients are there (or when `PACK_TIMEOUT_S` has passed since its first
came: then it trains those that came, with a warning) with `fedsim.model.packed.PackedTrainer`,
one pack at a time, and hands each client its `JobResult`. The ClientApp then loads the trained
adapter and replies exactly as after `train_lora`. A job that fails raises `PackedJobError` in its
ClientApp only (Flower records it as failed); the pack's other clients are not touched.

A client of a pack trains alone, as without packing, when its job cannot be packed (`alone_reason`:
a pruned model, dropout, `fedsim.model.packed_jobs.check_job`'s reasons); it tells the actor so
(its pack then does not wait for it) and each reason is logged once per process. A message
without a pack (packing off, a deployment) never reaches this module's actor.

Every ClientApp of a round must run at once: a pack waits for all its clients, and Ray starts a
round's messages in any order, so a pool smaller than the round could fill with clients of
different packs, each waiting for the others. `client_resources` sizes the pool so.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from flwr.app import ConfigRecord
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from clients.records import scalar
from fedsim.config.scenario import ModelConfig, Scenario
from fedsim.fleet.costs import ModelShape, train_step_flops
from fedsim.model.adapter import BASE_DELTA, AdapterState, get_state, set_state
from fedsim.model.loader import load_model
from fedsim.model.packed import PackedTrainer
from fedsim.model.packed_jobs import JobResult, PackedJob, check_job
from fedsim.model.rowlora import target_linears
from fedsim.model.training import TrainResult
from fedsim.protocol import (
    CLIENT_ID,
    LORA_FREEZE,
    PACK_ID,
    PACK_MEMORY,
    PACK_SIZE,
    PACK_TIMEOUT_S,
    PENALTY_GAMMA,
    PENALTY_LAMBDA,
    PROXIMAL_MU,
)
from strategies.lora_math import hetlora_rank_penalty

logger = logging.getLogger(__name__)
MAX_CONCURRENCY = 4096  # threads of the actor: each waiting client holds one
MIN_CPU_SHARE = 0.01  # the smallest CPU share a ClientApp of a packed round gets (100 per CPU)


@dataclass(frozen=True)
class TrainerSpec:
    """What the shared trainer is built from: the ClientApp's base model and how to train on it."""

    model: ModelConfig
    target_modules: tuple[str, ...]
    device: str  # `train.device`
    threads: int  # torch threads
    memory: int  # bytes a packed step may use (0: 90 % of the free memory)


@dataclass(frozen=True)
class _StepFlops:
    """`train_lora`'s `step_flops` for the unpruned model, picklable (no model inside)."""

    shape: ModelShape
    rank: int
    targets: tuple[str, ...]

    def __call__(self, batch: int, seq_len: int) -> float:
        return train_step_flops(self.shape, batch=batch, seq_len=seq_len, rank=self.rank, targets=self.targets)


@dataclass(frozen=True)
class _RankPenalty:
    """HetLoRA's penalty Σ_layers λ‖B_tail A_tail‖ over the job's (A, B) pairs, as the ClientApp adds it."""

    rank: int
    gamma: float
    lam: float

    def __call__(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        terms = (hetlora_rank_penalty(B, A, self.rank, self.gamma, self.lam) for A, B in pairs)
        return cast(torch.Tensor, sum(terms))  # summed as the ClientApp sums (`clients.app._rank_penalty`)


def server_name(run_id: int) -> str:
    """The run's `PackServer` actor name (one per Flower run, so concurrent runs never share one)."""
    return f"fedsim-packer-{run_id}"


def client_resources(cpus: float, clientapps: int, num_cpus_per_client: float) -> dict[str, float]:
    """Ray resources of each ClientApp actor with packing on: a CPU share such that `clientapps` of
    them run at once on `cpus` CPUs (at most `num_cpus_per_client`), and no GPU (the trainer holds it).
    Raises ValueError when that share is below `MIN_CPU_SHARE`."""
    share = min(num_cpus_per_client, math.floor(cpus / clientapps * 1e4) / 1e4)  # Ray counts in 1e-4
    if share < MIN_CPU_SHARE:
        raise ValueError(
            f"`simulation.packing`: a packed round needs {clientapps} ClientApps at once, more than "
            f"{cpus:g} CPUs can host at a share of at least {MIN_CPU_SHARE}: lower clients.per_round "
            "(or fleet.overcommit) or set packing = 'off'"
        )
    return {"num_cpus": share, "num_gpus": 0.0}


def packed_job(
    model: PeftModel,
    received: AdapterState,
    config: ConfigRecord,
    scenario: Scenario,
    examples: list[dict[str, str]],
    seed: int,
    rank: int,
    shape: ModelShape,
) -> PackedJob:
    """The job `train_lora` would run on `model` (which holds the adapter to start from)."""
    t, lora = scenario.train, scenario.lora
    lam = float(scalar(config, PENALTY_LAMBDA, 0.0))
    deltas = {k: v for k, v in received.items() if k.endswith(BASE_DELTA)}
    return PackedJob(
        key=int(scalar(config, CLIENT_ID)),
        state={**get_state(model), **deltas},
        scale=lora.alpha / rank,
        examples=examples,
        steps=t.local_steps,
        batch_size=t.batch_size,
        max_len=t.max_seq_len,
        lr=t.lr,
        weight_decay=t.weight_decay,
        grad_clip=t.grad_clip,
        seed=seed,
        freeze=str(config.get(LORA_FREEZE, "")),
        proximal_mu=float(scalar(config, PROXIMAL_MU, 0.0)),
        regulariser=_RankPenalty(rank, float(scalar(config, PENALTY_GAMMA)), lam) if lam > 0 else None,
        step_flops=_StepFlops(shape, rank, lora.target_modules),
    )


def alone_reason(model: PeftModel, job: PackedJob, pruned: bool) -> str | None:
    """Why `job` trains alone on its ClientApp's `model` instead of in its pack, or None."""
    if pruned:
        return "a pruned client holds a model of its own shape"
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return "the model has dropout (LoRA's or its own)"
    half = next(model.parameters()).dtype != torch.float32
    return check_job(job, target_linears(model), half)


def train_in_pack(
    model: PeftModel,
    received: AdapterState,
    config: ConfigRecord,
    scenario: Scenario,
    run_id: int,
    examples: list[dict[str, str]],
    seed: int,
    rank: int,
    shape: ModelShape,
    pruned: bool = False,
) -> TrainResult | None:
    """Train this client in its pack and load the trained adapter into `model`; None when the
    message names no pack or the job trains alone (then the caller runs `train_lora`). Raises
    `PackedJobError` when the job failed in its pack."""
    if PACK_ID not in config:
        return None
    job = packed_job(model, received, config, scenario, examples, seed, rank, shape)
    reason = alone_reason(model, job, pruned)
    pack = f"{scenario.name}/{scenario.seed}/{scalar(config, PACK_ID)!s}"  # several runs may share one simulation
    size, wait = int(scalar(config, PACK_SIZE)), float(scalar(config, PACK_TIMEOUT_S))
    spec = TrainerSpec(
        scenario.model,
        scenario.lora.target_modules,
        scenario.train.device,
        scenario.train.threads,
        int(scalar(config, PACK_MEMORY, 0)),
    )
    import ray  # here, not at the top: a ClientApp that never packs (a real device) does not pay Ray's import

    server = _server(run_id, scenario.train.device)
    if reason is not None:
        _log_once(reason)
        ray.get(server.train.remote(pack, size, job.key, None, spec, wait))
        return None
    outcome: JobResult = ray.get(server.train.remote(pack, size, job.key, job, spec, wait))
    result, state = outcome.unwrap()
    set_state(model, {**state, **{k: v for k, v in job.state.items() if k.endswith(BASE_DELTA)}})
    return result


def _server(run_id: int, device: str) -> Any:
    """The run's `PackServer`, started by the first ClientApp that asks: detached, so it lives on
    between packs (and goes with the Ray cluster fedsim started for the simulation: packing refuses
    an existing one); no CPU of the ClientApps' pool, a GPU when there is one."""
    import ray

    gpus = 1 if device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1 else 0
    actor = ray.remote(PackServer).options(
        name=server_name(run_id),
        get_if_exists=True,
        lifetime="detached",
        max_concurrency=MAX_CONCURRENCY,
        num_cpus=0,
        num_gpus=gpus,
    )
    return actor.remote()


@functools.cache
def _log_once(reason: str) -> None:
    logger.warning("packing: a client trains alone: %s", reason)


class PackServer:
    """The packs of one run: collects each pack's jobs, trains them together, hands out the results.

    Thread-safe (Ray runs it as a threaded actor: each waiting client's call holds a thread). The
    base model is loaded once per `TrainerSpec.model`; one pack trains at a time."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._training = threading.Lock()
        self._waiting: dict[str, dict[int, PackedJob | None]] = {}  # pack → key → job (None: trains alone)
        self._results: dict[tuple[str, int], JobResult] = {}
        self._closed: set[str] = set()  # packs taken for training
        self._bases: dict[ModelConfig, tuple[PreTrainedModel, PreTrainedTokenizerBase]] = {}
        self._trained: dict[str, list[int]] = {}  # pack → the keys of the jobs it trained together

    def trained(self) -> dict[str, list[int]]:
        """Each pack trained so far → its jobs' keys, sorted (late clients: a pack of their own)."""
        with self._cond:
            return {pack: list(keys) for pack, keys in self._trained.items()}

    def train(
        self, pack: str, size: int, key: int, job: PackedJob | None, spec: TrainerSpec, timeout_s: float
    ) -> JobResult | None:
        """Job `key`'s result once its pack of `size` jobs has trained (None: `job` is None, a
        client of the pack that trains alone; it returns at once)."""
        with self._cond:
            if pack in self._closed:
                logger.warning("packing: client %d came after its pack %s trained: it trains alone", key, pack)
                jobs = {key: job}
            else:
                members = self._waiting.setdefault(pack, {})
                members[key] = job
                self._cond.notify_all()
                if job is None and not (len(members) >= size and all(j is None for j in members.values())):
                    return None
                jobs = self._take(pack, size, key, timeout_s)
                if not jobs:  # another client took the pack: wait for this job's result
                    while (pack, key) not in self._results:
                        self._cond.wait()
                    return self._results.pop((pack, key))
        results = self._run(spec, [j for j in jobs.values() if j is not None])
        with self._cond:
            self._trained[pack if pack not in self._trained else f"{pack}+{key}"] = sorted(results)
            self._results.update({(pack, k): r for k, r in results.items() if k != key})
            self._cond.notify_all()
        return results.get(key)

    def _take(self, pack: str, size: int, key: int, timeout_s: float) -> dict[int, PackedJob | None]:
        """The pack's jobs once all `size` came (or `timeout_s` passed), if this call takes the
        pack; {} if another call took it. Holds the condition's lock."""
        deadline = time.monotonic() + timeout_s
        while pack not in self._closed and len(self._waiting[pack]) < size:
            left = deadline - time.monotonic()
            if left <= 0:
                logger.warning(
                    "packing: pack %s trains %d of its %d clients after waiting %gs",
                    pack,
                    len(self._waiting[pack]),
                    size,
                    timeout_s,
                )
                break
            self._cond.wait(left)
        if pack in self._closed:
            return {}
        self._closed.add(pack)
        return self._waiting.pop(pack)

    def _run(self, spec: TrainerSpec, jobs: list[PackedJob]) -> dict[int, JobResult]:
        """Each job's result: trained together, or each failed with the reason the whole call failed."""
        if not jobs:
            return {}
        with self._training:
            try:
                torch.set_num_threads(spec.threads)
                if spec.model not in self._bases:
                    self._bases[spec.model] = load_model(spec.model.name, dtype=spec.model.dtype)
                base, tokenizer = self._bases[spec.model]
                trainer = PackedTrainer(
                    base,
                    tokenizer,
                    target_modules=spec.target_modules,
                    device=spec.device,
                    max_clients_per_step=len(jobs),
                    memory_budget=spec.memory or None,
                )
                outcomes = trainer.train(jobs)
            except Exception as err:  # noqa: BLE001  # the model would not load: every job fails, with why
                outcomes = [JobResult(j.key, error=f"{type(err).__name__}: {err}") for j in jobs]
        return {o.key: o for o in outcomes}
