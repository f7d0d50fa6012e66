"""Packed local training (`fedsim.model.packed`): tokens/s with K clients per step, against training alone.

    .venv/bin/python bench/packing.py --model tiny-llama --doc /tmp/packing.md     # seconds: a smoke check
    .venv/bin/python bench/packing.py --clients 1 4 16 --repeats 2 --threads 1     # SmolLM2 on CPU, 3 CPU-min
    .venv/bin/python bench/packing.py --device cuda --batch-size 8 --max-len 64 --steps 5 --repeats 3
    .venv/bin/python bench/packing.py --federation --repeats 2 --doc /tmp/packing-federation.md    # Flower + Ray
    .venv/bin/python bench/packing.py --memory --repeats 2 --doc docs/results/packing-memory.md    # 16 a round

No Ray, one process, one model. K clients, each with its own examples (the "mixed" task, seeded by
client), its own adapter on q_proj/v_proj at rank 8 (A as PEFT initialises it, B small and random,
as after a first round) and seed, the same hyper-parameters. For each K three ways to train them,
in turn within each repeat, so load from other processes hits each alike:

- sequential: `train_lora` for one client after the other, on one `PeftModel` (as the ClientApp does);
- packed: `PackedTrainer.train` on the same model, all K in one pack (`max_clients_per_step` = K);
- ceiling: `train_lora` for one client holding all K clients' examples with K·batch_size rows a step,
  what one forward/backward of that size can do at best (no per-client losses, optimizers or padding).

tokens/s = Σ prompt and response tokens trained (padding excluded, `TrainResult.tokens`) / wall time
of the whole call (probe losses included). "packed/seq" and "packed/ceil" are the ratios of tokens/s
within a repeat, median [min, max] over repeats; on CPU the "cpu" ratios are the same with this
process's CPU time, which other processes on a shared machine disturb far less than wall time (use
`--threads 1` there: OpenMP threads waiting for each other burn CPU time too). "pad" is what packing
adds in padding: Σ over steps of rows x the pack's widest row, over Σ over steps and clients of rows
x the client's own widest row. "diff" is the largest ‖Δ_packed − Δ_sequential‖_F / ‖Δ_sequential‖_F
over the clients (Δ = trained − received). On CUDA, "peak GiB" is the packed call's peak allocated
memory beyond what was allocated before, and "est GiB" the trainer's estimate for the pack
(`fedsim.model.packed_jobs`). The doc defaults to docs/results/packing.md on CPU,
docs/results/packing-cuda.md on CUDA.

`--federation`: whole federations on Flower's engine (Ray, fedsim's ClientApp) of `--scenario`
(default scenarios/tiny.toml, with `--set` overrides on top of FEDERATION_SET), unpacked
(`simulation.packing = "off"`) and packed ("on"), in turn within each repeat. A round's time is the
wall time between two rounds' progress reports (training, federated and central evaluation,
checkpoint); the first round, which loads the model in every process, is left out. "packed/off" is
the ratio of the median round times within a repeat, median [min, max] over repeats; "same" says
whether the packed run's losses equal the unpacked run's to 1e-4 relative. The doc is written only
with `--doc`.

`--memory`: the peak memory of whole federations of `--scenario` with MEMORY_SET (16 clients a
round, all in one pack, short local training) and `--set` on top, for each of `--memory-models`,
three ways in turn within each repeat: unpacked ("off": the scenario's pool, as many ClientApps at
once as `simulation.num_cpus_per_client` lets the CPUs run), unpacked on the packed run's pool
("wide": each ClientApp on the packed CPU share and all of them fed at once, as in a packed round,
each loading the base model: what a packed round cost when every ClientApp held its own copy), and
packed ("on"). Each
run is a child process (`--memory-run`); every `--interval` seconds the parent sums the memory of
that process and all its descendants: the driver (server, central evaluation), Ray's own services
(GCS, raylet and its object store, ...) and every Ray worker (the ClientApp actors, the packed
trainer). PSS (proportional set size: each shared page split among the processes that map it) is
the memory the tree holds; RSS sums count shared pages (libraries, memory-mapped weights) once per
process. "peak" is the largest sum over the run, "ClientApps", "trainer" and "Ray" that sample's
PSS of the Ray workers but the trainer, of the trainer, and of Ray's services; "on/off" and
"on/wide" the ratios of the peaks within a repeat.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.printed import keep_printed, write_printed  # noqa: E402
from fedsim.config.scenario import LoraConfig  # noqa: E402
from fedsim.data.tasks import generate  # noqa: E402
from fedsim.model.adapter import AdapterState, attach_lora, get_state, set_state, set_trainable  # noqa: E402
from fedsim.model.loader import load_model  # noqa: E402
from fedsim.model.packed import PackedTrainer  # noqa: E402
from fedsim.model.packed_jobs import PackedJob, job_bytes  # noqa: E402
from fedsim.model.training import (  # noqa: E402
    TrainResult,
    batch_order,  # noqa: E402
    collate,
    resolve_device,
    train_lora,
)

Row = dict[str, float]
FEDERATION_SET = ["rounds=5", "clients.per_round=4", "clients.eval_per_round=2", "simulation.max_clients_per_step=4"]
MEMORY_SET = [
    "rounds=1", "clients.num_clients=16", "clients.per_round=16", "simulation.max_clients_per_step=16",
    "clients.eval_per_round=0", "data.num_examples=800", "data.central_test_size=8", "eval.max_new_tokens=2",
    "train.local_steps=2", "train.batch_size=2", "train.max_seq_len=32",
]  # fmt: skip
MEMORY_MODES = ("off", "wide", "on")
GIB = 2**30


def make_jobs(start: AdapterState, k: int, args: argparse.Namespace) -> list[PackedJob]:
    """K seeded clients: `start`'s A (PEFT's initialisation), a small random B of their own."""
    jobs = []
    for c in range(k):
        gen = torch.Generator().manual_seed(c)
        state = {
            key: (0.01 * torch.randn(v.shape, generator=gen) if ".lora_B." in key else v) for key, v in start.items()
        }
        jobs.append(
            PackedJob(
                key=c,
                state=state,
                scale=args.alpha / args.rank,
                examples=generate("mixed", args.examples, seed=c),
                steps=args.steps,
                batch_size=args.batch_size,
                max_len=args.max_len,
                lr=3e-4,
                weight_decay=0.0,
                grad_clip=1.0,
                seed=1000 + c,
            )  # fmt: skip
        )
    return jobs


def alone(model, tokenizer, job: PackedJob) -> tuple[TrainResult, AdapterState]:  # type: ignore[no-untyped-def]
    set_trainable(model, job.freeze)
    set_state(model, job.state)
    result = train_lora(
        model, tokenizer, job.examples, steps=job.steps, batch_size=job.batch_size, max_len=job.max_len, lr=job.lr,
        weight_decay=job.weight_decay, grad_clip=job.grad_clip, seed=job.seed,
    )  # fmt: skip
    return result, get_state(model)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float, float]:
    """(fn(), wall seconds, this process's CPU seconds)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def padding(jobs: list[PackedJob], tokenizer) -> float:  # type: ignore[no-untyped-def]
    """Σ_steps rows x pack width / Σ_steps Σ_k rows x own width."""
    orders = [batch_order(len(j.examples), j.steps, j.batch_size, j.seed) for j in jobs]
    packed = own = 0
    for step in range(max(j.steps for j in jobs)):
        shapes = [
            collate(tokenizer, [j.examples[i] for i in o[step]], j.max_len)["input_ids"].shape
            for j, o in zip(jobs, orders)
            if step < j.steps
        ]
        packed += sum(n for n, _ in shapes) * max(t for _, t in shapes)
        own += sum(n * t for n, t in shapes)
    return packed / own


def measure(model, tokenizer, jobs: list[PackedJob], args: argparse.Namespace, device: torch.device) -> Row:  # type: ignore[no-untyped-def]
    """One repeat: tokens/s of the three ways to train `jobs`, and the packed update's difference."""
    k = len(jobs)
    seq, seq_s, seq_cpu = timed(lambda: [alone(model, tokenizer, j) for j in jobs], device)
    trainer = PackedTrainer(model, tokenizer, device=device, max_clients_per_step=k)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    packed, packed_s, packed_cpu = timed(lambda: trainer.train(jobs), device)
    peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else 0
    one = PackedJob(
        key=0, state=jobs[0].state, scale=jobs[0].scale, examples=[e for j in jobs for e in j.examples],
        steps=args.steps, batch_size=k * args.batch_size, max_len=args.max_len, lr=3e-4, weight_decay=0.0,
        grad_clip=1.0, seed=0,
    )  # fmt: skip
    ceil, ceil_s, ceil_cpu = timed(lambda: alone(model, tokenizer, one), device)
    diff = 0.0
    for job, (_, ref), out in zip(jobs, seq, packed):  # type: ignore[call-overload]
        _, state = out.unwrap()
        d = torch.cat([(state[key] - ref[key]).flatten() for key in ref])
        u = torch.cat([(ref[key] - job.state[key]).flatten() for key in ref])
        diff = max(diff, float(d.norm() / u.norm()))
    width = max(j.max_len for j in jobs)
    tokens = sum(r.tokens for r, _ in seq)  # type: ignore[attr-defined]
    assert tokens == sum(o.unwrap()[0].tokens for o in packed)  # type: ignore[attr-defined]
    return {
        "seq": tokens / seq_s,
        "packed": tokens / packed_s,
        "ceil": ceil[0].tokens / ceil_s,  # type: ignore[index]
        "packed/seq": seq_s / packed_s,
        "packed/ceil": tokens / packed_s / (ceil[0].tokens / ceil_s),  # type: ignore[index]
        "cpu packed/seq": seq_cpu / packed_cpu,
        "cpu packed/ceil": tokens / packed_cpu / (ceil[0].tokens / ceil_cpu),  # type: ignore[index]
        "diff": diff,
        "pad": padding(jobs, tokenizer),
        "peak": peak / 2**30,
        "est": sum(job_bytes(j, width, trainer.token_bytes) for j in jobs) / 2**30,
    }


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "unknown CPU"
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def round_times(scenario_path: Path, packing: str, overrides: list[str], out: Path) -> tuple[list[float], Any]:
    """Wall seconds of each round after the first, and the run's metrics, of one federation."""
    from fedsim.config.scenario import load_scenario
    from fedsim.results.rundir import RunDir, read_metrics
    from fedsim.runtime.simulation import run_simulation

    scenario = load_scenario(scenario_path, [*FEDERATION_SET, *overrides, f'simulation.packing="{packing}"'])
    stamps: list[float] = []
    run_dir = RunDir.create(out / f"{packing}-{time.time_ns()}", scenario)
    run_simulation(scenario, run_dir, progress=lambda summary: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps[1:], stamps[2:])], read_metrics(run_dir.path)


