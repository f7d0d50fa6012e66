"""Values as a person reads them: bytes, FLOPs, durations, numbers and events as short text.

Pure functions, value in and string out; a missing value (None, NaN) is "–".
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from fedsim.results.report import si, significant

MISSING = "–"
_BYTES = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def human_bytes(value: float | None) -> str:
    """Bytes in powers of 1024: 512 → "512 B", 14_267 → "13.9 KiB", 3 × 2^30 → "3 GiB"."""
    if _missing(value):
        return MISSING
    assert value is not None
    size, unit = float(value), 0
    while abs(size) >= 1024 and unit < len(_BYTES) - 1:
        size, unit = size / 1024, unit + 1
    return f"{int(size)} B" if unit == 0 else f"{significant(size)} {_BYTES[unit]}"


def human_si(value: float | None, unit: str) -> str:
    """A count in powers of 1000 with `unit`: human_si(1.92e9, "FLOP") → "1.92 GFLOP"."""
    if _missing(value):
        return MISSING
    assert value is not None
    return si(value, unit)


def human_seconds(value: float | None) -> str:
    """A duration: "42 ms", "3.2 s", "4 min 10 s", "2 h 05 min"."""
    if _missing(value):
        return MISSING
    assert value is not None
    s = float(value)
    if s < 0:
        return "-" + human_seconds(-s)
    if s < 1:
        return f"{s * 1000:.3g} ms"
    if s < 60:
        return f"{s:.3g} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def number(value: Any) -> str:
    """A table cell: "–" for missing, 4 significant digits for floats, integers as they are."""
    if _missing(value):
        return MISSING
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 10_000 else f"{value:.4g}"
    return str(value)


def clock(stamp: Any) -> str:
    """A Unix time as local "YYYY-MM-DD HH:MM:SS"; anything else as text."""
    if isinstance(stamp, int | float) and math.isfinite(stamp):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))
    return "" if stamp is None else str(stamp)


_FIELD_FORMATS: dict[str, tuple[str, Callable[[Any], str]]] = {  # how an event field reads: (label, formatter)
    "round": ("round", str),
    "central_accuracy": ("central accuracy", number),
    "central_loss": ("central loss", number),
    "train_loss": ("train loss", number),
    "clients_ok": ("clients ok", str),
    "clients_failed": ("failed", str),
    "clients_lost": ("lost", str),
    "elapsed_s": ("wall", human_seconds),
    "wall_time_s": ("wall", human_seconds),
    "sim_time_s": ("simulated", human_seconds),
    "train_time_s": ("training", human_seconds),
}


def _field(key: str, value: Any) -> str:
    label, render = _FIELD_FORMATS.get(key, (key.replace("_", " "), number))
    if isinstance(value, list | tuple):
        return f"{label}: {', '.join(map(str, value)) or 'none'}"
    if isinstance(value, dict):
        return f"{label}: {', '.join(f'{k}={v}' for k, v in value.items())}"
    return f"{label} {render(value) if not isinstance(value, str) else value}"


def describe_event(event: Mapping[str, Any]) -> tuple[str, str, str]:
    """(time, kind, details) of one events.jsonl line, details as "field value · field value"."""
    kind = str(event.get("event", "?"))
    fields = {k: v for k, v in event.items() if k not in {"time", "event"} and v is not None}
    if kind == "round_end" and "round" in fields:
        of = fields.pop("rounds", None)
        head = f"round {fields.pop('round')}" + (f" of {of}" if of is not None else "")
        details = " · ".join([head, *(_field(k, v) for k, v in fields.items())])
    else:
        details = " · ".join(_field(k, v) for k, v in fields.items())
    return clock(event.get("time")), kind.replace("_", " "), details
