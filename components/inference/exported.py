"""Running what the export stage wrote, and where it wrote it: the layout of `artifacts_dir/export/`
(`ExportLayout`, written by `components/export.py`, read by `separate` and the serving tools), the TFLite chunk
runner, and the streaming step of a streaming SavedModel or .tflite.

    saved_model/<model_name>/<version>/      SavedModel, `serving_default`: waveform -> {target: waveform}
    saved_model/models.config                TF Serving model config list
    model.json                               sidecar: rate, targets, STFT parameters, fingerprints, metrics
    tflite/<model_name>.<variant>.tflite     fixed-length chunk models; tflite/<model_name>.json describes them
    stream/saved_model/, stream/stream.float32.tflite, stream/stream.json    the hop-by-hop streaming model
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIGNATURE = "serving_default"
WAV_SIGNATURE = "wav"  # WAV bytes in (`audio_bytes`), one 16-bit WAV per target out (`<target>_bytes`)
WAV_INPUT = "audio_bytes"  # TF Serving's REST API base64-encodes tensors whose alias ends in _bytes
METADATA_SIGNATURE = "metadata"  # any `unused` float in; sample_rate, nb_channels, chunk_samples, targets out
METADATA_INPUT = "unused"
SIDECAR = "model.json"  # the export's description, read by `separate`
INPUT_NAME = "waveform"


XLA_OPS = frozenset({"XlaLaunch", "_XlaCompile", "_XlaRun", "XlaCallModule", "_XlaMerge"})


def xla_functions(saved_model: Path) -> list:
    """Names of what in `saved_model`'s graph needs XLA: functions marked `_XlaMustCompile` (what TensorFlow
    Serving, the C API and TF Java fail on with XLA's CPU JIT off, their default) and nodes of XLA launch ops."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((Path(saved_model) / "saved_model.pb").read_bytes())
    found = []
    for graph in saved.meta_graphs:
        library = graph.graph_def.library.function
        found += [f.signature.name for f in library if f.attr["_XlaMustCompile"].b]
        nodes = list(graph.graph_def.node) + [node for f in library for node in f.node_def]
        found += [f"{node.name} ({node.op})" for node in nodes
                  if node.op in XLA_OPS or node.attr["_XlaMustCompile"].b]
    return found


SERVING_CACHE = "serving"  # <artifacts_dir>/serving: the published versions TF Serving reads (export.serving_dir)


def versions(model_folder: Path) -> list:
    """The complete numeric version folders of a TF Serving model folder, oldest first."""
    if not Path(model_folder).is_dir():
        return []
    found = [p for p in Path(model_folder).iterdir() if p.name.isdigit() and (p / "saved_model.pb").is_file()]
    return sorted(found, key=lambda p: int(p.name))


def publish(saved_model: Path, serving_root: Path, name: str, *, keep: int = 2, identity: str = "",
            minimum: int = 1) -> Path:
    """`saved_model` published as the next version of `name` under `serving_root` (TF Serving's model base
    path): copied (hard links where the file system allows) into a hidden folder beside, renamed to
    `<n+1>` in one step, so a server polling the folder never sees a half-written version; then the oldest
    versions beyond `keep` are removed and `serving_root/models.config` rewritten (write beside, rename) for
    every model published there. `identity` (the export's fingerprint) makes a re-publication of the same
    export return the existing version instead of adding one. Returns the version folder."""
    import os
    import shutil

    from components import artifacts

    serving_root = Path(serving_root)
    folder = serving_root / name
    with artifacts.exclusive(serving_root):
        present = versions(folder)
        if present and identity and _published_identity(present[-1]) == identity:
            return present[-1]
        for stale in folder.glob(".publishing-*") if folder.is_dir() else ():
            shutil.rmtree(stale, ignore_errors=True)  # a publication killed before its rename
        number = max([int(p.name) for p in present] + [minimum - 1]) + 1
        staging = folder / f".publishing-{number}-{os.getpid()}"
        folder.mkdir(parents=True, exist_ok=True)

        def link_or_copy(source, destination):
            try:
                os.link(source, destination)
            except OSError:
                shutil.copy2(source, destination)

        shutil.copytree(saved_model, staging, copy_function=link_or_copy)
        (staging / "assets.extra").mkdir(exist_ok=True)
        (staging / "assets.extra" / "published.json").write_text(json.dumps({"identity": identity}))
        target = folder / str(number)
        os.rename(staging, target)
        for old in versions(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        names = sorted(p.name for p in serving_root.iterdir() if p.is_dir() and versions(p))
        config = serving_root / f".models.config.{os.getpid()}"
        config.write_text(serving_config(names))
        os.replace(config, serving_root / "models.config")
    return target


def _published_identity(version: Path) -> str:
    try:
        return json.loads((version / "assets.extra" / "published.json").read_text()).get("identity", "")
    except (OSError, ValueError):
        return ""


def serving_config(model_names) -> str:
    """TF Serving's `--model_config_file` text proto; base paths relative to the container's /models."""
    entries = "".join(
        f'  config {{\n    name: "{name}"\n    base_path: "/models/{name}"\n    model_platform: "tensorflow"\n  }}\n'
        for name in model_names)
    return "model_config_list {\n" + entries + "}\n"


@dataclass(frozen=True)
class ExportLayout:
    """The files of one export folder (`artifacts_dir/export`)."""

    root: Path

    @property
    def sidecar(self) -> Path:
        return self.root / SIDECAR

    @property
    def saved_models(self) -> Path:
        return self.root / "saved_model"

    @property
    def serving_config(self) -> Path:
        return self.saved_models / "models.config"

    def saved_model(self, name: str, version) -> Path:
        return self.saved_models / name / str(version)

    @property
    def tflite(self) -> Path:
        return self.root / "tflite"

    @property
    def stream(self) -> Path:
        return self.root / "stream"

    @property
    def stream_description(self) -> Path:
        return self.stream / "stream.json"

    def read_sidecar(self) -> dict:
        return json.loads(self.sidecar.read_text())

    def latest_saved_model(self) -> Path:
        """The SavedModel the sidecar names (the export's model and version)."""
        sidecar = self.read_sidecar()
        return self.saved_model(sidecar["model"], sidecar["version"])


def tflite_ops(model_bytes: bytes) -> list:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model_bytes)
    return sorted({op["op_name"] for op in interpreter._get_ops_details()})


