"""Throughput of the data layer (not collected by pytest): `python tests/bench_data.py [--batches N]`.

Prints prepare throughput (audio seconds per wall second) on the MUSDB18 sample (stem mp4 and HQ wav)
and on the `default` preset's synthesized data, and tf.data training throughput (examples/s, augmented).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=60, help="training batches to time (default: 60)")
    parser.add_argument("--copies", type=int, default=1,
                        help="prepare N renamed copies of the MUSDB18 sample track (a catalogue; default: 1)")
    parser.add_argument("--workers", type=int, default=0, help="prepare.workers (default: 0, automatic)")
    return parser


def config_for(artifacts_dir, preset: str, workers: int = 0, **data):
    from configs import PRESETS, Config
    from configs.config import defaults
    from configs.config import deep_merge

    raw = deep_merge(defaults(), PRESETS[preset])
    return Config.from_dict(deep_merge(raw, {"artifacts_dir": str(artifacts_dir), "data": data,
                                             "prepare": {"workers": workers}}))


def catalogue(folder: Path, copies: int, tmp: Path) -> Path:
    """`copies` renamed symbolic links to the sample's train track(s): a data set of that many tracks."""
    if copies <= 1:
        return folder
    root = tmp / f"{folder.name}-x{copies}"
    (root / "train").mkdir(parents=True)
    for index in range(copies):
        for entry in (folder / "train").iterdir():
            (root / "train" / f"copy{index:03d} {entry.name}").symlink_to(entry)
    return root


def time_prepare(label, config):
    from components.data import synth
    from pipeline import definition

    started = time.time()
    if config.data.format == "default":  # generation timed apart from preparation
        synth.ensure(Path(config.artifacts_dir) / "default-data", synth.params_of(config.data))
        print(f"{label}: synthesized {sum(config.data.synth_tracks)} x {config.data.synth_seconds:.0f} s "
              f"in {time.time() - started:.1f} s")
    artifact, _ = definition.run_component(definition.component("prepare"), config, force=True)
    figures = artifact.figures
    print(f"{label}: prepared {figures['total_seconds']:.1f} s of audio in {figures['wall_seconds']:.2f} s "
          f"= {figures['audio_seconds_per_second']:.1f} audio s per s ({figures['megabytes']} MB of shards)")
    return artifact


def time_reader(artifact, config, nb_batches):
    from components.data import records

    seq_samples = int(round(config.train.seq_seconds * config.data.sample_rate))
    batch_size = config.train.batch_size
    dataset = records.load_dataset(artifact, "train", seq_samples=seq_samples, batch_size=batch_size,
                                   augment=True, data_config=config.data, workers=config.train.workers)
    iterator = iter(dataset)
    for _ in range(5):  # warm-up: tracing, shuffle buffer fill
        next(iterator)
    started = time.time()
    for _ in range(nb_batches):
        next(iterator)
    elapsed = time.time() - started
    print(f"reader: {nb_batches * batch_size / elapsed:.0f} training examples/s "
          f"({batch_size} x {seq_samples} samples x {config.data.nb_channels} ch, {len(config.data.targets)} "
          f"targets, augmented, {config.train.workers} workers)")


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    import tensorflow  # noqa: F401  (imported before timing: its import is not data throughput)
    shared = PROJECT_ROOT.parent / "shared" / "data"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if (shared / "musdb18-sample").is_dir():
            for data_format, folder in (("musdb", "musdb18-sample"), ("musdb-hq", "musdb18hq-sample")):
                root = catalogue(shared / folder, args.copies, tmp)
                time_prepare(f"{data_format} sample x{args.copies}",
                             config_for(tmp / data_format, "default", workers=args.workers, format=data_format,
                                        root=str(root), sample_rate=44100))
        else:
            print(f"MUSDB18 sample not found at {shared}; skipped")
        config = config_for(tmp / "default", "default")
        artifact = time_prepare("default data", config)
        time_reader(artifact, config, args.batches)
    return 0


if __name__ == "__main__":
    sys.exit(main())
