"""fedsim: simulate federated LoRA fine-tuning of a language model on a fleet of devices.

Its packages follow one round's flow (docs/design.md, "Where things live"): `config` (the
scenario), `fleet` (devices, availability, clock, costs), `model` and `data`, `compression`,
`pruning`, `controllers`, `server` (the round loop), `runtime` (simulation and deployment),
`results` (run directories, reports, statistics), with `protocol` (message keys) and `cli`.
"""

from fedsim.config.scenario import Scenario, ScenarioError, load_scenario

__all__ = ["Scenario", "ScenarioError", "load_scenario"]
