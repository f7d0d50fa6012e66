"""What a run leaves on disk, and how runs are read back and compared.

- `rundir`: the run directory (scenario, metrics.parquet, events, checkpoints, final evaluation).
- `report`: per-round tables and the summary `fedsim report` prints.
- `stats`: paired bootstrap and t intervals over seeds; `comparison`: strategies side by side.
- `plots`: the PNG plots of runs and comparisons.
"""
