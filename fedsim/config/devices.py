"""Device profiles: how fast a client trains, how much memory it has, how fast it talks.

The simulated clock charges a client FLOPs / (train_tflops · 10^12) seconds for local training and
bytes · 8 / (mbps · 10^6) seconds for each transfer. `train_tflops` is the *effective sustained*
training throughput (forward + backward, at the precision the device would train in), not the
marketing peak: peak × a utilisation that small-batch fine-tuning really reaches on that device.

Each catalog profile names its sources in `source`: the spec-sheet peak (≈: approximate), the
utilisation assumed and the link. The utilisations are estimates: ~25–30% of the fp16 CUDA-core
peak for the Pascal/Maxwell Jetsons, ~20% of the tensor-core peak for Volta/Ampere Jetsons (small
batches, shared memory bandwidth), ~20–25% of the CPU's fp32 FMA peak for PyTorch on a CPU, a few
percent of the mobile GPU peak for phones (thermal throttling, immature training kernels), ~35% of
the bf16 tensor peak for a desktop GPU. The FedSpine testbed (Jetson TX2, Xavier NX, AGX) is kept
in order: AGX Orin ≫ Xavier NX > TX2 > Nano.

Usable memory is what a training process can hold: shared CPU/GPU memory minus the OS and
desktop on Jetsons, the per-app budget Android leaves before killing a background app on phones,
RAM minus OS and browser on laptops, VRAM minus the CUDA context on the GPU. Bandwidths are
typical sustained figures (medians of public speed-test reports for 4G/5G and home broadband, a
shared access point for the Jetsons' Wi-Fi), uplink well below downlink except on wired links.

Energy (`fedsim.fleet.energy`). `train_watts` is the whole device's power while it trains: the
Jetsons' power-mode budget at the clocks `train_tflops` assumes (NVIDIA's module datasheets), the
SoC's sustained envelope on phones, TDP plus the rest of the system on the laptop, board power plus
host on the GPU box. `idle_watts` is what it draws online and idle (waiting for the round to end).
The radio figures are joules per MB (10^6 bytes) moved, from the linear power models of Huang et al.
(MobiSys 2012, "A Close Examination of Performance and Power Characteristics of 4G LTE Networks",
Table 3: P = α·rate + β; LTE α_up = 438.39, α_down = 51.97 mW/Mbit/s, β = 1288.04 mW; Wi-Fi 283.17,
137.01, 132.86) evaluated at the profile's link rate: J/MB = 8·(α + β/rate). A `battery` (phones,
laptop) drains by that energy and charges in daily windows; the others are mains-powered. Figures
marked ≈ are approximations, not measurements of that device.

Users add or override profiles with a TOML file of `[name]` tables (`load_profiles_file`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from fedsim.config.availability import AlwaysOn, Availability, Trace
from fedsim.config.errors import InputError, describe, read_toml

DAY_H = 24.0
POWER_FIGURES = ("train_watts", "idle_watts", "radio_j_per_mb_up", "radio_j_per_mb_down")


class ChargeWindow(BaseModel):
    """A daily window in which the device is plugged in; t = 0 of simulated time is midnight."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    start_h: float = Field(..., ge=0, le=DAY_H, allow_inf_nan=False, description="Start, hours into the day.")
    end_h: float = Field(
        ..., ge=0, le=DAY_H, allow_inf_nan=False, description="End, hours into the day (before start: over midnight)."
    )
    watts: float = Field(..., gt=0, allow_inf_nan=False, description="Charging power into the battery, W.")

    @model_validator(mode="after")
    def _not_empty(self) -> ChargeWindow:
        if not self.segments():
            raise ValueError(f"the window is empty: start_h = {self.start_h}, end_h = {self.end_h}")
        return self

    def segments(self) -> list[tuple[float, float]]:
        """The window as [a, b) hour intervals within [0, 24], a < b (two when it runs over midnight)."""
        if self.start_h < self.end_h:
            return [(self.start_h, self.end_h)]
        if self.start_h == self.end_h:  # empty, not a whole day (that is 0 to 24)
            return []
        return [(a, b) for a, b in ((self.start_h, DAY_H), (0.0, self.end_h)) if a < b]