def federation(args: argparse.Namespace) -> None:
    """`--federation`: round times of whole federations, packed against unpacked (module docstring)."""
    import logging
    import tempfile

    import numpy as np

    logging.getLogger("flwr").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp, keep_printed() as printed:
        print(f"{args.scenario} with {' '.join([*FEDERATION_SET, *args.set])} on {machine(torch.device('cpu'))}")
        ratios, rows = [], []
        for repeat in range(args.repeats):
            off, m_off = round_times(args.scenario, "off", args.set, Path(tmp))
            on, m_on = round_times(args.scenario, "on", args.set, Path(tmp))
            losses = [m["loss"].to_numpy(dtype=np.float64) for m in (m_off, m_on)]
            same = bool(np.allclose(losses[0], losses[1], rtol=1e-4, atol=0, equal_nan=True))
            ratios.append(statistics.median(on) / statistics.median(off))
            rows.append((repeat, statistics.median(off), statistics.median(on), ratios[-1], same))
        print(f"{'repeat':>6} {'off s/round':>12} {'packed s/round':>15} {'packed/off':>11} {'same':>5}")
        for repeat, off_s, on_s, ratio, same in rows:
            print(f"{repeat:>6} {off_s:12.2f} {on_s:15.2f} {ratio:11.2f} {str(same):>5}")
        print(f"packed/off round time: {spread(ratios)} (median [min, max] over repeats; < 1: packed is faster)")
    if args.doc:
        write_printed(args.doc, "Packed federation rounds against unpacked ones", printed.getvalue())


