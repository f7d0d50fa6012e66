"""A packed simulation's ClientApps (fedsim/runtime/simulation.py): `fedsim compare` sizes them for
every run it plans (`backend_config`), not for the first one only, and Flower runs all of them at
once (`every_actor_at_once`)."""

from __future__ import annotations

from pathlib import Path

from fedsim.runtime.compare import plan
from fedsim.runtime.simulation import MAX_WORKERS, backend_config, every_actor_at_once
from fedsim.server.packs import cpu_share, packing_on

TINY = str(Path(__file__).resolve().parents[3] / "scenarios" / "tiny.toml")


def test_compare_sizes_the_clientapps_for_the_largest_need_of_its_runs() -> None:
    overrides = ['simulation.packing="on"', "clients.num_clients=64", "clients.per_round=64", "data.num_examples=1000"]
    runs = plan(TINY, ["fedspeed", "fedit"], 1, overrides, "fedit")  # FedSpeed first: its clients train alone
    alone, packed = runs
    assert not packing_on(alone) and packing_on(packed)
    needed = {"num_cpus": cpu_share(packed), "num_gpus": 0.0}  # a whole packed round at once
    assert needed["num_cpus"] < 1.0  # below what a client training alone gets (on fewer than 64 CPUs)
    assert backend_config(runs)["client_resources"] == backend_config(runs[::-1])["client_resources"] == needed
    assert backend_config([alone])["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_every_actor_at_once_gives_flowers_executor_a_thread_per_actor() -> None:
    from flwr.server.superlink.fleet.vce import vce_api

    default = vce_api.ThreadPoolExecutor
    with every_actor_at_once():
        with vce_api.ThreadPoolExecutor() as executor:
            assert executor._max_workers == MAX_WORKERS  # not min(32, CPUs + 4)
    assert vce_api.ThreadPoolExecutor is default
