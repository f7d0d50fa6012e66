"""ComPEFT and the baselines it is compared with: what a client sends in place of its LoRA update.

ComPEFT (Yadav et al., "ComPEFT: Compression for Communicating Parameter Efficient Updates via
Sparsification and Quantization", arXiv:2311.13171). Rule, for an update x of n entries:

    k = ⌈d·n⌉                        entries kept, density d ∈ (0, 1]
    S = the k largest |x_i|          ties to the lower flat index; entries equal to 0 never kept
    γ = α·σ(x)                       σ: standard deviation of the original update
    C(x)_i = sign(x_i)·γ  if i ∈ S,  0 otherwise

so only S and the signs on it travel (see `fedsim.compression.codec`). σ is the sample standard
deviation (Bessel's n−1), as `tv.std()` in the paper's code, computed by that very call on the
float32 update; σ = 0 for n < 2. γ = α·σ is rounded once to float32. A constant update has σ = 0
and compresses to zeros: that is the paper's rule. Whole-update mode (the default, as the paper's
code) ranks and takes σ over all tensors concatenated in the update's order; `per_tensor=True`
applies the rule to each tensor with its own k and σ.

The paper's code (`compress_and_update_parms`, github.com/prateeky2806/ComPEFT, src/bert_eval.py)
flattens the PEFT state dict sorted by name and keeps |x| ≥ its `kthvalue` threshold: ⌊d·n⌋ + 1
entries plus any ties. Here k = ⌈d·n⌉ exactly (the same count unless d·n is a whole number) and
ties go to the lower index of the update's own order, so the kept set is always k entries.

k is ⌈d·n⌉ of the exact product (`fractions.Fraction`), so d = 0.7, n = 10 keeps 7 entries, not
the 8 that the float 0.7·10 = 7.000000000000001 would give. An entry equal to zero is never kept
(its sign is undefined and C(x)_i = 0 either way), so an update with fewer than k non-zero
entries keeps fewer than k.

Baselines: "topk" keeps the same S with the values themselves (cast to `dtype`); "none" sends
every entry cast to `dtype`. The client compresses its update; with error feedback it keeps
`residual(update, sent)` and adds it to its next update before compressing that one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

import numpy as np
import torch

from fedsim.config.scenario import CompressionConfig

Update = dict[str, torch.Tensor]

METHODS = ("none", "topk", "compeft")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_NUMEL = 2**31  # entries in one update, all tensors together
MAX_NDIM = 64
MAX_NAME_BYTES = 2**16 - 1


@dataclass(frozen=True)
class CodecConfig:
    """How a client compresses its update; every problem is reported at once, by field."""

    method: Literal["none", "topk", "compeft"] = field(
        default="compeft",
        metadata={
            "help": "'compeft': signs of the top-k entries times one scale γ = α·σ; 'topk': the top-k "
            "entries' values; 'none': every entry, cast to `dtype`."
        },
    )
    density: float = field(default=0.1, metadata={"help": "d in (0, 1]: keep ⌈d·n⌉ entries of n (topk, compeft)."})
    alpha: float = field(default=1.0, metadata={"help": "ComPEFT's scale multiplier α > 0: γ = α·σ."})
    dtype: Literal["float32", "float16", "bfloat16"] = field(
        default="float32", metadata={"help": "Wire dtype of the values sent by 'none' and 'topk'."}
    )
    per_tensor: bool = field(
        default=False,
        metadata={"help": "Rank and take σ per tensor instead of over the whole update (the paper's default)."},
    )

    def __post_init__(self) -> None:
        if problems := self._problems():
            raise ValueError("invalid CodecConfig:\n" + "\n".join(f"  - {p}" for p in problems))

    def _problems(self) -> list[str]:
        problems = []
        if self.method not in METHODS:
            problems.append(f"`method` must be one of {', '.join(METHODS)}; got {self.method!r}")
        if not _is_real(self.density) or not 0 < self.density <= 1:
            problems.append(f"`density` must be a number in (0, 1], got {self.density!r}")
        if not _is_real(self.alpha) or not 0 < self.alpha < math.inf:
            problems.append(f"`alpha` must be a finite number > 0, got {self.alpha!r}")
        if self.dtype not in DTYPES:
            problems.append(f"`dtype` must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if not isinstance(self.per_tensor, bool):
            problems.append(f"`per_tensor` must be True or False, got {self.per_tensor!r}")
        return problems


def codec_config(compression: CompressionConfig) -> CodecConfig:
    """The codec a scenario's `compression` section asks for (the downlink uses the same one);
    with `alpha = "auto"` clients encode with α = 1 and the server scales."""
    alpha = 1.0 if compression.alpha == "auto" else compression.alpha
    return CodecConfig(
        method=compression.method,
        density=compression.density,
        alpha=alpha,
        dtype=compression.dtype,
        per_tensor=compression.per_tensor,
    )


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


@dataclass(frozen=True, eq=False)
class Sparse:
    """What one tensor sends under "topk" or "compeft" (the codec's body for it)."""

    shape: tuple[int, ...]
    positions: np.ndarray  # (k,) int64 flat indices, strictly increasing, < numel
    negative: np.ndarray  # (k,) bool: the kept entry is negative ("compeft"'s sign bits)
    values: torch.Tensor | None  # (k,) kept values in the wire dtype ("topk"); None for "compeft"
    scale: float  # γ, a float32 value ("compeft"); 0.0 for "topk"


def keep_count(n: int, density: float) -> int:
    """k = ⌈d·n⌉, of the exact product of the float `density` and `n`."""
    return math.ceil(Fraction(density) * n)


def top_k(magnitudes: np.ndarray, k: int) -> np.ndarray:
    """Sorted flat indices of the `k` largest `magnitudes` (n,), ties to the lower index, zeros never.

    O(n): the k-th largest value t comes from a partition; every entry above t is kept, and the
    first k − #{> t} entries equal to t."""
    n = len(magnitudes)
    if k >= n:
        return np.flatnonzero(magnitudes > 0)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    t = np.partition(magnitudes, n - k)[n - k]
    keep = magnitudes > t
    if (missing := k - int(np.count_nonzero(keep))) > 0 and t > 0:
        keep[np.flatnonzero(magnitudes == t)[:missing]] = True
    return np.flatnonzero(keep)


def compeft_scale(flat: torch.Tensor, alpha: float) -> float:
    """γ = α·σ, σ = `flat.std()` (sample, float32, as the paper's code; 0 for n < 2), as a float32 value."""
    sigma = float(flat.std()) if flat.numel() >= 2 else 0.0
    with np.errstate(over="ignore"):
        gamma = np.float32(alpha * sigma)
    if not np.isfinite(gamma):
        raise ValueError(f"ComPEFT scale α·σ = {alpha}·{sigma} does not fit in float32")
    return float(gamma)


def check_update(update: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError listing every tensor the codec cannot carry (names, dtypes, sizes)."""
    if not isinstance(update, Mapping):
        raise TypeError(f"an update is a dict of name → tensor, got {type(update).__name__}")
    problems, total = [], 0
    for name, tensor in update.items():
        where = f"update[{name!r}]"
        if name_bytes(name) is None:
            problems.append(f"{where}: a name must be a str of at most {MAX_NAME_BYTES} bytes of UTF-8")
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            problems.append(f"{where} must be a floating-point torch.Tensor, got {_describe(tensor)}")
            continue
        if tensor.dim() > MAX_NDIM or any(s >= 2**32 for s in tensor.shape):
            problems.append(f"{where} has shape {tuple(tensor.shape)}: at most {MAX_NDIM} dims, each < 2**32")
        total += tensor.numel()
    if total > MAX_NUMEL:
        problems.append(f"the update has {total} entries, more than the codec's {MAX_NUMEL}")
    if problems:
        raise ValueError("update cannot be compressed:\n" + "\n".join(f"  - {p}" for p in problems))


def name_bytes(name: object) -> bytes | None:
    """`name` in UTF-8, or None where it is not a str, has lone surrogates, or is too long."""
    try:
        encoded = name.encode("utf-8") if isinstance(name, str) else None
    except UnicodeEncodeError:
        return None
    return encoded if encoded is not None and len(encoded) <= MAX_NAME_BYTES else None


def _describe(value: object) -> str:
    return f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__


def sparsify(update: Mapping[str, torch.Tensor], config: CodecConfig) -> dict[str, Sparse]:
    """The kept entries of every tensor under `config` ("topk" or "compeft"), in the update's order."""
    if config.method == "none":
        raise ValueError("`method` 'none' keeps every entry; sparsify needs 'topk' or 'compeft'")
    check_update(update)
    flats = {name: t.detach().to("cpu", torch.float32).reshape(-1) for name, t in update.items()}
    groups = [[name] for name in flats] if config.per_tensor else [list(flats)]
    out: dict[str, Sparse] = {}
    for group in filter(None, groups):
        out |= _sparsify_group({name: flats[name] for name in group}, update, config)
    return out


def _sparsify_group(
    flats: dict[str, torch.Tensor], update: Mapping[str, torch.Tensor], config: CodecConfig
) -> dict[str, Sparse]:
    """Apply the rule to the tensors of `flats` ranked together, then split the result per tensor."""
    flat = torch.cat(list(flats.values()))  # (n,) float32, a copy: nothing below writes to `update`
    x = flat.numpy()
    if not np.isfinite(x).all():
        bad = [name for name, f in flats.items() if not bool(torch.isfinite(f).all())]
        raise ValueError(f"cannot rank non-finite values: update{bad} hold inf or nan")
    positions = top_k(np.abs(x), keep_count(len(x), config.density))
    scale = compeft_scale(flat, config.alpha) if config.method == "compeft" else 0.0
    bounds = np.cumsum([0] + [len(f) for f in flats.values()])
    cuts = np.searchsorted(positions, bounds)
    out = {}
    for i, name in enumerate(flats):
        kept = positions[cuts[i] : cuts[i + 1]]
        values = None if config.method == "compeft" else cast_to(name, torch.from_numpy(x[kept]), config.dtype)
        out[name] = Sparse(tuple(update[name].shape), kept - bounds[i], x[kept] < 0, values, scale)
    return out


def cast_to(name: str, tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    """`tensor` in the wire `dtype` (a copy); ValueError where a finite value overflows it."""
    cast = tensor.detach().to("cpu", DTYPES[dtype], copy=True)
    if dtype != "float32" and bool((torch.isinf(cast) & torch.isfinite(tensor)).any()):
        limit = torch.finfo(DTYPES[dtype]).max
        raise ValueError(f"update[{name!r}] has values beyond {dtype}'s range (±{limit:g}); use a wider `dtype`")
    return cast


def densify(sparse: Sparse) -> torch.Tensor:
    """The dense tensor a `Sparse` stands for: ±γ (float32) or the kept values, zeros elsewhere."""
    if sparse.values is None:
        gamma = np.float32(sparse.scale)
        values = torch.from_numpy(np.where(sparse.negative, -gamma, gamma).astype(np.float32))
    else:
        values = sparse.values
    out = torch.zeros(math.prod(sparse.shape), dtype=values.dtype)  # (n,)
    out[torch.from_numpy(sparse.positions)] = values
    return out.reshape(sparse.shape)


def compress(update: Mapping[str, torch.Tensor], config: CodecConfig) -> Update:
    """C(update): what the receiver gets back, exactly (`decode(encode(update, config), layout_of(update))`)."""
    if config.method == "none":
        check_update(update)
        return {name: cast_to(name, tensor, config.dtype) for name, tensor in update.items()}
    return {name: densify(sparse) for name, sparse in sparsify(update, config).items()}


def residual(update: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor]) -> Update:
    """Error feedback: e = update − sent, in float64, so that sent + e == update.

    The client keeps e and adds it to its next update before compressing (Karimireddy et al.,
    "Error Feedback Fixes SignSGD and other Gradient Compression Schemes", arXiv:1901.09847).
    float64 because float32 subtraction is not exact: 3·γ − γ can round, and then sent + e ≠
    update. Two float32 numbers whose binary exponents differ by at most 28 are both multiples of
    the smaller one's ulp, and their difference is < 2^(e_max+2), so it fits float64's 53-bit
    significand: e is exact and `sent.double() + e == update.double()`. That covers every entry
    where sent = 0 (e = update) and every kept entry within a factor 2^28 of γ; only a kept entry
    2.7e8 times smaller or larger than γ can round. An update that is already float64 (one that
    carries the previous residual) gets the difference rounded to float64, a relative 1e-16.
    """
    if set(update) != set(sent):
        raise ValueError(f"update and sent name different tensors: {sorted(set(update) ^ set(sent))}")
    if bad := [name for name in update if update[name].shape != sent[name].shape]:
        raise ValueError(f"update and sent differ in shape for {bad}")
    return {
        name: update[name].detach().to("cpu", torch.float64) - sent[name].detach().to("cpu", torch.float64)
        for name in update
    }
