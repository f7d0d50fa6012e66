"""When a client prunes, and how far: FedSpine's prune-and-tune schedule.

A client with target ratio ρ* prunes in E events (`pruning.events`), one every `interval` of its
local training steps (`pruning.interval_steps`), counted over all its rounds: event e = 1..E
happens before its step (e − 1)·interval, so the first one before it trains at all, and takes the
ratio to the cubic schedule of Zhu & Gupta ("To prune, or not to prune", arXiv:1710.01878),

    ρ_e = ρ* · (1 − (1 − e/E)³),

which removes most early, while the adapter is still far from converged, and little near the end.
Between events the client trains LoRA on the pruned model: FedSpine (and LoRAPrune) found about
20 recovery steps between events best. Pure functions of the step count, so the server knows each
client's ratio without asking (the simulated clock and memory check need it before the round).
"""

from __future__ import annotations


def ratio_at_event(event: int, target: float, events: int) -> float:
    """ρ_e of the module docstring (0 before the first event, ρ* from event E on)."""
    if event <= 0:
        return 0.0
    done = min(event, events) / events
    return target * (1.0 - (1.0 - done) ** 3)


def events_by(steps: int, interval: int, events: int) -> int:
    """Events that have happened before a client's step `steps` (0-based; counts step 0's)."""
    return min(events, steps // interval + 1)


def ratio_before_step(steps: int, target: float, interval: int, events: int) -> float:
    """The ratio a client holds while it takes its step `steps` (cumulative, 0-based)."""
    return ratio_at_event(events_by(steps, interval, events), target, events)


def events_in(start: int, steps: int, target: float, interval: int, events: int) -> list[tuple[int, float]]:
    """(local step within the round, ratio to reach) of each event of a round that starts at
    cumulative step `start` and takes `steps` steps."""
    out = []
    for t in range(steps):
        before, now = (
            events_by(start + t - 1, interval, events) if start + t > 0 else 0,
            events_by(start + t, interval, events),
        )
        if now > before:
            out.append((t, ratio_at_event(now, target, events)))
    return out
