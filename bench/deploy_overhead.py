"""Per-message client overhead on Flower's deployment engine, three ways in one command: Flower's
own (a new `flwr-clientapp` process per message, a SuperNode that polls every 3 s: `fedsim
supernode --clientapp fresh --poll 3`, the baseline), fedsim's warm ClientApp runner alone
(`--clientapp warm --poll 3`), and fedsim's default (the warm runner and a SuperNode that asks
for work soon after a message, `fedsim.runtime.deploy.polling`).

    .venv/bin/python bench/deploy_overhead.py [--rounds 5] [--model tiny-llama]

1. Fresh-process costs: importing the ClientApp (torch, transformers, PEFT, datasets) and
   loading the base model (`smollm2-135m` from the memory-mapped safetensors cache, and
   `tiny-llama`), each in a new Python process.
2. A SuperLink behind its proxy and one SuperNode on 127.0.0.1 with TLS and node authentication,
   a one-client scenario, once each way: per round, the server's send → reply time of
   the training message against the client's own training time (`wall-time-s`); the difference
   is the per-message overhead, the polling included.

What it prints and the command go to `--doc` (default docs/results/deploy-overhead.md), whose
"## Reading" section is kept.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.printed import keep_printed, write_printed  # noqa: E402
from fedsim.results.rundir import read_metrics  # noqa: E402
from fedsim.runtime.deploy.certs import make_node_keys  # noqa: E402
from fedsim.runtime.deploy.flower import FLOWER_POLL_S, SUPERNODE_POLL_S  # noqa: E402
from fedsim.runtime.deploy.local import LocalFederation  # noqa: E402


def fresh_process(code: str) -> float:
    """Seconds a new Python process takes to run `code` (imports included)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def process_costs() -> None:
    imports = "import clients.app"
    base = fresh_process("import torch, transformers")
    print(f"python + import torch, transformers           {base:6.2f} s")
    print(f"python + import clients.app (ClientApp)       {fresh_process(imports):6.2f} s")
    for model in ("tiny-llama", "smollm2-135m"):
        code = (
            f"{imports}\nimport time\nt=time.perf_counter()\n"
            f"from fedsim.model.loader import load_model\nload_model({model!r})\nprint(time.perf_counter()-t)"
        )
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True).stdout
        print(f"load_model({model!r}) in a fresh process  {float(out.split()[-1]):6.2f} s")


def deployed_rounds(rounds: int, model: str, clientapp: str, poll_s: float) -> list[float]:
    """One SuperNode (its ClientApp `warm` or `fresh`, its first poll after a message `poll_s`) on a
    TLS federation with its proxy; prints each round's send → reply time, the client's training time
    and the difference; returns the differences."""
    overrides = [
        f"rounds={rounds}", "name=overhead", f"model.name={model}", "clients.num_clients=1", "clients.per_round=1",
        "clients.eval_per_round=0", "train.local_steps=2",
    ]  # fmt: skip
    scenario = ROOT / "scenarios" / "tiny.toml"
    with tempfile.TemporaryDirectory() as tmp, LocalFederation(Path(tmp) / "fed") as fed:
        fed.start_superlink()
        key = make_node_keys(Path(tmp) / "keys", 1)[0]
        fed.register(key)
        fed.start_supernode(scenario, 0, key, overrides, clientapp=clientapp, poll_s=poll_s)
        t0 = time.perf_counter()
        subprocess.run(
            fed.run_command(scenario, overrides, Path(tmp) / "runs"), env=fed.env(), check=True, capture_output=True
        )
        total = time.perf_counter() - t0
        run = Path(tmp) / "runs" / "overhead"
        events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
        metrics = read_metrics(run)
        # the warm runner logs each ClientApp process's life: the query at discovery, then one per round
        process_s = [
            float(s) for s in re.findall(r"done in ([0-9.]+) s", (fed.workdir / "supernode-0.log").read_text())
        ]
    train = metrics[metrics["kind"] == "train"].set_index("round")
    print(
        f"\nClientApp {clientapp}, --poll {poll_s:g}: one SuperNode behind the proxy, TLS + node auth, {model}, "
        f"{total:.1f} s in all"
    )
    print("| round | send → reply (s) | client training (s) | overhead (s) | ClientApp process (s) |")
    print("| --- | --- | --- | --- | --- |")
    overheads = []
    for e in events:
        if e["event"] == "round_end" and e["round"] > 0:
            rt, wall = e["train_time_s"], float(train.loc[e["round"], "wall_time_s"])
            overheads.append(rt - wall)
            life = f"{process_s[e['round']]:.2f}" if len(process_s) > e["round"] else "-"
            print(f"| {e['round']} | {rt:.2f} | {wall:.2f} | {rt - wall:.2f} | {life} |")
    return overheads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument(
        "--doc",
        type=Path,
        default=ROOT / "docs" / "results" / "deploy-overhead.md",
        help="where the figures and the command are written",
    )
    args = parser.parse_args()
    with keep_printed() as printed:
        process_costs()
        runs = {
            "Flower's (fresh ClientApp, 3 s poll)": deployed_rounds(args.rounds, args.model, "fresh", FLOWER_POLL_S),
            "warm ClientApp, 3 s poll": deployed_rounds(args.rounds, args.model, "warm", FLOWER_POLL_S),
            f"fedsim's (warm ClientApp, --poll {SUPERNODE_POLL_S:g})": deployed_rounds(
                args.rounds, args.model, "warm", SUPERNODE_POLL_S
            ),
        }
        base = statistics.mean(next(iter(runs.values())))
        print(f"\nper-message overhead over {args.rounds} rounds (ratio: mean against Flower's)")
        print("| SuperNode | mean (s) | min (s) | max (s) | ratio |")
        print("| --- | --- | --- | --- | --- |")
        for name, o in runs.items():
            print(
                f"| {name} | {statistics.mean(o):.2f} | {min(o):.2f} | {max(o):.2f} | {statistics.mean(o) / base:.2f} |"
            )
    write_printed(args.doc, "Per-message overhead on Flower's deployment engine", printed.getvalue())


if __name__ == "__main__":
    main()
