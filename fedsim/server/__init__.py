"""The server: the round loop and what it needs.

- `federation`: `run_federation`, the loop over rounds (discover clients, round, evaluate, record).
- `rounds`: one round in named stages (sample → plan → screen → configure → send → time →
  aggregate → record) and the federated evaluation after it.
- `roster`: which node plays which client (a node per client, or a pool seated phase by phase).
- `packs`: which clients of a round train together in a packed simulation.
- `replies`: each reply validated on its own before aggregation.
- `estimates`: what a client's round is expected to cost; `central`: the server's model and
  held-out evaluation; `control`: the bandit controller hooked into the round.
- `deployed`: the fleet's pruned models scored each round; `export`: a device's deployable model.
- `resume`: where an interrupted run picks up; `preflight`: checks that need more than the schema
  (fleet files, the data read whole and partitioned, the model's shape), before anything is written.
"""