def memory_run(args: argparse.Namespace) -> None:
    """`--memory-run MODE`: one federation of `--scenario` with MEMORY_SET and `--set`, MODE one of
    MEMORY_MODES (module docstring), its run directory under `--out` (what `--memory` measures, in a
    process of its own)."""
    from fedsim.config.scenario import load_scenario
    from fedsim.results.rundir import RunDir
    from fedsim.runtime.simulation import every_actor_at_once, run_simulation
    from fedsim.server.packs import cpu_share

    overrides = [*MEMORY_SET, *args.set]
    packed = load_scenario(args.scenario, [*overrides, 'simulation.packing="on"'])
    scenario = load_scenario(args.scenario, [*overrides, 'simulation.packing="off"'])
    if args.memory_run == "on":
        scenario = packed
    elif args.memory_run == "wide":  # unpacked, on as many ClientApps as the packed run, all at once
        share = cpu_share(packed)
        scenario = load_scenario(
            args.scenario, [*overrides, 'simulation.packing="off"', f"simulation.num_cpus_per_client={share}"]
        )
    with every_actor_at_once() if args.memory_run == "wide" else contextlib.nullcontext():
        run_simulation(scenario, RunDir.create(args.out, scenario))


def _kind(process: psutil.Process, driver: int) -> str:
    if process.pid == driver:
        return "driver"
    title = " ".join(process.cmdline())
    if title.startswith("ray::PackServer"):
        return "trainer"
    return "workers" if title.startswith("ray::") else "ray"


