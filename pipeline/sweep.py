"""Sweeps: a grid over configuration keys and training seeds, each point a normal pipeline run.

    sweep --grid train.batch_size=4,8 model.umx.hidden_size=256,512 --seeds 3 --budget 120 [with PRESET k=v ...]
    sweep --sweep seed_study --seeds 3 --musdb-preview ~/MUSDB18/MUSDB18-7

Data is prepared once per distinct `data` section (`<dir>/shared/`), then every point (grid values x
seed, `train.seed` = 0..N-1) runs the train and evaluate stages in `<dir>/points/<point>/` through the
driver's Sacred experiment, so each stage is a Sacred run recorded by the same observers
(`--runs-dir`, `--sql`, `--mongo`). The budget per point is wall-clock seconds (`--budget`,
train.max_seconds, early stopping off) or a number of epochs (`--epochs`).

A finished point writes `point.json` with the fingerprint of its resolved configuration and budget;
a point whose `point.json` matches is skipped, so an interrupted sweep resumes where it stopped (a
half-trained point resumes from its last epoch through the train stage itself).

Writes into `<dir>`: `results.csv` (one row per point and seed), `summary.csv` and `results.md` (mean
± std over seeds per grid point), `loss_vs_epoch.png` and `sdr_vs_train_seconds.png`.
"""
from __future__ import annotations

import argparse
import copy
import csv
import itertools
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter; errors still show
if __name__ == "__main__" and not __package__:  # `python pipeline/sweep.py`
    from _script import put_project_root_first
    put_project_root_first()

from configs.errors import SweepError, UserError  # noqa: E402 - after the sys.path set-up above

log = logging.getLogger("pipeline.sweep")

# Named sweeps: {name: (description, {dotted key: values})}
SWEEPS = {
    # The Open-Unmix seed study (issue #13): batch size, hidden size and samples per track against loss and
    # training time, and the unidirectional LSTM (real-time capable) against the BLSTM.
    "seed_study": ("Open-Unmix study: batch size, hidden size, samples per track, BLSTM vs LSTM", {
        "train.batch_size": [4, 8, 16, 32],
        "model.umx.hidden_size": [256, 512],
        "train.samples_per_track": [16, 32],
        "model.umx.unidirectional": [False, True],
    }),
    # The question of the streaming model alone: unidirectional vs bidirectional at one budget
    "unidirectional": ("Open-Unmix: unidirectional LSTM vs BLSTM", {"model.umx.unidirectional": [False, True]}),
    # Every family on one budget (pipeline/compare.py)
    "families": ("every model family on one budget", {
        "model.name": ["umx", "wave_u_net", "unet", "m_unet", "c_unet", "tfc_tdf_v3", "dttnet"]}),
}

# Columns of results.csv after the varied keys, and which of them get mean ± std in the summary
MEASURES = ("parameters", "train_loss", "val_loss", "train_seconds", "epochs", "SDR", "SIR", "ISR", "SAR", "uSDR",
            "q", "mix_sdr", "irm_sdr", "x_realtime")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musicsep sweep", description=__doc__.splitlines()[0],
                                     epilog="Configuration after `with`, as for pipeline/run.py (default: `with "
                                            "default`); grid values override it per point.")
    parser.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2",
                        help="configuration keys and the values to try, e.g. train.batch_size=4,8")
    parser.add_argument("--sweep", choices=sorted(SWEEPS), help="a named grid (more --grid keys are added to it)")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per grid point (train.seed = 0..N-1)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget", type=float, help="training seconds per point (train.max_seconds; default 120)")
    budget.add_argument("--epochs", type=int, help="training epochs per point instead of a time budget")
    parser.add_argument("--dir", default="artifacts/sweep", help="where artifacts, runs and results go")
    parser.add_argument("--runs-dir", help="FileStorageObserver directory (default: <dir>/runs)")
    parser.add_argument("--sql", metavar="URL", help="also record runs in a SQL database, e.g. sqlite:///runs.db")
    parser.add_argument("--mongo", metavar="URL", help="also record runs in MongoDB")
    parser.add_argument("--musdb-preview", metavar="DIR",
                        help="train on MUSDB18's 7-second previews, downloaded into DIR by the musdb package "
                             "(needs network access once; sets data.format=musdb data.root=DIR)")
    parser.add_argument("--no-speed", action="store_true", help="do not time separation (x real-time) per point")
    parser.add_argument("--list", action="store_true", help="print the points and exit")
    return parser


