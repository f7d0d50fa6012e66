"""What a run is asked to do, checked before anything runs; torch-free.

- `scenario`: the scenario schema (`Scenario` and its sections), loading, overrides, cross-checks.
- `controller`: the bandit controller's section (`ControllerConfig`, `RewardConfig`).
- `privacy`: the differential privacy section (`PrivacyConfig`) and the strategies that refuse it (`DP_REFUSED`).
- `devices`: device profiles and the built-in catalog; `availability`: when a profile is online.
- `names`: every name a scenario may use (models, tasks, strategies, controllers, scores).
- `sources`: cheap checks that a model name and a data source resolve (a data file's first bytes).
- `errors`: `InputError`, one error shape for every input, all problems at once.
"""
