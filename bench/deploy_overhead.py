"""Per-message client overhead on Flower's deployment engine (a SuperNode starts a new
`flwr-clientapp` process for every message), and what a fresh process pays to load a model.

    .venv/bin/python bench/deploy_overhead.py [--rounds 3] [--model tiny-llama]

1. Fresh-process costs: importing the ClientApp (torch, transformers, PEFT, datasets) and
   loading the base model (`smollm2-135m` from the memory-mapped safetensors cache, and
   `tiny-llama`), each in a new Python process as a SuperNode would.
2. One SuperLink + one SuperNode on 127.0.0.1 with TLS and node authentication, a one-client
   scenario: per round, the server's send → reply time of the training message against the
   client's own training time (`wall-time-s`); the difference is the per-message overhead.

What it prints and the command go to `--doc` (default docs/results/deploy-overhead.md), whose
"## Reading" section is kept.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.printed import keep_printed, write_printed  # noqa: E402
from fedsim.results.rundir import read_metrics  # noqa: E402
from fedsim.runtime.deploy import LocalFederation, make_node_keys  # noqa: E402


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


def deployed_rounds(rounds: int, model: str) -> None:
    overrides = [
        f"rounds={rounds}", "name=overhead", f"model.name={model}", "clients.num_clients=1", "clients.per_round=1",
        "clients.eval_per_round=0", "train.local_steps=2",
    ]  # fmt: skip
    scenario = ROOT / "scenarios" / "tiny.toml"
    with tempfile.TemporaryDirectory() as tmp, LocalFederation(Path(tmp) / "fed") as fed:
        fed.start_superlink()
        key = make_node_keys(Path(tmp) / "keys", 1)[0]
        fed.register(key)
        fed.start_supernode(scenario, 0, key, overrides)
        t0 = time.perf_counter()
        subprocess.run(
            fed.run_command(scenario, overrides, Path(tmp) / "runs"), env=fed.env(), check=True, capture_output=True
        )
        total = time.perf_counter() - t0
        run = Path(tmp) / "runs" / "overhead"
        events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
        metrics = read_metrics(run)
    train = metrics[metrics["kind"] == "train"].set_index("round")
    print(f"\none SuperNode, TLS + node auth, {model}: `flwr run` took {total:.1f} s for {rounds} rounds")
    print("round  send->reply  client training  overhead")
    for e in events:
        if e["event"] == "round_end" and e["round"] > 0:
            rt, wall = e["train_time_s"], float(train.loc[e["round"], "wall_time_s"])
            print(f"{e['round']:>5}  {rt:9.2f} s  {wall:13.2f} s  {rt - wall:6.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
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
        deployed_rounds(args.rounds, args.model)
    write_printed(args.doc, "Per-message overhead on Flower's deployment engine", printed.getvalue())


if __name__ == "__main__":
    main()
