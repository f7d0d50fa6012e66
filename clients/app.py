"""The fedsim ClientApp: the same code on a Flower virtual client (Ray) and on a real SuperNode.

Everything a client needs arrives in the Message (the resolved scenario as JSON, the global
adapter, the round) or comes from its node config (its partition id): nothing is shared with the
server through Python objects. Handlers:

- query: tells the server which client (partition) this node is, so the server can sample by
  client id deterministically (Flower's node ids are random).
- train: load what the server sent (the global adapter's part for this client's LoRA rank, and
  any merged base deltas) into the cached base model + LoRA, train on this client's train split
  with a seed derived from (scenario seed, round, client id), reply with the update
  (local − received) of the factors the strategy collects, encoded by `fedsim.compression` as
  the scenario says, and metrics. With privacy on (`fedsim.privacy`), the update is first clipped
  in the global scaling, and in local DP noised (`privatise`): error feedback and the codec then
  only post-process it.
- evaluate: loss and exact match of the received adapter on this client's test split.

Every record name and key is `fedsim.protocol`'s, which describes each message. How to train
comes in the message's config, set by the strategy (`strategies.lora_strategy`): the LoRA rank,
the factors to send back and those not to train (FFA-LoRA's A), whether to keep B on this node
across rounds (FedSA-LoRA), HetLoRA's tail penalty and rank self-pruning (after training, the
client may drop its tail ranks; its reply then covers the kept rank, named in its rank record),
FedProx's μ, and the pruned model this client holds and how it grows (`clients.prune_and_tune`).

The base model with its LoRA wrapper is built once per worker process (`_model`) and reused
across rounds: a Ray actor lives for the whole simulation, so only its first message pays the load.
A train message that names a pack (packing on, `clients.packing`) loads no model: its job goes to
the run's shared trainer, and the node knows the model's layout from its meta-device copy
(`clients.packing.meta_model`); it loads the model only if its job must train alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from clients.packing import meta_model, train_in_pack, zero_state
from clients.prune_and_tune import PruneAndTune, PruneOrder
from clients.records import scalar
from fedsim.compression import codec_config, compress, encode, layout_of, residual
from fedsim.compression.downlink import apply_down
from fedsim.config.scenario import CompressionConfig, LoraConfig, ModelConfig, Scenario, TrainConfig
from fedsim.data.partitions import ClientData, client_data
from fedsim.fleet.costs import ModelShape, train_step_flops
from fedsim.model.adapter import (
    AdapterState,
    active_pairs,
    attach_lora,
    factors,
    from_record,
    get_state,
    set_state,
    set_trainable,
    use_rank,
)
from fedsim.model.fedspeed import train_fedspeed
from fedsim.model.loader import load_model
from fedsim.model.training import TrainResult, resolve_device, train_lora
from fedsim.model.training import evaluate as evaluate_model
from fedsim.privacy import add_noise, below_clip, clip, folded, noise_generator
from fedsim.protocol import (
    ACCURACY,
    ARRAYS_RECORD,
    BELOW_CLIP,
    CLIENT_ID,
    CONFIG_RECORD,
    DOWN_RECORD,
    DOWN_VERSION,
    DP_CLIP,
    DP_LOCAL_NOISE,
    DP_RECORD,
    DP_REPORT,
    DP_SCALE,
    FEDSPEED_ALPHA,
    FEDSPEED_LAMBDA,
    FEDSPEED_RHO,
    FINAL_KEEP,
    FLOPS,
    IDENTITY_RECORD,
    KEPT_RANK,
    LOCAL_STEPS,
    LORA_FREEZE,
    LORA_PERSONAL_B,
    LORA_RANK,
    LORA_UPLOADS,
    LOSS,
    LOSS_AFTER,
    LOSS_BEFORE,
    METRICS_RECORD,
    NUM_EXAMPLES,
    PACK_ID,
    PARTITION_ID,
    PAYLOAD,
    PENALTY_GAMMA,
    PENALTY_LAMBDA,
    PROXIMAL_MU,
    PRUNE_RATIO,
    PRUNE_RECORD,
    RANK_RECORD,
    SCENARIO,
    SELF_PRUNE,
    SERVER_ROUND,
    TOKENS,
    TRAIN_LOSS,
    UPDATE_RECORD,
    WALL_TIME_S,
)
from fedsim.pruning.slicing import slice_adapter
from fedsim.pruning.structure import Keep, LayerGeometry, geometry
from fedsim.pruning.surgery import pruned_copy
from fedsim.seeding import derive_seed
from strategies.hetlora import drop_tail, self_pruned_rank
from strategies.lora_math import hetlora_rank_penalty, layer_pairs

app = ClientApp()
EF_KEY = "error-feedback"  # context.state key of the residual not yet sent
COPY_KEY = "downlink-copy"  # context.state key of this node's copy of the broadcast adapter
PERSONAL_KEY = "personal-b"  # context.state key of this node's own B factors (FedSA-LoRA)
CORRECTION_KEY = "fedspeed-correction"  # context.state key of this node's FedSpeed correction term ĝ
RUN_KEY = "run"  # context.state key naming the run the above belong to


@functools.cache
def _scenario(text: str) -> Scenario:
    return Scenario.from_json(text)


@functools.cache
def _model(model: ModelConfig, lora_json: str, device: str) -> tuple[PeftModel, PreTrainedTokenizerBase, ModelShape]:
    """(PeftModel, tokenizer, shape) for this process; pure in its arguments, so caching is safe.
    Adapters of other ranks are added to the same model on first use (`use_rank`). Their initial
    values never matter: every message loads the adapter it carries (or this node's own B)."""
    base, tokenizer = load_model(model.name, dtype=model.dtype)
    shape = ModelShape.from_model(base)
    return (
        attach_lora(base, LoraConfig.model_validate_json(lora_json), seed=0).to(resolve_device(device)),
        tokenizer,
        shape,
    )


def _fresh_state_per_run(context: Context, scenario: Scenario) -> None:
    """Forget what this node kept for another run (one simulation can hold several runs:
    `fedsim.runtime.simulation.run_simulations`): residuals, downlink copy, personal B, FedSpeed's ĝ."""
    run = f"{scenario.name}/{scenario.seed}"
    held = context.state.config_records.get(RUN_KEY)
    if held is None or held["run"] != run:
        for key in (EF_KEY, COPY_KEY, PERSONAL_KEY, CORRECTION_KEY):
            context.state.array_records.pop(key, None)
        for key in (COPY_KEY + "-version", PERSONAL_KEY + "-keep"):
            context.state.config_records.pop(key, None)
        context.state[RUN_KEY] = ConfigRecord({"run": run})


def client_id(context: Context, scenario: Scenario, config: ConfigRecord | None = None) -> int:
    """The client this node plays, checked against the scenario: the one the message names (fedsim's
    simulation assigns clients to nodes, `protocol.CLIENT_ID`), else its node config's partition."""
    raw: object
    if config is not None and CLIENT_ID in config:
        raw, source = config[CLIENT_ID], f"the message's {CLIENT_ID}"
    else:
        raw, source = context.node_config.get(PARTITION_ID), PARTITION_ID
    if raw is None:
        raise ValueError(
            f"node config lacks {PARTITION_ID!r}; start the SuperNode with --node-config '{PARTITION_ID}=N'"
        )
    cid = int(cast(int, raw))
    if not 0 <= cid < scenario.clients.num_clients:
        raise ValueError(
            f"{source} {cid} does not exist: the scenario has clients 0..{scenario.clients.num_clients - 1}"
        )
    return cid


@functools.cache
def _layers(model: ModelConfig, lora_json: str, device: str) -> list[LayerGeometry]:
    """The unpruned model's prunable structures (what keeps index)."""
    return geometry(_model(model, lora_json, device)[0])


@dataclass(frozen=True)
class Job:
    """What one message asks of this node, ready to run: `start` is the adapter to start from, held
    by `model`, which is built on first use (a client trained in its pack never builds one)."""

    scenario: Scenario
    config: ConfigRecord  # the message's config record (rank, freeze, pruning order, the strategy's flags)
    cid: int  # this node's client id (its data partition)
    rank: int  # the LoRA rank to train or evaluate at
    shape: ModelShape  # the unpruned model's shape
    data: ClientData
    received: AdapterState  # the adapter the message carried (what an update is measured from)
    start: AdapterState  # `received`, plus this node's own B with LORA_PERSONAL_B (FedSA-LoRA)
    order: PruneOrder | None  # this round's pruning order, if the client prunes
    held: PeftModel | None  # the model, already holding `start`, when `_setup` built it

    @functools.cached_property
    def model(self) -> PeftModel:
        """This client's model holding `start`: a pruned copy when it prunes, else the process's cached model."""
        if self.held is not None:
            return self.held
        model = _client_model(self.scenario, self.config, self.rank, self.order)
        set_state(model, self.start)
        return model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return _model(*_key(self.scenario))[1]


def _key(scenario: Scenario) -> tuple[ModelConfig, str, str]:
    """`_model`'s arguments for `scenario`."""
    return scenario.model, scenario.lora.model_dump_json(), scenario.train.device


def _client_model(scenario: Scenario, config: ConfigRecord, rank: int, order: PruneOrder | None) -> PeftModel:
    """The process's model at `rank`, the message's factors trainable; its pruned copy with `order`
    (the cached one stays whole for the next client)."""
    model = _model(*_key(scenario))[0]
    use_rank(model, scenario.lora, rank)
    set_trainable(model, freeze=str(config.get(LORA_FREEZE, "")))
    return pruned_copy(model, order.keep) if order is not None else model


def _setup(msg: Message, context: Context) -> Job:
    """The message's job. A train message naming a pack builds no model (`Job.model` does, if
    needed): the adapter's layout comes from the model on the meta device (`meta_model`)."""
    config = msg.content.config_records[CONFIG_RECORD]
    scenario = _scenario(str(config[SCENARIO]))
    torch.set_num_threads(scenario.train.threads)
    cid = client_id(context, scenario, config)
    _fresh_state_per_run(context, scenario)
    rank = int(scalar(config, LORA_RANK, scenario.lora.rank))
    order = PruneOrder.from_config(config, _layers(*_key(scenario))) if scenario.prunes else None
    held = None if PACK_ID in config and order is None else _client_model(scenario, config, rank, order)
    if held is None:  # a client of a pack: the model's layout, not its weights
        meta = meta_model(scenario.model, scenario.lora, rank)
        layout, shape = zero_state(meta), ModelShape.from_model(meta)
    else:
        layout, shape = get_state(held), _model(*_key(scenario))[2]
    received = _received_adapter(msg, context, layout)
    start = (
        {**received, **_personal_b(layout, context, order.keep if order else None)}
        if config.get(LORA_PERSONAL_B, False)
        else received
    )
    if held is not None:
        set_state(held, start)
    data = client_data(scenario.data, scenario.clients.num_clients, cid, scenario.seed)
    return Job(scenario, config, cid, rank, shape, data, received, start, order, held)


def _personal_b(layout: AdapterState, context: Context, keep: Keep | None) -> AdapterState:
    """This node's own B factors (FedSA-LoRA), zero until it first trains or when its rank changed;
    cut to the model's keep when the node has pruned more since it kept them. `layout`: the
    adapter the model holds (its keys and shapes)."""
    fresh = {k: torch.zeros_like(v) for k, v in factors(layout, "B").items()}
    held = context.state.array_records.get(PERSONAL_KEY)
    kept = held.to_torch_state_dict() if held is not None else {}
    held_keep = context.state.config_records.get(PERSONAL_KEY + "-keep")
    if kept and keep is not None and held_keep is not None and held_keep[FINAL_KEEP]:
        old = Keep.from_json(str(held_keep[FINAL_KEEP]))
        if old != keep and old.num_groups == keep.num_groups:
            kept = slice_adapter(kept, keep.within(old))
    same = set(kept) == set(fresh) and all(kept[k].shape == v.shape for k, v in fresh.items())
    return {k: v.float() for k, v in kept.items()} if same else fresh


def _received_adapter(msg: Message, context: Context, layout: AdapterState) -> AdapterState:
    """The adapter to start from: sent whole (its arrays), or through the compressed downlink,
    applied to the copy this node keeps in its context and decoded against `layout` (the adapter
    the model holds: the downlink's one adapter for every client)."""
    if DOWN_RECORD not in msg.content.config_records:
        return from_record(msg.content.array_records[ARRAYS_RECORD])
    down = msg.content.config_records[DOWN_RECORD]
    held = context.state.array_records.get(COPY_KEY)
    version = int(scalar(context.state.config_records[COPY_KEY + "-version"], DOWN_VERSION)) if held is not None else -1
    copy = held.to_torch_state_dict() if held is not None else None
    state = apply_down(down, copy, version, layout_of(layout))
    context.state[COPY_KEY] = ArrayRecord(state)
    context.state[COPY_KEY + "-version"] = ConfigRecord({DOWN_VERSION: int(scalar(down, DOWN_VERSION))})
    return state


@app.query()
def identify(msg: Message, context: Context) -> Message:
    scenario = _scenario(str(msg.content[CONFIG_RECORD][SCENARIO]))
    cid = client_id(context, scenario)
    return Message(RecordDict({IDENTITY_RECORD: ConfigRecord({CLIENT_ID: cid})}), reply_to=msg)


def _schedule(t: TrainConfig, config: ConfigRecord) -> dict[str, Any]:
    """The local-training settings `train_lora` and `train_fedspeed` both take from `[train]`; the
    steps are the message's LOCAL_STEPS when it names them (a device's own choice, asynchronous)."""
    return {
        "steps": int(scalar(config, LOCAL_STEPS, t.local_steps)),
        "batch_size": t.batch_size,
        "max_len": t.max_seq_len,
        "lr": t.lr,
        "weight_decay": t.weight_decay,
        "grad_clip": t.grad_clip,
    }


def _train_fedspeed(job: Job, context: Context, seed: int, step_flops: Callable[[int, int], float]) -> TrainResult:
    """FedSpeed's local training (`fedsim.model.fedspeed.train_fedspeed`) with the ρ, α, λ of the
    message, from the correction term ĝ this node kept (zeros the first time), which it keeps anew."""
    t, config = job.scenario.train, job.config
    held = context.state.array_records.get(CORRECTION_KEY)
    result, correction = train_fedspeed(
        job.model,
        job.tokenizer,
        list(job.data.train),
        **_schedule(t, config),
        seed=seed,
        step_flops=step_flops,
        rho=float(scalar(config, FEDSPEED_RHO)),
        alpha=float(scalar(config, FEDSPEED_ALPHA)),
        lam=float(scalar(config, FEDSPEED_LAMBDA)),
        correction=held.to_torch_state_dict() if held is not None else None,
    )
    context.state[CORRECTION_KEY] = ArrayRecord(correction)
    return result


def _train_in_pack(job: Job, context: Context, seed: int) -> tuple[TrainResult, AdapterState] | None:
    """(result, trained adapter) of this client trained with its pack (packing on, in simulation:
    `clients.packing.train_in_pack`), without loading the model; None when the message names no
    pack or the client trains alone."""
    if PACK_ID not in job.config:
        return None
    s = job.scenario
    return train_in_pack(
        meta_model(s.model, s.lora, job.rank), job.start, job.config, s, context.run_id, list(job.data.train), seed,
        job.rank, job.shape, _schedule(s.train, job.config), pruned=job.order is not None,
    )  # fmt: skip


@app.train()
def train(msg: Message, context: Context) -> Message:
    job = _setup(msg, context)
    scenario, config, rank = job.scenario, job.config, job.rank
    server_round = int(scalar(config, SERVER_ROUND))
    t, lora = scenario.train, scenario.lora
    pruner = None
    if job.order is not None:
        layers = _layers(scenario.model, lora.model_dump_json(), t.device)
        pruner = PruneAndTune.for_round(
            job.model,
            layers,
            job.order,
            scenario.pruning,
            t.local_steps,
            (t.batch_size, t.max_seq_len, rank, lora.target_modules),
        )
    step_flops = (
        pruner.step_flops
        if pruner is not None
        else lambda b, n: train_step_flops(job.shape, batch=b, seq_len=n, rank=rank, targets=lora.target_modules)
    )
    seed = derive_seed(scenario.seed, server_round, job.cid, "train")
    packed = None  # (result, trained adapter) of a client trained in its pack
    if FEDSPEED_LAMBDA in config:  # FedSpeed's local rule, its correction term kept on this node
        result = _train_fedspeed(job, context, seed, step_flops)
    elif (packed := _train_in_pack(job, context, seed)) is not None:  # no model loaded on this node
        result = packed[0]
    else:
        result = train_lora(
            job.model,
            job.tokenizer,
            list(job.data.train),
            **_schedule(t, config),
            seed=seed,
            step_flops=step_flops,
            proximal_mu=float(scalar(config, PROXIMAL_MU, 0.0)),  # set by Flower's FedProx
            regulariser=_rank_penalty(job.model, rank, config),
            hooks=pruner,
        )
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: len(job.data.train),
            CLIENT_ID: job.cid,
            TRAIN_LOSS: result.train_loss,
            LOSS_BEFORE: result.loss_before,
            LOSS_AFTER: result.loss_after,
            TOKENS: result.tokens,
            FLOPS: result.flops + (pruner.flops if pruner is not None else 0.0),
            PRUNE_RATIO: pruner.ratio()
            if pruner is not None
            else 0.0,  # every reply has the same keys (Flower's metric averaging needs them)
            WALL_TIME_S: result.wall_time_s,
        }
    )
    local = packed[1] if packed is not None else get_state(job.model)
    if config.get(LORA_PERSONAL_B, False):
        context.state[PERSONAL_KEY] = ArrayRecord(factors(local, "B"))
        context.state[PERSONAL_KEY + "-keep"] = ConfigRecord(
            {FINAL_KEEP: pruner.keep.to_json() if pruner is not None else ""}
        )
    records: dict[str, ArrayRecord | ConfigRecord | MetricRecord] = {METRICS_RECORD: metrics}
    received = job.received  # what the update is measured from
    if pruner is not None and job.order is not None:  # the update covers the keep the client ended with
        received = slice_adapter(received, pruner.keep.within(job.order.keep))
        records[PRUNE_RECORD] = ConfigRecord({FINAL_KEEP: pruner.keep.to_json()})
    if config.get(SELF_PRUNE, False):  # and the rank it kept
        kept = _self_pruned_rank(local, received, rank, float(scalar(config, PENALTY_GAMMA)))
        local, received = (drop_tail(local, kept), drop_tail(received, kept)) if kept < rank else (local, received)
        records[RANK_RECORD] = ConfigRecord({KEPT_RANK: kept})
    shared = factors(local, str(config.get(LORA_UPLOADS, "AB")))
    update = {k: shared[k] - received[k] for k in shared}
    if DP_CLIP in config:  # privacy on: clipped (and noised, local mode) before error feedback and encoding
        update, bit = privatise(update, config, scenario, job.cid, server_round, rank)
        if bit is not None:
            records[DP_RECORD] = ConfigRecord({BELOW_CLIP: bit})
    records[UPDATE_RECORD] = ConfigRecord({PAYLOAD: encode_update(update, scenario.compression, context)})
    return Message(RecordDict(records), reply_to=msg)


