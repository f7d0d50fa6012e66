"""The base of every scenario section: unknown keys refused, frozen, strict types.

Each section of a scenario (`fedsim.config.scenario`, `privacy`, `tracking`, `controller`,
`participation`) derives from `Section`, so a misspelt key or a value of the wrong type is
refused with its dotted path, and a validated scenario cannot change under the run.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A scenario section: extra keys forbidden, frozen, strict."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
