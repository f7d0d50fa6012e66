"""Packed training (fedsim/model/packed.py) against `train_lora` training each client alone.

Exactness: a job's update Δ = trained − received from the packed trainer equals the one `train_lora`
makes on a PEFT model holding the same adapter, per job in float32, to

    ‖Δ_packed − Δ_alone‖_F ≤ TOL_F · ‖Δ_alone‖_F     and     max|Δ_packed − Δ_alone| ≤ TOL_MAX · max|Δ_alone|

(measured on these cases: ≤ 5e-6 and ≤ 1.8e-4). The difference is the rounding of the base's matmuls
over a larger batch; the max is larger because AdamW divides by √v + ε, so a coordinate whose
gradient is near ε moves by a visible fraction of lr for a rounding-sized change of its gradient.
The `TrainResult` matches: steps, tokens and FLOPs exactly, losses to 1e-5.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import pytest
import torch

from fedsim.config.scenario import LoraConfig
from fedsim.data.tasks import generate
from fedsim.fleet.costs import ModelShape, train_memory
from fedsim.model.adapter import (
    BASE_DELTA,
    AdapterState,
    active_pairs,
    attach_lora,
    get_state,
    set_state,
    set_trainable,
    use_rank,
)
from fedsim.model.loader import load_model
from fedsim.model.packed import PackedTrainer
from fedsim.model.packed_jobs import JobResult, PackedJob, PackedJobError, job_bytes, token_bytes
from fedsim.model.training import TrainResult, batch_order, collate, train_lora
from strategies.lora_math import hetlora_rank_penalty

TOL_F, TOL_MAX = 1e-4, 1e-3
LORA = LoraConfig(rank=8, alpha=16.0, target_modules=("q_proj", "v_proj"))
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def peft_model():  # type: ignore[no-untyped-def]
    base, tokenizer = load_model("tiny-llama")
    return attach_lora(base, LORA, seed=0), tokenizer


@pytest.fixture(scope="module")
def trainer() -> PackedTrainer:
    base, tokenizer = load_model("tiny-llama")
    return PackedTrainer(base, tokenizer, target_modules=LORA.target_modules, device="cpu")


@functools.cache
def _linears() -> dict[str, tuple[int, int]]:
    """(in, out) of every linear of the tiny model, by PEFT prefix."""
    base = load_model("tiny-llama")[0]
    return {
        f"base_model.model.{n}": (m.in_features, m.out_features)
        for n, m in base.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def factors(prefix: str, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random (A, B) for the layer `prefix` (B nonzero, so every factor gets a gradient)."""
    fan_in, fan_out = _linears()[prefix]
    gen = torch.Generator().manual_seed(seed * 1000 + list(_linears()).index(prefix))
    return 0.1 * torch.randn(rank, fan_in, generator=gen), 0.1 * torch.randn(fan_out, rank, generator=gen)


def job(key: int, rank: int = 8, **changes: object) -> PackedJob:
    """A seeded job at `rank` on the tiny model's q_proj and v_proj."""
    prefixes = [p for p in _linears() if p.endswith(LORA.target_modules)]
    state = {p + s: v for p in prefixes for s, v in zip(LORA_SUFFIXES, factors(p, rank, key))}
    defaults = dict(
        key=key, state=state, scale=LORA.alpha / rank, examples=generate("sentiment", 10 + 3 * key, seed=key),
        steps=4, batch_size=4, max_len=40 + 6 * key, lr=1e-2, weight_decay=0.01, grad_clip=1.0, seed=100 + key,
        step_flops=lambda b, t: float(b * t),
    )  # fmt: skip
    return PackedJob(**{**defaults, **changes})  # type: ignore[arg-type]


def rank_of(state: AdapterState) -> int:
    return next(v.shape[0] for k, v in state.items() if k.endswith(".lora_A.weight"))


def rank_penalty(rank: int) -> Callable[[Sequence[tuple[torch.Tensor, torch.Tensor]]], torch.Tensor]:
    """HetLoRA's penalty over a client's (A, B) pairs, as the packed trainer takes it."""
    return lambda pairs: sum(hetlora_rank_penalty(B, A, rank, 0.5, 0.1) for A, B in pairs)  # type: ignore[return-value]