class Battery(BaseModel):
    """A device's battery: drained by the energy it spends on the federation, charged in its windows."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    capacity_wh: float = Field(..., gt=0, allow_inf_nan=False, description="Usable capacity, Wh.")
    initial_charge: float = Field(
        1.0, ge=0, le=1, allow_inf_nan=False, description="Charge at t = 0, share of capacity."
    )
    threshold: float = Field(
        0.2, ge=0, le=1, allow_inf_nan=False, description="Takes part only while its charge is above this share."
    )
    charging: tuple[ChargeWindow, ...] = Field((), description="Daily charging windows (none: never charges).")

    @field_validator("charging", mode="before")
    @classmethod
    def _list_to_tuple(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value  # TOML gives a list

    @model_validator(mode="after")
    def _disjoint_windows(self) -> Battery:
        parts = [(i, a, b) for i, w in enumerate(self.charging) for a, b in w.segments()]
        clashes = sorted({(i, j) for i, a, b in parts for j, c, d in parts if i < j and a < d and c < b})
        if clashes:
            pairs = ", ".join(f"{i} and {j}" for i, j in clashes)
            raise ValueError(f"charging windows must not overlap: windows {pairs} do")
        return self


class DeviceProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    train_tflops: float = Field(
        ...,
        gt=0,
        allow_inf_nan=False,
        description="Effective sustained training throughput in TFLOP/s (not the marketing peak).",
    )
    memory_gb: float = Field(..., gt=0, allow_inf_nan=False, description="Memory usable for training, GiB.")
    uplink_mbps: float = Field(..., gt=0, allow_inf_nan=False, description="Device → server bandwidth, Mbit/s.")
    downlink_mbps: float = Field(..., gt=0, allow_inf_nan=False, description="Server → device bandwidth, Mbit/s.")
    availability: Availability = Field(
        AlwaysOn(), description="When the device is online (kind = always | bernoulli | diurnal | trace)."
    )
    train_watts: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="Whole-device power while training, W (None: unknown)."
    )
    idle_watts: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="Whole-device power while online and idle, W (None: unknown)."
    )
    radio_j_per_mb_up: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="Energy to send 1 MB (10^6 bytes) on its uplink, J."
    )
    radio_j_per_mb_down: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="Energy to receive 1 MB (10^6 bytes) on its downlink, J."
    )
    battery: Battery | None = Field(None, description="Its battery (None: mains-powered, never runs out).")
    source: str = Field("", description="Where the numbers come from.")

    @model_validator(mode="after")
    def _battery_has_figures(self) -> DeviceProfile:
        missing = [name for name in POWER_FIGURES if getattr(self, name) is None]
        if self.battery is not None and missing:
            raise ValueError(f"a device with a `battery` needs every power figure to drain it; missing {missing}")
        return self


CATALOG: dict[str, DeviceProfile] = {
    "jetson-nano": DeviceProfile(
        train_tflops=0.12,
        memory_gb=2.5,
        uplink_mbps=10.0,
        downlink_mbps=25.0,
        train_watts=10.0,
        idle_watts=1.5,
        radio_j_per_mb_up=2.37,
        radio_j_per_mb_down=1.14,
        source="NVIDIA Jetson Nano datasheet: 128-core Maxwell GPU, 472 GFLOPS fp16 peak, 4 GB LPDDR4 shared; "
        "effective ≈25% of peak; no onboard Wi-Fi (USB/M.2 802.11n-ac card, approx. 10/25 Mbps)"
        "; power: 10 W MAXN mode (NVIDIA Jetson Nano module datasheet: 5 W / 10 W modes), idle ≈1.5 W; Wi-Fi radio "
        "≈2.37/1.14 J/MB (Huang et al. 2012 Wi-Fi model at 10/25 Mbps); mains-powered",
    ),
    "jetson-tx2": DeviceProfile(
        train_tflops=0.40,
        memory_gb=6.5,
        uplink_mbps=30.0,
        downlink_mbps=60.0,
        train_watts=15.0,
        idle_watts=2.0,
        radio_j_per_mb_up=2.30,
        radio_j_per_mb_down=1.11,
        source="NVIDIA Jetson TX2 datasheet: 256-core Pascal GPU, 1.33 TFLOPS fp16 peak, 8 GB LPDDR4 shared; "
        "effective ≈30% of peak; onboard 802.11ac 2x2 on a shared AP, approx. 30/60 Mbps"
        "; power: 15 W Max-P mode (NVIDIA Jetson TX2 module datasheet: 7.5 W Max-Q / 15 W Max-P), idle ≈2 W; Wi-Fi "
        "radio ≈2.30/1.11 J/MB (Huang et al. 2012 Wi-Fi model at 30/60 Mbps); mains-powered",
    ),
    "jetson-xavier-nx": DeviceProfile(
        train_tflops=1.2,
        memory_gb=6.5,
        uplink_mbps=30.0,
        downlink_mbps=60.0,
        train_watts=20.0,
        idle_watts=2.5,
        radio_j_per_mb_up=2.30,
        radio_j_per_mb_down=1.11,
        source="NVIDIA Jetson Xavier NX datasheet: 384-core Volta GPU with 48 Tensor Cores, 21 INT8 TOPS, approx. 6 "
        "TFLOPS fp16 tensor peak, 8 GB LPDDR4x shared; effective ≈20% of peak; 802.11ac M.2 card, approx. 30/60 Mbps"
        "; power: 20 W mode (NVIDIA Jetson Xavier NX module datasheet: 10 W / 15 W / 20 W modes), idle ≈2.5 W; Wi-Fi "
        "radio ≈2.30/1.11 J/MB (Huang et al. 2012 Wi-Fi model at 30/60 Mbps); mains-powered",
    ),
    "jetson-agx-orin": DeviceProfile(
        train_tflops=8.5,
        memory_gb=56.0,
        uplink_mbps=60.0,
        downlink_mbps=120.0,
        train_watts=60.0,
        idle_watts=9.0,
        radio_j_per_mb_up=2.28,
        radio_j_per_mb_down=1.10,
        source="NVIDIA Jetson AGX Orin 64GB datasheet: 2048-core Ampere GPU with 64 Tensor Cores, 275 INT8 TOPS "
        "(sparse), approx. 42.5 TFLOPS fp16 dense tensor peak, 64 GB LPDDR5 shared; effective ≈20% of peak; Wi-Fi 6, "
        "approx. 60/120 Mbps"
        "; power: 60 W MAXN (NVIDIA Jetson AGX Orin series datasheet: 15 W to 60 W modes for the 64GB module), idle "
        "≈9 W; Wi-Fi radio ≈2.28/1.10 J/MB (Huang et al. 2012 Wi-Fi model at 60/120 Mbps); mains-powered",
    ),
    "phone-midrange": DeviceProfile(
        train_tflops=0.03,
        memory_gb=2.0,
        uplink_mbps=8.0,
        downlink_mbps=30.0,
        train_watts=4.0,
        idle_watts=0.5,
        radio_j_per_mb_up=4.80,
        radio_j_per_mb_down=0.76,
        battery=Battery(capacity_wh=19.0, charging=(ChargeWindow(start_h=23.0, end_h=7.0, watts=10.0),)),
        source="Snapdragon 7-series class SoC (4x Cortex-A78 + 4x Cortex-A55): approx. 0.15 TFLOPS fp32 CPU peak, 6 "
        "GB RAM (≈2 GB app budget); CPU training ≈20% of peak; 4G LTE medians approx. 8/30 Mbps"
        "; power: ≈4 W sustained all-core CPU load (phone SoC thermal envelope ≈3-5 W), idle ≈0.5 W (awake, screen "
        "off); LTE radio ≈4.80/0.76 J/MB (Huang et al. 2012 LTE model at 8/30 Mbps); battery 5000 mAh × 3.85 V ≈19 "
        "Wh, charged overnight 23:00-07:00 at ≈10 W",
    ),
    "phone-highend": DeviceProfile(
        train_tflops=0.10,
        memory_gb=4.0,
        uplink_mbps=20.0,
        downlink_mbps=150.0,
        train_watts=6.0,
        idle_watts=0.6,
        radio_j_per_mb_up=4.02,
        radio_j_per_mb_down=0.48,
        battery=Battery(capacity_wh=18.0, charging=(ChargeWindow(start_h=23.0, end_h=7.0, watts=15.0),)),
        source="Snapdragon 8 Gen 2 class SoC (Adreno 740): approx. 2.5-3.5 TFLOPS "
        "fp32 GPU peak, 12 GB RAM (≈4 GB app budget); on-device training ≈4% of "
        "GPU peak (throttling, immature kernels); 5G medians approx. 20/150 Mbps"
        "; power: ≈6 W sustained GPU load (Snapdragon 8 Gen 2 class, throttled), idle ≈0.6 W; 5G radio ≈4.02/0.48 "
        "J/MB (Huang et al. 2012 LTE model at 20/150 Mbps: 5G NR draws more current than LTE but at these rates is "
        "about as efficient per bit, Narayanan et al., SIGCOMM 2021); battery 4700 mAh × 3.88 V ≈18 Wh (Galaxy S23+ "
        "class), charged overnight 23:00-07:00 at ≈15 W",
    ),
    "laptop-cpu": DeviceProfile(
        train_tflops=0.16,
        memory_gb=10.0,
        uplink_mbps=20.0,
        downlink_mbps=100.0,
        train_watts=55.0,
        idle_watts=8.0,
        radio_j_per_mb_up=2.32,
        radio_j_per_mb_down=1.11,
        battery=Battery(capacity_wh=60.0, charging=(ChargeWindow(start_h=9.0, end_h=17.0, watts=45.0),)),
        source="8-core x86 laptop CPU (Ryzen 7 / Core i7 class), AVX2 2xFMA: approx. "
        "0.64 TFLOPS fp32 at ~2.5 GHz all-core; PyTorch CPU training ≈25% of peak; "
        "16 GB RAM (≈10 GB usable); home broadband over Wi-Fi approx. 20/100 Mbps"
        "; power: 45 W CPU TDP (Ryzen 7 5800H / Core i7-11800H class) + ≈10 W rest of system, idle ≈8 W; Wi-Fi radio "
        "≈2.32/1.11 J/MB (Huang et al. 2012 Wi-Fi model at 20/100 Mbps); battery ≈60 Wh, plugged in 09:00-17:00 "
        "charging at ≈45 W",
    ),
    "workstation-gpu": DeviceProfile(
        train_tflops=58.0,
        memory_gb=22.0,
        uplink_mbps=500.0,
        downlink_mbps=900.0,
        train_watts=550.0,
        idle_watts=60.0,
        radio_j_per_mb_up=0.008,
        radio_j_per_mb_down=0.0044,
        source="NVIDIA GeForce RTX 4090 (Ada whitepaper): approx. 165 TFLOPS bf16 "
        "dense tensor peak with fp32 accumulate, 24 GB GDDR6X (≈22 GB after CUDA "
        "context); effective ≈35% of peak; wired gigabit LAN approx. 500/900 Mbps"
        "; power: 450 W RTX 4090 total board power (NVIDIA spec) + ≈100 W host, idle ≈60 W; wired ≈0.5 W gigabit PHY "
        "(IEEE 802.3az, Christensen et al., IEEE Commun. Mag. 2010) at 500/900 Mbps ≈0.008/0.0044 J/MB; mains-powered",
    ),
}


class ProfilesError(InputError):
    """A device profiles file that cannot be used; `problems` names each dotted path."""

    what = "device profiles file"


_PROFILES = TypeAdapter(dict[str, DeviceProfile])


def load_profiles_file(path: str | Path) -> dict[str, DeviceProfile]:
    """Read a TOML file of `[name]` tables, each a DeviceProfile (`[name.availability]` a sub-table);
    every problem is reported at once, by dotted path ("`my-board.uplink_mbps` must be greater
    than 0, got 0")."""
    raw = read_toml(Path(path), ProfilesError)
    try:
        return _PROFILES.validate_python(raw)
    except ValidationError as exc:
        raise ProfilesError(str(path), [_describe(err) for err in exc.errors()]) from None


def _describe(err: Mapping[str, Any]) -> str:
    """One line per pydantic error (`fedsim.config.errors.describe`); a profile that is not a table at
    all gets its own wording."""
    if err["type"] == "model_type" and len(err["loc"]) == 1:
        return f"`{err['loc'][0]}` must be a table of profile fields, got {err['input']!r}"
    return "\n".join(describe(err))


def resolve_profile(name: str, custom: Mapping[str, DeviceProfile]) -> DeviceProfile:
    """The profile called `name`: the user's (`custom`) first, then the catalog's."""
    if name in custom:
        return custom[name]
    if name in CATALOG:
        return CATALOG[name]
    raise ValueError(f"unknown device profile {name!r}; known: {', '.join(sorted({*CATALOG, *custom}))}")


def trace_profiles(rows: Sequence[Mapping[str, Any]], custom: Mapping[str, DeviceProfile]) -> list[DeviceProfile]:
    """One profile per trace row (rows from `availability.load_trace`, in client order): the named
    profile with the row's figures overriding it, online as the trace says (`Trace()`)."""
    profiles, problems = [], []
    for row in rows:
        try:
            base = resolve_profile(row["profile"], custom)
        except ValueError as exc:
            problems.append(f"line {row['line']}: {exc}")
            continue
        fields = {**base.model_dump(exclude={"availability", "source"}), **row["overrides"]}
        note = (
            f"; overridden by trace line {row['line']}: {', '.join(sorted(row['overrides']))}"
            if row["overrides"]
            else ""
        )
        profiles.append(DeviceProfile(**fields, availability=Trace(), source=base.source + note))
    if problems:
        raise ValueError("trace names unknown device profiles:\n" + "\n".join(f"  - {p}" for p in problems))
    return profiles
