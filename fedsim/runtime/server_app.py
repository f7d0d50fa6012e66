"""The ServerApp that `flwr run .` starts (see `[tool.flwr.app]` in pyproject.toml).

It reads `scenario` (a path relative to the app folder), `overrides` ("a.b=1;c.d=x") and `out`
from the run config, and runs the same `run_federation` loop as `fedsim run`.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsim.config.scenario import load_scenario
from fedsim.results.rundir import RunDir, RunExistsError
from fedsim.server.federation import run_federation
from fedsim.server.preflight import preflight

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    root = Path(__file__).resolve().parents[2]  # fedsim/runtime/ → the project
    scenario_path = Path(str(cfg.get("scenario", "scenarios/tiny.toml")))
    if not scenario_path.is_absolute():
        scenario_path = root / scenario_path
    overrides = [o for o in str(cfg.get("overrides", "")).split(";") if o.strip()]
    scenario = load_scenario(scenario_path, overrides)
    preflight(scenario, str(scenario_path))
    out = Path(str(cfg.get("out", "runs")))
    try:
        run_dir = RunDir.create(out if out.is_absolute() else Path.cwd() / out, scenario)
    except RunExistsError as err:  # the run config, not `fedsim run`'s flags, names it here
        raise FileExistsError(
            f"run directory {err.path} already exists; choose another with the run config's `out`, or "
            '`overrides="name=NEW_NAME"` (`fedsim deploy run`: --out DIR or --set name=NEW_NAME), or remove it'
        ) from None
    run_federation(grid, scenario, run_dir)
