"""fedsim: simulate federated LoRA fine-tuning of a language model on a fleet of devices.

The engine: scenarios (`scenario`), models (`models`), tasks and partitions (`tasks`, `data`),
local training (`training`), adapters (`adapter`), the fleet and its clock (`devices`,
`availability`, `fleet`, `costs`, `clock`), compression (`compression`), the server loop
(`server`, `rounds`) and the messages it exchanges with the ClientApp (`protocol`), run
directories (`rundir`, `report`), comparisons of runs (`compare`, `comparison`, `stats`) and the
CLI (`cli`).
"""

from fedsim.config.scenario import Scenario, ScenarioError, load_scenario

__all__ = ["Scenario", "ScenarioError", "load_scenario"]
