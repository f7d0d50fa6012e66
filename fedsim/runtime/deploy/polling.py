"""Flower's waits on a SuperNode, shortened: its pull from the SuperLink and its ClientApp's pull.

Flower 1.41's SuperNode asks the SuperLink for a message, and when there is none sleeps 3 s before it
asks again (`time.sleep(3)` in `flwr.supernode.start_client_internal`, not configurable); it checks
every 0.5 s whether its ClientApp has replied. In a round the server sends a node its next message
moments after the node's reply (aggregation, evaluation), so the node finds none, sleeps 3 s, and
that sleep is most of the per-message overhead (docs/results/deploy-overhead.md).

`python -m fedsim.runtime.deploy.polling FIRST_S ARGS...` runs `flower-supernode ARGS...` with
one change, the waits: after a message the first idle wait is `FIRST_S`, each further one 1.25
times the last, up to Flower's 3 s; the wait for the ClientApp's reply (a check of the node's own
local state, no network) is 0.05 s. A message that comes t seconds after the node's last one then
waits at most about FIRST_S + t/4 (and 3 s) to be pulled; with FIRST_S = 0.2 a node asks 6 times
in the first 3 s after a message (Flower's: once), 13 times before its waits are Flower's again
(after 14 s), and idle as often as Flower's.

A SuperNode creates the ClientApp's task before it has pulled the message's objects from the
SuperLink; a ClientApp that starts at once (fedsim's warm runner) finds them missing and Flower
retries after 1 s, doubling. `patch_clientapp_pull` retries every 0.05–0.1 s (a local call).

The SuperNode patch replaces the `time` module that `start_client_internal` alone sees (it uses it only for these
sleeps) and wraps its pull to notice messages; nothing else of Flower changes. It is checked
against the Flower version it was written for: on any other, or if the code it expects is not
there, the SuperNode runs unchanged, with a warning. The lasting fix is a configurable or
event-driven pull in Flower itself.
"""

from __future__ import annotations

import functools
import inspect
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import flwr
from flwr.supernode import start_client_internal
from flwr.supernode.runtime import run_clientapp

FLOWER_IDLE_S = 3.0  # Flower's wait after an empty pull
FLOWER_REPLY_POLL_S = 0.5  # Flower's wait for the ClientApp's reply
REPLY_POLL_S = 0.05
WRITTEN_FOR = "1.41."


class Backoff:
    """Idle waits: `first_s` after a message, `growth` times longer after each empty pull, at most Flower's."""

    def __init__(self, first_s: float, longest_s: float = FLOWER_IDLE_S, growth: float = 1.25) -> None:
        self.first_s, self.longest_s, self.growth = first_s, longest_s, growth
        self.next_s = longest_s  # before the first message: Flower's interval

    def message(self) -> None:
        """A message was pulled: the next idle wait is the shortest."""
        self.next_s = self.first_s

    def wait_s(self) -> float:
        """The wait after an empty pull (the next one is `growth` times longer)."""
        wait, self.next_s = self.next_s, min(self.next_s * self.growth, self.longest_s)
        return wait


class _Clock(ModuleType):
    """The `time` module as `start_client_internal` sees it: its sleeps are the backoff's."""

    def __init__(self, backoff: Backoff, sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__("time")
        self._backoff, self._sleep = backoff, sleep

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_S:
            self._sleep(self._backoff.wait_s())
        elif seconds == FLOWER_REPLY_POLL_S:
            self._sleep(REPLY_POLL_S)
        else:
            self._sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def patch_problem() -> str:
    """Why the SuperNode's waits cannot be changed here ("" if they can)."""
    if not flwr.__version__.startswith(WRITTEN_FOR):
        return f"written for Flower {WRITTEN_FOR}x, this is Flower {flwr.__version__}"
    source = inspect.getsource(start_client_internal)
    expected = (f"time.sleep({FLOWER_IDLE_S:g})", f"time.sleep({FLOWER_REPLY_POLL_S:g})", "_pull_and_store_message(")
    missing = [s for s in expected if s not in source]
    return f"flwr.supernode.start_client_internal has no {', '.join(missing)}" if missing else ""


def patch(first_s: float) -> Backoff:
    """Give `start_client_internal` the backoff's waits; returns the backoff."""
    backoff = Backoff(first_s)
    pull = start_client_internal._pull_and_store_message

    def pull_and_notice(*args: Any, **kwargs: Any) -> Any:
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            backoff.message()
        return run_id

    start_client_internal._pull_and_store_message = pull_and_notice
    start_client_internal.time = _Clock(backoff)
    return backoff


CLIENTAPP_PULL_RETRY_S = 0.05  # first retry of a ClientApp's pull of objects its SuperNode has not yet


def patch_clientapp_pull() -> None:
    """In a ClientApp process: retry its pull of the message's objects every 0.05–0.1 s (Flower: 1 s,
    doubling up to 10 s)."""
    pull = run_clientapp.pull_and_inflate_object_from_tree
    run_clientapp.pull_and_inflate_object_from_tree = functools.partial(
        pull, initial_backoff=CLIENTAPP_PULL_RETRY_S, backoff_cap=2 * CLIENTAPP_PULL_RETRY_S
    )


def main(argv: list[str]) -> int:
    """`polling FIRST_S ARGS...`: Flower's SuperNode with ARGS, its waits patched (`patch`)."""
    from flwr.supernode.cli import flower_supernode

    first_s = float(argv[0])
    if problem := patch_problem():
        print(f"fedsim supernode: the SuperNode keeps Flower's 3 s poll: {problem}", file=sys.stderr, flush=True)
    else:
        patch(first_s)
    sys.argv = ["flower-supernode", *argv[1:]]
    flower_supernode()
    return 0


if __name__ == "__main__":  # no logging set-up here: Flower's own log handlers print the SuperNode's log
    sys.exit(main(sys.argv[1:]))
