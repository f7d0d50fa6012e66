"""Compression of a SmolLM2-135M-sized LoRA update: bytes on the wire, error, and codec speed.

    .venv/bin/python bench/compression.py
    .venv/bin/python bench/compression.py --repeats 7 --threads 2
    .venv/bin/python bench/compression.py --accuracy      # + accuracy on the quickstart (~25 min)

The update is SmolLM2-135M's LoRA at rank 16 on all seven linears of its 30 layers (hidden 576,
9 query heads and 3 key/value heads of 64, MLP 1536): A (r × in) and B (out × r) per linear,
4,884,480 entries, drawn N(0, 0.01²) and seeded. A real update is not Gaussian (its magnitudes
are heavier-tailed), so the errors here are only indicative; the sizes and speeds carry over.

Sizes are ratios to the raw float32 bytes (4·n). The 8-bit baseline (per-tensor absmax: q =
round(127·x / max|x|) as int8, one float32 scale per tensor) is counted as n + 4·tensors bytes,
with no names or shapes, in its favour. Speeds are MB/s of float32 input (4·n / seconds, median
of --repeats), for ComPEFT at d = 0.1 against `torch.save` / `torch.load` of the same tensors
to and from a BytesIO in the same run.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsim.compression import CodecConfig, decode, encode  # noqa: E402

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


def smollm2_lora_update(seed: int = 0, std: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    update = {}
    for layer in range(LAYERS):
        for module, (fan_in, fan_out) in LINEARS.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            update[f"{prefix}.lora_A.weight"] = torch.randn(RANK, fan_in, generator=g) * std  # (r, in)
            update[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, RANK, generator=g) * std  # (out, r)
    return update


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
    return len(payload), decode(payload)


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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    update = smollm2_lora_update()
    n = sum(t.numel() for t in update.values())
    raw = 4 * n
    print(
        f"SmolLM2-135M LoRA r={RANK}: {len(update)} tensors, {n:,} entries, {raw / 1e6:.2f} MB float32; "
        f"{torch.get_num_threads()} torch thread(s)"
    )

    print(f"{'method':<22}{'bytes':>12}{'ratio':>9}{'rel. L2 error':>16}")
    configs = {
        "none float16": CodecConfig(method="none", dtype="float16"),
        "topk d=0.1 float32": CodecConfig(method="topk", density=0.1),
    }
    configs |= {f"compeft d={d}": CodecConfig(density=d) for d in (0.2, 0.1, 0.05)}
    results = [(label, *sent(update, config)) for label, config in configs.items()]
    results.insert(1, ("int8 absmax/tensor", *absmax_int8(update)))
    for label, size, approx in results:
        print(f"{label:<22}{size:>12,}{raw / size:>9.2f}{relative_error(update, approx):>16.4f}")

    config = CodecConfig(density=0.1)
    payload, saved = encode(update, config), torch_save(update)
    t_encode = median_seconds(lambda: encode(update, config), args.repeats)
    t_decode = median_seconds(lambda: decode(payload), args.repeats)
    t_save = median_seconds(lambda: torch_save(update), args.repeats)
    t_load = median_seconds(lambda: torch.load(io.BytesIO(saved), weights_only=True), args.repeats)
    mb = raw / 1e6
    print(
        f"compeft d=0.1 encode {mb / t_encode:7.1f} MB/s   torch.save {mb / t_save:7.1f} MB/s   "
        f"ratio {t_save / t_encode:.2f}"
    )
    print(
        f"compeft d=0.1 decode {mb / t_decode:7.1f} MB/s   torch.load {mb / t_load:7.1f} MB/s   "
        f"ratio {t_load / t_decode:.2f}"
    )
    if args.accuracy:
        import compression_accuracy  # bench/ is on sys.path when this script runs

        sys.argv = [sys.argv[0]]
        compression_accuracy.main()


if __name__ == "__main__":
    main()