def _rank_penalty(model: PeftModel, rank: int, config: ConfigRecord) -> Callable[[], torch.Tensor] | None:
    """HetLoRA's rank self-pruning penalty over every LoRA layer, if the strategy asks for it."""
    lam = float(scalar(config, PENALTY_LAMBDA, 0.0))
    if lam <= 0:
        return None
    gamma = float(scalar(config, PENALTY_GAMMA))

    def penalty() -> torch.Tensor:
        # the pairs are looked up at every step: a prune event replaces the factors' modules.
        # Casts: nn.Module.__getattr__ is typed Tensor | Module (lora_A / lora_B are nn.Linear), and
        # sum's start 0 is only returned for a model without LoRA layers
        terms = (
            hetlora_rank_penalty(cast(torch.Tensor, B.weight), cast(torch.Tensor, A.weight), rank, gamma, lam)
            for A, B in active_pairs(model)
        )
        return cast(torch.Tensor, sum(terms))

    return penalty


def _self_pruned_rank(local: AdapterState, received: AdapterState, rank: int, gamma: float) -> int:
    """HetLoRA's self-pruning test over every LoRA layer (`strategies.hetlora.self_pruned_rank`):
    the rank this client keeps, `rank` when its tail norm did not fall below the received one's."""
    keys = layer_pairs(local).values()
    return self_pruned_rank(
        [(received[a], received[b]) for a, b in keys], [(local[a], local[b]) for a, b in keys], rank, gamma
    )


