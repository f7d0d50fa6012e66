"""Packed local training: many clients' LoRA adapters trained together over one frozen base model.

`PackedTrainer.train(jobs)` does for every `PackedJob` what `train_lora` does on a model holding the
job's adapter, and returns the same `TrainResult` and the trained adapter, but runs one forward and
one backward of the shared base per step for all the jobs of a pack:

- each job's batch is drawn as `train_lora` draws it (`batch_order`) and collated alone, then right-
  padded to the pack's widest row (pad id, attention mask 0, label -100: its loss is unchanged) and
  stacked; each job's factors act on its own rows only (`fedsim.model.rowlora`);
- job k's loss L_k is the model's mean response-token loss over its own rows, and the pack minimises
  Σ_k [L_k + μ_k/2 ‖θ_k − θ_k⁰‖² + R_k(θ_k)]; rows never mix, so ∂/∂θ_k of the sum is job k's own
  gradient, clipped over θ_k alone and applied by job k's own AdamW;
- a job leaves the pack after its own number of steps (its probe loss then computed, packed with
  the others that finished on that step); `loss_before` / `loss_after` are on its probe batch
  (its first `batch_size` examples), as in `train_lora`. `wall_time_s` is the time from the pack's
  start to the job's end; `tokens` and `flops` are those of its own batches collated alone.

So a job's update equals training it alone up to float rounding: the base's matmuls over a larger
batch sum in another order (tests/fedsim/model/test_packed.py bounds the difference; a pack of one
job runs the very operations of `train_lora`, bit for bit on CPU). Packs are formed from the
jobs sorted by (steps, max_len, key), so the result does not depend on the order jobs are given in,
and hold at most `max_clients_per_step` jobs and `memory_budget` bytes (`fedsim.model.packed_jobs`).

What cannot be packed (`can_pack` says why): an adapter whose shapes differ from the shared base's
layers (a pruned client), keys that do not cover every adapted layer, nothing trainable, no examples
or steps, base deltas on a half-precision base (the solo path computes such layers in float32).
A model with dropout is refused whole, and prune hooks (`StepHooks`) are `train_lora`'s alone. A
job that fails (a non-finite loss or objective, a regulariser that raises) fails alone with its
reason; an error of the shared step (out of memory included) splits the pack in halves and runs
each again from the start, down to the one job that fails.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import peft
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedsim.model.adapter import apply_base_delta, split_state
from fedsim.model.packed_jobs import (
    JobResult,
    PackedJob,
    available_bytes,
    check_job,
    job_bytes,
    token_bytes,
)
from fedsim.model.rowlora import LORA_A, LORA_B, Segment, adapters_off, applied, target_linears
from fedsim.model.training import IGNORE, TrainResult, batch_order, collate, resolve_device

logger = logging.getLogger(__name__)
Batch = dict[str, torch.Tensor]


@dataclass(eq=False)
class _Run:
    """One job in a pack: its factors on the device, its optimizer and its books."""

    index: int  # the job's position in the caller's list
    job: PackedJob
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer prefix → (A, B), module order
    deltas: dict[str, torch.Tensor]
    params: list[torch.Tensor]  # the trainable factors, in the order PEFT's model.parameters() gives them
    anchor: list[torch.Tensor]  # FedProx's θ₀
    opt: torch.optim.AdamW
    batches: list[list[int]]
    probe: Batch
    loss_before: float = math.nan
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    flops: float = 0.0
    error: str | None = None
    outcome: JobResult | None = None

    def segment(self, rows: int) -> Segment:
        return Segment(rows, self.job.scale, self.factors, self.deltas)

    def objective(self, loss: torch.Tensor) -> torch.Tensor:
        """`train_lora`'s: loss + μ/2·‖θ − θ₀‖² + regulariser, summed in its order."""
        mu = self.job.proximal_mu
        if mu > 0:
            loss = loss + mu / 2 * sum(((p - p0) ** 2).sum() for p, p0 in zip(self.params, self.anchor))
        if self.job.regulariser is not None:
            loss = loss + self.job.regulariser(list(self.factors.values()))
        return loss


