"""Every model family on the same data and the same training budget: `python pipeline/compare.py [--budget S]`.

Prepares the data once (default preset unless presets follow `with`), then for each model trains for
`--budget` wall-clock seconds (train.max_seconds), evaluates on the test split (MIX/IRM baselines scored
once and shared) and times separation of one test track; `--seeds 3` repeats training with three seeds
and reports mean ± standard deviation (error bars). Every stage is a Sacred run under
`<dir>/runs`. Writes `<dir>/comparison.json` and `<dir>/comparison.md` (a Markdown table).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    # run as `python pipeline/<script>.py`: the script's folder would shadow the `pipeline` package
    # with pipeline/pipeline.py, so the project root takes its place
    sys.path[0] = str(PROJECT_ROOT)
elif str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

MODELS = ("umx", "wave_u_net", "unet", "m_unet", "c_unet", "tfc_tdf_v3", "dttnet")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline/compare.py", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    parser.add_argument("--budget", type=float, default=120.0, help="training seconds per model (default 120)")
    parser.add_argument("--dir", default="artifacts/compare", help="where artifacts and runs go")
    parser.add_argument("--seeds", type=int, default=1,
                        help="training seeds per model (train.seed = 0..N-1); SDR and q get mean ± std")
    parser.epilog = "Configuration after `with`, as for pipeline/run.py (default: `with default`)."
    return parser


def _link(target: Path, link: Path) -> None:
    if not link.exists():
        link.symlink_to(target.resolve(), target_is_directory=True)


def separation_speed(config, artifacts_dir: Path) -> float:
    """x real-time of the trained separator on the first test track (after one warm-up chunk)."""
    import numpy as np

    from components import artifacts, records
    from components.separation import compiled, separate_array
    from components.train import load_trained

    model = load_trained(artifacts.load(artifacts_dir, "train"), config)
    _, stems = next(iter(records.read_tracks(artifacts.load(artifacts_dir, "prepare"), config.evaluate.split)))
    mixture = np.sum(list(stems.values()), axis=0).astype(np.float32)
    kwargs = dict(sample_rate=config.data.sample_rate, chunk_seconds=config.evaluate.chunk_seconds,
                  overlap=config.evaluate.overlap, input_samples=None)
    separate_fn = compiled(model.separator, model.nb_channels)
    separate_array(separate_fn, mixture[: config.data.sample_rate * 2], **kwargs)  # traces once
    started = time.perf_counter()
    separate_array(separate_fn, mixture, **kwargs)
    return len(mixture) / config.data.sample_rate / (time.perf_counter() - started)


def _summary(name: str, runs: list) -> dict:
    """Mean over seeds (and the standard deviation of SDR and q when there are several)."""
    import numpy as np

    row = {"model": name, "seeds": len(runs), "runs": runs}
    for key in ("parameters", "train_seconds", "epochs", "sdr", "usdr", "mix_sdr", "irm_sdr", "q", "x_realtime"):
        row[key] = float(np.mean([run[key] for run in runs]))
    for key in ("sdr", "q"):
        row[key + "_std"] = float(np.std([run[key] for run in runs], ddof=1)) if len(runs) > 1 else 0.0
    row["parameters"] = int(row["parameters"])
    row["per_target_sdr"] = {t: float(np.mean([run["per_target_sdr"][t] for run in runs]))
                             for t in runs[0]["per_target_sdr"]}
    return row


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("with") if "with" in argv else len(argv)
    args = get_parser().parse_args(argv[:split])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from pipeline.experiment import build_experiment, deep_merge, resolve
    from pipeline.run import split_updates

    updates, named = split_updates(argv[split:])
    named = named or ["default"]
    root = Path(args.dir)
    shared = root / "shared"
    experiment = build_experiment(argparse.Namespace(no_file_observer=False, runs_dir=str(root / "runs"),
                                                     sql=None, mongo=None))
    experiment.run("prepare", config_updates=deep_merge(updates, {"artifacts_dir": str(shared)}),
                   named_configs=named, meta_info={"force": False})
    (shared / "evaluate-baselines").mkdir(exist_ok=True)
    rows = []
    for name in args.models.split(","):
        runs = []
        for seed in range(args.seeds):
            folder = root / name if args.seeds == 1 else root / name / f"seed{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            _link(shared / "prepare", folder / "prepare")
            _link(shared / "evaluate-baselines", folder / "evaluate-baselines")
            model_updates = deep_merge(copy.deepcopy(updates), {
                "artifacts_dir": str(folder), "model": {"name": name},
                "train": {"max_seconds": args.budget, "epochs": 10_000, "patience": 10_000, "seed": seed}})
            for stage in ("train", "evaluate"):
                experiment.run(stage, config_updates=model_updates, named_configs=named, meta_info={"force": False})
            config = resolve(model_updates, named)
            train = json.loads((folder / "train" / "artifact.json").read_text())
            metrics = json.loads((folder / "evaluate" / "metrics.json").read_text())
            runs.append({
                "seed": seed,
                "parameters": train["figures"]["parameters"],
                "train_seconds": train["figures"]["seconds"],
                "epochs": train["figures"]["epochs"],
                "sdr": metrics["mean"]["SDR"],
                "usdr": metrics["mean"]["uSDR"],
                "mix_sdr": metrics["baselines"]["mix"]["mean"]["SDR"],
                "irm_sdr": metrics["baselines"]["irm"]["mean"]["SDR"],
                "q": metrics["normalized"]["mean"],
                "per_target_sdr": {t: metrics["model"][t]["SDR"] for t in config.data.targets},
                "x_realtime": separation_speed(config, folder),
            })
        rows.append(_summary(name, runs))
        (root / "comparison.json").write_text(json.dumps(rows, indent=1))
    lines = ["| model | parameters | train s (epochs) | SDR | MIX | IRM | q | uSDR | separation × real-time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        spread = lambda key: (f" ± {row[key + '_std']:.2f}" if row["seeds"] > 1 else "")  # noqa: E731
        lines.append(f"| {row['model']} | {row['parameters']:,} | {row['train_seconds']:.0f} ({row['epochs']:.0f}) | "
                     f"{row['sdr']:.2f}{spread('sdr')} | {row['mix_sdr']:.2f} | {row['irm_sdr']:.2f} | "
                     f"{row['q']:.2f}{spread('q')} | {row['usdr']:.2f} | {row['x_realtime']:.1f} |")
    (root / "comparison.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