def privatise(
    update: AdapterState, config: ConfigRecord, scenario: Scenario, cid: int, server_round: int, rank: int
) -> tuple[AdapterState, int | None]:
    """DP-FedAvg's client step (`fedsim.privacy`): `update` folded to the global scaling (B times
    s_k / s_g, s_k = α / `rank`, s_g = DP_SCALE), clipped to C_t = DP_CLIP, in local mode plus
    N(0, DP_LOCAL_NOISE² I) drawn from (seed, round, client, "dp-local-noise") (the OS's entropy with
    `privacy.secure_noise`), and unfolded; with the indicator bit 1[‖update‖₂ ≤ C_t] when DP_REPORT
    asks for it (else None)."""
    s_k, s_g = scenario.lora.alpha / rank, float(scalar(config, DP_SCALE))
    bound, std = float(scalar(config, DP_CLIP)), float(scalar(config, DP_LOCAL_NOISE, 0.0))
    clipped, norm = clip(folded(update, s_k, s_g), bound)
    if std > 0:
        seed = None if scenario.privacy.secure_noise else scenario.seed
        clipped = add_noise(clipped, std, noise_generator(seed, server_round, cid, "dp-local-noise"))
    bit = int(below_clip(norm, bound)) if config.get(DP_REPORT, False) else None
    return folded(clipped, s_g, s_k), bit