class PackedTrainer:
    """Trains `PackedJob`s in packs over `model`, a causal LM held once (module docstring).

    `model` is a plain transformers model (its `target_modules` linears are adapted; its parameters
    are frozen here) or a fedsim `PeftModel` (its LoRA layers are the adapted ones; while a pack
    trains its own adapters are switched off, and its base deltas are reset to none for good). It
    must have no dropout, and is moved to `device`. `memory_budget` bounds a pack's estimated bytes
    (None: 90 % of the device's free memory, of MemAvailable on CPU, when `train` is called);
    `bytes_per_token` overrides the per-token estimate (`fedsim.model.packed_jobs.token_bytes`)."""

    def __init__(
        self,
        model: PreTrainedModel | peft.PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        target_modules: Sequence[str] = (),
        device: str | torch.device = "auto",
        max_clients_per_step: int = 16,
        memory_budget: int | None = None,
        bytes_per_token: int | None = None,
    ) -> None:
        if max_clients_per_step < 1:
            raise ValueError(f"`max_clients_per_step` must be >= 1, got {max_clients_per_step}")
        self.device = resolve_device(device) if isinstance(device, str) else device
        model.to(self.device)  # type: ignore[arg-type]  # mypy misreads HF's wrapped .to
        self.model = model
        self.causal_lm = cast(PreTrainedModel, model.get_base_model() if isinstance(model, peft.PeftModel) else model)
        if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
            raise ValueError(
                "the model has dropout (LoRA's or its own): its masks come from the global RNG in the order "
                "layers run, which a packed step cannot reproduce per client; train its clients alone"
            )
        if not isinstance(model, peft.PeftModel):
            model.requires_grad_(False)
        self.linears = target_linears(model, target_modules)
        if not self.linears:
            raise ValueError(f"no linear named in `target_modules` {list(target_modules)} in the model")
        self.tokenizer = tokenizer
        self.max_clients_per_step = max_clients_per_step
        self.memory_budget = memory_budget
        dtype = next(model.parameters()).dtype
        self.half = dtype != torch.float32
        self.token_bytes = bytes_per_token or token_bytes(self.causal_lm.config, dtype.itemsize)

    # --- what can be packed, and how ------------------------------------------------

    def can_pack(self, job: PackedJob) -> str | None:
        """Why `job` cannot train in a pack (train it alone with `train_lora`), or None."""
        return check_job(job, self.linears, self.half)

    def plan(self, jobs: Sequence[PackedJob], budget: int | None = None) -> list[list[int]]:
        """The packs `train` runs `jobs` in (indices into `jobs`): greedily in (steps, max_len, key)
        order, each of at most `max_clients_per_step` jobs and `budget` estimated bytes (a job
        over budget alone still trains alone: it needs what `train_lora` would)."""
        budget = self._budget() if budget is None else budget
        order = sorted(range(len(jobs)), key=lambda i: (jobs[i].steps, jobs[i].max_len, jobs[i].key))
        packs: list[list[int]] = []
        for i in order:
            trial = [*packs[-1], i] if packs else [i]
            width = max(jobs[j].max_len for j in trial)
            size = sum(job_bytes(jobs[j], width, self.token_bytes) for j in trial)
            if packs and len(trial) <= self.max_clients_per_step and size <= budget:
                packs[-1] = trial
            else:
                packs.append([i])
        return packs

    def _budget(self) -> int:
        return self.memory_budget if self.memory_budget is not None else available_bytes(self.device)

    # --- training -------------------------------------------------------------------

    def train(self, jobs: Sequence[PackedJob]) -> list[JobResult]:
        """One `JobResult` per job, in the order given (module docstring)."""
        keys = [job.key for job in jobs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"job keys must be unique, got {sorted(keys)}")
        outcomes: dict[int, JobResult] = {}
        packable = []
        for i, job in enumerate(jobs):
            reason = self.can_pack(job)
            if reason is None:
                packable.append(i)
            else:
                outcomes[i] = JobResult(job.key, error=reason)
        if packable:
            for pack in self.plan([jobs[i] for i in packable]):
                outcomes |= self._run_pack([(packable[i], jobs[packable[i]]) for i in pack])
        return [outcomes[i] for i in range(len(jobs))]

    def _run_pack(self, pack: list[tuple[int, PackedJob]]) -> dict[int, JobResult]:
        """Train one pack; if its shared step fails, each half again from the start."""
        try:
            runs = [self._prepare(i, job) for i, job in pack]
            if isinstance(self.model, peft.PeftModel):
                apply_base_delta(self.model, {})  # the original base weights, whatever a solo job left
            with adapters_off(self.model):
                self._train_pack(runs)
        except Exception as err:  # noqa: BLE001  # out of memory, or a job no check foresaw
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(pack) == 1:
                return {pack[0][0]: JobResult(pack[0][1].key, error=f"{type(err).__name__}: {err}")}
            logger.warning("a packed step of %d jobs failed (%s); splitting it", len(pack), err)
            half = len(pack) // 2
            return self._run_pack(pack[:half]) | self._run_pack(pack[half:])
        finally:
            self.model.eval()
        return {run.index: run.outcome or JobResult(run.job.key, error=run.error) for run in runs}

    def _prepare(self, index: int, job: PackedJob) -> _Run:
        adapter, deltas = split_state(job.state)
        factors = {}
        for prefix in self.linears:
            A, B = (adapter[prefix + s].to(self.device, torch.float32, copy=True) for s in (LORA_A, LORA_B))
            factors[prefix] = (A.requires_grad_("A" not in job.freeze), B.requires_grad_("B" not in job.freeze))
        params = [p for pair in factors.values() for p in pair if p.requires_grad]
        return _Run(
            index=index,
            job=job,
            factors=factors,
            deltas={k: v.to(self.device, torch.float32) for k, v in deltas.items()},
            params=params,
            anchor=[p.detach().clone() for p in params] if job.proximal_mu > 0 else [],
            opt=torch.optim.AdamW(params, lr=job.lr, weight_decay=job.weight_decay),
            batches=batch_order(len(job.examples), job.steps, job.batch_size, job.seed),
            probe=collate(self.tokenizer, job.examples[: job.batch_size], job.max_len),
        )

    def _train_pack(self, runs: list[_Run]) -> None:
        """`train_lora`'s loop, for every run of the pack at once; fills each run's outcome."""
        start = time.perf_counter()
        for run, value in zip(runs, self._probe(runs)):
            run.loss_before = value
        active, step = list(runs), 0
        while active:
            batches = [self._batch(run, run.batches[step]) for run in active]
            self.model.train()
            total, trained = self._objective(active, self._losses(active, batches), step)
            for run in trained:
                run.opt.zero_grad(set_to_none=True)
            if total is not None:
                total.backward()
            for run, batch in zip(active, batches):
                if run in trained:
                    self._step(run, batch)
            step += 1
            done = [run for run in active if run.error is None and step == run.job.steps]
            for run, value in zip(done, self._probe(done)):
                run.outcome = self._outcome(run, value, time.perf_counter() - start)
            active = [run for run in active if run.error is None and step < run.job.steps]

    @staticmethod
    def _objective(
        runs: Sequence[_Run], losses: Sequence[torch.Tensor], step: int
    ) -> tuple[torch.Tensor | None, list[_Run]]:
        """(Σ of the runs' objectives, the runs in it); a run whose loss or objective is not finite,
        or whose regulariser raises, gets its error instead (one device sync for all the values)."""
        kept = []
        for run, loss in zip(runs, losses):
            try:
                kept.append((run, loss, run.objective(loss)))
            except Exception as err:  # noqa: BLE001  # a failing regulariser fails its job only
                run.error = f"objective at step {step}: {type(err).__name__}: {err}"
        values = torch.stack([t.detach() for _, loss, term in kept for t in (loss, term)]).tolist() if kept else []
        total, trained = None, []
        for i, (run, _, term) in enumerate(kept):
            loss_value, value = values[2 * i], values[2 * i + 1]
            if not (math.isfinite(loss_value) and math.isfinite(value)):
                run.error = f"non-finite loss ({loss_value}) or objective ({value}) at step {step}"
                continue
            total = term if total is None else total + term
            run.losses.append(loss_value)
            trained.append(run)
        return total, trained

    def _step(self, run: _Run, batch: Batch) -> None:
        if run.job.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(run.params, run.job.grad_clip)
        run.opt.step()
        run.tokens += int(batch["attention_mask"].sum())
        if run.job.step_flops is not None:
            run.flops += run.job.step_flops(*batch["input_ids"].shape)

    def _batch(self, run: _Run, indices: list[int]) -> Batch:
        return collate(self.tokenizer, [run.job.examples[i] for i in indices], run.job.max_len)

    def _losses(self, runs: Sequence[_Run], batches: Sequence[Batch]) -> list[torch.Tensor]:
        """Each run's mean response-token loss on its batch, from one forward of the stacked batches."""
        width = max(b["input_ids"].shape[1] for b in batches)
        fill = {"input_ids": self.tokenizer.pad_token_id, "attention_mask": 0, "labels": IGNORE}
        stacked = {
            k: torch.cat([F.pad(b[k], (0, width - b[k].shape[1]), value=v) for b in batches]).to(self.device)
            for k, v in fill.items()
        }  # each (N, width), N = Σ rows
        rows = [b["input_ids"].shape[0] for b in batches]
        with applied(self.linears, [run.segment(n) for run, n in zip(runs, rows)]):
            logits = self.causal_lm(
                input_ids=stacked["input_ids"], attention_mask=stacked["attention_mask"], use_cache=False
            ).logits  # (N, width, V)
        vocab = self.causal_lm.config.get_text_config().vocab_size
        return [
            self.causal_lm.loss_function(logits=part, labels=labels, vocab_size=vocab)
            for part, labels in zip(logits.split(rows), stacked["labels"].split(rows))
        ]

    @torch.no_grad()
    def _probe(self, runs: Sequence[_Run]) -> list[float]:
        if not runs:
            return []
        self.model.eval()
        return torch.stack(self._losses(runs, [run.probe for run in runs])).tolist()

    def _outcome(self, run: _Run, loss_after: float, wall_time_s: float) -> JobResult:
        state = {}
        for prefix, (A, B) in run.factors.items():
            state[prefix + LORA_A] = A.detach().to("cpu", torch.float32).clone()
            state[prefix + LORA_B] = B.detach().to("cpu", torch.float32).clone()
        if not all(bool(v.isfinite().all()) for v in state.values()):
            return JobResult(run.job.key, error="non-finite adapter after training")
        result = TrainResult(
            steps=run.job.steps,
            train_loss=sum(run.losses) / len(run.losses),
            loss_before=run.loss_before,
            loss_after=loss_after,
            tokens=run.tokens,
            flops=run.flops,
            wall_time_s=wall_time_s,
        )
        return JobResult(run.job.key, result=result, state=state)