def run_tflite(model_bytes: bytes, chunk: np.ndarray) -> dict:
    """Run a .tflite separator on one chunk `(1, chunk, channels)`; returns {output name: array}."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model_bytes, num_threads=2)
    runner = interpreter.get_signature_runner(SIGNATURE)
    return {name: np.asarray(value) for name, value in runner(**{INPUT_NAME: chunk.astype(np.float32)}).items()}


class TFLiteChunkRunner:
    """A .tflite chunk model `(1, chunk, channels)` run on a batch of chunks `(batch, chunk, channels)`, the
    chunks shared out over `workers` interpreters of `threads_per_worker` threads that run at the same time.

    Why not one call at batch B: the fused UNIDIRECTIONAL_SEQUENCE_LSTM kernel (lite/kernels/lstm_eval.cc) does
    a step's gate products as FullyConnected calls on one thread, and TFLite runs one op at a time; a file
    converted at batch 4 or 16 measured no faster per chunk than batch 1 (README, "TFLite for phones").
    Independent chunks on independent interpreters can use every core instead, with the same numbers as
    running them one by one (`invoke` releases the GIL): on a quiet 2-core machine two 1-thread workers took
    2.10 s against 3.78 s for one 2-thread interpreter (UMX-HQ, 30 s), so `separate` runs 2 by default.

    Every chunk starts from the zero LSTM state: UNIDIRECTIONAL_SEQUENCE_LSTM (the float16 file's; the float32
    and dynamic files run WHILE loops that keep nothing) keeps its hidden and cell state
    in variable tensors that persist from one `invoke` to the next, so an interpreter reused without
    `reset_all_variables()` starts chunk k from chunk k-1's last state (measured 48 dB from the Keras
    separator instead of >= 130 dB at the unittest size)."""

    def __init__(self, model_bytes: bytes = None, model_path: str = None, workers: int = 1,
                 threads_per_worker: int = 1, signature: str = SIGNATURE):
        from concurrent.futures import ThreadPoolExecutor

        from ai_edge_litert.interpreter import Interpreter

        if workers < 1 or threads_per_worker < 1:
            raise ValueError(f"TFLiteChunkRunner: workers ({workers}) and threads_per_worker ({threads_per_worker}) "
                             "must be at least 1")
        self.workers = workers
        self.interpreters = [Interpreter(model_content=model_bytes, model_path=model_path,
                                         num_threads=threads_per_worker) for _ in range(workers)]
        for interpreter in self.interpreters:
            interpreter.allocate_tensors()  # the variable tensors exist from here on: reset_all_variables needs them
        self.runners = [interpreter.get_signature_runner(signature) for interpreter in self.interpreters]
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="tflite") if workers > 1 else None

    def __call__(self, batch: np.ndarray) -> dict:
        batch = np.asarray(batch, np.float32)
        rows = [None] * len(batch)

        def work(worker: int) -> None:  # chunks worker, worker + workers, ...: one interpreter, in order
            for index in range(worker, len(batch), self.workers):
                # the fused LSTMs keep their last state in variable tensors: each chunk starts from zeros
                self.interpreters[worker].reset_all_variables()
                rows[index] = self.runners[worker](**{INPUT_NAME: batch[index:index + 1]})

        used = min(self.workers, len(batch))
        if used == 1:
            work(0)
        else:
            for future in [self._pool.submit(work, worker) for worker in range(used)]:
                future.result()
        return {name: np.concatenate([np.asarray(row[name]) for row in rows]) for name in rows[0]}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def saved_model_stream_step(path: Path):
    """A loaded streaming SavedModel's step: keyword numpy arrays in, {name: numpy array} out."""
    import tensorflow as tf

    from models.streaming import STEP_SIGNATURE

    loaded = tf.saved_model.load(str(path))
    signature = loaded.signatures[STEP_SIGNATURE]

    def step(**inputs):
        return {k: v.numpy() for k, v in signature(**{k: tf.constant(v) for k, v in inputs.items()}).items()}

    step.loaded = loaded  # keep the trackable alive
    return step


def tflite_stream_step(model_bytes: bytes = None, model_path: str = None, num_threads: int = 1):
    """A streaming .tflite's step (same calling convention as `saved_model_stream_step`)."""
    from ai_edge_litert.interpreter import Interpreter

    from models.streaming import STEP_SIGNATURE

    interpreter = Interpreter(model_content=model_bytes, model_path=model_path, num_threads=num_threads)
    runner = interpreter.get_signature_runner(STEP_SIGNATURE)

    def step(**inputs):
        outputs = runner(**{k: np.asarray(v, np.float32) for k, v in inputs.items()})
        return {k: np.asarray(v) for k, v in outputs.items()}

    step.interpreter = interpreter
    return step
