"""The examples and who holds them.

- `tasks`: the built-in synthetic tasks (seeded generators).
- `partitions`: load a task, file or hub set; the server's held-out set; flwr-datasets partitions
  into one train/test split per client.
"""
