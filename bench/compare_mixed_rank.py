"""Mixed-rank strategy comparison on SmolLM2, with intervals: writes docs/results/compare-mixed-rank.md.

    .venv/bin/python bench/compare_mixed_rank.py                    # 9 strategies x 3 seeds, about an hour on 2 cores
    .venv/bin/python bench/compare_mixed_rank.py --strategies fedit,flexlora --seeds 1 --set rounds=1 --doc /tmp/x.md

Runs `fedsim compare` on scenarios/quickstart-mixed-rank.toml (phones rank 2, Jetsons rank 4,
laptops rank 8; 256 held-out examples score the final round) and writes its table, the exact
command, and its three plots into docs/results/. The run folder (--out) is kept, so an interrupted
bench resumes where it stopped. The doc's "## Reading" section and everything after it is the
person's reading of the numbers: a rerun keeps it and replaces what comes before.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.printed import command as bench_command  # noqa: E402
from bench.results_doc import write_result  # noqa: E402
from fedsim.cli import main as fedsim  # noqa: E402

SCENARIO = "scenarios/quickstart-mixed-rank.toml"
STRATEGIES = "fedit,fedprox,hetlora,flexlora,flora,ffa_lora,fedsa_lora,fedex_lora,lora_fair"
PLOTS = ("accuracy_vs_round.png", "loss_vs_round.png", "accuracy_vs_sim_time.png")


def write_doc(compare_dir: Path, doc: Path) -> None:
    """The comparison's Markdown and plots at `doc` (plots beside it), keeping the doc's reading."""
    for plot in PLOTS:
        shutil.copyfile(compare_dir / plot, doc.with_name(f"{doc.stem}-{plot}"))
    images = "\n".join(f"![{plot[:-4]}]({doc.stem}-{plot})" for plot in PLOTS)
    table = (
        (compare_dir / "comparison.md")
        .read_text()
        .replace("# fedsim compare", f"# {doc.stem}: fedsim compare\n\nWritten by `{bench_command()}`, which ran:", 1)
    )
    write_result(doc, f"{table}\n{images}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", default=STRATEGIES)
    parser.add_argument("--seeds", default="3")
    parser.add_argument("--target", default="0.2")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench"), help="where the runs are kept (resumable)")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "results" / "compare-mixed-rank.md"))
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="scenario override (repeatable)"
    )
    args = parser.parse_args()
    command = [
        "compare",
        SCENARIO,
        "--strategies",
        args.strategies,
        "--seeds",
        args.seeds,
        "--target",
        args.target,
        "--out",
        args.out,
    ]
    for override in args.set:
        command += ["--set", override]
    code = fedsim(command)
    if code == 0:
        doc = Path(args.doc)
        doc.parent.mkdir(parents=True, exist_ok=True)
        write_doc(Path(args.out) / f"{Path(SCENARIO).stem}-compare", doc)
        print(f"wrote {doc}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
