"""Device profiles: a sane catalog with sourced speed and power figures, user files that override it,
errors by file and dotted path."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from fedsim.config.availability import AlwaysOn, Bernoulli, Diurnal, Trace
from fedsim.config.devices import (
    CATALOG,
    Battery,
    ChargeWindow,
    DeviceProfile,
    ProfilesError,
    load_profiles_file,
    resolve_profile,
    trace_profiles,
)
from fedsim.config.scenario import ScenarioError, load_scenario
from fedsim.fleet.availability import TRACE_FIGURES, load_trace

ROOT = Path(__file__).resolve().parents[3]
REQUIRED = [
    "jetson-nano",
    "jetson-tx2",
    "jetson-xavier-nx",
    "jetson-agx-orin",
    "phone-midrange",
    "phone-highend",
    "laptop-cpu",
    "workstation-gpu",
]
GOOD = {"train_tflops": 0.5, "memory_gb": 4.0, "uplink_mbps": 10.0, "downlink_mbps": 50.0}


@pytest.mark.parametrize("name", REQUIRED)
def test_catalog_entry_is_valid_and_cited(name: str) -> None:
    profile = CATALOG[name]
    assert DeviceProfile.model_validate(profile.model_dump()) == profile  # survives re-validation
    assert profile.uplink_mbps <= profile.downlink_mbps
    assert "peak" in profile.source and any(ch.isdigit() for ch in profile.source)


def test_catalog_speeds_are_ordered() -> None:
    tflops = {name: p.train_tflops for name, p in CATALOG.items()}
    assert tflops["jetson-agx-orin"] >= 4 * tflops["jetson-xavier-nx"]  # ≫
    assert tflops["jetson-xavier-nx"] > tflops["jetson-tx2"] > tflops["jetson-nano"]
    assert tflops["phone-midrange"] < tflops["phone-highend"] < tflops["laptop-cpu"] < tflops["jetson-tx2"]
    assert max(tflops, key=tflops.__getitem__) == "workstation-gpu"
    assert (
        CATALOG["jetson-agx-orin"].memory_gb > CATALOG["jetson-xavier-nx"].memory_gb >= CATALOG["jetson-nano"].memory_gb
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"uplink_mbps": 0.0},
        {"downlink_mbps": -5.0},
        {"train_tflops": 0},
        {"memory_gb": float("nan")},
        {"uplink_mbps": float("inf")},
        {"train_tflops": "fast"},
        {"cores": 4},
        {"availability": {"kind": "sometimes"}},
        {"availability": {"kind": "bernoulli", "p": 0.0}},
    ],
)
def test_bad_profile_values_are_refused(bad: dict) -> None:
    with pytest.raises(ValidationError):
        DeviceProfile.model_validate({**GOOD, **bad})


def test_profile_takes_availability_specs() -> None:
    profile = DeviceProfile.model_validate({**GOOD, "availability": {"kind": "diurnal", "on_fraction": 0.25}})
    assert profile.availability == Diurnal(on_fraction=0.25)
    assert DeviceProfile(**GOOD).availability == AlwaysOn()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "devices.toml"
    path.write_text(text)
    return path


def test_profiles_file_overrides_the_catalog(tmp_path: Path) -> None:
    text = """
[jetson-tx2]
train_tflops = 0.3
memory_gb = 7
uplink_mbps = 5
downlink_mbps = 20

