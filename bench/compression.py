"""Compression of SmolLM2-135M-sized LoRA updates: bytes on the wire against the bound, error, speed.

    .venv/bin/python bench/compression.py
    .venv/bin/python bench/compression.py --repeats 7 --threads 2 --doc /tmp/compression-bytes.md
    .venv/bin/python bench/compression.py --accuracy      # + accuracy on the quickstart (~25 min)

Two updates, drawn N(0, 0.01²) and seeded, with SmolLM2-135M's shapes (30 layers, hidden 576,
9 query heads and 3 key/value heads of 64, MLP 1536; A (r × in) and B (out × r) per linear,
PEFT's names): the quickstart's adapter (`scenarios/quickstart.toml`: rank 8 on q_proj and
v_proj, 120 tensors, 460,800 entries) and rank 16 on all seven linears (420 tensors, 4,884,480
entries). A real update is not Gaussian (its magnitudes are heavier-tailed), so the errors here
are only indicative; the sizes and speeds carry over.

Bytes: `v2` is the payload as sent (`fedsim.compression.codec`, format version 2: a 32-byte
header with a layout fingerprint, a 4-byte CRC-32). `v1` is what format version 1 sent for the
same update: 24 header bytes and every tensor's name and shape, 2 + |name| + 1 + 4·ndim bytes
each, the rest alike, so v1 = v2 − 12 + Σ names and shapes (computed, not encoded). `bound` is
the information-theoretic size of what the codec's rule keeps, for a receiver that knows the
layout, n and k and takes every set of k kept positions as equally likely: ⌈(log₂ C(n, k) + k·v)/8⌉
bytes, v = 1 sign bit (compeft) or the value's bits, sign included (topk: 32 for float32), and
n·v bits for none; per-tensor modes sum it per tensor. It leaves out γ (4 bytes) and anything
else the receiver could be told once. `v2/bound` is the codec's overhead over that.

The ratio is to the raw float32 bytes (4·n). The 8-bit baseline (per-tensor absmax: q =
round(127·x / max|x|) as int8, one float32 scale per tensor) is counted as n + 4·tensors bytes,
with no names or shapes, in its favour. Speeds are MB/s of float32 input (4·n / seconds, median
of --repeats), on the rank-16 update, for ComPEFT at d = 0.1 against `torch.save` / `torch.load`
of the same tensors to and from a BytesIO in the same run. What it prints goes to `--doc`
(default docs/results/compression-bytes.md), whose "## Reading" section is kept.
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.printed import keep_printed, write_printed  # noqa: E402
from fedsim.compression import CodecConfig, decode, encode, layout_of, sparsify  # noqa: E402

LAYERS, HIDDEN, Q_OUT, KV_OUT, MLP, RANK = 30, 576, 9 * 64, 3 * 64, 1536, 16
LINEARS = {  # name: (in, out)
    "self_attn.q_proj": (HIDDEN, Q_OUT),
    "self_attn.k_proj": (HIDDEN, KV_OUT),
    "self_attn.v_proj": (HIDDEN, KV_OUT),
    "self_attn.o_proj": (Q_OUT, HIDDEN),
    "mlp.gate_proj": (HIDDEN, MLP),
    "mlp.up_proj": (HIDDEN, MLP),
    "mlp.down_proj": (MLP, HIDDEN),
}


QUICKSTART = ("self_attn.q_proj", "self_attn.v_proj")
LAYOUTS = {  # label: (rank, linears)
    "quickstart: r=8 on q_proj, v_proj": (8, QUICKSTART),
    f"r={RANK} on all seven linears": (RANK, tuple(LINEARS)),
}
BITS = {"float32": 32, "float16": 16, "bfloat16": 16}


def smollm2_lora_update(
    seed: int = 0, std: float = 0.01, rank: int = RANK, linears: tuple[str, ...] = tuple(LINEARS)
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    update = {}
    for layer in range(LAYERS):
        for module in linears:
            fan_in, fan_out = LINEARS[module]
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            update[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * std  # (r, in)
            update[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * std  # (out, r)
    return update


def names_and_shapes(update: dict[str, torch.Tensor]) -> int:
    """Bytes format version 1 spent on the tensors' names and shapes: 2 + |name| + 1 + 4·ndim each."""
    return sum(2 + len(name.encode()) + 1 + 4 * t.dim() for name, t in update.items())


