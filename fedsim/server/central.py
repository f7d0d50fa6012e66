"""The server's own model: base model + the global LoRA adapter, scored on the held-out set each
round, and the source of the server's importance scores and checkpoints."""

from __future__ import annotations

from typing import Any

from fedsim.config.scenario import Scenario
from fedsim.data.partitions import central_test_set
from fedsim.fleet.costs import ModelShape
from fedsim.model.adapter import AdapterState, attach_lora, get_state, set_state
from fedsim.model.loader import load_model
from fedsim.model.training import ExampleResults, collate, evaluate_examples, evaluate_loss, resolve_device
from fedsim.pruning.importance import importance_scores
from fedsim.pruning.structure import Scores
from fedsim.seeding import derive_seed


class CentralEvaluator:
    """The server's copy of base model + LoRA, for central evaluation and for saving checkpoints.

    `held_out` is the server's whole held-out set (`data.central_test_size`); `examples`, its first
    `eval.central_examples` (0 = all), is what each round, calibration and the deployed models are
    scored on. The run's last round is scored on the whole held-out set."""

    def __init__(self, scenario: Scenario) -> None:
        base, self.tokenizer = load_model(scenario.model.name, dtype=scenario.model.dtype)
        self.shape = ModelShape.from_model(base)
        self.model = attach_lora(base, scenario.lora, derive_seed(scenario.seed, "lora-init")).to(
            resolve_device(scenario.train.device)
        )
        self.held_out = list(central_test_set(scenario.data, scenario.seed))
        self.examples = self.held_out[: scenario.eval.central_examples or None]  # each round's subset
        self.scenario = scenario

    def importance(self, state: AdapterState) -> Scores:
        """`pruning.where = "server"`: the global adapter's importance scores (`pruning.importance`)
        on the first `pruning.calibration_examples` held-out examples."""
        return self._scores(state, self.scenario.pruning.importance)

    def deploy_importance(self, state: AdapterState) -> Scores:
        """The same for the server's cut to a deploy ratio (`pruning.deploy_importance`)."""
        return self._scores(state, self.scenario.pruning.deploy_importance)

    def _scores(self, state: AdapterState, score: str) -> Scores:
        set_state(self.model, state)
        p, t = self.scenario.pruning, self.scenario.train
        batch = collate(self.tokenizer, self.examples[: p.calibration_examples], t.max_seq_len)
        device = next(self.model.parameters()).device
        return importance_scores(
            self.model,
            score,
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
        )

    def initial_state(self) -> AdapterState:
        return get_state(self.model)

    def loss(self, state: AdapterState, examples: int = 16) -> float:
        """Held-out response loss on the first `examples` (no generation: cheap enough to
        score several candidate aggregates in a round)."""
        set_state(self.model, state)
        rows = self.examples[:examples]
        return float(
            evaluate_loss(
                self.model,
                self.tokenizer,
                rows,
                batch_size=self.scenario.eval.batch_size,
                max_len=self.scenario.train.max_seq_len,
            )
        )

    def __call__(
        self, state: AdapterState, server_round: int, elapsed: float, sim_time: float, *, final: bool = False
    ) -> tuple[dict[str, Any], ExampleResults]:
        """The round's eval_central row and its per-example results, on `examples`, or on
        `held_out` when `final`."""
        set_state(self.model, state)
        e, t = self.scenario.eval, self.scenario.train
        rows = self.held_out if final else self.examples
        per_example = evaluate_examples(
            self.model,
            self.tokenizer,
            rows,
            max_new_tokens=e.max_new_tokens,
            batch_size=e.batch_size,
            max_len=t.max_seq_len,
        )
        res = per_example.reduce()
        return {
            "round": server_round, "client_id": -1, "kind": "eval_central", "num_examples": res.num_examples,
            "loss": res.loss, "accuracy": res.accuracy, "wall_time_s": elapsed, "sim_time_s": sim_time,
        }, per_example  # fmt: skip
