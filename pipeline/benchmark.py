"""Speed of training and separation: `musicsep benchmark {train,separate,stream,memory,command} [options] [with ...]`.

train:    training examples per second and seconds per step (after warm-up) of the configured model
          on the prepared data (running prepare first when its artifact is missing).
separate: seconds and x real-time to separate the same 30 s stereo input with the SavedModel (the serving
          graph as exported, and its XLA variant `export.xla=true` as `saved_model_xla`) and with each TFLite variant, on 2 CPU threads, plus where the SavedModel's time goes (STFT/ISTFT,
          networks, Wiener filter). The TFLite files run as `separate --model x.tflite` does: one interpreter
          of --threads threads (or `--tflite-workers` 1-thread interpreters on that many chunks at once); the
          float32 file also runs the other way in the same run (`tflite_float32_<n>_workers` or
          `tflite_float32_one_interpreter`). `cpu_seconds` is the CPU time of each backend (all threads),
          the work it does whatever else runs on the machine. Weights do not change speed, so the model is
          built untrained:
          `python pipeline/benchmark.py separate with paper` is the UMX-HQ architecture (4 targets,
          n_fft 4096, hidden 512, 3 BLSTM layers, 1 Wiener iteration) at 44.1 kHz. The TFLite variants are
          timed in turn with the SavedModel (ratios `tflite_float32_over_saved_model`, `tflite_<q>_over_float32`)
          and, when the real MUSDB18-HQ excerpt is in ../shared/data, separate it: `tflite_<variant>_musdb_sdr`
          (mean over targets of the whole-excerpt SDR) and `tflite_<q>_sdr_loss_db` (float32 minus quantized).
          The weights are random there, so that loss is what quantization changes, not a trained model's SDR.
          `float32_floor`: the networks' multiply-adds and their time at this machine's measured float32
          matmul rate (Open-Unmix), a bound no float32 schedule of the same numbers goes below.
stream:   the real-time streaming model (unidirectional Open-Unmix, models/streaming.py) on ONE thread by
          default: latency and compute time per hop, SavedModel and TFLite, as a real-time factor
          (`python pipeline/benchmark.py stream with paper model.umx.unidirectional=True`: UMX size).
memory:   peak resident memory of the `separate` CLI on a synthetic song (default 10 minutes, stereo 44.1 kHz),
          one child process per registered family (or `--families a,b`): each family's SavedModel is
          exported untrained (randomly initialised: weights change neither memory nor speed) at the
          configured size (`with paper`: every family's published size), then `separate` runs on the song
          in a fresh process whose peak RSS the kernel reports (wait4's ru_maxrss), with the chunk the family
          declares (`SeparationModel.separation_chunk_samples`, reported as `chunk_seconds`) unless --chunk-seconds.
command:  whole-process wall time of `separate <song> -n <release>` (start-up, decode, separate, write; the model
          cached) against open-unmix's own pipeline on the same song, each a fresh process, best of --repeats,
          alternating (`musicsep benchmark command --seconds 180 --release umxhq`; random weights at the
          release's sizes, served to the catalogue code from 127.0.0.1).

Against the reference: when the open-unmix PyTorch package is installed, both commands also run it on
the same input with random weights of the same size (Open-Unmix only) and print ratios (> 1: we are
faster). `separate`: open-unmix's `Separator` (same targets, n_fft/hop, hidden size, layers, bandwidth,
Wiener iterations; its default `wiener_win_len` 300) versus every backend. `train`: one optimizer step
on the same random batch (`--step-batch-size` x `train.seq_seconds` stereo): our `train_on_batch` versus
open-unmix's training loop body (STFT encoder, one `OpenUnmix` and one Adam per target, MSE, backward,
step). Install the reference without CUDA and without torchaudio (open-unmix's package `__init__`
imports torchaudio; the benchmark loads `openunmix.model` without it):

    pip install torch==2.13.0
    pip install --no-deps openunmix==1.3.0
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
if __name__ == "__main__" and not __package__:  # `python pipeline/benchmark.py`
    from _script import put_project_root_first
    put_project_root_first()
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musicsep benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("train", "separate", "stream", "memory", "command"),
                        help="what to measure (command: the whole `separate -n <release>` process against "
                             "open-unmix's own pipeline)")
    parser.add_argument("--release", default="umxhq", choices=("umxhq", "umx", "umxl"),
                        help="command: the open-unmix release whose architecture is measured (default umxhq)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (tracing, caches)")
    parser.add_argument("--seconds", type=float, default=30.0, help="separate: input length (default 30 s)")
    parser.add_argument("--repeats", type=int, default=3, help="separate: timed runs, the best is reported")
    parser.add_argument("--threads", type=int, default=None, help="separate: CPU threads (default 2; stream: 1)")
    parser.add_argument("--hops", type=int, default=200, help="stream: timed hops (default 200)")
    parser.add_argument("--tflite-chunk-seconds", type=float, default=None,
                        help="separate: TFLite chunk (default export.tflite_chunk_seconds)")
    parser.add_argument("--no-tflite", action="store_true", help="separate: SavedModel only")
    parser.add_argument("--tflite-workers", type=int, default=None,
                        help="separate: chunks the TFLite files separate at once, one 1-thread interpreter each "
                             "(default 1: one interpreter of --threads threads), as `separate --workers`")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the open-unmix PyTorch comparison even when the package is installed")
    parser.add_argument("--step-batch-size", type=int, default=4,
                        help="train: batch of the step comparison with open-unmix (default 4)")
    parser.add_argument("--step-only", action="store_true",
                        help="train: only the step comparison on a random batch (no prepared data needed)")
    parser.add_argument("--families", default=None,
                        help="memory: comma-separated families (default: every registered family)")
    parser.add_argument("--song-minutes", type=float, default=10.0, help="memory: song length (default 10)")
    parser.add_argument("--chunk-seconds", type=float, default=None,
                        help="memory: separate's --chunk-seconds (default: separate's own, the chunk the family "
                             "declares at its size, else 10 s)")
    parser.add_argument("--work-dir", default=None,
                        help="memory: where the song, SavedModels and stems go (default: a temporary folder)")
    parser.epilog = "Configuration after `with`, as for pipeline/run.py: `with default model.name=umx`."
    return parser


def benchmark_train(config, steps: int, warmup: int) -> dict:
    import keras

    from components import artifacts
    from components.data.manifest import Manifest
    from components.train import compile_model, make_strategy, train_datasets, with_graph_optimization
    from components.training.trained import build_model
    from models.base import count_parameters
    from pipeline import definition

    prepare = artifacts.load(Path(config.artifacts_dir), "prepare")
    if prepare is None:
        prepare, _ = definition.run_component(definition.component("prepare"), config)
    strategy = make_strategy(config.train.replicas)
    with strategy.scope():
        model = build_model(config, Manifest.read(prepare).stats)
    started = time.perf_counter()
    compile_model(model, strategy, config.train)  # as the train stage: optimizer slots and loss trackers built first
    compile_seconds = time.perf_counter() - started
    train, _, _ = train_datasets(prepare, config, model, config.train.batch_size, seed=config.train.seed)
    iterator = iter(train.repeat())
    batch = next(iterator)
    def timed():  # under the model's declared graph optimisation, as the train stage runs fit
        started, cpu_started = time.perf_counter(), time.process_time()
        model.train_model.train_on_batch(*batch)  # the first step: tracing, graph optimisation, one step
        first = time.perf_counter() - started, time.process_time() - cpu_started
        for _ in range(warmup - 1):
            model.train_model.train_on_batch(*next(iterator))
        started = time.perf_counter()
        for _ in range(steps):
            model.train_model.train_on_batch(*next(iterator))
        return first, time.perf_counter() - started

    (first_step, first_step_cpu), seconds = with_graph_optimization(model, timed)
    return {
        "model": config.model.name,
        "parameters": count_parameters(model.train_model),
        "replicas": strategy.num_replicas_in_sync,
        "batch_size": config.train.batch_size,
        "seq_seconds": config.train.seq_seconds,
        "steps": steps,
        "compile_seconds": round(compile_seconds, 2),
        "first_step_seconds": round(first_step, 2),
        # CPU seconds of this process: mostly single-threaded tracing, so a shared machine's load barely moves it
        "first_step_cpu_seconds": round(first_step_cpu, 2),
        "seconds_per_step": round(seconds / steps, 4),
        # what the first step costs beyond a steady one: tracing and graph optimisation (issue 12's "first-step
        # tracing"); the first step itself also runs one step at the configured batch
        "tracing_seconds": round(first_step - seconds / steps, 2),
        "examples_per_second": round(steps * config.train.batch_size / seconds, 2),
        "keras": keras.__version__,
    }


def open_unmix_reference():
    """open-unmix's `openunmix.model` module, or None when torch / open-unmix are not installed.

    Loaded without the package's `__init__` (it imports `openunmix.utils`, which needs torchaudio, which has
    no wheel for every torch); `openunmix.transforms` imports torchaudio at the top but its `torch` STFT
    path never uses it, so an empty stand-in module is registered when torchaudio is missing.
    """
    import importlib
    import importlib.util
    import types

    try:
        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("openunmix") is None:
            return None
    except ValueError:
        return None
    if "openunmix" not in sys.modules:
        spec = importlib.util.find_spec("openunmix")
        package = types.ModuleType("openunmix")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["openunmix"] = package
    if importlib.util.find_spec("torchaudio") is None:
        sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
    return importlib.import_module("openunmix.model")


def _reference_networks(reference, model, config):
    """One open-unmix `OpenUnmix` per target, sized as our model, random (PyTorch default) weights."""
    cfg = model.config
    return {target: reference.OpenUnmix(nb_bins=cfg.n_fft // 2 + 1, nb_channels=config.data.nb_channels,
                                        hidden_size=cfg.hidden_size, nb_layers=cfg.nb_layers,
                                        unidirectional=cfg.unidirectional, max_bin=model.inference.max_bin)
            for target in model.targets}


def _reference_separate(reference, model, config, mixture, threads: int):
    """A callable running open-unmix's `Separator` on `mixture` `(nb_timesteps, nb_channels)`."""
    import torch

    torch.set_num_threads(threads)
    cfg = model.config
    separator = reference.Separator(_reference_networks(reference, model, config), niter=cfg.wiener_iterations,
                                    softmask=False, residual=cfg.residual, sample_rate=float(config.data.sample_rate),
                                    n_fft=cfg.n_fft, n_hop=cfg.hop_length, nb_channels=config.data.nb_channels)
    separator.freeze()
    audio = torch.from_numpy(mixture.T.copy())[None]  # (nb_samples, nb_channels, nb_timesteps)

    def run():
        with torch.inference_mode():
            return separator(audio).numpy()
    return run


