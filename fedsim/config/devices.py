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

Users add or override profiles with a TOML file of `[name]` tables (`load_profiles_file`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from fedsim.config.availability import AlwaysOn, Availability, Trace
from fedsim.config.errors import InputError, describe, read_toml


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
    source: str = Field("", description="Where the numbers come from.")


CATALOG: dict[str, DeviceProfile] = {
    "jetson-nano": DeviceProfile(
        train_tflops=0.12,
        memory_gb=2.5,
        uplink_mbps=10.0,
        downlink_mbps=25.0,
        source="NVIDIA Jetson Nano datasheet: 128-core Maxwell GPU, 472 GFLOPS fp16 peak, 4 GB LPDDR4 shared; "
        "effective ≈25% of peak; no onboard Wi-Fi (USB/M.2 802.11n-ac card, approx. 10/25 Mbps)",
    ),
    "jetson-tx2": DeviceProfile(
        train_tflops=0.40,
        memory_gb=6.5,
        uplink_mbps=30.0,
        downlink_mbps=60.0,
        source="NVIDIA Jetson TX2 datasheet: 256-core Pascal GPU, 1.33 TFLOPS fp16 peak, 8 GB LPDDR4 shared; "
        "effective ≈30% of peak; onboard 802.11ac 2x2 on a shared AP, approx. 30/60 Mbps",
    ),
    "jetson-xavier-nx": DeviceProfile(
        train_tflops=1.2,
        memory_gb=6.5,
        uplink_mbps=30.0,
        downlink_mbps=60.0,
        source="NVIDIA Jetson Xavier NX datasheet: 384-core Volta GPU with 48 Tensor Cores, 21 INT8 TOPS, approx. 6 "
        "TFLOPS fp16 tensor peak, 8 GB LPDDR4x shared; effective ≈20% of peak; 802.11ac M.2 card, approx. 30/60 Mbps",
    ),
    "jetson-agx-orin": DeviceProfile(
        train_tflops=8.5,
        memory_gb=56.0,
        uplink_mbps=60.0,
        downlink_mbps=120.0,
        source="NVIDIA Jetson AGX Orin 64GB datasheet: 2048-core Ampere GPU with 64 Tensor Cores, 275 INT8 TOPS "
        "(sparse), approx. 42.5 TFLOPS fp16 dense tensor peak, 64 GB LPDDR5 shared; effective ≈20% of peak; Wi-Fi 6, "
        "approx. 60/120 Mbps",
    ),
    "phone-midrange": DeviceProfile(
        train_tflops=0.03,
        memory_gb=2.0,
        uplink_mbps=8.0,
        downlink_mbps=30.0,
        source="Snapdragon 7-series class SoC (4x Cortex-A78 + 4x Cortex-A55): approx. 0.15 TFLOPS fp32 CPU peak, 6 "
        "GB RAM (≈2 GB app budget); CPU training ≈20% of peak; 4G LTE medians approx. 8/30 Mbps",
    ),
    "phone-highend": DeviceProfile(
        train_tflops=0.10,
        memory_gb=4.0,
        uplink_mbps=20.0,
        downlink_mbps=150.0,
        source="Snapdragon 8 Gen 2 class SoC (Adreno 740): approx. 2.5-3.5 TFLOPS "
        "fp32 GPU peak, 12 GB RAM (≈4 GB app budget); on-device training ≈4% of "
        "GPU peak (throttling, immature kernels); 5G medians approx. 20/150 Mbps",
    ),
    "laptop-cpu": DeviceProfile(
        train_tflops=0.16,
        memory_gb=10.0,
        uplink_mbps=20.0,
        downlink_mbps=100.0,
        source="8-core x86 laptop CPU (Ryzen 7 / Core i7 class), AVX2 2xFMA: approx. "
        "0.64 TFLOPS fp32 at ~2.5 GHz all-core; PyTorch CPU training ≈25% of peak; "
        "16 GB RAM (≈10 GB usable); home broadband over Wi-Fi approx. 20/100 Mbps",
    ),
    "workstation-gpu": DeviceProfile(
        train_tflops=58.0,
        memory_gb=22.0,
        uplink_mbps=500.0,
        downlink_mbps=900.0,
        source="NVIDIA GeForce RTX 4090 (Ada whitepaper): approx. 165 TFLOPS bf16 "
        "dense tensor peak with fp32 accumulate, 24 GB GDDR6X (≈22 GB after CUDA "
        "context); effective ≈35% of peak; wired gigabit LAN approx. 500/900 Mbps",
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
