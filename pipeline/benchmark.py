"""Training speed for the current preset: `python pipeline/benchmark.py train [--steps N] [with preset key=value ...]`.

Prints training examples per second and seconds per step (after warm-up) of the configured model on
the prepared data (running prepare first when its artifact is missing), on this machine's devices.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter; errors still show
PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline/benchmark.py", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("train",), help="what to measure")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (tracing, caches)")
    parser.epilog = "Configuration after `with`, as for pipeline/run.py: `with default model.name=umx`."
    return parser


def benchmark_train(config, steps: int, warmup: int) -> dict:
    import keras

    from components import artifacts
    from components.train import build_model, count_params, make_optimizer, make_strategy, train_datasets
    from pipeline import pipeline

    prepare = artifacts.load(Path(config.artifacts_dir), "prepare")
    if prepare is None:
        prepare, _ = pipeline.run_component(pipeline.component("prepare"), config)
    strategy = make_strategy(config.train.replicas)
    with strategy.scope():
        model = build_model(config, prepare.meta["manifest"].get("stats", {}))
        model.train_model.compile(optimizer=make_optimizer(config.train), loss=model.loss)
    train, _, _ = train_datasets(prepare, config, model, config.train.batch_size, seed=config.train.seed)
    iterator = iter(train.repeat())
    for _ in range(warmup):
        model.train_model.train_on_batch(*next(iterator))
    started = time.perf_counter()
    for _ in range(steps):
        model.train_model.train_on_batch(*next(iterator))
    seconds = time.perf_counter() - started
    return {
        "model": config.model.name,
        "parameters": count_params(model.train_model),
        "replicas": strategy.num_replicas_in_sync,
        "batch_size": config.train.batch_size,
        "seq_seconds": config.train.seq_seconds,
        "steps": steps,
        "seconds_per_step": round(seconds / steps, 4),
        "examples_per_second": round(steps * config.train.batch_size / seconds, 2),
        "keras": keras.__version__,
    }


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("with") if "with" in argv else len(argv)
    args = get_parser().parse_args(argv[:split])
    args.updates = argv[split:]
    logging.basicConfig(level=logging.WARNING)
    from pipeline.experiment import UserError, resolve
    from pipeline.run import split_updates

    updates, named = split_updates(args.updates)
    try:
        config = resolve(updates, named)
        if config.train.replicas > 1:
            from components.train import configure_devices

            configure_devices(config.train.replicas)
        print(json.dumps(benchmark_train(config, args.steps, args.warmup), indent=1))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
