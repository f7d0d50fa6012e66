"""Training step of SmolLM2 structurally pruned at ratios 0, 0.25, 0.5: time and peak memory vs fedsim.fleet.costs.

    .venv/bin/python bench/pruning_step.py                       # about 3 minutes on 2 idle cores
    .venv/bin/python bench/pruning_step.py --ratios 0 0.5 --steps 4
    .venv/bin/python bench/pruning_step.py --profile 0.5         # where the time goes

Setup: SmolLM2-135M, float32, `torch.set_num_threads(2)`; pruned with the magnitude score, per_layer
(`fedsim.pruning.prune`); then LoRA r=8 on q_proj,v_proj (`fedsim.model.adapter.attach_lora`), AdamW,
batch 8 x 64 random tokens, one step = forward + backward + optimizer step.

Time: all ratios' models live in one process and take their steps in turn (0, 0.25, 0.5, 0, …), so
load from other processes on a shared machine hits every ratio alike; "time x" is the median over
rounds of t_ratio / t_0 from the same round, "step s" the median step time (after `--warmup`
rounds). "cpu x" is the same with process CPU time. Memory: each ratio runs once more alone in a
fresh subprocess, so allocator state and high-water marks cannot leak between ratios. The child
copies the weights out of the memory-mapped checkpoint (else its file pages, pruned ones too, stay
resident), loads, prunes and attaches LoRA, then frees garbage, returns free heap to the OS (glibc
`malloc_trim(0)`) and resets the kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`);
VmHWM after two steps is then the peak resident memory of training. "net x" subtracts the ~380 MB
that the interpreter, torch and transformers hold before any model is loaded. tracemalloc cannot
see torch's allocations and torch keeps no CPU allocator statistics, hence RSS. "est x" is
`fedsim.fleet.costs.train_memory`.

Finding (this 2-core CPU, two runs): step time x0.78-0.83 at ratio 0.25 and x0.62 at 0.5, against
FLOPs x0.80 and x0.60 (2.7-3.1 s per unpruned step), so at 0.5 the time ratio is close to the FLOP
ratio. `--profile 0.5` (self CPU seconds per step, 2 threads, ratio 0 -> 0.5) shows the residual:
decoder matmuls 1.54 -> 0.80 (x0.52; their FLOPs x0.50), lm_head matmuls 0.43 -> 0.45 (FLOPs
x1.00), log-softmax + NLL over the 512 x 49,152 logits 0.10 -> 0.09 (no FLOPs in `fedsim.fleet.costs`),
everything else (RMSNorm, rotary, SDPA, SiLU·up, residual adds, AdamW, autograd) 0.55 -> 0.35;
total x0.65 against FLOPs x0.60. Pruning shrinks the matmuls it removes in proportion to their
FLOPs; the time the cost model does not count (the vocabulary-sized loss, ~4% of an unpruned step,
unchanged, and the element-wise work, ~20%, which shrinks only to x0.64) keeps the time ratio a
few points above the FLOP ratio. Peak memory shrinks less than FLOPs (x0.72-0.74 at 0.5; x0.66-0.68
net of the libraries; estimate x0.64): the embeddings (28.3M of 134.5M parameters) and the 100 MB
vocabulary-sized logits, log-probabilities and their gradient are not pruned, and the transient
ones are not in `train_memory`. On a loaded machine, 2-thread timings are erratic (OpenMP threads
wait for each other whenever another process holds a core; one run measured 20 s for a 3 s step),
hence the interleaving; with 1 thread under load the same profile gave x0.69, the memory-bound
loss taking 0.35-0.49 s.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsim.config.scenario import LoraConfig  # noqa: E402
from fedsim.fleet.costs import ModelShape, train_memory, train_step_flops  # noqa: E402
from fedsim.model.adapter import attach_lora  # noqa: E402
from fedsim.model.loader import load_model  # noqa: E402
from fedsim.pruning import prunable_params, prune  # noqa: E402

BATCH, SEQ_LEN, RANK, TARGETS = 8, 64, 8, ("q_proj", "v_proj")
Setup = tuple[torch.nn.Module, torch.optim.Optimizer, dict[str, torch.Tensor], float]


def _proc_status(field: str) -> int:
    """A kB field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _release_and_reset_peak() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS


def _setup(ratio: float, threads: int) -> Setup:
    """(LoRA model pruned at `ratio`, AdamW, batch, share of prunable parameters removed)."""
    torch.set_num_threads(threads)
    model, _ = load_model("smollm2-135m")
    for p in model.parameters():  # own the weights: no file pages of the memory-mapped checkpoint
        p.data = p.data.clone()
    full = prunable_params(model)
    if ratio > 0:
        prune(model, ratio, mode="per_layer", score="magnitude")
    removed = 1 - prunable_params(model) / full
    model = attach_lora(model, LoraConfig(rank=RANK, target_modules=TARGETS), seed=0)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ_LEN), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    return model, optimizer, batch, removed


def _step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]
) -> tuple[float, float]:
    """(wall, CPU) seconds of one forward + backward + AdamW step; CPU time sums all threads."""
    wall, cpu = time.perf_counter(), time.process_time()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.process_time() - cpu


def memory(ratio: float, threads: int) -> dict[str, float]:
    """Run in a fresh process: peak RSS of two training steps at `ratio`, and fedsim.fleet.costs' numbers."""
    imports = _proc_status("VmRSS")  # interpreter + torch + transformers, before any model
    model, optimizer, batch, removed = _setup(ratio, threads)
    _release_and_reset_peak()
    for _ in range(2):  # AdamW allocates its state in the first step
        _step(model, optimizer, batch)
    shape = ModelShape.from_model(model)
    return {
        "removed": removed,
        "params": shape.num_params,
        "peak_rss": _proc_status("VmHWM"),
        "imports_rss": imports,
        "flops": train_step_flops(shape, batch=BATCH, seq_len=SEQ_LEN, rank=RANK, targets=TARGETS),
        "memory_estimate": train_memory(shape, batch=BATCH, seq_len=SEQ_LEN, rank=RANK, targets=TARGETS).total,
    }


def interleaved_times(
    ratios: list[float], threads: int, warmup: int, steps: int
) -> dict[float, list[tuple[float, float]]]:
    """Per ratio, the (wall, CPU) time of each measured round, every round stepping each ratio once."""
    setups = {r: _setup(r, threads) for r in ratios}
    times: dict[float, list[tuple[float, float]]] = {r: [] for r in ratios}
    for k in range(warmup + steps):
        for r, (model, optimizer, batch, _) in setups.items():
            t = _step(model, optimizer, batch)
            if k >= warmup:
                times[r].append(t)
    return times


PARTS = ("lm_head matmuls", "decoder matmuls", "log_softmax + loss", "everything else")


def _parts(prof: torch.profiler.profile, vocab: int) -> dict[str, float]:
    """Self CPU seconds of one profiled step, by part."""
    parts = dict.fromkeys(PARTS, 0.0)
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in ("aten::mm", "aten::addmm", "aten::bmm"):
            part = PARTS[0] if any(vocab in shape for shape in e.input_shapes if shape) else PARTS[1]
        else:
            part = PARTS[2] if "log_softmax" in e.key or "nll_loss" in e.key else PARTS[3]
        parts[part] += e.self_cpu_time_total / 1e6
    return parts


