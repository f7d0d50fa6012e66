"""`fedsim.protocol` is the one place a message key or record name is spelled out: its names are
distinct strings, Flower's own keys are Flower's, and no other module of the server, the
strategies or the ClientApp writes one of them as a literal."""

from __future__ import annotations

import ast
from pathlib import Path

from flwr.serverapp.strategy import FedAvg

from fedsim import protocol
from fedsim.results.rundir import METRIC_COLUMNS

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fedsim", "clients", "strategies")
NAMES = {name: value for name, value in vars(protocol).items() if name.isupper() and not name.startswith("_")}
KEYS = {value: name for name, value in NAMES.items() if isinstance(value, str)}

# Protocol strings that are also ordinary words with another meaning in a module (module → words).
# Words that name a metrics-table column (`fedsim.results.rundir.METRIC_COLUMNS`: "kind", "loss", ...) may
# appear anywhere: rows are built and read by column name.
OTHER_MEANINGS: dict[str, set[str]] = {
    "fedsim/model/adapter.py": {"rank"},  # a LoraConfig field
    "fedsim/cli.py": {"scenario"},  # a CLI argument
    "fedsim/fleet/costs.py": {"config"},  # transformers' `model.config`
    "fedsim/runtime/deploy/commands.py": {"scenario"},  # a CLI argument
    "fedsim/runtime/deploy/flower.py": {"scenario"},  # a run-config key of the ServerApp
    "fedsim/server/export.py": {"keep"},  # a field of the export manifest
    "fedsim/pruning/__init__.py": {"prune"},  # a function in `__all__`
    "fedsim/pruning/structure.py": {"config"},  # transformers' `model.config`
    "fedsim/config/scenario.py": {"scenario"},  # how a config error names its input
    "fedsim/runtime/server_app.py": {"scenario"},  # a run-config key of the ServerApp
    "fedsim/privacy/book.py": {"delta"},  # the privacy event's δ
    "clients/app.py": {"dp-local-noise"},  # the name of the local-DP noise stream (`noise_generator`)
    "fedsim/results/report.py": {"delta"},  # the privacy event's δ
    "fedsim/server/federation.py": {"delta"},  # the privacy event's δ
    "fedsim/results/tracking.py": {"scenario"},  # a TensorBoard text tag
}


def _string_literals(path: Path) -> list[tuple[int, str]]:
    """(line, value) of every string constant in `path`, docstrings and other bare string
    statements left out (f-string pieces are constants too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bare = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    return [
        (n.lineno, n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in bare
    ]


def _sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py") if p != ROOT / "fedsim/protocol.py")


def test_every_name_is_a_distinct_nonempty_string() -> None:
    strings = {name: value for name, value in NAMES.items() if name != "TRAIN_METRICS"}
    assert all(isinstance(v, str) and v for v in strings.values()), strings
    assert len(set(strings.values())) == len(strings), sorted(strings.values())


def test_train_metrics_are_distinct_protocol_keys() -> None:
    assert len(set(protocol.TRAIN_METRICS)) == len(protocol.TRAIN_METRICS)
    assert set(protocol.TRAIN_METRICS) <= set(KEYS)
    assert protocol.NUM_EXAMPLES in protocol.TRAIN_METRICS


def test_flowers_own_keys_are_flowers() -> None:
    flower = FedAvg()
    assert (flower.weighted_by_key, flower.arrayrecord_key, flower.configrecord_key) == (
        protocol.NUM_EXAMPLES,
        protocol.ARRAYS_RECORD,
        protocol.CONFIG_RECORD,
    )


def test_the_protocol_module_imports_nothing() -> None:
    tree = ast.parse((ROOT / "fedsim/protocol.py").read_text(encoding="utf-8"))
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_no_other_module_spells_out_a_protocol_key() -> None:
    found = []
    for path in _sources():
        module = path.relative_to(ROOT).as_posix()
        allowed = OTHER_MEANINGS.get(module, set()) | set(METRIC_COLUMNS)
        found += [
            f"{module}:{line}: {value!r} (use fedsim.protocol.{KEYS[value]})"
            for line, value in _string_literals(path)
            if value in KEYS and value not in allowed
        ]
    assert not found, "\n".join(found)


def test_every_other_meaning_is_still_there() -> None:
    """The allowances above name only words a module still uses (so the table cannot go stale)."""
    for module, words in OTHER_MEANINGS.items():
        used = {value for _, value in _string_literals(ROOT / module)}
        assert words <= used, f"{module} no longer uses {sorted(words - used)}: drop them from OTHER_MEANINGS"
