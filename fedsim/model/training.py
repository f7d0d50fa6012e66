"""Local LoRA training and evaluation of a causal LM on instruction examples.

Shared by the ClientApp (local training, federated evaluation) and the ServerApp (central
evaluation), so both score a model the same way:

- An example is rendered as ``PROMPT_TEMPLATE.format(prompt=...)`` followed by the response and
  the end-of-sequence token. The loss is the mean cross-entropy over response tokens only: prompt
  positions carry the label -100, as in instruction tuning (FedIT, Alpaca). Per example i, l_i is
  the mean over its n_i response tokens (`example_losses`); a set's loss is the token-weighted
  Σ l_i n_i / Σ n_i (`token_weighted`), the one definition every evaluation uses.
- Exact match: greedy generation from the rendered prompt, cut at the first newline or EOS,
  stripped, compared with the stripped reference response (`exact_matches`).
- `evaluate_examples` keeps both per example; `evaluate` is its reduction.
- Everything random (batch order) is drawn from a `torch.Generator` seeded by the caller, so a
  client's work depends only on (scenario seed, round, client id), never on scheduling order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

PROMPT_TEMPLATE = "Question: {prompt}\nAnswer: "
IGNORE = -100


@dataclass(frozen=True)
class TrainResult:
    """What one client's local training did; the reply's metrics."""

    steps: int
    train_loss: float  # mean loss over the steps
    loss_before: float  # loss on a fixed probe batch before training
    loss_after: float  # ... and after
    tokens: int  # tokens processed (forward + backward), padding excluded
    flops: float  # training FLOPs of the batches as computed (padding included), per `step_flops`
    wall_time_s: float


class StepHooks(Protocol):
    """Called by `train_lora` around each step (prune-and-tune: `clients.prune_and_tune`)."""

    def before_step(self, step: int, batch: dict[str, torch.Tensor]) -> bool:
        """Before step `step` on `batch`; True when the model's trainable parameters changed."""
        ...

    def after_backward(self, step: int) -> None:
        """After the step's backward pass and optimizer step (its gradients are still there)."""
        ...


@dataclass(frozen=True)
class EvalResult:
    num_examples: int
    loss: float  # mean response-token loss
    accuracy: float  # exact match
    wall_time_s: float


@dataclass(frozen=True)
class ExampleResults:
    """`evaluate_examples`: one entry per example, in the order given."""

    loss: tuple[float, ...]  # mean response-token loss l_i
    n_tokens: tuple[int, ...]  # response tokens n_i that l_i is the mean of
    correct: tuple[bool, ...]  # greedy exact match
    wall_time_s: float

    def reduce(self) -> EvalResult:
        """Token-weighted loss Σ l_i n_i / Σ n_i and accuracy, the share of examples correct."""
        count = len(self.correct)
        accuracy = sum(self.correct) / count if count else math.nan
        return EvalResult(
            num_examples=count,
            loss=token_weighted(self.loss, self.n_tokens),
            accuracy=accuracy,
            wall_time_s=self.wall_time_s,
        )


def encode(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels; the prompt is masked and truncated from the left to fit."""
    p = tokenizer(PROMPT_TEMPLATE.format(prompt=prompt), add_special_tokens=False).input_ids
    r = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    r = r[:max_len]
    p = p[max(0, len(p) + len(r) - max_len) :]
    return p + r, [IGNORE] * len(p) + r


def collate(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, str]], max_len: int
) -> dict[str, torch.Tensor]:
    """Right-padded batch of input_ids / attention_mask / labels, each (B, T)."""
    pairs = [encode(tokenizer, r["prompt"], r["response"], max_len) for r in rows]
    width = max(len(ids) for ids, _ in pairs)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (x, y) in enumerate(pairs):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def resolve_device(name: str) -> torch.device:
    """`auto` → CUDA if this process sees a GPU, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("`train.device` = 'cuda' but this process sees no CUDA device")
    return torch.device(name)


def _batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in batch.items()}).loss


def train_lora(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[dict[str, str]],
    *,
    steps: int,
    batch_size: int,
    max_len: int,
    lr: float,
    weight_decay: float,
    grad_clip: float,
    seed: int,
    step_flops: Callable[[int, int], float] | None = None,
    proximal_mu: float = 0.0,
    regulariser: Callable[[], torch.Tensor] | None = None,
    hooks: StepHooks | None = None,
) -> TrainResult:
    """`steps` AdamW steps on the trainable (LoRA) parameters, batches drawn without
    replacement from a seeded permutation of `examples` (re-shuffled when exhausted: `batch_order`).
    `step_flops(batch, seq_len)` prices one step for the simulated clock; `proximal_mu` > 0 adds
    FedProx's μ/2·‖θ − θ₀‖² with θ₀ the parameters training started from; `regulariser()` is
    added to every step's objective (HetLoRA's rank penalty). `hooks` may change the model
    between steps (pruning): the optimizer is then rebuilt over the new parameters, and FedProx's
    anchor θ₀ moves to them."""
    if not examples:
        raise ValueError("train_lora needs at least one example")
    start = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    start_params = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    probe = collate(tokenizer, examples[:batch_size], max_len)
    loss_before = _probe_loss(model, probe)

    model.train()
    losses, tokens, flops = [], 0, 0.0
    for step, idx in enumerate(batch_order(len(examples), steps, batch_size, seed)):
        batch = collate(tokenizer, [examples[i] for i in idx], max_len)
        if hooks is not None and hooks.before_step(step, batch):
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            start_params = [p.detach().clone() for p in params] if proximal_mu > 0 else []
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        loss = _batch_loss(model, batch)
        objective = (
            loss + proximal_mu / 2 * sum(((p - p0) ** 2).sum() for p, p0 in zip(params, start_params))
            if proximal_mu > 0
            else loss
        )
        if regulariser is not None:
            objective = objective + regulariser()
        opt.zero_grad(set_to_none=True)
        objective.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        if hooks is not None:
            hooks.after_backward(step)
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
        if step_flops is not None:
            flops += step_flops(*batch["input_ids"].shape)
    model.eval()
    return TrainResult(
        steps=steps,
        train_loss=sum(losses) / len(losses),
        loss_before=loss_before,
        loss_after=_probe_loss(model, probe),
        tokens=tokens,
        flops=flops,
        wall_time_s=time.perf_counter() - start,
    )