def profile(ratio: float, threads: int, steps: int) -> None:
    """Where the time goes at ratio 0 and at `ratio`: both models in this process, steps interleaved."""
    setups = {r: _setup(r, threads) for r in (0.0, ratio)}
    totals = {r: dict.fromkeys(PARTS, 0.0) for r in setups}
    for k in range(steps + 1):
        for r, (model, optimizer, batch, _) in setups.items():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
                _step(model, optimizer, batch)
            if k > 0:  # the first is a warm-up
                for part, seconds in _parts(prof, model.config.vocab_size).items():
                    totals[r][part] += seconds / steps
    flops = {}
    for r, (model, *_) in setups.items():
        shape = ModelShape.from_model(model)
        head = 4 * BATCH * SEQ_LEN * shape.hidden * shape.vocab  # forward + dX, as in fedsim.fleet.costs
        total = train_step_flops(shape, batch=BATCH, seq_len=SEQ_LEN, rank=RANK, targets=TARGETS)
        flops[r] = {PARTS[0]: head, PARTS[1]: total - head}
    print(f"self CPU s per step, mean of {steps}, {threads} thread(s): ratio 0 | ratio {ratio} | time x | FLOPs x")
    for part in PARTS:
        a, b = totals[0.0][part], totals[ratio][part]
        f = f"{flops[ratio][part] / flops[0.0][part]:.2f}" if part in flops[0.0] else "-"
        print(f"{part:>20} {a:6.2f} {b:6.2f} {b / a:6.2f} {f:>7}")
    a, b = sum(totals[0.0].values()), sum(totals[ratio].values())
    f = sum(flops[ratio].values()) / sum(flops[0.0].values())
    print(f"{'total':>20} {a:6.2f} {b:6.2f} {b / a:6.2f} {f:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    parser.add_argument("--warmup", type=int, default=2, help="rounds before timing")
    parser.add_argument("--steps", type=int, default=8, help="timed rounds (one step per ratio each)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2 by default)")
    parser.add_argument("--memory", type=float, help=argparse.SUPPRESS)  # child: one ratio's memory
    parser.add_argument("--profile", type=float, metavar="RATIO", help="profile ratio 0 against RATIO instead")
    args = parser.parse_args()
    if args.profile is not None:
        return profile(args.profile, args.threads, args.steps)
    if args.memory is not None:
        return print(json.dumps(memory(args.memory, args.threads)))
    if args.ratios[0] != 0.0:
        parser.error("--ratios must start with 0, the reference")
    mem = {}
    for r in args.ratios:
        cmd = [sys.executable, __file__, "--memory", str(r), "--threads", str(args.threads)]
        mem[r] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    times = interleaved_times(args.ratios, args.threads, args.warmup, args.steps)
    print(
        f"SmolLM2-135M, LoRA r{RANK} on {','.join(TARGETS)}, batch {BATCH}x{SEQ_LEN}, {args.threads} threads, "
        f"{args.steps} interleaved rounds after {args.warmup}; x = relative to ratio 0"
    )
    print(
        f"{'ratio':>5} {'removed':>7} {'params M':>8} {'step s':>6} {'time x':>6} {'cpu x':>6} {'FLOPs x':>7} "
        f"{'peak MB':>7} {'peak x':>6} {'net x':>6} {'est x':>6}"
    )
    ref, t0 = mem[0.0], times[0.0]
    for r in args.ratios:
        m, t = mem[r], times[r]
        time_x = statistics.median(a[0] / b[0] for a, b in zip(t, t0))
        cpu_x = statistics.median(a[1] / b[1] for a, b in zip(t, t0))
        net = (m["peak_rss"] - m["imports_rss"]) / (ref["peak_rss"] - ref["imports_rss"])
        print(
            f"{r:>5.2f} {m['removed']:>7.3f} {m['params'] / 1e6:>8.1f} {statistics.median(w for w, _ in t):>6.2f} "
            f"{time_x:>6.2f} {cpu_x:>6.2f} {m['flops'] / ref['flops']:>7.2f} {m['peak_rss'] / 2**20:>7.0f} "
            f"{m['peak_rss'] / ref['peak_rss']:>6.2f} {net:>6.2f} {m['memory_estimate'] / ref['memory_estimate']:>6.2f}"
        )


if __name__ == "__main__":
    main()