[my-board]
train_tflops = 2.0
memory_gb = 16.0
uplink_mbps = 100.0
downlink_mbps = 100.0
source = "our lab's measurement"
availability = { kind = "bernoulli", p = 0.8 }
"""
    custom = load_profiles_file(write(tmp_path, text))
    assert resolve_profile("jetson-tx2", custom).train_tflops == 0.3
    assert resolve_profile("my-board", custom).availability == Bernoulli(p=0.8)
    assert resolve_profile("jetson-nano", custom) is CATALOG["jetson-nano"]
    assert CATALOG["jetson-tx2"].train_tflops == 0.40  # the catalog itself is untouched


BAD_FILES = [
    (
        "zero bandwidth",
        "[b]\ntrain_tflops = 1\nmemory_gb = 1\nuplink_mbps = 0\ndownlink_mbps = 1\n",
        "`b.uplink_mbps` must be greater than 0, got 0",
    ),
    (
        "unknown key",
        '[b]\ntrain_tflops = 1\nmemory_gb = 1\nuplink_mbps = 1\ndownlink_mbps = 1\ngpu = "yes"\n',
        "`b.gpu` is not a known key",
    ),
    ("missing field", "[b]\ntrain_tflops = 1\nmemory_gb = 1\nuplink_mbps = 1\n", "`b.downlink_mbps` is required"),
    (
        "wrong type",
        '[b]\ntrain_tflops = "fast"\nmemory_gb = 1\nuplink_mbps = 1\ndownlink_mbps = 1\n',
        "`b.train_tflops` must be a valid number, got 'fast'",
    ),
    (
        "bad availability",
        "[b]\ntrain_tflops = 1\nmemory_gb = 1\nuplink_mbps = 1\ndownlink_mbps = 1\n[b.availability]\nkind = "
        '"bernoulli"\np = 1.5\n',
        "`b.availability.p` must be less than or equal to 1, got 1.5",
    ),
    ("not a table", "b = 3\n", "`b` must be a table of profile fields, got 3"),
    ("invalid toml", "[b\n", "not valid TOML"),
]


@pytest.mark.parametrize(("case", "text", "expected"), BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_profiles_file_names_file_and_dotted_path(tmp_path: Path, case: str, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ProfilesError) as info:
        load_profiles_file(path)
    assert str(path) in str(info.value)
    assert any(expected in p for p in info.value.problems), info.value.problems


def test_profiles_file_reports_every_problem_at_once(tmp_path: Path) -> None:
    text = "[a]\ntrain_tflops = 0\nmemory_gb = 1\nuplink_mbps = 1\ndownlink_mbps = -1\n[b]\nmemory_gb = 1\n"
    with pytest.raises(ProfilesError) as info:
        load_profiles_file(write(tmp_path, text))
    assert len(info.value.problems) == 5  # a: 2 bad values; b: 3 missing fields


def test_missing_profiles_file(tmp_path: Path) -> None:
    with pytest.raises(ProfilesError, match="file not found"):
        load_profiles_file(tmp_path / "nope.toml")


def test_unknown_profile_lists_known_names() -> None:
    custom = {"my-board": DeviceProfile(**GOOD)}
    with pytest.raises(ValueError, match="unknown device profile 'toaster'; known: .*jetson-nano.*my-board"):
        resolve_profile("toaster", custom)


def test_trace_figures_are_profile_fields() -> None:
    assert set(TRACE_FIGURES) <= set(DeviceProfile.model_fields)


def test_trace_profiles_apply_row_overrides(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("client_id,profile,windows,uplink_mbps\n0,phone-midrange,0-10,2.5\n1,my-board,,\n")
    rows, _ = load_trace(path)
    profiles = trace_profiles(rows, {"my-board": DeviceProfile(**GOOD)})
    assert profiles[0].uplink_mbps == 2.5 and profiles[0].train_tflops == CATALOG["phone-midrange"].train_tflops
    assert "line 2" in profiles[0].source
    assert profiles[1] == DeviceProfile(**GOOD, availability=Trace())
    with pytest.raises(ValueError, match="line 3: unknown device profile 'my-board'"):
        trace_profiles(rows, {})


def test_shipped_trace_uses_catalog_profiles() -> None:
    rows, windows = load_trace(ROOT / "scenarios" / "traces" / "campus-40.csv", known_profiles=CATALOG)
    profiles = trace_profiles(rows, {})
    assert len(profiles) == windows.num_clients == 40
    assert all(p.availability == Trace() for p in profiles)


# --- power figures and batteries --------------------------------------------------------------

POWER = {"train_watts": 5.0, "idle_watts": 0.5, "radio_j_per_mb_up": 4.0, "radio_j_per_mb_down": 0.8}
MAINS = {"jetson-nano", "jetson-tx2", "jetson-xavier-nx", "jetson-agx-orin", "workstation-gpu"}


@pytest.mark.parametrize("name", REQUIRED)
def test_catalog_entry_has_sourced_power_figures(name: str) -> None:
    profile = CATALOG[name]
    assert all(getattr(profile, field) > 0 for field in POWER)
    assert profile.idle_watts < profile.train_watts  # type: ignore[operator]
    assert profile.radio_j_per_mb_down < profile.radio_j_per_mb_up  # type: ignore[operator]
    assert "power:" in profile.source and "J/MB" in profile.source
    assert (profile.battery is None) == (name in MAINS)


def test_battery_devices_charge_and_phones_spend_more_per_mb_on_cellular() -> None:
    for name in ("phone-midrange", "phone-highend", "laptop-cpu"):
        battery = CATALOG[name].battery
        assert battery is not None and battery.charging and 0 < battery.threshold < battery.initial_charge
    assert CATALOG["phone-midrange"].radio_j_per_mb_up > CATALOG["laptop-cpu"].radio_j_per_mb_up  # type: ignore[operator]


def test_power_figures_are_optional_and_a_battery_takes_a_toml_list_of_windows() -> None:
    assert DeviceProfile(**GOOD).train_watts is None and DeviceProfile(**GOOD).battery is None
    profile = DeviceProfile.model_validate(
        {**GOOD, **POWER, "battery": {"capacity_wh": 10, "charging": [{"start_h": 22, "end_h": 6, "watts": 5}]}}
    )
    assert profile.battery == Battery(capacity_wh=10.0, charging=(ChargeWindow(start_h=22.0, end_h=6.0, watts=5.0),))
    assert profile.battery.charging[0].segments() == [(22.0, 24.0), (0.0, 6.0)]


BAD_POWER = [
    ({"train_watts": 0.0}, "train_watts"),
    ({"idle_watts": -1.0}, "idle_watts"),
    ({"radio_j_per_mb_up": 0.0}, "radio_j_per_mb_up"),
    ({"radio_j_per_mb_down": float("nan")}, "radio_j_per_mb_down"),
    ({"battery": {"capacity_wh": 0.0}}, "battery.capacity_wh"),
    ({"battery": {"capacity_wh": 1.0, "threshold": 1.5}}, "battery.threshold"),
    ({"battery": {"capacity_wh": 1.0, "threshold": -0.1}}, "battery.threshold"),
    ({"battery": {"capacity_wh": 1.0, "initial_charge": 2.0}}, "battery.initial_charge"),
    (
        {"battery": {"capacity_wh": 1.0, "charging": [{"start_h": 25, "end_h": 6, "watts": 5}]}},
        "battery.charging.0.start_h",
    ),
    (
        {"battery": {"capacity_wh": 1.0, "charging": [{"start_h": 1, "end_h": 6, "watts": 0}]}},
        "battery.charging.0.watts",
    ),
    ({"battery": {"capacity_wh": 1.0, "charging": [{"start_h": 6, "end_h": 6, "watts": 1}]}}, "battery.charging.0"),
    ({"battery": {"capacity_wh": 1.0, "volts": 3.8}}, "battery.volts"),
]


@pytest.mark.parametrize(("bad", "where"), BAD_POWER, ids=[w for _, w in BAD_POWER])
def test_bad_power_values_are_refused_at_their_path(bad: dict, where: str) -> None:
    with pytest.raises(ValidationError) as info:
        DeviceProfile.model_validate({**GOOD, **POWER, **bad})
    assert [".".join(map(str, e["loc"])) for e in info.value.errors()] == [where]


BAD_POWER_FILES = [
    ("zero training power", "train_watts = 0\n", "`b.train_watts` must be greater than 0, got 0"),
    (
        "threshold above 1",
        "[b.battery]\ncapacity_wh = 10\nthreshold = 1.5\n",
        "`b.battery.threshold` must be less than or equal to 1, got 1.5",
    ),
    (
        "window past midnight hour 24",
        "[b.battery]\ncapacity_wh = 10\ncharging = [{start_h = 22, end_h = 30, watts = 5}]\n",
        "`b.battery.charging.0.end_h` must be less than or equal to 24, got 30",
    ),
    (
        "overlapping windows",
        "[b.battery]\ncapacity_wh = 10\ncharging = [{start_h = 22, end_h = 6, watts = 5}, "
        "{start_h = 5, end_h = 8, watts = 5}]\n",
        "`b.battery`: charging windows must not overlap: windows 0 and 1 do",
    ),
    (
        "empty window",
        "[b.battery]\ncapacity_wh = 10\ncharging = [{start_h = 3, end_h = 3, watts = 5}]\n",
        "`b.battery.charging.0`: the window is empty: start_h = 3.0, end_h = 3.0",
    ),
]


@pytest.mark.parametrize(("case", "text", "expected"), BAD_POWER_FILES, ids=[c[0] for c in BAD_POWER_FILES])
def test_bad_power_figures_in_a_file_name_their_dotted_path(
    tmp_path: Path, case: str, text: str, expected: str
) -> None:
    head = "[b]\ntrain_tflops = 1\nmemory_gb = 1\nuplink_mbps = 1\ndownlink_mbps = 1\n"
    figures = "".join(f"{k} = {v}\n" for k, v in POWER.items() if k not in text)
    with pytest.raises(ProfilesError) as info:
        load_profiles_file(write(tmp_path, head + figures + text))
    assert any(expected in p for p in info.value.problems), info.value.problems


def test_a_battery_without_power_figures_is_refused(tmp_path: Path) -> None:
    text = "[b]\ntrain_tflops = 1\nmemory_gb = 1\nuplink_mbps = 1\ndownlink_mbps = 1\ntrain_watts = 3\n"
    with pytest.raises(ProfilesError) as info:
        load_profiles_file(write(tmp_path, text + "[b.battery]\ncapacity_wh = 10\n"))
    assert info.value.problems == [
        "`b`: a device with a `battery` needs every power figure to drain it; missing "
        "['idle_watts', 'radio_j_per_mb_up', 'radio_j_per_mb_down']"
    ]


def test_trace_overrides_keep_the_profiles_battery(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("client_id,profile,windows,uplink_mbps\n0,phone-highend,0-10,2.5\n")
    rows, _ = load_trace(path)
    (profile,) = trace_profiles(rows, {})
    assert profile.battery == CATALOG["phone-highend"].battery and profile.train_watts == 6.0


def test_a_scenarios_own_profiles_are_refused_by_their_full_path(tmp_path: Path) -> None:
    profile = (
        "\n[fleet.profiles.my-phone]\ntrain_tflops = 0.1\nmemory_gb = 2\nuplink_mbps = 5\ndownlink_mbps = 20\n"
        "train_watts = -3\nbattery = { capacity_wh = 10, threshold = 1.5 }\n"
    )
    path = tmp_path / "s.toml"
    path.write_text((ROOT / "scenarios" / "tiny.toml").read_text() + profile)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert info.value.problems == [
        "`fleet.profiles.my-phone.train_watts` must be greater than 0, got -3",
        "`fleet.profiles.my-phone.battery.threshold` must be less than or equal to 1, got 1.5",
    ]
