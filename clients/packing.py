"""The ClientApp's packed path: a client of a pack hands its training job to one shared trainer.

In fedsim's simulation with packing on, the server puts each round's clients in packs
(`fedsim.server.packs`; `protocol.PACK_ID`, `PACK_SIZE`). A ClientApp whose message names a pack
builds its `PackedJob` from what `train_lora` would get (the adapter it received, its examples,
its `[train]` schedule, seed, frozen factors, FedProx's μ, HetLoRA's penalty), submits it to the
run's `PackServer` (a named Ray actor holding the base model once: `server_name`) and blocks; the
actor trains a pack when all its clients are there with `fedsim.model.packed.PackedTrainer`, one
pack at a time, and hands each client its `JobResult`. The ClientApp then replies exactly as after
`train_lora`. A job that fails raises `PackedJobError` in its ClientApp only (Flower records it as
failed); the pack's other clients are not touched.

One base copy per device: a ClientApp of a pack never loads the base model. What it must know of
it (the adapter's keys and shapes at its rank, the adapted layers, the dtype, dropout, the
`ModelShape` its FLOPs are counted on) it reads from the same model on the meta device
(`meta_model`: the config only, no weights). It loads the model only when it trains alone, and for
evaluation messages, which are never packed: with federated evaluation on
(`clients.eval_per_round` > 0) each ClientApp that evaluates holds a copy.

A client of a pack trains alone, as without packing, when its job cannot be packed (`alone_reason`:
a pruned model, dropout, `fedsim.model.packed_jobs.check_job`'s reasons); it tells the actor so
(its pack then does not wait for it) and each reason is logged once per process. A message
without a pack (packing off, a deployment) never reaches this module's actor.

A pack that waits `PACK_TIMEOUT_S` for a client that does not come is cut: each of its jobs then
trains alone (a pack of one, the very operations of `train_lora`), and so does every job of it that
comes later, with a warning in the actor's log. A cut pack's updates are thus those of `packing =
"off"` for its clients, whichever of them came in time; they differ from the uncut pack's only by
float rounding (a packed update's dependence on its pack, `fedsim.model.packed`).

Every ClientApp of a round must run at once: a pack waits for all its clients, and Ray starts a
round's messages in any order, so a pool smaller than the round could fill with clients of
different packs, each waiting for the others (`fedsim.server.packs.client_resources`).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import peft
import torch
from flwr.app import ConfigRecord
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from clients.records import scalar
from fedsim.config.scenario import LoraConfig, ModelConfig, Scenario
from fedsim.fleet.costs import ModelShape, train_step_flops
from fedsim.model.adapter import AdapterState, attach_lora, use_rank
from fedsim.model.loader import empty_model, load_model
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


@functools.cache
def _meta_base(model: ModelConfig, lora_json: str) -> PeftModel:
    with torch.device("meta"):
        return attach_lora(empty_model(model.name, model.dtype), LoraConfig.model_validate_json(lora_json), seed=0)


def meta_model(model: ModelConfig, lora: LoraConfig, rank: int) -> PeftModel:
    """The ClientApp's model (the base with its LoRA, `clients.app`) on the meta device, the rank-`rank`
    adapter active: its layers, shapes, dtype and dropout, no weights. Built once per process from
    the model's config (`fedsim.model.loader.empty_model`); ranks are added on first use."""
    meta = _meta_base(model, lora.model_dump_json())
    with torch.device("meta"):
        use_rank(meta, lora, rank)
    return meta


def zero_state(meta: PeftModel) -> AdapterState:
    """Zeros laid out as `get_state` of `meta`'s active adapter: its keys in its order, its shapes (float32, CPU)."""
    state = peft.get_peft_model_state_dict(meta, adapter_name=meta.active_adapter)
    return {k: torch.zeros(v.shape) for k, v in state.items()}


def packed_job(
    start: AdapterState,
    config: ConfigRecord,
    scenario: Scenario,
    examples: list[dict[str, str]],
    seed: int,
    rank: int,
    shape: ModelShape,
    schedule: Mapping[str, Any],
) -> PackedJob:
    """The job `train_lora` would run from `start` (the adapter and base deltas the client starts
    from) with `schedule` (the steps, batch_size, max_len, lr, weight_decay and grad_clip it passes
    `train_lora`)."""
    lam = float(scalar(config, PENALTY_LAMBDA, 0.0))
    return PackedJob(
        key=int(scalar(config, CLIENT_ID)),
        state=dict(start),
        scale=scenario.lora.alpha / rank,
        examples=examples,
        **schedule,
        seed=seed,
        freeze=str(config.get(LORA_FREEZE, "")),
        proximal_mu=float(scalar(config, PROXIMAL_MU, 0.0)),
        regulariser=_RankPenalty(rank, float(scalar(config, PENALTY_GAMMA)), lam) if lam > 0 else None,
        step_flops=_StepFlops(shape, rank, scenario.lora.target_modules),
    )


