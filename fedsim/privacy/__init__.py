"""Client-level differential privacy of the released global adapter: DP-FedAvg (McMahan et al.,
2018, "Learning Differentially Private Recurrent Language Models", arXiv:1710.06963) with
optional adaptive clipping (Andrew et al., 2021, "Differentially Private Learning with Adaptive
Clipping", arXiv:1905.03871). Each round, with C the clip, z the noise multiplier, m the expected
number of clients:

    global ← global + (Σ_{k∈S} clip(Δ_k, C) + N(0, (zC)² I)) / m

- `clipping`: ‖Δ‖₂, clip(Δ, C), and folding B to the global scaling.
- `mechanism`: the seeded Gaussian noise and the fixed-denominator noised mean.
- `adaptive`: the clip that follows a quantile of the update norms, and its share of the noise.
- `sampling`: Poisson sampling of the clients, each with probability q = per_round / num_clients.
- `accountant`: ε after t rounds (dp_accounting's RDP), and the noise that reaches a target ε.
- `plan`: a run's resolved numbers (δ, q, z, σ_Δ, σ_b, planned ε) and the preflight check.
- `space`: a client's update in the global adapter's coordinates (fold, pad to r_max, scatter).
- `book`: the server's side across rounds (plan, accountant, adaptive clip, noise seed), checkpointed.

The update space. DP bounds what the server sums, so a client's update is the vector of the
tensors it uploads, as the strategy aggregates them: the factor deltas relative to what it was
sent, with B folded to the global scaling, ΔA_k and ΔB'_k = (s_k / s_g)(B_k − B_k^sent), flattened
over every layer (FedIT: both; FFA-LoRA: B; FedSA-LoRA: A). Not the products s_k B_k A_k: the
strategies that DP allows average the factors, and a bound on products bounds no sum of factors
(one product has many factorisations). Clipping raw B_k instead would let the fold s_k / s_g > 1
of a low-rank client carry it past C. A client of rank r_k < r_max, or a pruned one scattered back
to the unpruned shape, is zero where it holds nothing, which adds nothing to its norm; the noise
covers every coordinate at r_max and unpruned shape. Post-processing of the noised mean is free:
the strategy's rule, a Flower server optimiser, ComPEFT's α chosen on the server's held-out data.

Which strategies: those whose global adapter is a function of that sum alone, with each
client's influence bounded by C / m; `fedsim.config.privacy.DP_REFUSED` names the others and why.

Central and local. Central: the client clips, the server re-clips each decoded update (a codec
may raise the norm: ComPEFT's ternary values α·σ·sign, error feedback's residual) and adds the
noise to the sum; sampling is Poisson. Local: the client clips and adds N(0, (zC)² I) itself before
encoding, the server only sums and divides by m; the accountant then bounds each client against
a server that sees its messages.

Compression and error feedback. Compression is post-processing when it runs on what privacy has
already produced. Local mode: the client encodes its noised update, and error feedback keeps the
residual of that noised update, e = (noised + e_prev) − sent, so the residual is a function of
noised values only and carries nothing un-noised into a later message. Central mode: the uplink
is inside the trusted server's boundary; the residual of the clipped update stays on the client
and may raise what it sends past C, which the server's re-clip bounds again before the noise, so
each round's sum still moves by at most C per client (adaptive composition covers a round that
depends on the client's earlier rounds).

What the guarantee covers: the global adapter of every round (and what is computed from it and
from the server's own data). Not the per-client records of the run directory (each client's loss,
examples, timing, its presence in a round): those are the trusted server's books, not releases.
"""

from fedsim.privacy.accountant import (
    MAX_NOISE,
    Accountant,
    UnreachableTarget,
    default_delta,
    dp_event,
    epsilon,
    noise_for_target,
)
from fedsim.privacy.adaptive import (
    AdaptiveClip,
    below_clip,
    combined_noise_multiplier,
    next_clip,
    noisy_fraction,
    update_noise_multiplier,
)
from fedsim.privacy.book import PrivacyBook
from fedsim.privacy.clipping import clip, folded, l2_norm
from fedsim.privacy.mechanism import add_noise, noise_generator, noised_mean
from fedsim.privacy.plan import DpPlan, plan, plan_problems
from fedsim.privacy.sampling import poisson_sample
from fedsim.privacy.space import to_global, update_rank

__all__ = [
    "MAX_NOISE",
    "Accountant",
    "AdaptiveClip",
    "DpPlan",
    "PrivacyBook",
    "UnreachableTarget",
    "add_noise",
    "below_clip",
    "clip",
    "combined_noise_multiplier",
    "default_delta",
    "dp_event",
    "epsilon",
    "folded",
    "l2_norm",
    "next_clip",
    "noise_for_target",
    "noise_generator",
    "noised_mean",
    "noisy_fraction",
    "plan",
    "plan_problems",
    "poisson_sample",
    "to_global",
    "update_noise_multiplier",
    "update_rank",
]
