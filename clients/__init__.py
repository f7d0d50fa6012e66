"""The Flower ClientApp fedsim runs on every client, simulated or real (`clients.app:app`)."""
