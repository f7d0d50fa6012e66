"""The simulated fleet: who the devices are, when they are online, what a round costs them.

- `fleet`: `build_fleet` turns a scenario into per-client arrays (profile, FLOP/s, memory, links).
- `availability`: online/offline per (client, time), dropout draws, trace files.
- `costs`: FLOPs and memory of a training step from the model's shape, rank and keep.
- `clock`: payload bytes, link seconds, the first finishers and the round's duration.
- `ranks`: each client's LoRA rank; `keeps`: each client's pruned model (`PruneBook`).
- `energy`: joules of a client's round from its device's power figures, and battery charge.
"""