def benchmark_train_step(config, batch_size: int, repeats: int, threads: int, with_reference: bool) -> dict:
    """Seconds of one optimizer step on the same random batch: ours, and open-unmix's when installed."""
    import numpy as np
    import tensorflow as tf

    from components.train import build_loss_trackers, make_optimizer
    from components.training.trained import build_model

    model = build_model(config, {})
    nb_timesteps = model.input_samples(int(round(config.train.seq_seconds * config.data.sample_rate)))
    rng = np.random.default_rng(0)
    shape = (batch_size, nb_timesteps, config.data.nb_channels)
    stems = {target: (0.1 * rng.standard_normal(shape)).astype(np.float32) for target in model.targets}
    mixture = np.sum(list(stems.values()), axis=0).astype(np.float32)
    targets = {name: np.asarray(value) for name, value in model.train_targets(
        {name: tf.constant(value) for name, value in stems.items()}).items()}
    model.train_model.compile(optimizer=make_optimizer(config.train), loss=model.loss)
    build_loss_trackers(model.train_model)  # else the step is traced twice
    runs = {"ours": lambda: model.train_model.train_on_batch(mixture, targets)}
    runs["ours"]()  # tracing
    reference = open_unmix_reference() if with_reference and config.model.name == "umx" else None
    if reference is not None:  # timed in turn with ours, so that both see the same load
        runs["open_unmix_pytorch"] = _reference_train_step(reference, model, config, mixture, stems, threads)
        runs["open_unmix_pytorch"]()  # warm-up
    seconds = _best_of_alternating(repeats, runs)
    report = {"model": config.model.name, "batch": list(shape), "threads": threads,
              "seconds": {name: round(value, 3) for name, value in seconds.items()}}
    if reference is not None:
        report["open_unmix_over_ours"] = round(seconds["open_unmix_pytorch"] / seconds["ours"], 2)
    return report


