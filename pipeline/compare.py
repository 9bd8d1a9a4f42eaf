"""Every model family on the same data and the same training budget: `python pipeline/compare.py [--budget S]`.

A sweep over `model.name` (pipeline/sweep.py, the named sweep `families`): the data is prepared once
(default preset unless presets follow `with`), then each model trains for `--budget` wall-clock
seconds (train.max_seconds), is evaluated on the test split (MIX/IRM baselines scored once and
shared) and its separation of one test track is timed; `--seeds 3` repeats training with three
seeds and reports mean ± standard deviation. Every stage is a Sacred run under `<dir>/runs`; finished
models are skipped when the command is run again. Writes `<dir>/comparison.json` and
`<dir>/comparison.md` (a Markdown table), besides the sweep's own results table and plots.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter; errors still show
if __name__ == "__main__" and not __package__:  # `python pipeline/compare.py`
    from _script import put_project_root_first
    put_project_root_first()

from pipeline.sweep import SWEEPS  # noqa: E402  (light: no TensorFlow)

MODELS = tuple(SWEEPS["families"][1]["model.name"])


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musicsep compare", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    parser.add_argument("--budget", type=float, default=120.0, help="training seconds per model (default 120)")
    parser.add_argument("--dir", default="artifacts/compare", help="where artifacts and runs go")
    parser.add_argument("--seeds", type=int, default=1,
                        help="training seeds per model (train.seed = 0..N-1); SDR and q get mean ± std")
    parser.epilog = "Configuration after `with`, as for pipeline/run.py (default: `with default`)."
    return parser


def comparison_row(row: dict) -> dict:
    """A sweep summary row (one model) in the comparison's own keys."""
    runs = [{"seed": r["seed"], "parameters": r["parameters"], "train_seconds": r["train_seconds"],
             "epochs": r["epochs"], "sdr": r["SDR"], "usdr": r["uSDR"], "mix_sdr": r["mix_sdr"],
             "irm_sdr": r["irm_sdr"], "q": r["q"], "per_target_sdr": r["per_target_sdr"],
             "x_realtime": r["x_realtime"]} for r in row["runs"]]
    return {"model": row["values"]["model.name"], "seeds": row["seeds"], "runs": runs,
            "parameters": int(row["parameters"]), "train_seconds": row["train_seconds"], "epochs": row["epochs"],
            "sdr": row["SDR"], "sdr_std": row["SDR_std"], "usdr": row["uSDR"], "mix_sdr": row["mix_sdr"],
            "irm_sdr": row["irm_sdr"], "q": row["q"], "q_std": row["q_std"], "x_realtime": row["x_realtime"],
            "per_target_sdr": row["per_target_sdr"]}


def table(rows: list) -> str:
    lines = ["| model | parameters | train s (epochs) | SDR | MIX | IRM | q | uSDR | separation × real-time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        spread = lambda key: (f" ± {row[key + '_std']:.2f}" if row["seeds"] > 1 else "")  # noqa: E731
        lines.append(f"| {row['model']} | {row['parameters']:,} | {row['train_seconds']:.0f} ({row['epochs']:.0f}) | "
                     f"{row['sdr']:.2f}{spread('sdr')} | {row['mix_sdr']:.2f} | {row['irm_sdr']:.2f} | "
                     f"{row['q']:.2f}{spread('q')} | {row['usdr']:.2f} | {row['x_realtime']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from pipeline.sweep import report, run_sweep, split_with, summarise

    own, config_tokens = split_with(argv)
    args = get_parser().parse_args(own)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from configs.errors import UserError
    from pipeline.run import split_updates

    updates, named = split_updates(config_tokens)
    named = named or ["default"]
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    grid = {"model.name": [name for name in args.models.split(",") if name]}
    observers_args = argparse.Namespace(no_file_observer=False, runs_dir=str(root / "runs"), sql=None, mongo=None)
    # the same budget for every family: wall-clock seconds, early stopping off
    budget = {"train": {"max_seconds": args.budget, "epochs": 10_000, "patience": 10_000}}
    try:
        results = run_sweep(grid=grid, seeds=args.seeds, updates=updates, named=named, root=root, budget=budget,
                            observers_args=observers_args, name="families",
                            point_dir=lambda values, seed: (Path(values["model.name"]) if args.seeds == 1 else
                                                            Path(values["model.name"]) / f"seed{seed}"))
    except UserError as error:  # SweepError, ConfigError, StageError...
        print(f"error: compare: {error}", file=sys.stderr)
        return 2
    report(root, list(grid), results)
    rows = [comparison_row(row) for row in summarise(results)]
    (root / "comparison.json").write_text(json.dumps(rows, indent=1))
    markdown = table(rows)
    (root / "comparison.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
