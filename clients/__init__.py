"""The Flower ClientApp fedsim runs on every client, simulated or real (`clients.app:app`).

- `app`: the ClientApp's handlers (train, evaluate, query) and what a node keeps between rounds.
- `prune_and_tune`: pruning on the device during local training.
- `packing`: in a packed simulation, the hand-off of a client's training job to the run's shared
  trainer (`fedsim.model.packed`).
- `records`: reading the message's records.
"""