# ------------------------------------------------------------------------------------- the grid
def parse_value(text: str):
    """`4` -> 4, `1e-3` -> 0.001, `true`/`false` -> bool, `none` -> None, anything else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_grid(entries) -> dict:
    grid = {}
    for entry in entries:
        key, sep, values = entry.partition("=")
        if not sep or not key or not values or any(not part for part in key.split(".")):
            raise SweepError(f"--grid {entry!r}: expected KEY=V1,V2,... such as train.batch_size=4,8")
        if key in grid:
            raise SweepError(f"--grid {key}: given twice; list all its values in one KEY=V1,V2")
        grid[key] = [parse_value(v) for v in values.split(",")]
    return grid


def points(grid: dict, seeds: int) -> list:
    """[(values {key: value}, seed)] over the Cartesian product of the grid, seeds innermost."""
    keys = list(grid)
    combos = list(itertools.product(*(grid[k] for k in keys))) if keys else [()]
    return [(dict(zip(keys, combo)), seed) for combo in combos for seed in range(seeds)]


def label(values: dict, seed=None) -> str:
    """A folder-safe name of a point: `train.batch_size=4,model.umx.unidirectional=true,seed=0`."""
    parts = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]
    if seed is not None:
        parts.append(f"seed={seed}")
    return ",".join(parts).replace("/", "_") or "base"


def budget_updates(args) -> dict:
    if args.epochs is not None:
        return {"train": {"epochs": args.epochs, "max_seconds": None}}
    # a time budget: train until it runs out (early stopping would end points at different budgets)
    return {"train": {"max_seconds": args.budget if args.budget is not None else 120.0, "epochs": 100_000,
                      "patience": 100_000}}


# ------------------------------------------------------------------------------------------ data
def fetch_musdb_preview(root) -> Path:
    """MUSDB18's 7-second previews in `root` (`root/train`, `root/test`), downloaded by musdb when missing."""
    import musdb

    root = Path(root).expanduser()
    try:
        musdb.DB(root=str(root), download=True, subsets=["train"])
    except OSError as error:  # URLError, connection refused, disk full
        reason = " ".join(str(getattr(error, "reason", error)).split())[:200]
        raise SweepError(f"--musdb-preview {root}: the musdb package could not download MUSDB18's 7-second "
                         f"previews ({reason}); run once with network access or point data.root at a copy") from None
    if not (root / "train").is_dir():
        raise SweepError(f"--musdb-preview {root}: no train/ folder after the download; remove {root} and retry")
    return root


# --------------------------------------------------------------------------------------- running
def _link(target: Path, link: Path) -> None:
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target.resolve(), target_is_directory=True)


def separation_speed(config, artifacts_dir: Path) -> float:
    """x real-time of the trained separator on the first track of the evaluation split (after a warm-up)."""
    import numpy as np

    from components import artifacts
    from components.data import records
    from components.inference.separation import compiled, separate_array
    from components.training.trained import load_trained

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


def collect(folder: Path, config) -> dict:
    """The measures of a finished point from its train and evaluate artifacts."""
    train = json.loads((folder / "train" / "artifact.json").read_text())
    history = json.loads((folder / "train" / "history.json").read_text())
    metrics = json.loads((folder / "evaluate" / "metrics.json").read_text())
    last = history[-1] if history else {}
    return {
        "parameters": train["figures"]["parameters"],
        "train_loss": last.get("loss"),
        "val_loss": last.get("val_loss"),
        "train_seconds": train["figures"]["seconds"],
        "epochs": train["figures"]["epochs"],
        **{metric: metrics["mean"][metric] for metric in ("SDR", "SIR", "ISR", "SAR", "uSDR")},
        "q": metrics["normalized"]["mean"],
        "mix_sdr": metrics["baselines"]["mix"]["mean"]["SDR"],
        "irm_sdr": metrics["baselines"]["irm"]["mean"]["SDR"],
        "per_target_sdr": {t: metrics["model"][t]["SDR"] for t in config.data.targets},
        "history": [{k: h[k] for k in ("epoch", "loss", "val_loss") if k in h} for h in history],
    }


