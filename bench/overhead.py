"""Overhead of Flower's engine: fedsim's train phase per round vs the same training in a plain loop.

    .venv/bin/python bench/overhead.py                         # SmolLM2 (quickstart settings)
    .venv/bin/python bench/overhead.py --scenario scenarios/tiny.toml

Both sides do the same work: the same sampled clients, the same data, local steps, batch and
seeds (fedsim's own `train_lora`), for the same rounds. fedsim runs it on Flower's simulation
engine (Ray actors, one per `num_cpus_per_client` CPUs, in parallel); the floor runs it in one
process, client after client, with torch using every core. Round 1 includes the actors' model
load, so the ratio is taken over rounds 2..R; round 1 is printed apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsim.cli import quiet_libraries  # noqa: E402
from fedsim.config.scenario import Scenario, load_scenario  # noqa: E402
from fedsim.data.partitions import client_data  # noqa: E402
from fedsim.model.adapter import attach_lora, get_state, set_state  # noqa: E402
from fedsim.model.loader import load_model  # noqa: E402
from fedsim.model.training import train_lora  # noqa: E402
from fedsim.results.rundir import RunDir  # noqa: E402
from fedsim.runtime.simulation import run_simulation  # noqa: E402
from fedsim.seeding import derive_seed  # noqa: E402
from fedsim.server.rounds import sample_clients  # noqa: E402


def fedsim_round_times(scenario: Scenario) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = RunDir.create(Path(tmp), scenario)
        run_simulation(scenario, run_dir)
        events = [json.loads(line) for line in (run_dir.path / "events.jsonl").read_text().splitlines()]
    return [e["train_time_s"] for e in events if e["event"] == "round_end" and e["round"] > 0]


def plain_round_times(scenario: Scenario) -> list[float]:
    """The floor: identical training, sequential, in this process, no messaging."""
    torch.set_num_threads(torch.get_num_threads())
    base, tokenizer = load_model(scenario.model.name, dtype=scenario.model.dtype)
    model = attach_lora(base, scenario.lora, derive_seed(scenario.seed, "lora-init"))
    state = get_state(model)
    t = scenario.train
    times = []
    for server_round in range(1, scenario.rounds + 1):
        start = time.perf_counter()
        chosen = sample_clients(
            list(range(scenario.clients.num_clients)), scenario.clients.per_round, scenario.seed, server_round, "train"
        )
        updates, weights = [], []
        for cid in chosen:
            set_state(model, state)
            data = client_data(scenario.data, scenario.clients.num_clients, cid, scenario.seed)
            train_lora(
                model,
                tokenizer,
                list(data.train),
                steps=t.local_steps,
                batch_size=t.batch_size,
                max_len=t.max_seq_len,
                lr=t.lr,
                weight_decay=t.weight_decay,
                grad_clip=t.grad_clip,
                seed=derive_seed(scenario.seed, server_round, cid, "train"),
            )
            updates.append(get_state(model))
            weights.append(len(data.train))
        total = sum(weights)
        state = {k: sum(u[k] * (w / total) for u, w in zip(updates, weights)) for k in state}
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", default=str(ROOT / "scenarios" / "quickstart.toml"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    quiet_libraries()
    scenario = load_scenario(
        args.scenario, [f"rounds={args.rounds}", "clients.eval_per_round=0", "eval.central_examples=1", "name=overhead"]
    )
    fed = fedsim_round_times(scenario)
    plain = plain_round_times(scenario)
    steady_fed, steady_plain = statistics.mean(fed[1:]), statistics.mean(plain[1:])
    print(
        f"scenario {Path(args.scenario).name}: model {scenario.model.name}, "
        f"{scenario.clients.per_round} clients/round, "
        f"{scenario.train.local_steps} local steps, batch {scenario.train.batch_size}, {torch.get_num_threads()} cores"
    )
    print(f"round 1 (incl. model load in actors): fedsim {fed[0]:.2f}s   plain {plain[0]:.2f}s")
    print(f"rounds 2..{args.rounds} mean:                fedsim {steady_fed:.2f}s   plain {steady_plain:.2f}s")
    print(f"overhead ratio (fedsim / plain loop): {steady_fed / steady_plain:.2f}")


if __name__ == "__main__":
    main()
