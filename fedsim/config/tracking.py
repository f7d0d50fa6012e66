"""The `[tracking]` section: which experiment trackers a run logs to (`fedsim.results.tracking`).

A section of the scenario (`fedsim.config.scenario`), in its style: a pydantic model that forbids
unknown keys, is frozen and strict, and carries a help text per field; the scenario loader reports
its problems by dotted path (`tracking.backends.0`). Nothing here imports a tracker: whether one is
installed is checked before the run (`fedsim.results.tracking.missing_trackers`).

    [tracking]
    backends = ["tensorboard", "mlflow", "wandb"]
    mlflow_uri = "sqlite:///runs/mlflow.db"     # default: sqlite:///<out>/mlflow.db, beside the run directories
    wandb_mode = "offline"                      # default; "online" needs `wandb login`
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from fedsim.config.section import Section

Backend = Literal["tensorboard", "mlflow", "wandb"]


class TrackingConfig(Section):
    """Experiment trackers the server logs each round's metrics, the scenario and the final adapter to."""

    backends: tuple[Backend, ...] = Field(
        (), description="Trackers to log to: tensorboard, mlflow, wandb (each an optional extra of fedsim)."
    )
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI; None: a SQLite store, sqlite:///<out>/mlflow.db, beside the runs."
    )
    mlflow_experiment: str = Field("fedsim", min_length=1, description="MLflow experiment the run is logged under.")
    wandb_project: str = Field("fedsim", min_length=1, description="W&B project.")
    wandb_entity: str | None = Field(None, description="W&B entity (user or team); None: the account's default.")
    wandb_mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="W&B mode: offline writes <run>/wandb/ only (`wandb sync` uploads it later)."
    )

    @field_validator("backends", mode="before")
    @classmethod
    def _backends_to_tuple(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    @field_validator("backends")
    @classmethod
    def _once_each(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        twice = sorted({b for b in value if value.count(b) > 1})
        if twice:
            raise ValueError(f"names {', '.join(map(repr, twice))} more than once")
        return value