def run_sweep(*, grid: dict, seeds: int, updates: dict, named: list, root: Path, budget: dict,
              observers_args, speed: bool = True, name: str = "", point_dir=None) -> list:
    """Run (or resume) every point; returns one result dict per point and seed, in grid order.

    `point_dir(values, seed)` names a point's folder under `root` (default `points/<label>`).
    """
    from components import artifacts
    from configs.config import deep_merge, nested
    from pipeline.experiment import build_experiment, invocation_meta, resolve

    grid_points = points(grid, seeds)
    configs = []
    for values, seed in grid_points:  # resolve everything first: a bad key fails before any training
        point_updates = copy.deepcopy(updates)
        for key, value in values.items():
            point_updates = deep_merge(point_updates, nested({key: value}))
        point_updates = deep_merge(point_updates, budget)
        point_updates = deep_merge(point_updates, {"train": {"seed": seed}})
        try:
            config = resolve(point_updates, named)
        except UserError as error:
            raise SweepError(f"point {label(values, seed)}: {error}") from None
        configs.append((values, seed, point_updates, config))

    experiment = build_experiment(observers_args)
    invocation = invocation_meta(False)
    point_runs: dict = {}  # label -> {stage: Sacred run id}
    points_by_label = {label(values, seed): {"values": values, "seed": seed} for values, seed, _, _ in configs}

    def meta(text):  # one invocation; each point its own chain of runs, recording the sweep and its grid values
        return {**invocation, "runs": point_runs.setdefault(text, {}), "comment": f"sweep {name or 'grid'}: {text}",
                "sweep": {"name": name or "grid", "root": str(root), "point": text, "grid": grid,
                          **points_by_label[text]}}

    def run_stage(stage, stage_updates, text):
        try:
            experiment.run(stage, config_updates=stage_updates, named_configs=named, meta_info=meta(text),
                           options={"--loglevel": "INFO"})
        except UserError as error:
            raise SweepError(f"{text}: {stage}: {error}") from None

    results = []
    for index, (values, seed, point_updates, config) in enumerate(configs):
        text = label(values, seed)
        folder = root / (point_dir(values, seed) if point_dir else Path("points") / text)
        data_key = artifacts.fingerprint(config.section("data"))
        shared = root / "shared" / f"data-{data_key}"
        fingerprint = artifacts.fingerprint({"config": config.to_dict(), "budget": budget, "speed": speed})
        done = folder / "point.json"
        if done.is_file():
            previous = json.loads(done.read_text())
            if previous.get("fingerprint") == fingerprint:
                log.info("point %d/%d %s: complete (fingerprint %s); skipping", index + 1, len(configs), text,
                         fingerprint)
                results.append(previous)
                continue
        log.info("point %d/%d %s", index + 1, len(configs), text)
        # shared by every point with the same data section; the stage skips itself when up to date
        run_stage("prepare", deep_merge(point_updates, {"artifacts_dir": str(shared)}), text)
        (shared / "evaluate-baselines").mkdir(exist_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        _link(shared / "prepare", folder / "prepare")
        _link(shared / "evaluate-baselines", folder / "evaluate-baselines")
        stage_updates = deep_merge(point_updates, {"artifacts_dir": str(folder)})
        for stage in ("train", "evaluate"):
            run_stage(stage, stage_updates, text)
        point_config = resolve(stage_updates, named)
        result = {"point": text, "values": values, "seed": seed, "fingerprint": fingerprint,
                  **collect(folder, point_config)}
        result["x_realtime"] = separation_speed(point_config, folder) if speed else None
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, done)  # a point counts as done only once its results are complete
        results.append(result)
    return results


# --------------------------------------------------------------------------------------- results
def summarise(results: list) -> list:
    """Mean and sample standard deviation over seeds per grid point (values), in grid order."""
    import numpy as np

    groups = {}
    for result in results:
        groups.setdefault(json.dumps(result["values"], sort_keys=False), []).append(result)
    rows = []
    for key, runs in groups.items():
        row = {"values": runs[0]["values"], "seeds": len(runs), "runs": runs}
        for measure in MEASURES:
            found = [r[measure] for r in runs if r.get(measure) is not None]
            row[measure] = float(np.mean(found)) if found else None
            row[measure + "_std"] = float(np.std(found, ddof=1)) if len(found) > 1 else 0.0
        targets = runs[0].get("per_target_sdr", {})
        row["per_target_sdr"] = {t: float(np.mean([r["per_target_sdr"][t] for r in runs])) for t in targets}
        rows.append(row)
    return rows


