"""Which node plays which client: the server's map between fedsim's client ids and Flower's node ids.

Two shapes:

- **A node per client** (`Roster.fixed`): a deployment's SuperNodes, each holding its own partition
  (`fedsim.server.federation.discover_clients`), or a simulation whose clients keep state from one
  round to the next in their node's `Context.state` (`client_state`).
- **A pool of nodes as large as a round** (`Roster.pooled`): in fedsim's own simulation a virtual
  node can play any client, since a client's work depends only on (seed, round, client id) and its
  data is `client_data(client id)`. Before each phase (train, evaluate) `seat` puts that phase's
  clients on the pool's nodes, and each message names its client (`protocol.CLIENT_ID`). Flower's
  simulation engine keeps state and sweeps its message queues per node, so a fleet of 100,000
  clients on a pool of a round's size costs what a fleet of that size does (docs/results/scale.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from fedsim.config.names import CLIENT_STATE
from fedsim.config.scenario import Scenario


def client_state(scenario: Scenario) -> list[str]:
    """Why the clients of `scenario` keep state between rounds, one reason per setting ([] if they keep none)."""
    c = scenario.compression
    reasons = [
        "`compression.error_feedback`: each client keeps the residual it has not sent yet" if c.error_feedback else "",
        "`compression.downlink`: each client keeps its copy of the global adapter" if c.downlink else "",
        f"`strategy.name` = {scenario.strategy.name!r}: {CLIENT_STATE[scenario.strategy.name]}"
        if scenario.strategy.name in CLIENT_STATE
        else "",
    ]
    return [r for r in reasons if r]


def node_pool_size(scenario: Scenario) -> int:
    """The virtual nodes a simulation of `scenario` needs: one per client when its clients keep state
    (`client_state`), a round's sample has no bound below the fleet (central DP samples each client
    with probability q: `fedsim.privacy.sampling`) or devices train across server steps (asynchronous
    participation: `fedsim.server.asynchronous`), else the most clients one phase addresses — a
    round's sample, ⌈per_round·(1 + overcommit)⌉, or its federated evaluation's `eval_per_round`."""
    n = scenario.clients.num_clients
    if client_state(scenario) or scenario.privacy.mode == "central" or scenario.asynchronous:
        return n
    k = scenario.clients
    return min(n, max(math.ceil(k.per_round * (1 + scenario.fleet.overcommit)), k.eval_per_round, 1))


class Roster:
    """client id ↔ node id; the client ids are `ids` (sorted), the node ids `nodes`."""

    def __init__(self, ids: Iterable[int], seats: Mapping[int, int], pool: list[int] | None) -> None:
        self.ids = np.array(sorted(int(c) for c in ids), dtype=np.int64)
        self._pool = pool
        self._seat(seats)

    @classmethod
    def fixed(cls, clients: Mapping[int, int]) -> Roster:
        """Each client on its own node for the whole run (`clients`: client id → node id)."""
        return cls(clients, clients, None)

    @classmethod
    def pooled(cls, num_clients: int, nodes: list[int]) -> Roster:
        """Clients 0..num_clients-1 seated on `nodes` phase by phase (`seat`)."""
        if not nodes:
            raise ValueError("a pooled roster needs at least one node")
        return cls(range(num_clients), {}, sorted(nodes))

    @property
    def nodes(self) -> list[int]:
        """The node ids the run addresses (the pool's, or one per client)."""
        return list(self._pool) if self._pool is not None else sorted(self._to_client)

    def seat(self, cids: Iterable[int]) -> None:
        """Put the phase's clients `cids` on the pool's nodes, the i-th smallest id on the i-th node
        (a fixed roster is left as it is)."""
        if self._pool is None:
            return
        chosen = sorted(int(c) for c in cids)
        if len(chosen) > len(self._pool):
            raise ValueError(f"{len(chosen)} clients cannot be seated on a pool of {len(self._pool)} nodes")
        self._seat(dict(zip(chosen, self._pool)))

    def node(self, cid: int) -> int:
        """The node client `cid` is on (in a pool: for the current phase)."""
        try:
            return self._to_node[int(cid)]
        except KeyError:
            raise KeyError(f"client {cid} has no node (not seated this phase)") from None

    def client(self, node: int) -> int:
        """The client node `node` plays (in a pool: for the current phase)."""
        return self._to_client[node]

    def _seat(self, seats: Mapping[int, int]) -> None:
        self._to_node = {int(c): int(n) for c, n in seats.items()}
        self._to_client = {n: c for c, n in self._to_node.items()}
