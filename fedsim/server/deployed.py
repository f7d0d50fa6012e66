"""The fleet's deployed models: what each device would run if fine-tuning stopped now.

FedSpine's deliverable is not one unpruned model: a weak device runs the model pruned to what its
memory or latency allows for inference (`pruning.deploy_ratios`, a ratio per device profile), with
the global adapter on it. Comparing methods "at the same sparsity", as FedSpine does, means
scoring those models: a run whose weak devices never trained pruned still ships them a pruned
model, and pays for it there.

Which models profile p deploys, with ratio ρ_p > 0: each device its own. A device that trained at
ρ_p (its target is ρ_p and its schedule has reached it) runs the keep it trained on, cut from
importance on its own data; any other device runs the server's cut to ρ_p by the global adapter's
importance (`pruning.deploy_importance` on the held-out calibration examples), as a user pruning
the final model before shipping it would. That score defaults to `first_order`, not the clients'
`lora_grad`: a client averages lora_grad over its training steps, while a one-shot cut reads one
batch, which makes lora_grad's cut unstable (bench/fedspine.py, docs/results/fedspine.md). L_p is
the mean over a panel of p's devices: `pruning.deploy_panel` of them, a seeded sample fixed for the
run (all of them when p has fewer), so the cost of a score does not grow with the fleet and every
method of a comparison is scored on the same devices. A profile without a ratio deploys the
unpruned model. The fleet's deployed loss is the device-weighted mean

    L_deployed = Σ_p (n_p / N) · L_p,      L_p = mean over p's panel of the global adapter's
                                            held-out loss on each device's model,

and accuracy likewise. Every held-out score of the round loop then uses L_deployed instead of
the unpruned loss: a controller's contributions (`rounds.contributions`), so the bandit learns
what a device's update does to the models the fleet will run, and ComPEFT's α grid
(`compression.alpha = "auto"`). They use the keeps planned after the previous round.

Why each device its own keep and not one per profile: with non-IID data the devices' keeps
differ, and one global adapter can score very differently on them; scoring one keep per profile
(its most trained client's, as `fedsim export --device` ships) would make a method's score hinge on
which client that was.

Each distinct keep is cut once per round (`plan`, `surgery.pruned_copy`: it shares the unpruned
tensors it keeps whole); a score then loads the adapter's slice for that keep onto it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import peft
from transformers import PreTrainedTokenizerBase

from fedsim.config.scenario import Scenario
from fedsim.fleet.keeps import PruneBook
from fedsim.model.adapter import AdapterState, set_state
from fedsim.model.training import evaluate, evaluate_loss
from fedsim.pruning.select import select_keep
from fedsim.pruning.slicing import slice_adapter
from fedsim.pruning.structure import Keep, Scores, geometry
from fedsim.pruning.surgery import pruned_copy
from fedsim.seeding import derive_seed


class Deployment:
    """Each profile's panel of devices and the keeps they deploy this round, and the fleet's loss and accuracy on
    them."""

    def __init__(
        self, scenario: Scenario, device: np.ndarray, model: peft.PeftModel, tokenizer: PreTrainedTokenizerBase,
        examples: Sequence[dict[str, str]], importance: Callable[[AdapterState], Scores],
    ) -> None:  # fmt: skip
        self.scenario, self.device = scenario, np.asarray(device).astype(str)
        names, counts = np.unique(self.device, return_counts=True)
        self.shares = {str(n): float(c) / len(self.device) for n, c in zip(names, counts)}  # profile → n_p / N
        self.ratios = {p: r for p, r in scenario.pruning.deploy_ratios.items() if r > 0}
        self.panel = {p: self._sample(p) for p in self.shares if p in self.ratios}  # profile → the client ids scored
        self.model, self.tokenizer, self.examples, self.importance = model, tokenizer, list(examples), importance
        self.layers = geometry(model)
        self.keeps: dict[str, list[Keep | None]] = {}  # profile → the keeps its panel deploys this round
        self._copies: dict[Keep, peft.PeftModel] = {}

    def plan(self, state: AdapterState, book: PruneBook | None) -> None:
        """Choose each panel device's keep for the global adapter `state` and the clients' `book`,
        and cut each distinct one (a keep already cut last round is reused)."""
        server: dict[float, Keep] = {}  # ratio → the server's cut, made only if a device runs it
        scores: list[Scores] = []
        for profile in self.shares:
            ratio = self.ratios.get(profile, 0.0)
            if ratio == 0:
                self.keeps[profile] = [None]
                continue
            held = [book.trained_at(c, ratio) if book is not None else None for c in self.panel[profile]]
            if None in held and ratio not in server:
                scores = scores or [self.importance(state)]
                server[ratio] = select_keep(scores[0], self.layers, ratio, self.scenario.pruning.mode)
            self.keeps[profile] = [k if k is not None else server[ratio] for k in held]
        wanted = {k for keeps in self.keeps.values() for k in keeps if k is not None}
        self._copies = {k: self._copies[k] if k in self._copies else self._cut(k) for k in wanted}

    def _cut(self, keep: Keep) -> peft.PeftModel:
        """The model pruned to `keep`, leaving `self.model` as it is."""
        model = pruned_copy(self.model, keep)
        assert isinstance(model, peft.PeftModel)  # pruned_copy deep-copies the PEFT model it is given
        return model

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
        self,
        score: Callable[[peft.PeftModel], tuple[float, float]],
        state: AdapterState,
        known: dict[Keep | None, tuple[float, float]] | None = None,
    ) -> tuple[float, float]:
        """The device-weighted mean of `score` over the profiles, each profile's the mean over its
        panel's keeps, each model scored once (`known`: scores already at hand, by keep)."""
        if not self.keeps:
            raise RuntimeError("Deployment.plan must run before a score")
        by_keep = dict(known or {})
        loss = accuracy = 0.0
        for profile, keeps in self.keeps.items():
            for keep in keeps:
                if keep not in by_keep:
                    by_keep[keep] = score(self._loaded(keep, state))
                loss += self.shares[profile] * by_keep[keep][0] / len(keeps)
                accuracy += self.shares[profile] * by_keep[keep][1] / len(keeps)
        return loss, accuracy

    def _loaded(self, keep: Keep | None, state: AdapterState) -> peft.PeftModel:
        """The model `keep` deploys, with the global adapter `state` (its slice) loaded."""
        if keep is None:
            set_state(self.model, state)
            return self.model
        model = self._copies[keep]
        set_state(model, slice_adapter(state, keep))
        return model

    def _sample(self, profile: str) -> list[int]:
        """The profile's panel: `pruning.deploy_panel` of its client ids, drawn from the scenario seed."""
        ids = np.flatnonzero(self.device == profile)
        size = self.scenario.pruning.deploy_panel
        if len(ids) > size:
            ids = np.sort(
                np.random.default_rng(derive_seed(self.scenario.seed, "deploy-panel", profile)).choice(
                    ids, size, replace=False
                )
            )
        return [int(c) for c in ids]
