"""The fleet: which device every client is, how fast, how much memory, how well connected, and
when it is online — as per-client numpy arrays, so 10,000 clients cost a few arrays, not
10,000 objects.

Client i is the i-th device in group order (or trace row i) and holds data partition i.
Two devices of one profile are not identical: speed, uplink and downlink are each multiplied by
a per-client factor exp(σ·z), z ~ N(0, 1) drawn from the scenario seed (σ = `fleet.jitter`).
Power figures and batteries are the profile's, unjittered (`fedsim.fleet.energy`; NaN: not given).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedsim.config.devices import CATALOG, DeviceProfile, load_profiles_file, resolve_profile, trace_profiles
from fedsim.config.scenario import FleetConfig, Scenario
from fedsim.fleet.availability import FleetAvailability, Windows, load_trace
from fedsim.fleet.energy import BatterySpec
from fedsim.seeding import derive_seed

GIB = 1024**3


@dataclass(frozen=True)
class Fleet:
    device: np.ndarray  # (N,) profile name of each client
    flops: np.ndarray  # (N,) effective training FLOP/s
    memory: np.ndarray  # (N,) bytes usable for training
    up_bps: np.ndarray  # (N,) uplink, bit/s
    down_bps: np.ndarray  # (N,) downlink, bit/s
    availability: FleetAvailability
    train_watts: np.ndarray  # (N,) W while training (NaN: not given)
    idle_watts: np.ndarray  # (N,) W online and idle
    radio_j_per_mb_up: np.ndarray  # (N,) J per MB sent
    radio_j_per_mb_down: np.ndarray  # (N,) J per MB received
    battery: BatterySpec  # per-client batteries (capacity NaN: mains-powered)

    @property
    def size(self) -> int:
        return len(self.device)


def per_client(
    fleet: Fleet, default: float, by_profile: Mapping[str, float], by_client: Mapping[str, float], dtype: type
) -> np.ndarray:
    """(N,) a per-client setting: `by_client[str(id)]`, else `by_profile[profile]`, else `default`
    (the scenario's lora.*_ranks and pruning.*_ratios tables)."""
    values: np.ndarray = np.array([by_profile.get(str(d), default) for d in fleet.device], dtype=dtype)
    for cid, v in by_client.items():
        values[int(cid)] = v
    return values


def _custom_profiles(cfg: FleetConfig) -> dict[str, DeviceProfile]:
    from_file = load_profiles_file(cfg.profiles_file) if cfg.profiles_file else {}
    return {**from_file, **cfg.profiles}


def fleet_profiles(cfg: FleetConfig, num_clients: int) -> tuple[list[str], list[DeviceProfile], Windows | None]:
    """(profile name per client, profile per client, trace windows or None)."""
    custom = _custom_profiles(cfg)
    if cfg.trace:
        rows, windows = load_trace(cfg.trace, known_profiles={*CATALOG, *custom})
        return [r["profile"] for r in rows], trace_profiles(rows, custom), windows
    groups = [(g.profile, g.count, g.availability) for g in cfg.groups] or [(cfg.default_profile, num_clients, None)]
    names, profiles = [], []
    for name, count, availability in groups:
        profile = resolve_profile(name, custom)
        if availability is not None:
            profile = profile.model_copy(update={"availability": availability})
        names += [name] * count
        profiles += [profile] * count
    return names, profiles, None


def build_fleet(scenario: Scenario) -> Fleet:
    """The scenario's fleet, jittered with its seed; raises ValueError naming what is wrong."""
    cfg = scenario.fleet
    names, profiles, windows = fleet_profiles(cfg, scenario.clients.num_clients)
    if len(names) != scenario.clients.num_clients:
        raise ValueError(
            f"`clients.num_clients` ({scenario.clients.num_clients}) must equal the fleet's size ({len(names)} devices)"
        )
    n = len(names)
    rng = np.random.default_rng(derive_seed(scenario.seed, "fleet-jitter"))
    jitter = np.exp(cfg.jitter * rng.standard_normal((3, n)))  # speed, uplink, downlink
    column = lambda field: np.array([getattr(p, field) for p in profiles], dtype=float)  # noqa: E731
    return Fleet(
        device=np.array(names, dtype=object),
        flops=column("train_tflops") * 1e12 * jitter[0],
        memory=column("memory_gb") * GIB,
        up_bps=column("uplink_mbps") * 1e6 * jitter[1],
        down_bps=column("downlink_mbps") * 1e6 * jitter[2],
        availability=FleetAvailability(
            [p.availability for p in profiles], derive_seed(scenario.seed, "availability"), windows
        ),
        train_watts=column("train_watts"),  # a None figure becomes NaN
        idle_watts=column("idle_watts"),
        radio_j_per_mb_up=column("radio_j_per_mb_up"),
        radio_j_per_mb_down=column("radio_j_per_mb_down"),
        battery=BatterySpec.of([p.battery for p in profiles]),
    )


def describe(fleet: Fleet) -> str:
    """'30 jetson-tx2, 40 jetson-xavier-nx, 10 jetson-agx-orin' (in first-appearance order)."""
    names, counts = np.unique(fleet.device.astype(str), return_counts=True)
    first = {n: int(np.flatnonzero(fleet.device == n)[0]) for n in names}
    return ", ".join(f"{c} {n}" for n, c in sorted(zip(names, counts), key=lambda nc: first[nc[0]]))


__all__ = ["GIB", "Fleet", "build_fleet", "describe", "fleet_profiles"]
