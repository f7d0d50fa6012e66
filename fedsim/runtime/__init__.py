"""Where the server and clients run.

- `simulation`: Flower's simulation engine (Ray) with virtual clients, one or several runs.
- `server_app`: the `ServerApp` for `flwr run` and real deployments.
- `deploy`: a real deployment: certificates, SuperLink, SuperNodes, the run.
- `compare`: `fedsim compare`, one scenario under several strategies and seeds.
"""