def _reference_train_step(reference, model, config, mixture, stems, threads: int):
    """A callable running open-unmix `train.py`'s loop body for every target (it trains one target per run):
    encoder on the mixture and the target, forward, MSE, backward, Adam step (`lr`, `weight_decay` of `train`)."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    cfg = model.config
    stft, _ = reference.make_filterbanks(n_fft=cfg.n_fft, n_hop=cfg.hop_length,
                                         sample_rate=float(config.data.sample_rate))
    encoder = torch.nn.Sequential(stft, reference.ComplexNorm(mono=config.data.nb_channels == 1))
    networks = _reference_networks(reference, model, config)
    optimizers = {target: torch.optim.Adam(network.parameters(), lr=config.train.lr,
                                           weight_decay=config.train.weight_decay)
                  for target, network in networks.items()}
    x = torch.from_numpy(np.ascontiguousarray(np.transpose(mixture, (0, 2, 1))))
    ys = {target: torch.from_numpy(np.ascontiguousarray(np.transpose(stem, (0, 2, 1))))
          for target, stem in stems.items()}

    def step():
        for target, network in networks.items():
            network.train()
            optimizers[target].zero_grad()
            loss = torch.nn.functional.mse_loss(network(encoder(x)), encoder(ys[target]))
            loss.backward()
            optimizers[target].step()
    return step


def _best_of_alternating(repeats: int, runs: dict, cpu: dict = None) -> dict:
    """Best seconds of each callable in `runs`, run in turn within every repeat (ours, reference, ours, ...):
    a change of load on a shared machine then hits both sides of a ratio alike. `cpu`, when given, receives
    the least CPU seconds (all threads of the process) of each: the work done, whatever else the machine runs."""
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started, cpu_started = time.perf_counter(), time.process_time()
            run()
            best[name] = min(best[name], time.perf_counter() - started)
            if cpu is not None:
                cpu[name] = min(cpu.get(name, float("inf")), time.process_time() - cpu_started)
    return best


def _best_of(repeats: int, run) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def benchmark_separate(config, seconds: float, repeats: int, threads: int, tflite_chunk: float,
                       with_tflite: bool, with_reference: bool = True, tflite_workers: int = None) -> dict:
    import tempfile

    import numpy as np
    import tensorflow as tf

    from components import export
    from components.inference import exported
    from components.inference.separation import separate_array
    from components.training.trained import build_model
    from configs.config import to_plain
    from models.base import count_parameters

    rate = config.data.sample_rate
    rng = np.random.default_rng(0)
    mixture = (0.1 * rng.standard_normal((int(seconds * rate), config.data.nb_channels))).astype(np.float32)
    model = build_model(config, {})
    report = {"model": config.model.name, "parameters": count_parameters(model.train_model), "input_seconds": seconds,
              "sample_rate": rate, "threads": threads, "family_config": to_plain(model.config)}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        batch = tf.constant(mixture[None])
        runs = {}
        # `saved_model`: the serving graph as exported (export.xla, default false: what stock TF Serving runs);
        # `saved_model_xla` / `saved_model_plain`: the other variant, timed in turn in the same run
        other = "saved_model_plain" if config.export.xla else "saved_model_xla"
        for name, xla in (("saved_model", config.export.xla), (other, not config.export.xla)):
            saved = Path(tmp) / name
            export.write_saved_model(model.separator, saved, config.data.nb_channels, xla=xla)
            serving = tf.saved_model.load(str(saved)).signatures[exported.SIGNATURE]
            serving(waveform=batch)  # warm-up: tracing, compilation, allocations
            runs[name] = lambda serving=serving: serving(waveform=batch)
        reference = open_unmix_reference() if with_reference and config.model.name == "umx" else None
        if reference is not None:  # timed in turn with the SavedModel, so that both see the same load
            runs["open_unmix_pytorch"] = _reference_separate(reference, model, config, mixture, threads)
            runs["open_unmix_pytorch"]()
            report["open_unmix"] = _open_unmix_versions()
        if with_tflite and model.inference.mobile is not None:  # converted first, timed in turn with the SavedModel
            excerpt = musdb_excerpt(rate, config.data.nb_channels, model.targets)
            chunk = model.input_samples(int(round(tflite_chunk * rate)))
            mobile = model.inference.mobile(chunk)
            workers = tflite_workers or 1
            variants = {"float32": "", config.export.quantize: config.export.quantize}
            for variant, quantize in variants.items():
                started = time.perf_counter()
                blob = export.convert_tflite(mobile, chunk, config.data.nb_channels, quantize)
                report[f"tflite_{variant}_convert_seconds"] = round(time.perf_counter() - started, 1)
                # as `separate --model x.tflite`: one interpreter of `threads` threads, or `workers` chunks at a
                # time on single-threaded interpreters
                runner = exported.TFLiteChunkRunner(blob, workers=workers,
                                                  threads_per_worker=threads if workers == 1 else 1)
                separate_fn = runner  # the file is the whole separator: waveforms in, stems out
                runs[f"tflite_{variant}"] = lambda separate_fn=separate_fn: separate_array(  # noqa: E731
                    separate_fn, mixture, sample_rate=rate, chunk_seconds=chunk / rate, overlap=0.0,
                    batch_size=workers)
                runs[f"tflite_{variant}"]()  # warm-up
                if variant == "float32" and threads > 1:  # the other driver, same file, same run
                    drivers = 1 if workers > 1 else threads
                    name = "tflite_float32_one_interpreter" if drivers == 1 else f"tflite_float32_{drivers}_workers"
                    alternative = exported.TFLiteChunkRunner(blob, workers=drivers,
                                                           threads_per_worker=threads if drivers == 1 else 1)
                    runs[name] = lambda alternative=alternative, drivers=drivers: separate_array(  # noqa: E731
                        alternative, mixture, sample_rate=rate, chunk_seconds=chunk / rate, overlap=0.0,
                        batch_size=drivers)
                    runs[name]()
                report[f"tflite_{variant}_megabytes"] = round(len(blob) / 1e6, 2)
                if excerpt is not None:  # what quantization costs in separation quality, on real music
                    estimates = separate_array(separate_fn, excerpt[0], sample_rate=rate, chunk_seconds=chunk / rate,
                                               overlap=0.0, batch_size=workers)
                    report[f"tflite_{variant}_musdb_sdr"] = round(_mean_sdr(excerpt[1], estimates), 3)
            report["tflite_chunk_seconds"] = chunk / rate
            report["tflite_workers"] = workers
            if excerpt is not None and config.export.quantize in variants:
                report["musdb_excerpt"] = str(MUSDB_EXCERPT)
                report[f"tflite_{config.export.quantize}_sdr_loss_db"] = round(
                    report["tflite_float32_musdb_sdr"] - report[f"tflite_{config.export.quantize}_musdb_sdr"], 3)
        cpu = {}
        rows.update(_best_of_alternating(repeats, runs, cpu))
        report["cpu_seconds"] = {k: round(v, 3) for k, v in cpu.items()}
        report[f"{other}_over_saved_model"] = round(rows["saved_model"] / rows[other], 2)  # > 1: the other is faster
        if "tflite_float32" in rows:  # > 1: faster than the SavedModel / than float32, same run
            report["tflite_float32_over_saved_model"] = round(rows["saved_model"] / rows["tflite_float32"], 2)
            quantized = f"tflite_{config.export.quantize}"
            if quantized in rows:
                report[f"{quantized}_over_float32"] = round(rows["tflite_float32"] / rows[quantized], 2)
        # where the time goes: the same graph pieces as Keras functions on the whole input
        parts = _separator_parts(model, mixture)
        for name, function in parts.items():
            function()
            rows[f"part:{name}"] = _best_of(repeats, function)
        floor = _matmul_floor(model, mixture.shape[0], repeats)
        if floor:
            report["float32_floor"] = floor
    report["seconds"] = {k: round(v, 3) for k, v in rows.items()}
    report["x_realtime"] = {k: round(seconds / v, 2) for k, v in rows.items() if not k.startswith("part:")}
    if reference is not None:  # > 1: faster than open-unmix on the same input, same run
        report["open_unmix_over_ours"] = {k: round(rows["open_unmix_pytorch"] / v, 2) for k, v in rows.items()
                                          if not k.startswith("part:") and k != "open_unmix_pytorch"}
    return report


def _matmul_floor(model, nb_timesteps: int, repeats: int) -> dict:
    """The networks' multiply-adds on `nb_timesteps` of audio and what they cost at this machine's float32
    matrix-product rate: a floor no float32 schedule of the same numbers goes below.

    Open-Unmix's networks are matrix products per frame: every 2-D kernel (fc1-3, each LSTM's input and
    recurrent kernels) is applied once per STFT frame, so multiply-adds = frames x (weights of 2-D kernels).
    The rate is measured here, on one matmul of the largest kernel's shape over four targets' frames (oneDNN's
    best case: the recurrences' matrix-vector steps run slower). {} for families with other kernels."""
    import numpy as np
    import tensorflow as tf

    networks = list((model.inference.networks or {}).values())
    kernels = [weight for network in networks for weight in network.weights if len(weight.shape) == 2]
    if not kernels or not hasattr(model.config, "hop_length") or any(
            len(weight.shape) > 2 for network in networks for weight in network.weights):
        return {}
    nb_frames = 1 + nb_timesteps // model.config.hop_length
    multiply_adds = nb_frames * sum(int(np.prod(weight.shape)) for weight in kernels)
    largest = max(kernels, key=lambda weight: int(np.prod(weight.shape)))
    rng = np.random.default_rng(0)
    rows = tf.constant(rng.standard_normal((len(networks) * nb_frames, largest.shape[0]), np.float32))
    kernel = tf.constant(rng.standard_normal(tuple(largest.shape), np.float32))
    product = tf.function(lambda: tf.matmul(rows, kernel))
    product()
    seconds = _best_of(repeats, lambda: product().numpy())
    rate = int(rows.shape[0]) * int(np.prod(largest.shape)) / seconds
    return {"networks_giga_multiply_adds": round(multiply_adds / 1e9, 2),
            "float32_matmul_giga_multiply_adds_per_second": round(rate / 1e9, 1),
            "networks_floor_seconds": round(multiply_adds / rate, 3)}


# the real MUSDB18-HQ excerpt of ../shared/data (beside the checkout, or beside its worktree folder)
MUSDB_EXCERPT = next((base / "shared" / "data" / "musdb18hq-sample" / "train" / "Music Delta - 80s Rock"
                      for base in (PROJECT_ROOT.parent, PROJECT_ROOT.parent.parent)
                      if (base / "shared" / "data" / "musdb18hq-sample").is_dir()), None)


def musdb_excerpt(sample_rate: int, nb_channels: int, targets):
    """(mixture `(nb_timesteps, nb_channels)`, {target: stem}) of the real excerpt at `sample_rate`, the mixture
    being the sum of the stems; None when the excerpt is absent or lacks one of `targets`."""
    if MUSDB_EXCERPT is None or not all((MUSDB_EXCERPT / f"{target}.wav").is_file() for target in targets):
        return None
    from components.data.audio import read_audio

    stems = {target: read_audio(MUSDB_EXCERPT / f"{target}.wav", sample_rate=sample_rate, nb_channels=nb_channels)
             for target in targets}
    return sum(stems.values()).astype("float32"), stems


def _mean_sdr(references: dict, estimates: dict) -> float:
    """Mean over targets of the whole-excerpt SDR (components.evaluation.metrics.global_sdr), in dB."""
    from components.evaluation.metrics import global_sdr

    return sum(global_sdr(references[t], estimates[t]) for t in references) / len(references)


def _open_unmix_versions() -> dict:
    from importlib.metadata import version

    return {"openunmix": version("openunmix"), "torch": version("torch")}


def _separator_parts(model, mixture):
    """Timed pieces of the spectrogram separator: STFT+ISTFT alone, STFT+networks, full separator without
    and with Wiener EM. Only for families exposing `make_separator` (e.g. Open-Unmix)."""
    import keras
    import tensorflow as tf

    import inspect

    make = model.inference.make_separator
    # Open-Unmix's pieces: its separator takes wiener_iterations (the other families' parts are not split)
    open_unmix = make is not None and "wiener_iterations" in inspect.signature(make).parameters
    batch = tf.constant(mixture[None])
    parts = {"stft+networks": tf.function(lambda x: model.train_model(x, training=False))}
    networks = model.inference.networks or None
    if open_unmix and networks is not None:
        # the networks alone on the mixture magnitude: one graph per target (as training runs them) versus
        # the separator's stacked graph (models/open_unmix.py StackedOpenUnmix), same weights
        from models.open_unmix import StackedOpenUnmix
        from models.transforms import complex_norm, stft

        magnitude = complex_norm(stft(batch, model.config.n_fft, model.config.hop_length))
        stacked = StackedOpenUnmix(list(networks.values()))
        parts["networks, per target"] = tf.function(  # the mixture is ignored: the magnitude is precomputed
            lambda mixture: tf.stack([network(magnitude, training=False) for network in networks.values()], -1))
        parts["networks, stacked"] = tf.function(lambda mixture: stacked(magnitude, training=False))
    if open_unmix:
        soft = make(wiener_iterations=0)
        parts["separator, soft masks"] = tf.function(lambda x: soft(x, training=False))
        parts["separator, configured Wiener"] = tf.function(lambda x: model.separator(x, training=False))
        from models.transforms import istft, stft

        cfg = model.config
        parts["stft+istft only"] = tf.function(
            lambda x: istft(stft(x, cfg.n_fft, cfg.hop_length), cfg.n_fft, cfg.hop_length, tf.shape(x)[1]))
    return {name: (lambda f=f: keras.ops.convert_to_numpy(tf.nest.flatten(f(batch))[0])) for name, f in parts.items()}


def benchmark_stream(config, hops: int, warmup: int, threads: int) -> dict:
    """Per-hop compute time of the streaming model (median over `hops` of real audio-like noise), SavedModel and
    TFLite, against the hop's duration: x real-time = hop duration / compute time."""
    import tempfile

    import numpy as np

    from components import export
    from components.inference import exported
    from components.training.trained import build_model
    from models.base import count_parameters
    from models.streaming import StreamingOpenUnmix

    model = build_model(config, {})
    stream = StreamingOpenUnmix(model)
    rng = np.random.default_rng(0)
    audio = rng.normal(0, 0.1, (hops + warmup, 1, stream.hop_length, stream.nb_channels)).astype(np.float32)

    def per_hop(step) -> float:
        state, times = stream.initial_state(), []
        for index, hop in enumerate(audio):
            started = time.perf_counter()
            outputs = step(audio=hop, **state)
            if index >= warmup:
                times.append(time.perf_counter() - started)
            state = {name: outputs[name + "_out"] for name in ("frame_buffer", "overlap_tail", "lstm_state")}
        return float(np.median(times))

    hop_seconds = stream.hop_length / stream.sample_rate
    result = {"model": "umx unidirectional", "parameters": count_parameters(model.train_model), "threads": threads,
              **{k: v for k, v in stream.describe().items() if k in ("sample_rate", "hop_samples", "hop_ms",
                                                                      "window_samples", "latency_ms",
                                                                      "algorithmic_latency_ms")}}
    with tempfile.TemporaryDirectory() as tmp:
        export.write_stream_saved_model(stream, Path(tmp) / "saved_model")
        seconds = per_hop(exported.saved_model_stream_step(Path(tmp) / "saved_model"))
        result["saved_model"] = {"ms_per_hop": round(1000 * seconds, 3), "x_realtime": round(hop_seconds / seconds, 2)}
        blob = export.convert_stream_tflite(stream)
        seconds = per_hop(exported.tflite_stream_step(blob, num_threads=threads))
        result["tflite_float32"] = {"ms_per_hop": round(1000 * seconds, 3),
                                    "x_realtime": round(hop_seconds / seconds, 2),
                                    "megabytes": round(len(blob) / 1e6, 2)}
    return result


def _export_untrained(updates: dict, named: list, family: str, saved: str) -> None:
    """(Child process) the untrained SavedModel of `family` at the configured size, with the sidecar `separate`
    reads (rate, channels, targets)."""
    import copy

    from components.export import write_saved_model, write_sidecar
    from components.training.trained import build_model
    from models.base import count_parameters
    from pipeline.experiment import resolve

    updates = copy.deepcopy(updates)
    updates.setdefault("model", {})["name"] = family
    config = resolve(updates, named)
    model = build_model(config, {})
    write_saved_model(model.separator, Path(saved), config.data.nb_channels)
    sidecar = {"model": family, "sample_rate": config.data.sample_rate, "nb_channels": config.data.nb_channels,
               "targets": list(model.targets), "parameters": count_parameters(model.train_model), "untrained": True,
               "separation_chunk_samples": model.inference.separation_chunk_samples,
               "config": {"data": config.section("data"), "model": config.section("model")}}
    write_sidecar(Path(saved), sidecar)


def benchmark_command(release: str, seconds: float, repeats: int, work: Path) -> dict:
    """Whole-process wall time (start-up, decode, separate, write) of `separate <song> -n <release>` with the model
    already cached, against open-unmix's own pipeline on the same song (soundfile read, its `Separator` with the
    same weights and its defaults: 1 Wiener iteration, wiener_win_len 300; soundfile write), best of `repeats`,
    each run a fresh process, alternating. The weights are random (open-unmix's initialisation, seed 0) at the
    release's sizes, served to the catalogue code from a local HTTP server on 127.0.0.1 under the published file
    naming (`<target>-<sha256 prefix>.pth`), so the measured path is the real `-n` one: catalogue, cache,
    conversion (once, untimed), SavedModel."""
    import functools
    import hashlib
    import http.server
    import subprocess
    import threading

    import numpy as np

    from components.data import synth
    from components.inference.files import read_any
    from configs.errors import UserError
    from models.open_unmix import PUBLISHED

    reference = open_unmix_reference()
    if reference is None:
        raise UserError("benchmark command needs open-unmix's PyTorch package: pip install torch; "
                        "pip install --no-deps openunmix==1.3.0")
    import torch

    spec = PUBLISHED[release]
    n_fft, rate, channels = spec["n_fft"], spec["sample_rate"], spec["nb_channels"]
    max_bin = int(np.ceil(spec["bandwidth"] / (rate / 2) * (n_fft // 2 + 1)))  # open-unmix's bandwidth_to_max_bin
    files = work / "release"
    files.mkdir()
    torch.manual_seed(0)
    names = {}
    for target in spec["targets"]:
        network = reference.OpenUnmix(nb_bins=n_fft // 2 + 1, nb_channels=channels, hidden_size=spec["hidden_size"],
                                      nb_layers=3, max_bin=max_bin)
        path = files / f"{target}.pth"
        torch.save(network.state_dict(), path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        names[target] = f"{target}-{digest[:8]}.pth"
        path.rename(files / names[target])
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(files)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    catalogue_file = work / "catalogue.json"
    catalogue_file.write_text(json.dumps({"models": [{
        "name": release, "family": "umx", "import": {"model": release}, "sample_rate": rate,
        "targets": list(spec["targets"]), "license": "random weights", "source": "pipeline/benchmark.py",
        "files": [{"url": f"{url}/{name}", "sha256": name[:-4].split("-")[1]} for name in names.values()]}]}))
    env = dict(os.environ, MUSICSEP_CATALOG=str(catalogue_file), MUSICSEP_CACHE=str(work / "cache"),
               PYTHONPATH=str(PROJECT_ROOT))
    song = work / "song.wav"
    synth.write_song(song, seconds, rate, channels)
    ours = [sys.executable, str(PROJECT_ROOT / "pipeline" / "separate.py"), str(song), "-n", release, "-q", "--force"]
    try:
        first = subprocess.run(ours + ["-o", str(work / "first")], env=env, capture_output=True, text=True)
        if first.returncode != 0:  # downloads and converts once: not timed
            raise UserError(f"separate -n {release} failed: {first.stderr.strip()[-500:]}")
    finally:
        server.shutdown()
    script = work / "open_unmix_pipeline.py"
    script.write_text(f"""import sys, time
import soundfile, torch
from pipeline.benchmark import open_unmix_reference
reference = open_unmix_reference()
audio, rate = soundfile.read({str(song)!r}, dtype="float32", always_2d=True)
networks = {{}}
for target, name in {names!r}.items():
    network = reference.OpenUnmix(nb_bins={n_fft // 2 + 1}, nb_channels={channels}, hidden_size={spec["hidden_size"]},
                                  nb_layers=3, max_bin={max_bin})
    network.load_state_dict(torch.load({str(files)!r} + "/" + name, map_location="cpu"))
    networks[target] = network
separator = reference.Separator(networks, niter=1, softmask=False, residual=False, wiener_win_len=300,
                                sample_rate=float(rate), n_fft={n_fft}, n_hop={spec["hop_length"]},
                                nb_channels={channels})
separator.freeze()
with torch.inference_mode():
    estimates = separator(torch.from_numpy(audio.T.copy())[None])[0].numpy()
import os
os.makedirs(sys.argv[1], exist_ok=True)
for index, target in enumerate(networks):
    soundfile.write(f"{{sys.argv[1]}}/{{target}}.wav", estimates[index].T, rate, subtype="FLOAT")
""")
    theirs = [sys.executable, str(script), str(work / "reference")]

    def timed(command, out):
        start = time.perf_counter()
        result = subprocess.run(command + out, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise UserError(f"{command[1]} failed: {result.stderr.strip()[-500:]}")
        return time.perf_counter() - start

    best = {"ours": float("inf"), "open-unmix": float("inf")}
    for _ in range(repeats):  # alternating, so a busy moment costs both
        best["ours"] = min(best["ours"], timed(ours, ["-o", str(work / "ours")]))
        best["open-unmix"] = min(best["open-unmix"], timed(theirs, []))
    ours_stems, _ = read_any(work / "ours" / "song" / "vocals.wav")
    their_stems, _ = read_any(work / "reference" / "vocals.wav")
    error = float(np.sum(their_stems ** 2) / max(np.sum((ours_stems - their_stems) ** 2), 1e-20))
    return {"release": release, "song_seconds": seconds, "repeats": repeats,
            "separate_seconds": round(best["ours"], 2), "open_unmix_seconds": round(best["open-unmix"], 2),
            "speedup": round(best["open-unmix"] / best["ours"], 2),
            "vocals_sdr_between_them_db": round(10 * np.log10(error), 1), **_open_unmix_versions()}


def benchmark_memory(updates: dict, named: list, families, minutes: float, work: Path,
                     chunk_seconds: float = None) -> dict:
    """Peak RSS (MB) and wall time of `separate` on a `minutes`-long stereo 44.1 kHz song, per family."""
    import multiprocessing
    import shutil
    import subprocess

    from components.data import synth
    from components.inference.exported import SIDECAR

    song = work / "song.wav"
    synth.write_song(song, minutes * 60.0)
    report = {"song_minutes": minutes, "song_megabytes": round(song.stat().st_size / 1e6, 1),
              "chunk_seconds": chunk_seconds or "separate's default", "families": {}}
    for family in families:
        saved = work / family / "saved_model"
        shutil.rmtree(work / family, ignore_errors=True)
        exporter = multiprocessing.get_context("spawn").Process(target=_export_untrained,
                                                                args=(updates, named, family, str(saved)))
        exporter.start()
        exporter.join()
        if exporter.exitcode != 0:
            report["families"][family] = {"error": f"export failed (exit code {exporter.exitcode})"}
            continue
        sidecar = json.loads((saved / "assets.extra" / SIDECAR).read_text())
        command = [sys.executable, str(PROJECT_ROOT / "pipeline" / "separate.py"), str(song), "--model", str(saved),
                   "-o", str(work / family / "stems"), "-q", "--force"]
        if chunk_seconds:
            command += ["--chunk-seconds", str(chunk_seconds)]
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # wait4: the resource usage of this child alone (getrusage(RUSAGE_CHILDREN) would keep the maximum
        # over every child so far)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        errors = child.stderr.read().decode(errors="replace").strip().splitlines()
        child.stderr.close()
        report["families"][family] = {
            "peak_rss_megabytes": round(usage.ru_maxrss / 1024, 0),  # Linux reports kilobytes
            "seconds": round(seconds, 1), "parameters": sidecar["parameters"],
            "sample_rate": sidecar["sample_rate"], "exit_code": child.returncode,
            "chunk_seconds": chunk_seconds or round((sidecar.get("separation_chunk_samples") or 0)
                                                    / sidecar["sample_rate"], 3) or 10.0,
            **({"error": errors[-1]} if child.returncode and errors else {})}
        print(json.dumps({family: report["families"][family]}), file=sys.stderr, flush=True)
        shutil.rmtree(work / family, ignore_errors=True)
    return report


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("with") if "with" in argv else len(argv)
    args = get_parser().parse_args(argv[:split])
    args.updates = argv[split:]
    logging.basicConfig(level=logging.WARNING)
    from pipeline.experiment import resolve
    from configs.errors import UserError
    from pipeline.run import split_updates

    updates, named = split_updates(args.updates)
    named = named or ["default"]  # as pipeline/run.py
    try:
        config = resolve(updates, named)
        if config.train.replicas > 1:
            from components.train import configure_devices

            configure_devices(config.train.replicas)
        if args.what == "command":
            import tempfile

            if args.work_dir:
                Path(args.work_dir).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
                print(json.dumps(benchmark_command(args.release, args.seconds, args.repeats, Path(work)), indent=1))
            return 0
        if args.what == "memory":
            import tempfile

            from models import registry

            families = args.families.split(",") if args.families else list(registry.names())
            unknown = [f for f in families if f not in registry.names()]
            if unknown:
                raise UserError(f"--families: unknown family '{unknown[0]}'; choose from {', '.join(registry.names())}")
            if args.work_dir:
                Path(args.work_dir).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
                print(json.dumps(benchmark_memory(updates, named, families, args.song_minutes, Path(work),
                                                  args.chunk_seconds), indent=1))
            return 0
        if args.what == "train":
            import tensorflow as tf

            threads = args.threads or 2
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
            print(json.dumps({"step": benchmark_train_step(config, args.step_batch_size, args.repeats, threads,
                                                           not args.no_reference)}, indent=1), flush=True)
            if not args.step_only:
                print(json.dumps(benchmark_train(config, args.steps, args.warmup), indent=1))
        elif args.what == "stream":
            import tensorflow as tf

            threads = args.threads or 1
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
            print(json.dumps(benchmark_stream(config, args.hops, max(args.warmup, 3), threads), indent=1))
        else:
            args.threads = args.threads or 2
            import tensorflow as tf

            tf.config.threading.set_intra_op_parallelism_threads(args.threads)
            tf.config.threading.set_inter_op_parallelism_threads(args.threads)
            chunk = args.tflite_chunk_seconds or config.export.tflite_chunk_seconds
            if args.tflite_workers is not None and args.tflite_workers < 1:
                raise UserError(f"--tflite-workers {args.tflite_workers}: must be at least 1; e.g. --tflite-workers 2")
            print(json.dumps(benchmark_separate(config, args.seconds, args.repeats, args.threads, chunk,
                                                not args.no_tflite, not args.no_reference, args.tflite_workers),
                             indent=1))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