def encode_update(update: AdapterState, c: CompressionConfig, context: Context) -> bytes:
    """`update` (local − received, after `privatise` with privacy on) as codec bytes. With error
    feedback, what was not sent last round is added first, and what is not sent now is kept in the
    node's context for next round (Flower keeps `context.state` across rounds, in simulation and on
    a SuperNode); a residual of another rank (the node's rank changed) is dropped. In local DP the
    update is already noised, so the residual is one of noised values, e = (noised + e_prev) − sent:
    it carries nothing un-noised into a later message."""
    if c.error_feedback and EF_KEY in context.state.array_records:
        carried = context.state.array_records[EF_KEY].to_torch_state_dict()
        if set(carried) == set(update) and all(carried[k].shape == v.shape for k, v in update.items()):
            update = {k: (v.double() + carried[k]).float() for k, v in update.items()}
    config = codec_config(c)
    if c.error_feedback:
        context.state[EF_KEY] = ArrayRecord(residual(update, compress(update, config)))
    return encode(update, config)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    job = _setup(msg, context)
    e = job.scenario.eval
    rows = list(job.data.test)[: e.client_examples]
    if not rows:
        raise ValueError(
            f"client {job.cid} has no test examples (data.test_fraction = {job.scenario.data.test_fraction})"
        )
    result = evaluate_model(
        job.model,
        job.tokenizer,
        rows,
        max_new_tokens=e.max_new_tokens,
        batch_size=e.batch_size,
        max_len=job.scenario.train.max_seq_len,
    )
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: result.num_examples,
            CLIENT_ID: job.cid,
            LOSS: result.loss,
            ACCURACY: result.accuracy,
            WALL_TIME_S: result.wall_time_s,
        }
    )
    return Message(RecordDict({METRICS_RECORD: metrics}), reply_to=msg)
