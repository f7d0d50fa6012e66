"""Built-in instruction tasks: small, deterministic, exactly scorable.

Each task is a generator ``(n, seed) -> n examples``; an example is
``{"prompt": str, "response": str, "domain": str}``. Responses are short (a number, a
word, a few letters) so that a 135M instruct model scores them by exact match after
cheap greedy decoding, and they are canonical (plain digits, lower-case words), so
exact match is the right metric. The domain of an example is the natural non-IID key
for partitioning (``data.partition_by = "domain"``).

Generators use their own ``random.Random(seed)``, never the global RNG. Domains are
assigned round-robin, so they are balanced to within one example, and ``generate(n,
seed)`` is a prefix of ``generate(n + 1, seed)``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from fedsim.config.sources import unknown_task_message

Example = dict[str, str]

# Common short English words (3-7 letters), lower case.
WORDS: tuple[str, ...] = tuple(
    """
    apple river house green table water light music paper stone bread chair cloud dream
    earth field glass heart horse lemon money night ocean plant queen radio smile sugar
    tiger train voice watch world youth beach brain candy dance eagle flame grape honey
    juice knife mouse north piano salad shirt sound storm sweet tooth wheel cat dog sun
    moon star tree book door fish bird rain snow wind fire milk salt rice corn lamp
    road ship king gold blue red cup hat pen key box bus car egg ice map net owl pig
    sky toy garden window orange yellow summer winter forest bridge castle dinner
    flower friend guitar island jacket kitten letter market number pencil rabbit silver
    ticket violin animal bottle camera doctor engine family planet rocket kitchen
    morning picture teacher weather balloon chicken
    """.split()
)


@dataclass(frozen=True)
class Task:
    """A built-in task: a name, a one-line description, its domains and its generator."""

    name: str
    description: str
    domains: tuple[str, ...]
    generate: Callable[[int, int], list[Example]]


def _example(prompt: str, response: str, domain: str) -> Example:
    return {"prompt": prompt, "response": response, "domain": domain}


# --- arithmetic ---------------------------------------------------------------------

_ARITHMETIC_DOMAINS = ("add", "sub", "mul")


def _arithmetic_one(rng: random.Random, domain: str) -> Example:
    if domain == "add":
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        return _example(f"What is {a} + {b}?", str(a + b), domain)
    if domain == "sub":
        a, b = sorted((rng.randint(10, 999), rng.randint(10, 999)), reverse=True)
        return _example(f"What is {a} - {b}?", str(a - b), domain)
    a, b = rng.randint(10, 99), rng.randint(2, 12)
    return _example(f"What is {a} * {b}?", str(a * b), domain)


def _arithmetic(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    doms = _ARITHMETIC_DOMAINS
    return [_arithmetic_one(rng, doms[i % len(doms)]) for i in range(n)]


# --- strings ------------------------------------------------------------------------

_STRINGS_DOMAINS = ("reverse", "upper", "first_letters", "count")


def _strings_one(rng: random.Random, domain: str) -> Example:
    word = rng.choice(WORDS)
    if domain == "reverse":
        return _example(f"Reverse the word: {word}", word[::-1], domain)
    if domain == "upper":
        return _example(f"Write in capitals: {word}", word.upper(), domain)
    if domain == "first_letters":
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 4))]
        initials = "".join(w[0] for w in words)
        return _example(f"First letters of: {' '.join(words)}", initials, domain)
    return _example(f"How many letters are in '{word}'?", str(len(word)), domain)


def _strings(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    doms = _STRINGS_DOMAINS
    return [_strings_one(rng, doms[i % len(doms)]) for i in range(n)]


# --- units --------------------------------------------------------------------------

# (from unit, to unit, factor): value in `to` = value in `from` * factor.
UNIT_CONVERSIONS: dict[str, tuple[tuple[str, str, int], ...]] = {
    "length": (
        ("km", "m", 1000),
        ("m", "cm", 100),
        ("cm", "mm", 10),
        ("m", "mm", 1000),
    ),
    "mass": (("kg", "g", 1000), ("g", "mg", 1000), ("t", "kg", 1000)),
    "time": (
        ("hours", "minutes", 60),
        ("minutes", "seconds", 60),
        ("days", "hours", 24),
        ("weeks", "days", 7),
    ),
}
_UNITS_DOMAINS = tuple(UNIT_CONVERSIONS)


def _units_one(rng: random.Random, domain: str) -> Example:
    src, dst, factor = rng.choice(UNIT_CONVERSIONS[domain])
    value = rng.randint(1, 250)
    return _example(f"Convert {value} {src} to {dst}.", str(value * factor), domain)


def _units(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    doms = _UNITS_DOMAINS
    return [_units_one(rng, doms[i % len(doms)]) for i in range(n)]


# --- sentiment ----------------------------------------------------------------------

_SUBJECTS: dict[str, tuple[str, ...]] = {
    "movies": ("The movie", "The plot", "The acting", "The ending", "The film"),
    "food": ("The pasta", "The soup", "The pizza", "The dessert", "The service"),
    "electronics": (
        "The battery",
        "The screen",
        "The laptop",
        "The phone",
        "The camera",
    ),
}
_GENERIC_ADJECTIVES = {
    "positive": ("great", "excellent", "wonderful", "superb", "amazing", "lovely"),
    "negative": ("terrible", "awful", "poor", "horrible", "dreadful", "bad"),
}
_DOMAIN_ADJECTIVES: dict[str, dict[str, tuple[str, ...]]] = {
    "movies": {
        "positive": ("gripping", "hilarious", "moving", "brilliant"),
        "negative": ("boring", "dull", "predictable", "clumsy"),
    },
    "food": {
        "positive": ("delicious", "fresh", "tasty", "perfect"),
        "negative": ("bland", "stale", "greasy", "cold"),
    },
    "electronics": {
        "positive": ("fast", "reliable", "sturdy", "sharp"),
        "negative": ("slow", "flimsy", "buggy", "faulty"),
    },
}
_INTENSIFIERS = ("", "really ", "very ", "quite ")
_SENTIMENT_DOMAINS = tuple(_SUBJECTS)


def _sentiment_one(rng: random.Random, domain: str) -> Example:
    label = rng.choice(("positive", "negative"))
    adjectives = _GENERIC_ADJECTIVES[label] + _DOMAIN_ADJECTIVES[domain][label]
    subject, verb = rng.choice(_SUBJECTS[domain]), rng.choice(("was", "is"))
    sentence = f"{subject} {verb} {rng.choice(_INTENSIFIERS)}{rng.choice(adjectives)}."
    return _example(f"Review: {sentence} Sentiment?", label, domain)


def _sentiment(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    doms = _SENTIMENT_DOMAINS
    return [_sentiment_one(rng, doms[i % len(doms)]) for i in range(n)]


# --- mixed --------------------------------------------------------------------------

_MIXED_PARTS: dict[str, Callable[[int, int], list[Example]]] = {
    "arithmetic": _arithmetic,
    "strings": _strings,
    "units": _units,
    "sentiment": _sentiment,
}


def _mixed(n: int, seed: int) -> list[Example]:
    """Example i comes from task i % 4, in turn; its domain is that task's name."""
    names = tuple(_MIXED_PARTS)
    parts = [_MIXED_PARTS[name](len(range(k, n, len(names))), seed) for k, name in enumerate(names)]
    out = []
    for i in range(n):
        k = i % len(names)
        out.append({**parts[k][i // len(names)], "domain": names[k]})
    return out


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            "arithmetic",
            "What is 47 + 385? -> 432: 2-3 digit add/sub, small mul",
            _ARITHMETIC_DOMAINS,
            _arithmetic,
        ),
        Task(
            "strings",
            "Reverse the word: apple -> elppa: reverse, capitals, initials, letter count",
            _STRINGS_DOMAINS,
            _strings,
        ),
        Task(
            "units",
            "Convert 3 km to m. -> 3000: integer length, mass and time conversions",
            _UNITS_DOMAINS,
            _units,
        ),
        Task(
            "sentiment",
            "Review: The pasta was bland. Sentiment? -> negative: templated reviews",
            _SENTIMENT_DOMAINS,
            _sentiment,
        ),
        Task(
            "mixed",
            "all four tasks interleaved; the domain is the task name",
            tuple(_MIXED_PARTS),
            _mixed,
        ),
    )
}


def list_tasks() -> list[Task]:
    """The built-in tasks, in a fixed order."""
    return list(TASKS.values())


def generate(task: str, n: int, seed: int) -> list[Example]:
    """``n`` examples of the built-in ``task``; the same arguments give the same list."""
    if task not in TASKS:
        raise ValueError(unknown_task_message(task))
    if n < 0:
        raise ValueError(f"number of examples must be >= 0, got {n}")
    return TASKS[task].generate(n, seed)
