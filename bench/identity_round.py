"""How much a round in which every client returns what it was sent moves each strategy's model.

    .venv/bin/python bench/identity_round.py                 # seconds; writes docs/results/identity-round.md

Three clients of LoRA ranks 2, 4 and 8 (10, 30 and 20 examples) under a global adapter of rank 8
(α = 16) on two layers (12 → 10 and 12 → 9, float64). Each strategy sends every client its share
of a random global adapter (with a random merged base delta where the strategy keeps one; FLoRA's
adapter has B = 0, as it always does between rounds), the clients send back exactly what they
received, and the strategy aggregates. The figure is the relative change of what the global state
adds to the layers' weights, ‖ΔW_after − ΔW_before‖_F / ‖ΔW_before‖_F with ΔW = base_delta + s_g B A,
summed over layers, under each `strategy.rank_padding` ("paper": the strategy's own), mean over
5 random global adapters with the smallest and largest. 0 means the round changed nothing.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict  # noqa: E402
from flwr.app.message.message import make_message  # noqa: E402
from flwr.app.metadata import Metadata  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from bench.results_doc import write_result  # noqa: E402
from fedsim.config.scenario import validate_scenario  # noqa: E402
from fedsim.model.adapter import AdapterState, from_record, split_state  # noqa: E402
from fedsim.protocol import ARRAYS_RECORD, METRICS_RECORD, NUM_EXAMPLES  # noqa: E402
from strategies import STRATEGIES, FLoRA, LoraStrategy  # noqa: E402

R_MAX, ALPHA = 8, 16.0
LAYERS = {
    "base_model.model.model.layers.0.self_attn.q_proj": (12, 10),
    "base_model.model.model.layers.1.mlp.down_proj": (12, 9),
}
CLIENTS = {1: (2, 10.0), 2: (4, 30.0), 3: (8, 20.0)}  # node: (rank, examples)
SEEDS = range(5)
PADDINGS = ("paper", "holders", "zeros")


class Grid:
    def get_node_ids(self) -> list[int]:
        return list(CLIENTS)


def start_state(strategy: LoraStrategy, seed: int) -> AdapterState:
    g = torch.Generator().manual_seed(seed)
    state: AdapterState = {}
    for prefix, (i, o) in LAYERS.items():
        state[f"{prefix}.lora_A.weight"] = torch.randn(R_MAX, i, generator=g, dtype=torch.float64)
        B = torch.randn(o, R_MAX, generator=g, dtype=torch.float64)
        state[f"{prefix}.lora_B.weight"] = torch.zeros_like(B) if isinstance(strategy, FLoRA) else B
        state[f"{prefix}.base_delta"] = torch.randn(o, i, generator=g, dtype=torch.float64)
    return state if type(strategy).__name__ in ("FLoRA", "FedExLoRA") else split_state(state)[0]


def added(state: AdapterState) -> torch.Tensor:
    """What the global state adds to each layer's weight, flattened over the layers."""
    adapter, deltas = split_state(state)
    parts = []
    for prefix in LAYERS:
        A, B = adapter[f"{prefix}.lora_A.weight"].double(), adapter[f"{prefix}.lora_B.weight"].double()
        parts.append(((deltas[prefix].double() if prefix in deltas else 0.0) + ALPHA / R_MAX * B @ A).flatten())
    return torch.cat(parts)


def identity_round(strategy: LoraStrategy, seed: int) -> float:
    state = start_state(strategy, seed)
    strategy.assign_ranks({n: r for n, (r, _) in CLIENTS.items()})
    messages = strategy.configure_train(
        1, ArrayRecord({k: v.float() for k, v in state.items()}), ConfigRecord({}), Grid()
    )  # type: ignore[arg-type]
    replies = []
    for m in messages:
        node = m.metadata.dst_node_id
        sent = {k: v for k, v in from_record(m.content[ARRAYS_RECORD]).items() if not k.endswith(".base_delta")}
        meta = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="m", group_id="1",
                        created_at=time.time(), ttl=60.0, message_type="train")  # fmt: skip
        content = RecordDict(
            {ARRAYS_RECORD: ArrayRecord(sent), METRICS_RECORD: MetricRecord({NUM_EXAMPLES: CLIENTS[node][1]})}
        )
        replies.append(make_message(meta, content))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    before, after = added({k: v.float() for k, v in state.items()}), added(from_record(arrays))
    if type(strategy).__name__ == "FedSALoRA":  # the server holds the shared A alone: compare A
        a = [k for k in state if ".lora_A." in k]
        before, after = (
            torch.cat([state[k].float().flatten() for k in a]),
            torch.cat([from_record(arrays)[k].flatten() for k in a]),
        )
    return float(torch.linalg.vector_norm(after.double() - before.double()) / torch.linalg.vector_norm(before.double()))


def main() -> int:
    logging.getLogger("flwr").setLevel(logging.WARNING)
    for name, value in {"_run_id": 1, "_node_id": 0, "_task_id": 0}.items():  # Message() outside a run
        setattr(TaskIdentity, name, value)
    head = ["strategy", *(f"rank_padding = {p!r}" for p in PADDINGS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in STRATEGIES:
        cells = [name]
        for padding in PADDINGS:
            if name == "flora" and padding != "paper":
                cells.append("n/a (stacks)")
                continue
            scenario = validate_scenario(
                {
                    "model": {"name": "tiny-llama"},
                    "lora": {"rank": R_MAX, "alpha": ALPHA},
                    "strategy": {"name": name, "rank_padding": padding},
                }
            )
            changes = [identity_round(STRATEGIES[name](scenario), seed) for seed in SEEDS]
            mean = sum(changes) / len(changes)
            cells.append(f"{100 * mean:.1f} % [{100 * min(changes):.1f}, {100 * max(changes):.1f}]")
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    write_result(
        ROOT / "docs" / "results" / "identity-round.md",
        "\n".join([
            "# A round in which every client returns what it was sent", "",
            "```", ".venv/bin/python bench/identity_round.py", "```", "",
            f"Ranks {', '.join(str(r) for r, _ in CLIENTS.values())} under r_max = {R_MAX}; relative change of "
            f"base_delta + s_g B A (FedSA-LoRA: of the shared A), mean [min, max] over {len(SEEDS)} random global "
            "adapters.", "",
            *lines,
        ]),
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
