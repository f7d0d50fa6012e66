"""The fleet's deployed models: what each device would run if fine-tuning stopped now.

FedSpine's deliverable is not one unpruned model: a weak device runs the model pruned to what its
memory or latency allows for inference (`pruning.deploy_ratios`, a ratio per device profile), with
the global adapter on it. Comparing methods "at the same sparsity", as FedSpine does, means
scoring those models: a run whose weak devices never trained pruned still ships them a pruned
model, and pays for it there.

Which model profile p deploys, with ratio ρ_p > 0: the keep of its most trained client that holds
a keep cut for ρ_p (its target is ρ_p and its schedule has reached it), which is what `fedsim
export --device p` ships; if none does, the server cuts the model to ρ_p by the global adapter's
importance (`pruning.importance` on the held-out calibration examples, as `pruning.where =
"server"` does), as a user pruning the final model before shipping it would. A profile without a
ratio deploys the unpruned model. The fleet's deployed loss is the device-weighted mean

    L_deployed = Σ_p (n_p / N) · L_p,      L_p: held-out loss of the global adapter on p's model,

and accuracy likewise. Every held-out score of the round loop then uses L_deployed instead of
the unpruned loss: a controller's contributions (`rounds.contributions`), so the bandit learns
what a device's update does to the models the fleet will run, and ComPEFT's α grid
(`compression.alpha = "auto"`). They use the keeps planned after the previous round.

Each distinct keep is cut once per round (`plan`, `surgery.pruned_copy`: it shares the unpruned
tensors it keeps whole); a score then loads the adapter's slice for that keep onto it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import peft
from transformers import PreTrainedTokenizerBase

from fedsim.adapter import AdapterState, set_state
from fedsim.keeps import PruneBook, most_trained
from fedsim.pruning.schedule import ratio_before_step
from fedsim.pruning.select import select_keep
from fedsim.pruning.slicing import slice_adapter
from fedsim.pruning.structure import Keep, Scores, geometry
from fedsim.pruning.surgery import pruned_copy
from fedsim.scenario import Scenario
from fedsim.training import evaluate, evaluate_loss


class Deployment:
    """Each profile's deployed keep for the round, and the fleet's loss and accuracy on them."""

    def __init__(
        self, scenario: Scenario, device: np.ndarray, model: peft.PeftModel, tokenizer: PreTrainedTokenizerBase,
        examples: Sequence[dict[str, str]], importance: Callable[[AdapterState], Scores],
    ) -> None:  # fmt: skip
        self.scenario, self.device = scenario, np.asarray(device).astype(str)
        names, counts = np.unique(self.device, return_counts=True)
        self.shares = {str(n): float(c) / len(self.device) for n, c in zip(names, counts)}  # profile → n_p / N
        self.ratios = {p: r for p, r in scenario.pruning.deploy_ratios.items() if r > 0}
        self.model, self.tokenizer, self.examples, self.importance = model, tokenizer, list(examples), importance
        self.layers = geometry(model)
        self.keeps: dict[str, Keep | None] = {}  # profile → the keep it deploys this round
        self._copies: dict[Keep, peft.PeftModel] = {}

    def plan(self, state: AdapterState, book: PruneBook | None) -> None:
        """Choose each profile's keep for the global adapter `state` and the clients' `book`, and cut
        each distinct one (a keep already cut last round is reused)."""
        cut: dict[float, Keep] = {}
        scores: list[Scores] = []
        for profile in self.shares:
            ratio = self.ratios.get(profile, 0.0)
            keep = self._held(book, profile, ratio) if ratio > 0 else None
            if ratio > 0 and keep is None:
                if ratio not in cut:
                    scores = scores or [self.importance(state)]
                    cut[ratio] = select_keep(scores[0], self.layers, ratio, self.scenario.pruning.mode)
                keep = cut[ratio]
            self.keeps[profile] = keep
        wanted = {k for k in self.keeps.values() if k is not None}
        self._copies = {k: self._copies[k] if k in self._copies else pruned_copy(self.model, k) for k in wanted}

    def loss(self, state: AdapterState, examples: int = 16) -> float:
        """L_deployed on the first `examples` held-out examples (no generation)."""
        t = self.scenario.train
        rows = self.examples[:examples]
        return self._mean(
            lambda m: (
                evaluate_loss(m, self.tokenizer, rows, batch_size=self.scenario.eval.batch_size, max_len=t.max_seq_len),
                0.0,
            ),
            state,
        )[0]

    def evaluate(self, state: AdapterState, unpruned: tuple[float, float] | None = None) -> tuple[float, float]:
        """(L_deployed, deployed accuracy) on the central test set, with generation; `unpruned`: the
        unpruned model's (loss, accuracy) there, when the central evaluation has them already."""
        e, t = self.scenario.eval, self.scenario.train

        def score(m: peft.PeftModel) -> tuple[float, float]:
            res = evaluate(
                m,
                self.tokenizer,
                self.examples,
                max_new_tokens=e.max_new_tokens,
                batch_size=e.batch_size,
                max_len=t.max_seq_len,
            )
            return res.loss, res.accuracy

        return self._mean(score, state, {} if unpruned is None else {None: unpruned})

    def _mean(
        self, score: Callable[[peft.PeftModel], tuple[float, float]], state: AdapterState, known: dict[Keep | None, tuple[float, float]] | None = None
    ) -> tuple[float, float]:
        """The device-weighted mean of `score` over the planned keeps, each model scored once
        (`known`: scores already at hand, by keep)."""
        if not self.keeps:
            raise RuntimeError("Deployment.plan must run before a score")
        by_keep = dict(known or {})
        loss = accuracy = 0.0
        for profile, keep in self.keeps.items():
            if keep not in by_keep:
                by_keep[keep] = score(self._loaded(keep, state))
            loss += self.shares[profile] * by_keep[keep][0]
            accuracy += self.shares[profile] * by_keep[keep][1]
        return loss, accuracy

    def _loaded(self, keep: Keep | None, state: AdapterState) -> peft.PeftModel:
        """The model `keep` deploys, with the global adapter `state` (its slice) loaded."""
        if keep is None:
            set_state(self.model, state)
            return self.model
        model = self._copies[keep]
        set_state(model, slice_adapter(state, keep))
        return model

    def _held(self, book: PruneBook | None, profile: str, ratio: float) -> Keep | None:
        """The keep of the profile's most trained client whose model is cut for `ratio`, if any."""
        if book is None:
            return None
        p = self.scenario.pruning

        def reached(c: int) -> bool:  # its last step trained at the target (the schedule's last event is behind it)
            return (
                book.steps[c] >= 1
                and ratio_before_step(int(book.steps[c]) - 1, ratio, p.interval_steps, p.events) >= ratio - 1e-9
            )

        ids = [
            int(c)
            for c in np.flatnonzero(self.device == profile)
            if book.held(int(c)) is not None and abs(book.targets[c] - ratio) <= 1e-9 and reached(int(c))
        ]
        return book.held(most_trained(ids, book.steps)) if ids else None