def log2_binomial(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def bound_bytes(update: dict[str, torch.Tensor], config: CodecConfig) -> int:
    """⌈(log₂ C(n, k) + k·v) / 8⌉ of what `config` keeps (module docstring), summed per group."""
    if config.method == "none":
        return math.ceil(sum(t.numel() for t in update.values()) * BITS[config.dtype] / 8)
    value_bits = 1 if config.method == "compeft" else BITS[config.dtype]
    kept = sparsify(update, config)
    groups = [[name] for name in kept] if config.per_tensor else [list(kept)]
    bits = 0.0
    for group in groups:
        n = sum(math.prod(kept[name].shape) for name in group)
        k = sum(len(kept[name].positions) for name in group)
        bits += log2_binomial(n, k) + k * value_bits
    return math.ceil(bits / 8)


def absmax_int8(update: dict[str, torch.Tensor]) -> tuple[int, dict[str, torch.Tensor]]:
    """The 8-bit baseline: (bytes, dequantised update)."""
    size, out = 0, {}
    for name, x in update.items():
        scale = x.abs().max() / 127
        q = torch.round(x / scale).to(torch.int8)
        size += q.numel() + 4
        out[name] = q.float() * scale
    return size, out


def sent(update: dict[str, torch.Tensor], config: CodecConfig) -> tuple[int, dict[str, torch.Tensor]]:
    """(bytes on the wire, what the server decodes) under `config`."""
    payload = encode(update, config)
    return len(payload), decode(payload, layout_of(update))


def relative_error(update: dict[str, torch.Tensor], approx: dict[str, torch.Tensor]) -> float:
    err = sum(float(((update[n] - approx[n].float()) ** 2).sum()) for n in update)
    return (err / sum(float((t**2).sum()) for t in update.values())) ** 0.5


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def torch_save(update: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(update, buffer)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--accuracy", action="store_true", help="also run bench/compression_accuracy.py's federations")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "results" / "compression-bytes.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with keep_printed() as printed:
        for label, (rank, linears) in LAYOUTS.items():
            bytes_table(label, smollm2_lora_update(rank=rank, linears=linears))
        speeds(smollm2_lora_update(), args.repeats)
    write_printed(args.doc, "Bytes on the wire against the bound (bench/compression.py)", printed.getvalue())
    if args.accuracy:
        import compression_accuracy  # bench/ is on sys.path when this script runs

        sys.argv = [sys.argv[0]]
        compression_accuracy.main()


def bytes_table(label: str, update: dict[str, torch.Tensor]) -> None:
    """Bytes per codec: version 1, version 2, the bound, and the error of what is sent."""
    n = sum(t.numel() for t in update.values())
    raw, names = 4 * n, names_and_shapes(update)
    print(f"\nSmolLM2-135M LoRA, {label}: {len(update)} tensors, {n:,} entries, {raw / 1e6:.2f} MB float32")
    print(f"header: v1 {24 + names:,} bytes (24 + {names:,} of names and shapes), v2 32 + 4 (checksum) bytes")
    print(
        f"{'method':<22}{'v1 bytes':>11}{'v2 bytes':>11}{'bound':>11}{'v2/bound':>10}{'ratio':>8}{'rel. L2 error':>15}"
    )
    configs = {
        "none float16": CodecConfig(method="none", dtype="float16"),
        "topk d=0.1 float32": CodecConfig(method="topk", density=0.1),
        "topk d=0.05 float32": CodecConfig(method="topk", density=0.05),
    }
    configs |= {f"compeft d={d}": CodecConfig(density=d) for d in (0.2, 0.1, 0.05)}
    configs |= {"compeft d=0.05 per-t.": CodecConfig(density=0.05, per_tensor=True)}
    size, approx = absmax_int8(update)
    print(f"{'int8 absmax/tensor':<22}{'–':>11}{size:>11,}{'–':>11}{'–':>10}{raw / size:>8.2f}{error(update, approx)}")
    for name, config in configs.items():
        size, approx = sent(update, config)
        bound = bound_bytes(update, config)
        v1 = size - 12 + names
        print(
            f"{name:<22}{v1:>11,}{size:>11,}{bound:>11,}{size / bound:>10.3f}{raw / size:>8.2f}{error(update, approx)}"
        )


def error(update: dict[str, torch.Tensor], approx: dict[str, torch.Tensor]) -> str:
    return f"{relative_error(update, approx):>15.4f}"


def speeds(update: dict[str, torch.Tensor], repeats: int) -> None:
    """ComPEFT d = 0.1's encode and decode against torch.save and torch.load, in MB/s of float32 input."""
    raw = 4 * sum(t.numel() for t in update.values())
    print(f"\nspeed, r={RANK} on all seven linears; {torch.get_num_threads()} torch thread(s), median of {repeats}")
    config, layout = CodecConfig(density=0.1), layout_of(update)
    payload, saved = encode(update, config), torch_save(update)
    t_encode = median_seconds(lambda: encode(update, config), repeats)
    t_decode = median_seconds(lambda: decode(payload, layout), repeats)
    t_save = median_seconds(lambda: torch_save(update), repeats)
    t_load = median_seconds(lambda: torch.load(io.BytesIO(saved), weights_only=True), repeats)
    mb = raw / 1e6
    print(
        f"compeft d=0.1 encode {mb / t_encode:7.1f} MB/s   torch.save {mb / t_save:7.1f} MB/s   "
        f"ratio {t_save / t_encode:.2f}"
    )
    print(
        f"compeft d=0.1 decode {mb / t_decode:7.1f} MB/s   torch.load {mb / t_load:7.1f} MB/s   "
        f"ratio {t_load / t_decode:.2f}"
    )


if __name__ == "__main__":
    main()