def alone(peft_model, job: PackedJob) -> tuple[TrainResult, AdapterState]:  # type: ignore[no-untyped-def]
    """The reference: `train_lora` on the PEFT model holding the job's adapter, as the ClientApp trains."""
    model, tokenizer = peft_model
    rank = rank_of(job.state)
    use_rank(model, LORA, rank)
    set_trainable(model, job.freeze)
    set_state(model, job.state)

    def penalty() -> torch.Tensor:  # the ClientApp's closure over the model's own pairs
        return sum(hetlora_rank_penalty(B.weight, A.weight, rank, 0.5, 0.1) for A, B in active_pairs(model))  # type: ignore[return-value]

    result = train_lora(
        model, tokenizer, job.examples, steps=job.steps, batch_size=job.batch_size, max_len=job.max_len, lr=job.lr,
        weight_decay=job.weight_decay, grad_clip=job.grad_clip, seed=job.seed, step_flops=job.step_flops,
        proximal_mu=job.proximal_mu, regulariser=penalty if job.regulariser is not None else None,
    )  # fmt: skip
    state = get_state(model)
    set_state(model, {k: v for k, v in job.state.items() if not k.endswith(BASE_DELTA)})  # base deltas off again
    return result, state


def assert_same_update(job: PackedJob, packed: JobResult, reference: tuple[TrainResult, AdapterState]) -> None:
    result, state = packed.unwrap()
    ref_result, ref_state = reference
    assert set(state) == set(ref_state)
    diff = torch.cat([(state[k] - ref_state[k]).flatten() for k in ref_state])
    moved = torch.cat([(ref_state[k] - job.state[k]).flatten() for k in ref_state])
    assert moved.abs().max() > 1e-3  # the job did train
    assert diff.norm() <= TOL_F * moved.norm(), f"job {job.key}: ‖diff‖ {diff.norm():.2e}, ‖update‖ {moved.norm():.2e}"
    assert diff.abs().max() <= TOL_MAX * moved.abs().max(), f"job {job.key}: max diff {diff.abs().max():.2e}"
    assert (result.steps, result.tokens, result.flops) == (ref_result.steps, ref_result.tokens, ref_result.flops)
    for name in ("train_loss", "loss_before", "loss_after"):
        assert getattr(result, name) == pytest.approx(getattr(ref_result, name), abs=1e-5), name


CASES = {
    "mixed ranks": [job(0, 8), job(1, 4), job(2, 1)],
    "FFA-LoRA frozen A": [job(0, freeze="A"), job(1, 4, freeze="A"), job(2)],
    "FedProx": [job(0, proximal_mu=5.0), job(1, 2, proximal_mu=5.0), job(2)],
    "HetLoRA penalty": [job(0, regulariser=rank_penalty(8)), job(1, 4, regulariser=rank_penalty(4)), job(2)],
    "steps and batch sizes differ": [job(0, steps=1), job(1, 4, steps=6, batch_size=3), job(2, steps=3)],
    "more batches than examples": [job(0, steps=5, batch_size=7), job(1, 2, steps=3, batch_size=20)],
}


@pytest.mark.parametrize("jobs", CASES.values(), ids=CASES.keys())
def test_packed_update_equals_training_alone(peft_model, trainer: PackedTrainer, jobs: list[PackedJob]) -> None:  # type: ignore[no-untyped-def]
    references = [alone(peft_model, j) for j in jobs]
    results = trainer.train(jobs)
    assert [r.key for r in results] == [j.key for j in jobs]
    for j, packed, reference in zip(jobs, results, references):
        assert_same_update(j, packed, reference)


def test_frozen_factor_is_returned_unchanged(trainer: PackedTrainer) -> None:
    j = job(0, freeze="A")
    _, state = trainer.train([j])[0].unwrap()
    assert all(torch.equal(state[k], v) for k, v in j.state.items() if ".lora_A." in k)
    assert not all(torch.equal(state[k], v) for k, v in j.state.items() if ".lora_B." in k)


def test_result_does_not_depend_on_the_order_jobs_are_given_in(trainer: PackedTrainer) -> None:
    jobs = [job(0), job(1, 4, steps=2), job(2, 2), job(3, 8, freeze="A")]
    first = trainer.train(jobs)
    again = trainer.train(jobs[::-1])[::-1]
    for a, b in zip(first, again):
        assert all(torch.equal(a.unwrap()[1][k], v) for k, v in b.unwrap()[1].items())  # bitwise