def alone_reason(model: PeftModel, job: PackedJob, pruned: bool) -> str | None:
    """Why `job` trains alone on its ClientApp's `model` (or its `meta_model`) instead of in its pack, or None."""
    if pruned:
        return "a pruned client holds a model of its own shape"
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return "the model has dropout (LoRA's or its own)"
    half = next(model.parameters()).dtype != torch.float32
    return check_job(job, target_linears(model), half)


def train_in_pack(
    meta: PeftModel,
    start: AdapterState,
    config: ConfigRecord,
    scenario: Scenario,
    run_id: int,
    examples: list[dict[str, str]],
    seed: int,
    rank: int,
    shape: ModelShape,
    schedule: Mapping[str, Any],
    pruned: bool = False,
) -> tuple[TrainResult, AdapterState] | None:
    """Train this client in its pack: (its result, its trained adapter laid out as `get_state` of
    `meta`, the client's `meta_model` at `rank`); None when the message names no pack or the job
    trains alone (then the caller runs `train_lora` on the model itself). The base model is not
    loaded here. Raises `PackedJobError` when the job failed in its pack."""
    if PACK_ID not in config:
        return None
    job = packed_job(start, config, scenario, examples, seed, rank, shape, schedule)
    reason = alone_reason(meta, job, pruned)
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
    return result, {k: state[k] for k in zero_state(meta)}


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
    base model is loaded once per `TrainerSpec.model`; one pack trains at a time. A pack cut by its
    timeout trains its jobs one by one, as does each of its jobs that comes later (module docstring)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._training = threading.Lock()
        self._waiting: dict[str, dict[int, PackedJob | None]] = {}  # pack → key → job (None: trains alone)
        self._results: dict[tuple[str, int], JobResult] = {}
        self._closed: set[str] = set()  # packs taken for training
        self._cut: set[str] = set()  # packs taken before all their clients came
        self._bases: dict[ModelConfig, tuple[PreTrainedModel, PreTrainedTokenizerBase]] = {}
        self._trained: dict[str, list[int]] = {}  # pack → the keys of the jobs it trained together

    def trained(self) -> dict[str, list[int]]:
        """Each pack trained so far → its jobs' keys, sorted; a cut pack's jobs (and its late ones)
        each as a pack of its own, "<pack>+<key>"."""
        with self._cond:
            return {pack: list(keys) for pack, keys in self._trained.items()}

    def train(
        self, pack: str, size: int, key: int, job: PackedJob | None, spec: TrainerSpec, timeout_s: float
    ) -> JobResult | None:
        """Job `key`'s result once its pack of `size` jobs has trained (None: `job` is None, a
        client of the pack that trains alone; it returns at once)."""
        with self._cond:
            if pack in self._closed:
                logger.warning("packing: client %d came after its pack %s was cut: it trains alone", key, pack)
                jobs, alone = {key: job}, True
            else:
                members = self._waiting.setdefault(pack, {})
                members[key] = job
                self._cond.notify_all()
                if job is None and not (len(members) >= size and all(j is None for j in members.values())):
                    return None
                taken = self._take(pack, size, timeout_s)
                if taken is None:  # another client took the pack: wait for this job's result
                    while (pack, key) not in self._results:
                        self._cond.wait()
                    return self._results.pop((pack, key))
                jobs, alone = taken, pack in self._cut
        results = self._run(spec, [j for j in jobs.values() if j is not None], alone)
        with self._cond:
            if alone:
                self._trained.update({f"{pack}+{k}": [k] for k in results})
            else:
                self._trained[pack] = sorted(results)
            self._results.update({(pack, k): r for k, r in results.items() if k != key})
            self._cond.notify_all()
        return results.get(key)

    def _take(self, pack: str, size: int, timeout_s: float) -> dict[int, PackedJob | None] | None:
        """The pack's jobs once all `size` came, or those that came in `timeout_s` (the pack is then
        cut), if this call takes the pack; None if another call took it. Holds the condition's lock."""
        deadline = time.monotonic() + timeout_s
        while pack not in self._closed and len(self._waiting[pack]) < size:
            left = deadline - time.monotonic()
            if left <= 0:
                logger.warning(
                    "packing: pack %s has %d of its %d clients after waiting %gs: it is cut, each of its clients "
                    "trains alone (as with packing = 'off'), those that come later too",
                    pack,
                    len(self._waiting[pack]),
                    size,
                    timeout_s,
                )
                self._cut.add(pack)
                break
            self._cond.wait(left)
        if pack in self._closed:
            return None
        self._closed.add(pack)
        return self._waiting.pop(pack)

    def _run(self, spec: TrainerSpec, jobs: list[PackedJob], alone: bool = False) -> dict[int, JobResult]:
        """Each job's result: trained together (`alone`: one by one), or each failed with the reason
        the whole call failed."""
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
                    max_clients_per_step=1 if alone else len(jobs),
                    memory_budget=spec.memory or None,
                )
                outcomes = trainer.train(jobs)
            except Exception as err:  # noqa: BLE001  # the model would not load: every job fails, with why
                outcomes = [JobResult(j.key, error=f"{type(err).__name__}: {err}") for j in jobs]
        return {o.key: o for o in outcomes}
