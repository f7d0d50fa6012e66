"""The simulated clock: how long a round would take on the fleet, not on this machine.

For client k in a round:

    compute_k = FLOPs_k / throughput_k
        FLOPs_k is counted by the client from its actual model shape and the batches it
        trained on (`fedsim.fleet.costs.train_step_flops`, summed over steps).
    comm_k    = 8·bytes_down_k / downlink_k + 8·bytes_up_k / uplink_k
        bytes are the Message content as Flower sends it: the deflated size of every object
        in the record tree (`payload_bytes`), measured on the real messages.
    finish_k  = compute_k + comm_k

The server keeps the first K finishers (FedScale's over-commitment samples K·(1+o) and keeps
the first K), drops any client whose finish time exceeds the round deadline, and the round
lasts as long as its slowest kept client — or the whole deadline when it had to give up on
someone. A round that keeps no update at all (nobody online, everyone lost) lasts
`fleet.idle_step_s`: the server waits that long before it samples again. Simulated time is the
sum of the round durations; federated evaluation is not on the clock.

Energy runs on the same clock (`fedsim.fleet.energy`): a client's compute seconds, bytes and the
seconds it waits for the round to end, at its device's power figures, are its joules; one the round
gives up on is billed what it got through by the round's end. What is not on the clock (federated
evaluation) is not billed.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from flwr.app import RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects


def payload_bytes(content: RecordDict) -> int:
    """Bytes that `content` occupies on the wire: Flower deflates each object of the record
    tree (arrays, records, the record dict) and ships them; identical objects travel once."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def comm_seconds(
    bytes_down: npt.ArrayLike, bytes_up: npt.ArrayLike, down_bps: npt.ArrayLike, up_bps: npt.ArrayLike
) -> np.ndarray:
    """Seconds to move `bytes_down` at `down_bps` and `bytes_up` at `up_bps` (bits per second), elementwise."""
    return 8.0 * np.asarray(bytes_down) / np.asarray(down_bps) + 8.0 * np.asarray(bytes_up) / np.asarray(up_bps)


def keep_first_finishers(finish_s: np.ndarray, k: int, deadline_s: float) -> np.ndarray:
    """Boolean mask of the clients whose update the server keeps: finished within the deadline
    (0 = none) and among the first `k` to finish (ties broken by position, i.e. client id)."""
    finish_s = np.asarray(finish_s, dtype=float)
    in_time = finish_s <= deadline_s if deadline_s > 0 else np.ones(len(finish_s), dtype=bool)
    order = np.argsort(finish_s, kind="stable")
    kept = np.zeros(len(finish_s), dtype=bool)
    kept[order[:k]] = True
    return kept & in_time


def round_duration(finish_s: np.ndarray, kept: np.ndarray, deadline_s: float) -> float:
    """The round lasts until the slowest kept client is done; if the server gave up on a
    client because of the deadline, it waited the whole deadline."""
    finish_s = np.asarray(finish_s, dtype=float)
    slowest = float(finish_s[kept].max()) if kept.any() else 0.0
    if deadline_s > 0 and bool((finish_s > deadline_s).any()):
        return float(deadline_s)
    return slowest