def test_a_pack_of_one_is_train_lora_to_the_bit(peft_model, trainer: PackedTrainer) -> None:  # type: ignore[no-untyped-def]
    """With one job a step the packed trainer runs the same float operations as `train_lora` on CPU:
    the whole difference of a larger pack is the rounding of the batched matmuls."""
    jobs = [*CASES["mixed ranks"], job(3, 4, freeze="A", proximal_mu=1.0, regulariser=rank_penalty(4))]
    one_by_one = PackedTrainer(
        trainer.model, trainer.tokenizer, target_modules=LORA.target_modules, device="cpu", max_clients_per_step=1
    )
    for j, packed in zip(jobs, one_by_one.train(jobs)):
        result, state = packed.unwrap()
        ref_result, ref_state = alone(peft_model, j)
        assert all(torch.equal(state[k], v) for k, v in ref_state.items()), f"job {j.key}"
        assert dataclasses.replace(result, wall_time_s=0.0) == dataclasses.replace(ref_result, wall_time_s=0.0)


def test_plan_respects_max_clients_and_the_memory_budget(trainer: PackedTrainer) -> None:
    jobs = [job(k, steps=4 - k % 2) for k in range(5)]
    one = job_bytes(jobs[0], max(j.max_len for j in jobs), trainer.token_bytes)
    assert sorted(i for pack in trainer.plan(jobs, budget=2**62) for i in pack) == list(range(5))
    limited = PackedTrainer(
        trainer.model, trainer.tokenizer, target_modules=LORA.target_modules, device="cpu", max_clients_per_step=2
    )
    assert [len(p) for p in limited.plan(jobs, budget=2**62)] == [2, 2, 1]
    packs = trainer.plan(jobs, budget=int(2.5 * one))
    assert [len(p) for p in packs] == [2, 2, 1]
    for pack in packs:
        width = max(jobs[i].max_len for i in pack)
        assert sum(job_bytes(jobs[i], width, trainer.token_bytes) for i in pack) <= 2.5 * one
    assert packs[0] == [1, 3]  # the two 3-step jobs first, by max_len then key
    assert trainer.plan(jobs, budget=1) == [[1], [3], [0], [2], [4]]  # over budget alone: still trains, alone


def test_a_failing_job_fails_alone(peft_model, trainer: PackedTrainer) -> None:  # type: ignore[no-untyped-def]
    good = [job(0), job(2, 4)]
    nan_state = {k: torch.full_like(v, float("nan")) for k, v in job(1).state.items()}

    def raising(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        raise RuntimeError("penalty exploded")

    bad_examples = [{"prompt": "no response key"}] * 4
    jobs = [good[0], job(1, state=nan_state), job(3, regulariser=raising), job(4, examples=bad_examples), good[1]]
    results = trainer.train(jobs)
    assert "non-finite loss" in str(results[1].error)
    assert "penalty exploded" in str(results[2].error)
    assert "KeyError" in str(results[3].error)  # fails the shared step: the pack is split down to it
    with pytest.raises(PackedJobError, match="packed job 1 failed: non-finite"):
        results[1].unwrap()
    assert_same_update(good[0], results[0], alone(peft_model, good[0]))
    assert_same_update(good[1], results[4], alone(peft_model, good[1]))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda s: {k: v[:, :32] if ".lora_A." in k else v for k, v in s.items()}, "a pruned client trains alone"),
        (lambda s: {k: v for k, v in s.items() if "layers.1" not in k}, "missing"),
        (lambda s: {k: v[:2] if ".lora_A." in k else v for k, v in s.items()}, "not a LoRA pair"),
        (lambda s: {**s, "x.weight": torch.zeros(1)}, "other than LoRA factors"),
    ],
)
def test_can_pack_names_the_reason(trainer: PackedTrainer, change, reason: str) -> None:  # type: ignore[no-untyped-def]
    j = job(0)
    assert trainer.can_pack(j) is None
    bad = dataclasses.replace(j, state=change(j.state))
    assert reason in str(trainer.can_pack(bad))
    assert reason in str(trainer.train([bad, job(1)])[0].error)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [({"steps": 0}, "`steps` must be >= 1"), ({"freeze": "AB"}, "`freeze`"), ({"examples": []}, "no examples")],
)
def test_can_pack_checks_the_hyper_parameters(trainer: PackedTrainer, changes: dict, reason: str) -> None:
    assert reason in str(trainer.can_pack(job(0, **changes)))


