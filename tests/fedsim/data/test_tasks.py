"""Tests for fedsim/data/tasks.py: determinism, shape, and answers checked by recomputing them."""

import random
import re
from collections import Counter

import pytest

from fedsim.data.tasks import TASKS, generate, list_tasks

TASK_NAMES = ["arithmetic", "strings", "units", "sentiment", "mixed"]


def test_list_tasks_names_descriptions_and_domains():
    tasks = list_tasks()

    assert [t.name for t in tasks] == TASK_NAMES
    assert list(TASKS) == TASK_NAMES
    for task in tasks:
        assert task.description and "\n" not in task.description
        generated = {e["domain"] for e in task.generate(40, 0)}
        assert generated == set(task.domains)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_same_seed_same_examples_other_seed_different(name):
    first, again = generate(name, 200, seed=7), generate(name, 200, seed=7)
    other = generate(name, 200, seed=8)

    assert first == again
    assert first != other


@pytest.mark.parametrize("name", TASK_NAMES)
def test_shorter_run_is_a_prefix(name):
    assert generate(name, 50, seed=3) == generate(name, 80, seed=3)[:50]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_global_rng_neither_used_nor_disturbed(name):
    random.seed(0)
    state = random.getstate()
    first = generate(name, 100, seed=1)
    assert random.getstate() == state
    random.seed(12345)
    assert generate(name, 100, seed=1) == first


@pytest.mark.parametrize("name", TASK_NAMES)
def test_examples_are_short_strings(name):
    examples = generate(name, 400, seed=0)

    assert len(examples) == 400
    for e in examples:
        assert set(e) == {"prompt", "response", "domain"}
        assert all(isinstance(v, str) for v in e.values())
        assert 0 < len(e["prompt"]) <= 60, e
        assert 0 < len(e["response"]) <= 10, e
        assert e["response"] == e["response"].strip()


@pytest.mark.parametrize("name", TASK_NAMES)
def test_domains_balanced_and_all_present(name):
    counts = Counter(e["domain"] for e in generate(name, 301, seed=0))

    assert set(counts) == set(TASKS[name].domains)
    assert max(counts.values()) - min(counts.values()) <= 1


@pytest.mark.parametrize("name", TASK_NAMES)
def test_not_degenerate(name):
    examples = generate(name, 600, seed=0)

    assert len({e["prompt"] for e in examples}) >= 200
    assert len({e["response"] for e in examples}) >= 2


def test_zero_examples_and_errors():
    assert generate("units", 0, seed=0) == []
    with pytest.raises(ValueError, match="at least|>= 0"):
        generate("units", -1, seed=0)
    with pytest.raises(ValueError) as error:
        generate("arithmatic", 10, seed=0)
    message = str(error.value)
    assert "unknown task 'arithmatic'" in message
    assert all(name in message for name in TASK_NAMES)
    assert "did you mean 'arithmetic'" in message


def test_arithmetic_answers_recomputed():
    ops = {"add": ("+", lambda a, b: a + b), "sub": ("-", lambda a, b: a - b)}
    ops["mul"] = ("*", lambda a, b: a * b)

    for e in generate("arithmetic", 600, seed=2):
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", e["prompt"]).groups()
        symbol, fn = ops[e["domain"]]
        assert op == symbol
        assert e["response"] == str(fn(int(a), int(b)))
        if e["domain"] == "mul":
            assert int(a) < 100 and int(b) < 100  # smaller operands
        else:
            assert 10 <= int(a) <= 999 and 10 <= int(b) <= 999
            assert int(e["response"]) >= 0


def test_strings_answers_recomputed():
    patterns = {
        "reverse": (r"Reverse the word: (\w+)", lambda w: w[::-1]),
        "upper": (r"Write in capitals: (\w+)", str.upper),
        "first_letters": (
            r"First letters of: ([a-z ]+)",
            lambda s: "".join(w[0] for w in s.split()),
        ),
        "count": (r"How many letters are in '(\w+)'\?", lambda w: str(len(w))),
    }

    for e in generate("strings", 400, seed=4):
        pattern, fn = patterns[e["domain"]]
        (argument,) = re.fullmatch(pattern, e["prompt"]).groups()
        assert e["response"] == fn(argument)
        if e["domain"] == "first_letters":
            assert len(argument.split()) in (3, 4)


# Independent reference: every unit in its base unit (mm, mg, s).
BASE = {
    "km": 1_000_000, "m": 1000, "cm": 10, "mm": 1,
    "t": 1_000_000_000, "kg": 1_000_000, "g": 1000, "mg": 1,
    "weeks": 604_800, "days": 86_400, "hours": 3600, "minutes": 60, "seconds": 1,
}  # fmt: skip
DIMENSION = {"km": "length", "m": "length", "cm": "length", "mm": "length"}
DIMENSION |= {"t": "mass", "kg": "mass", "g": "mass", "mg": "mass"}
DIMENSION |= {u: "time" for u in ("weeks", "days", "hours", "minutes", "seconds")}


def test_units_answers_recomputed():
    for e in generate("units", 600, seed=5):
        value, src, dst = re.fullmatch(r"Convert (\d+) (\w+) to (\w+)\.", e["prompt"]).groups()
        assert DIMENSION[src] == DIMENSION[dst] == e["domain"]
        expected = int(value) * BASE[src] // BASE[dst]
        assert int(value) * BASE[src] % BASE[dst] == 0
        assert e["response"] == str(expected)


def test_sentiment_labels_follow_the_adjective():
    examples = generate("sentiment", 900, seed=6)
    label_of = {}

    for e in examples:
        match = re.fullmatch(r"Review: The (\w+) (?:was|is) (?:\w+ )?(\w+)\. Sentiment\?", e["prompt"])
        assert match, e["prompt"]
        adjective = match.group(2)
        assert label_of.setdefault(adjective, e["response"]) == e["response"]
    assert set(label_of.values()) == {"positive", "negative"}
    for word, label in [
        ("delicious", "positive"),
        ("bland", "negative"),
        ("buggy", "negative"),
        ("gripping", "positive"),
    ]:
        assert label_of[word] == label
    share = Counter(e["response"] for e in examples)["positive"] / len(examples)
    assert 0.4 < share < 0.6


def test_mixed_interleaves_the_four_tasks():
    mixed = generate("mixed", 203, seed=9)
    parts = {name: generate(name, 51, seed=9) for name in ("arithmetic", "strings", "units", "sentiment")}

    for i, e in enumerate(mixed):
        name = list(parts)[i % 4]
        source = parts[name][i // 4]
        assert e == {
            "prompt": source["prompt"],
            "response": source["response"],
            "domain": name,
        }
