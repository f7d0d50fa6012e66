"""Availability specs: when a device profile says its devices are online (`fedsim.fleet.availability`
evaluates them).

    always      online at every time of every round
    bernoulli   online in round r with probability p, independently per (client, round)
    diurnal     online for `on_fraction` of every `period_s`, from a per-client phase
    trace       online inside the client's windows read from the fleet's trace file
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class AlwaysOn(_Spec):
    kind: Literal["always"] = Field("always", description="Online at every time of every round.")


class Bernoulli(_Spec):
    kind: Literal["bernoulli"] = Field("bernoulli", description="Online in a round with probability p.")
    p: float = Field(
        ...,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="Probability of being online in a round, independent per (client, round).",
    )


class Diurnal(_Spec):
    kind: Literal["diurnal"] = Field(
        "diurnal", description="On for a fraction of every period, from a per-client random phase."
    )
    period_s: float = Field(
        86400.0,
        gt=0,
        allow_inf_nan=False,
        description="Length of one on/off cycle in simulated seconds (a day by default).",
    )
    on_fraction: float = Field(
        0.5, gt=0, le=1, allow_inf_nan=False, description="Share of each period the device is online."
    )


class Trace(_Spec):
    kind: Literal["trace"] = Field(
        "trace", description="Online inside the client's windows from the fleet's trace file."
    )


Availability = Annotated[AlwaysOn | Bernoulli | Diurnal | Trace, Field(discriminator="kind")]
KINDS = ("always", "bernoulli", "diurnal", "trace")