def _cell(value, digits: int) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_tables(root: Path, grid_keys: list, results: list, rows: list) -> str:
    """results.csv (per point and seed), summary.csv and results.md (mean ± std over seeds). Returns the markdown."""
    with open(root / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(grid_keys + ["seed"] + list(MEASURES))
        for r in results:
            writer.writerow([_cell(r["values"][k], 6) for k in grid_keys] + [r["seed"]]
                            + [_cell(r.get(m), 6) for m in MEASURES])
    with open(root / "summary.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(grid_keys + ["seeds"] + [c for m in MEASURES for c in (m, m + "_std")])
        for row in rows:
            writer.writerow([_cell(row["values"][k], 6) for k in grid_keys] + [row["seeds"]]
                            + [_cell(row[c], 6) for m in MEASURES for c in (m, m + "_std")])
    def spread(row, key, digits):
        shown = row["seeds"] > 1 and row[key] is not None
        return _cell(row[key], digits) + (f" ± {row[key + '_std']:.{digits}f}" if shown else "")

    header = [k.split(".")[-1] for k in grid_keys] + [
        "seeds", "parameters", "train loss", "val loss", "train s", "epochs", "SDR", "SIR", "ISR", "SAR", "uSDR", "q",
        "× real-time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(grid_keys) + "---:|" * (len(header) - len(grid_keys))]
    for row in rows:
        cells = [_cell(row["values"][k], 4) for k in grid_keys] + [
            str(row["seeds"]), f"{int(row['parameters']):,}", spread(row, "train_loss", 4), spread(row, "val_loss", 4),
            spread(row, "train_seconds", 0), spread(row, "epochs", 1), spread(row, "SDR", 2), spread(row, "SIR", 2),
            spread(row, "ISR", 2), spread(row, "SAR", 2), spread(row, "uSDR", 2), spread(row, "q", 2),
            spread(row, "x_realtime", 1)]
        lines.append("| " + " | ".join(cells) + " |")
    if rows:
        lines.append("")
        lines.append(f"Baselines on the same test split: MIX {rows[0]['mix_sdr']:.2f} dB, "
                     f"IRM {rows[0]['irm_sdr']:.2f} dB SDR; mean ± sample standard deviation over seeds.")
    markdown = "\n".join(lines) + "\n"
    (root / "results.md").write_text(markdown)
    return markdown


def plot(root: Path, results: list, rows: list) -> list:
    """loss_vs_epoch.png (train solid, validation dashed, one colour per point) and sdr_vs_train_seconds.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    figure, axes = plt.subplots(figsize=(8, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, result in enumerate(results):
        colour = colours[index % len(colours)]
        epochs = [h["epoch"] for h in result["history"]]
        axes.plot(epochs, [h.get("loss", float("nan")) for h in result["history"]], color=colour, marker=".",
                  label=result["point"])
        if any("val_loss" in h for h in result["history"]):
            axes.plot(epochs, [h.get("val_loss", float("nan")) for h in result["history"]], color=colour, marker=".",
                      linestyle="--")
    axes.set(xlabel="epoch", ylabel="loss (solid: train, dashed: validation)", yscale="log",
             title="loss per epoch, every point")
    if len(results) <= 16:
        axes.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(root / "loss_vs_epoch.png", dpi=120)
    plt.close(figure)
    written.append(root / "loss_vs_epoch.png")

    figure, axes = plt.subplots(figsize=(7, 5))
    for index, row in enumerate(rows):
        colour = colours[index % len(colours)]
        axes.scatter([r["train_seconds"] for r in row["runs"]], [r["SDR"] for r in row["runs"]], color=colour,
                     alpha=0.4)
        axes.errorbar([row["train_seconds"]], [row["SDR"]], xerr=[row["train_seconds_std"]], yerr=[row["SDR_std"]],
                      color=colour, marker="o", capsize=3, label=label(row["values"]))
    if rows:
        axes.axhline(rows[0]["mix_sdr"], color="gray", linestyle=":", label="MIX")
        axes.axhline(rows[0]["irm_sdr"], color="green", linestyle=":", label="IRM")
    axes.set(xlabel="training seconds", ylabel="SDR (dB, mean over targets)", title="SDR vs training time")
    axes.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(root / "sdr_vs_train_seconds.png", dpi=120)
    plt.close(figure)
    written.append(root / "sdr_vs_train_seconds.png")
    return written


def report(root: Path, grid_keys: list, results: list) -> str:
    rows = summarise(results)
    (root / "results.json").write_text(json.dumps(rows, indent=1))
    markdown = write_tables(root, grid_keys, results, rows)
    plot(root, results, rows)
    return markdown


# ------------------------------------------------------------------------------------------ main
def split_with(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("with") if "with" in argv else len(argv)
    return argv[:split], argv[split:]


def main(argv=None) -> int:
    own, config_tokens = split_with(argv)
    args = get_parser().parse_args(own)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from configs.config import deep_merge
    from pipeline.run import split_updates

    try:
        if args.seeds < 1:
            raise SweepError(f"--seeds must be at least 1, got {args.seeds}")
        grid = dict(SWEEPS[args.sweep][1]) if args.sweep else {}
        for key, values in parse_grid(args.grid).items():
            grid[key] = values
        updates, named = split_updates(config_tokens)
        named = named or ["default"]
        if args.musdb_preview:
            root = fetch_musdb_preview(args.musdb_preview)
            updates = deep_merge(updates, {"data": {"format": "musdb", "root": str(root)}})
        if args.list:
            for values, seed in points(grid, args.seeds):
                print(label(values, seed))
            return 0
        root = Path(args.dir)
        root.mkdir(parents=True, exist_ok=True)
        observers_args = argparse.Namespace(no_file_observer=False, runs_dir=args.runs_dir or str(root / "runs"),
                                            sql=args.sql, mongo=args.mongo)
        results = run_sweep(grid=grid, seeds=args.seeds, updates=updates, named=named, root=root,
                            budget=budget_updates(args), observers_args=observers_args, speed=not args.no_speed,
                            name=args.sweep or "")
        print(report(root, list(grid), results))
    except UserError as error:  # SweepError among them
        print(f"error: sweep: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