def test_duplicate_keys_are_refused(trainer: PackedTrainer) -> None:
    with pytest.raises(ValueError, match="unique"):
        trainer.train([job(0), job(0, 4)])


def test_peft_model_is_shared_and_left_as_it_was(peft_model) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = peft_model
    deltas = {
        f"base_model.model.model.layers.{i}.self_attn.q_proj{BASE_DELTA}": 0.01 * torch.randn(64, 64) for i in range(2)
    }
    jobs = [job(0, state={**job(0).state, **deltas}), job(1, 4)]
    references = [alone(peft_model, j) for j in jobs]
    use_rank(model, LORA, 8)
    set_trainable(model, "A")
    set_state(model, {**job(5).state, **deltas})  # what a solo job left: its adapter, a base delta, frozen A
    held = get_state(model)
    shared = PackedTrainer(model, tokenizer, device="cpu")
    for j, packed, reference in zip(jobs, shared.train(jobs), references):
        assert_same_update(j, packed, reference)
    assert all(torch.equal(get_state(model)[k], v) for k, v in held.items())
    assert [(A.weight.requires_grad, B.weight.requires_grad) for A, B in active_pairs(model)] == [(False, True)] * 4
    set_state(model, job(5).state)  # base deltas off for the other tests


def test_peft_model_with_lora_dropout_is_refused() -> None:
    base, tokenizer = load_model("tiny-llama")
    model = attach_lora(base, LORA.model_copy(update={"dropout": 0.1}), seed=0)
    with pytest.raises(ValueError, match="dropout"):
        PackedTrainer(model, tokenizer, device="cpu")


def test_batch_order_is_the_one_train_lora_draws(peft_model) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = peft_model
    examples = generate("sentiment", 7, seed=0)
    seen: list[torch.Tensor] = []

    class Record:
        def before_step(self, step: int, batch: dict[str, torch.Tensor]) -> bool:
            seen.append(batch["input_ids"])
            return False

        def after_backward(self, step: int) -> None:
            pass

    use_rank(model, LORA, 8)
    set_trainable(model)
    start = get_state(model)
    train_lora(model, tokenizer, examples, steps=6, batch_size=3, max_len=48, lr=0.0, weight_decay=0.0,
               grad_clip=0.0, seed=11, hooks=Record())  # fmt: skip
    set_state(model, start)
    order = batch_order(len(examples), 6, 3, seed=11)
    assert sorted(order[0] + order[1]) == sorted(set(order[0] + order[1]))  # without replacement in an epoch
    expected = [collate(tokenizer, [examples[i] for i in idx], 48)["input_ids"] for idx in order]
    assert len(seen) == len(expected) and all(torch.equal(a, b) for a, b in zip(seen, expected))


@pytest.mark.parametrize("targets", [LORA.target_modules, ALL_LINEARS])
def test_row_estimate_bounds_what_autograd_saves_plus_the_loss_transients(targets: tuple[str, ...]) -> None:
    model, tokenizer = load_model("tiny-llama")
    saved = train_memory(ModelShape.from_model(model), batch=1, seq_len=1, rank=8, targets=targets).activations
    per_token = token_bytes(model.config, 4)
    trainer = PackedTrainer(model, tokenizer, target_modules=targets, device="cpu")
    j = job(0, state={k + s: v for k in trainer.linears for s, v in zip(LORA_SUFFIXES, factors(k, 8))}, batch_size=1)
    row = job_bytes(j, 1, per_token) - 24 * sum(v.numel() for v in j.state.values())  # one token's activations
    transients = 12 * model.config.vocab_size  # float32 logits' gradient and log-probabilities' (+ copy)
    assert saved + transients <= row <= 1.5 * saved + transients


@pytest.mark.gpu
def test_packed_update_equals_training_alone_on_cuda() -> None:
    base, tokenizer = load_model("tiny-llama")
    reference_model = (attach_lora(base, LORA, seed=0).to("cuda"), tokenizer)
    trainer = PackedTrainer(load_model("tiny-llama")[0], tokenizer, target_modules=LORA.target_modules, device="cuda")
    jobs = CASES["mixed ranks"] + [job(3, regulariser=rank_penalty(8), proximal_mu=1.0)]
    references = [alone(reference_model, j) for j in jobs]
    for j, packed, reference in zip(jobs, trainer.train(jobs), references):
        assert_same_update(j, packed, reference)
