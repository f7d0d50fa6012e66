"""The `participation` section: each bad value and each combination the asynchronous clock cannot
run is refused before the run, naming its dotted path and why (exit 2 from `fedsim run`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsim.cli import EXIT_BAD_INPUT, main
from fedsim.config.participation import ParticipationConfig
from fedsim.config.scenario import ScenarioError, load_scenario

TINY = Path(__file__).resolve().parents[3] / "scenarios" / "tiny.toml"
AFA = ["strategy.name=afa_cd", "participation.mode=async"]


def _refusal(overrides: list[str]) -> str:
    with pytest.raises(ScenarioError) as err:
        load_scenario(TINY, overrides)
    return str(err.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["participation.mode=async"], "`participation.mode` = 'async' cannot run 'fedit', which needs synchronous"),
        (["strategy.name=afa_cs", "participation.mode='sync'"], "`strategy.name` = 'afa_cs' aggregates stale"),
        ([*AFA, "participation.max_staleness=-1"], "`participation.max_staleness` must be greater than or equal to 0"),
        ([*AFA, "participation.join_probability=0"], "`participation.join_probability` must be greater than 0"),
        (
            [*AFA, "participation.min_steps=5", "participation.max_steps=2"],
            "`min_steps` (5) must be <= `max_steps` (2)",
        ),
        ([*AFA, "fleet.clock='measured'"], "it cannot run with fleet.clock = 'measured'"),
        ([*AFA, "compression.downlink=true"], "`compression.downlink` cannot run with participation.mode = 'async'"),
        ([*AFA, "simulation.packing='on'"], "`simulation.packing` = 'on' cannot run with participation.mode = 'async'"),
        ([*AFA, "strategy.rank_padding='holders'"], "`strategy.rank_padding` = 'holders' does not apply to 'afa_cd'"),
        ([*AFA, "strategy.afa_server_lr=0"], "`strategy.afa_server_lr` must be greater than 0"),
        (
            [*AFA, "privacy.mode='local'", "privacy.clip=1.0", "privacy.noise_multiplier=1.0"],
            "'afa_cd' cannot run with privacy.mode = 'local'",
        ),
        ([*AFA, "pruning.ratio=0.3"], "afa_cd"),
    ],
)
def test_each_bad_setting_is_refused_with_its_path(overrides: list[str], message: str) -> None:
    assert message in _refusal(overrides)


def test_a_controller_is_refused_on_the_asynchronous_clock() -> None:
    assert "`controller` cannot run with participation.mode = 'async'" in _refusal([*AFA, "controller.name=ucb1"])


def test_steps_default_to_the_scenarios_local_steps_and_fill_what_is_unset() -> None:
    assert ParticipationConfig().steps_range(8) == (8, 8)
    assert ParticipationConfig(min_steps=2).steps_range(8) == (2, 8)
    assert ParticipationConfig(max_steps=4).steps_range(8) == (4, 4)
    assert ParticipationConfig(min_steps=9).steps_range(8) == (9, 9)


def test_auto_is_async_for_afa_only_and_clients_are_never_sent_the_section() -> None:
    afa = load_scenario(TINY, ["strategy.name=afa_cs", "participation.max_staleness=2"])
    assert afa.participation.mode == "auto" and afa.asynchronous and '"participation"' not in afa.to_json()
    assert not load_scenario(TINY, []).asynchronous
    assert load_scenario(TINY, AFA).asynchronous


def test_fedsim_run_exits_2_before_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs"
    code = main(["run", str(TINY), "--out", str(out), "--set", "participation.mode=async"])
    assert code == EXIT_BAD_INPUT and "needs synchronous rounds" in capsys.readouterr().err
    assert not out.exists()
