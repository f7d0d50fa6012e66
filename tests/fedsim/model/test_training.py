"""Local training and evaluation on the tiny model: masking, the loop, FedProx's pull, scoring."""

from __future__ import annotations

import pytest
import torch

from fedsim.config.scenario import LoraConfig
from fedsim.data.tasks import generate
from fedsim.model.adapter import attach_lora, get_state, set_state
from fedsim.model.loader import load_model
from fedsim.model.training import (
    IGNORE,
    PROMPT_TEMPLATE,
    collate,
    encode,
    evaluate,
    evaluate_examples,
    evaluate_loss,
    example_losses,
    token_weighted,
    train_lora,
)


@pytest.fixture(scope="module")
def tiny():  # type: ignore[no-untyped-def]
    base, tokenizer = load_model("tiny-llama")
    return attach_lora(base, LoraConfig(rank=4, alpha=8.0), seed=0), tokenizer


def test_prompt_is_masked_and_truncated_from_the_left(tiny) -> None:  # type: ignore[no-untyped-def]
    _, tok = tiny
    ids, labels = encode(tok, "What is 2 + 2?", "4", max_len=64)
    prompt_len = len(PROMPT_TEMPLATE.format(prompt="What is 2 + 2?"))  # one token per character
    assert labels[:prompt_len] == [IGNORE] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:] == tok("4").input_ids + [tok.eos_token_id]
    ids, labels = encode(tok, "x" * 100, "4", max_len=16)
    assert len(ids) == 16 and labels[-2:] == ids[-2:]  # the response survives, the prompt is cut


def test_collate_pads_right(tiny) -> None:  # type: ignore[no-untyped-def]
    _, tok = tiny
    batch = collate(tok, [{"prompt": "a", "response": "b"}, {"prompt": "abcdef", "response": "b"}], 64)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()


def train(model, tok, mu: float):  # type: ignore[no-untyped-def]
    examples = generate("sentiment", 64, seed=0)
    return train_lora(model, tok, examples, steps=10, batch_size=8, max_len=64, lr=1e-2, weight_decay=0.0,
                      grad_clip=1.0, seed=1, step_flops=lambda b, t: float(b * t), proximal_mu=mu)  # fmt: skip


def test_training_lowers_the_loss_and_counts_flops(tiny) -> None:  # type: ignore[no-untyped-def]
    model, tok = tiny
    start = get_state(model)
    result = train(model, tok, 0.0)
    set_state(model, start)
    assert result.loss_after < result.loss_before
    assert result.flops >= result.tokens > 0  # step_flops(b, t) = b·t counts padding too


def test_fedprox_term_keeps_the_adapter_near_where_it_started(tiny) -> None:  # type: ignore[no-untyped-def]
    model, tok = tiny
    start = get_state(model)
    moved = {}
    for mu in (0.0, 100.0):
        set_state(model, start)
        train(model, tok, mu)
        moved[mu] = sum(float((v - start[k]).norm()) for k, v in get_state(model).items())
    set_state(model, start)
    assert moved[100.0] < 0.5 * moved[0.0]


def test_evaluate_loss_matches_evaluate(tiny) -> None:  # type: ignore[no-untyped-def]
    model, tok = tiny
    rows = generate("sentiment", 12, seed=3)
    full = evaluate(model, tok, rows, max_new_tokens=4, batch_size=5, max_len=64)
    assert evaluate_loss(model, tok, rows, batch_size=5, max_len=64) == full.loss
    assert full.num_examples == 12 and 0.0 <= full.accuracy <= 1.0
    assert torch.isfinite(torch.tensor(full.loss))


def test_per_example_losses_reduce_to_the_models_own_batch_loss(tiny) -> None:  # type: ignore[no-untyped-def]
    model, tok = tiny
    rows = generate("sentiment", 6, seed=4) + [{"prompt": "x" * 40, "response": "a longer answer"}]
    batch = collate(tok, rows, 64)
    with torch.no_grad():
        reference = float(model(**batch).loss)  # transformers' mean over the batch's shifted labels

    losses, tokens = example_losses(model, tok, rows, batch_size=len(rows), max_len=64)

    assert tokens == (batch["labels"][:, 1:] != IGNORE).sum(dim=1).tolist()
    assert len(set(tokens)) > 1  # unequal lengths: the token weighting matters
    assert token_weighted(losses, tokens) == pytest.approx(reference, rel=1e-6)
    alone = [example_losses(model, tok, [r], batch_size=1, max_len=64)[0][0] for r in rows]
    assert losses == pytest.approx(alone, rel=1e-5)  # padding does not leak into an example's loss


def test_evaluate_is_the_reduction_of_the_per_example_results(tiny) -> None:  # type: ignore[no-untyped-def]
    model, tok = tiny
    rows = generate("arithmetic", 9, seed=5)

    each = evaluate_examples(model, tok, rows, max_new_tokens=4, batch_size=4, max_len=64)
    full = evaluate(model, tok, rows, max_new_tokens=4, batch_size=4, max_len=64)

    assert len(each.loss) == len(each.n_tokens) == len(each.correct) == 9
    assert (
        full.loss
        == token_weighted(each.loss, each.n_tokens)
        == sum(x * n for x, n in zip(each.loss, each.n_tokens)) / sum(each.n_tokens)
    )
    assert full.accuracy == sum(each.correct) / 9 and full.num_examples == 9


def test_token_weighted_skips_examples_without_response_tokens() -> None:
    assert token_weighted([2.0, float("nan"), 5.0], [1, 0, 2]) == 4.0
    assert token_weighted([], []) != token_weighted([], [])  # NaN