def batch_order(num_examples: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """The example indices of each step's batch: without replacement from `torch.randperm`s of a
    `torch.Generator().manual_seed(seed)`, a new permutation appended whenever fewer than
    `batch_size` indices are left. Every local-training rule draws its batches here (`train_lora`,
    `fedsim.model.fedspeed`, the packed trainer), so one client's batches are the same whichever trains it."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    batches = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(num_examples, generator=gen).tolist()
        batches.append(order[:batch_size])
        order = order[batch_size:]
    return batches


@torch.no_grad()
def _probe_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    model.eval()
    return float(_batch_loss(model, batch))


def normalise_answer(text: str) -> str:
    """The part of a generation that is compared: up to the first newline, stripped."""
    return text.split("\n", 1)[0].strip()


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    max_len: int,
) -> list[str]:
    """Greedy answers for a batch of prompts (left-padded, so generation continues each row)."""
    enc = [tokenizer(PROMPT_TEMPLATE.format(prompt=p), add_special_tokens=False).input_ids[-max_len:] for p in prompts]
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, width - len(e) :] = torch.tensor(e)
        mask[i, width - len(e) :] = 1
    device = next(model.parameters()).device
    # torch types a module's attributes as Tensor | Module; `generate` is the causal LM's (or its
    # PEFT wrapper's) method, returning (B, width + new) token ids.
    generate = cast(Callable[..., torch.Tensor], model.generate)
    out = generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # One 1-D row decodes to one str (transformers types `decode` for batches of rows too).
    texts = [cast(str, tokenizer.decode(row[width:].cpu(), skip_special_tokens=True)) for row in out]
    return [normalise_answer(text) for text in texts]


def token_weighted(losses: Sequence[float], n_tokens: Sequence[int]) -> float:
    """Σ_i l_i n_i / Σ_i n_i: the mean over every response token of the examples whose mean losses
    are `losses` over `n_tokens` tokens each (NaN when no example has a response token)."""
    total = sum(n_tokens)
    return sum(loss * n for loss, n in zip(losses, n_tokens, strict=True) if n) / total if total else math.nan


@torch.no_grad()
def example_losses(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[dict[str, str]],
    *,
    batch_size: int,
    max_len: int,
) -> tuple[list[float], list[int]]:
    """Per example, in order: its mean response-token cross-entropy l_i (NaN if the truncation left
    it no response token) and n_i, the tokens that mean is over (the labels after the causal shift,
    as the model's own loss counts them)."""
    model.eval()
    device = next(model.parameters()).device
    losses: list[float] = []
    counts: list[int] = []
    for lo in range(0, len(examples), batch_size):
        batch = collate(tokenizer, examples[lo : lo + batch_size], max_len)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits
        labels = batch["labels"][:, 1:].to(device)  # (B, T-1): token t+1 is predicted at t
        nll = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none"
        )  # (B, T-1)
        n = (labels != IGNORE).sum(dim=1)  # (B,)
        sums = nll.double().sum(dim=1)  # (B,)
        counts += n.tolist()
        losses += [s / k if k else math.nan for s, k in zip(sums.tolist(), n.tolist(), strict=True)]
    return losses, counts


def evaluate_loss(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[dict[str, str]],
    *,
    batch_size: int,
    max_len: int,
) -> float:
    """Response-token loss alone (token-weighted mean of `example_losses`), without generation."""
    return token_weighted(*example_losses(model, tokenizer, examples, batch_size=batch_size, max_len=max_len))


@torch.no_grad()
def exact_matches(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[dict[str, str]],
    *,
    max_new_tokens: int,
    batch_size: int,
    max_len: int,
) -> list[bool]:
    """Per example, in order: whether the greedy answer equals the stripped reference response."""
    model.eval()
    correct: list[bool] = []
    for lo in range(0, len(examples), batch_size):
        rows = examples[lo : lo + batch_size]
        answers = generate_answers(
            model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens, max_len=max_len
        )
        correct += [a == r["response"].strip() for a, r in zip(answers, rows, strict=True)]
    return correct


def evaluate_examples(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[dict[str, str]],
    *,
    max_new_tokens: int,
    batch_size: int,
    max_len: int,
) -> ExampleResults:
    """Per-example response-token loss (`example_losses`) and exact match (`exact_matches`)."""
    start = time.perf_counter()
    losses, n_tokens = example_losses(model, tokenizer, examples, batch_size=batch_size, max_len=max_len)
    correct = exact_matches(
        model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size, max_len=max_len
    )
    return ExampleResults(
        loss=tuple(losses), n_tokens=tuple(n_tokens), correct=tuple(correct), wall_time_s=time.perf_counter() - start
    )


def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[dict[str, str]],
    *,
    max_new_tokens: int,
    batch_size: int,
    max_len: int,
) -> EvalResult:
    """Response-token loss (token-weighted mean) and greedy exact-match accuracy: the reduction
    of `evaluate_examples`."""
    return evaluate_examples(
        model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size, max_len=max_len
    ).reduce()