def _sample(root: psutil.Process) -> dict[str, float]:
    """Σ PSS and Σ RSS (bytes) of `root` and its descendants now, and PSS by `_kind`."""
    out = {"pss": 0.0, "rss": 0.0, "processes": 0.0, "driver": 0.0, "workers": 0.0, "trainer": 0.0, "ray": 0.0}
    for process in [root, *root.children(recursive=True)]:
        try:
            info, kind = process.memory_full_info(), _kind(process, root.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # it ended between the listing and the read
        out["pss"] += info.pss
        out["rss"] += info.rss
        out["processes"] += 1
        out[kind] += info.pss
    return out


def peak_memory(args: argparse.Namespace, mode: str, out: Path, model: str) -> tuple[dict[str, float], Any]:
    """The sample with the largest Σ PSS over one `--memory-run` of `model` (its wall time added, and
    its peak Σ RSS and most processes), and the run's metrics."""
    from fedsim.results.rundir import read_metrics

    command = [sys.executable, __file__, "--memory-run", mode, "--scenario", str(args.scenario), "--out", str(out)]
    command += [x for s in [*args.set, f'model.name="{model}"'] for x in ("--set", s)]
    start, peak, rss, most = time.perf_counter(), {"pss": 0.0}, 0.0, 0.0
    with open(out / f"{mode}.log", "w") as log:
        child = psutil.Popen(command, stdout=log, stderr=log)
        while child.poll() is None:
            now = _sample(child)
            peak, rss, most = max(peak, now, key=lambda s: s["pss"]), max(rss, now["rss"]), max(most, now["processes"])
            time.sleep(args.interval)
    if child.returncode != 0:
        raise RuntimeError(f"the {mode} run failed (exit {child.returncode}); its log: {out / f'{mode}.log'}")
    (run,) = [p for p in out.iterdir() if (p / "metrics.parquet").is_file()]
    return {**peak, "rss": rss, "processes": most, "wall": time.perf_counter() - start}, read_metrics(run)


def memory(args: argparse.Namespace) -> None:
    """`--memory`: peak memory of whole federations, packed against unpacked (module docstring)."""
    import tempfile

    import numpy as np

    with keep_printed() as printed:
        print(f"{args.scenario} with {' '.join([*MEMORY_SET, *args.set])} on {machine(torch.device('cpu'))}")
        print(f"memory of the run's process tree, sampled every {args.interval:g}s; GiB")
        print(
            f"{'model':>13} {'repeat':>6} {'packing':>7} {'peak PSS':>9} {'peak RSS':>9} {'driver':>7} "
            f"{'ClientApps':>11} {'trainer':>8} {'Ray':>6} {'processes':>9} {'wall s':>7} {'same':>5}"
        )
        ratios: dict[str, dict[str, list[float]]] = {m: {"on/off": [], "on/wide": []} for m in args.memory_models}
        for model in args.memory_models:
            for repeat in range(args.repeats):
                with tempfile.TemporaryDirectory() as tmp:
                    peaks, metrics = {}, {}
                    for mode in MEMORY_MODES:
                        (Path(tmp) / mode).mkdir()
                        peaks[mode], metrics[mode] = peak_memory(args, mode, Path(tmp) / mode, model)
                    losses = {m: metrics[m]["loss"].to_numpy(dtype=np.float64) for m in MEMORY_MODES}
                    same = {
                        m: bool(np.allclose(losses["off"], v, rtol=1e-4, atol=0, equal_nan=True))
                        for m, v in losses.items()
                    }
                for mode, p in peaks.items():
                    print(
                        f"{model:>13} {repeat:>6} {mode:>7} {p['pss'] / GIB:9.2f} {p['rss'] / GIB:9.2f} "
                        f"{p['driver'] / GIB:7.2f} {p['workers'] / GIB:11.2f} {p['trainer'] / GIB:8.2f} "
                        f"{p['ray'] / GIB:6.2f} {int(p['processes']):>9} {p['wall']:7.1f} {str(same[mode]):>5}",
                        flush=True,
                    )
                for key in ratios[model]:
                    ratios[model][key].append(peaks["on"]["pss"] / peaks[key.split("/")[1]]["pss"])
        for model, r in ratios.items():
            print(f"{model}: peak PSS on/off {spread(r['on/off'])}, on/wide {spread(r['on/wide'])} (median [min, max])")
    if args.doc:
        write_printed(args.doc, "Peak memory of a federation round, packed against unpacked", printed.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="registry name (tiny-llama for a quick check)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64], help="K, clients per step")
    parser.add_argument("--steps", type=int, default=2, help="local steps per client")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=32)
    parser.add_argument("--examples", type=int, default=16, help="examples per client")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument("--doc", type=Path, help="results doc (default: docs/results/packing[-cuda].md)")
    parser.add_argument("--federation", action="store_true", help="round times of whole federations (docstring)")
    parser.add_argument("--scenario", type=Path, default=ROOT / "scenarios" / "tiny.toml", help="--federation's")
    parser.add_argument("--set", action="append", default=[], help="--federation, --memory: a scenario override")
    parser.add_argument("--memory", action="store_true", help="peak memory of whole federations (docstring)")
    parser.add_argument("--interval", type=float, default=0.5, help="--memory: seconds between samples")
    parser.add_argument("--memory-models", nargs="+", default=["tiny-llama", "smollm2-135m"], help="--memory's models")
    parser.add_argument("--memory-run", choices=MEMORY_MODES, help=argparse.SUPPRESS)  # one run of --memory
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)  # --memory-run's run directory root
    args = parser.parse_args()
    if args.memory_run:
        memory_run(args)
        return
    if args.federation or args.memory:
        (federation if args.federation else memory)(args)
        return
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    base, tokenizer = load_model(args.model, dtype=args.dtype)
    lora = LoraConfig(rank=args.rank, alpha=args.alpha, target_modules=("q_proj", "v_proj"))
    model = attach_lora(base, lora, seed=0).to(device)
    start = get_state(model)
    doc = args.doc or ROOT / "docs" / "results" / ("packing-cuda.md" if device.type == "cuda" else "packing.md")
    with keep_printed() as printed:
        print(f"{args.model} ({args.dtype}) on {machine(device)}")
        print(
            f"LoRA r{args.rank} on q_proj, v_proj; per client: {args.steps} steps of {args.batch_size} x <= "
            f"{args.max_len} tokens, {args.examples} examples; {args.repeats} repeat(s), median [min, max]"
        )
        ratios = ["packed/seq", "packed/ceil"] + (["cpu packed/seq", "cpu packed/ceil"] if device.type == "cpu" else [])
        print(f"{'K':>3} {'seq tok/s':>10} {'packed':>10} {'ceiling':>10} " + " ".join(f"{r:>19}" for r in ratios)
              + f" {'pad':>5} {'diff':>8} {'peak GiB':>9} {'est GiB':>8}")  # fmt: skip
        for k in args.clients:
            rows = [measure(model, tokenizer, make_jobs(start, k, args), args, device) for _ in range(args.repeats)]
            col = {name: [r[name] for r in rows] for name in rows[0]}
            peak = f"{max(col['peak']):9.2f}" if device.type == "cuda" else f"{'-':>9}"
            print(
                f"{k:>3} {statistics.median(col['seq']):10.1f} {statistics.median(col['packed']):10.1f} "
                f"{statistics.median(col['ceil']):10.1f} "
                + " ".join(f"{spread(col[r]):>19}" for r in ratios)
                + f" {col['pad'][0]:5.2f} {max(col['diff']):8.1e} {peak} {col['est'][0]:8.2f}",
                flush=True,
            )
    write_printed(doc, "Packed local training: tokens/s against training clients one by one", printed.getvalue())


if __name__ == "__main__":
    main()
