"""The separators `separate` runs: an exported SavedModel (`serving_default`) or a .tflite chunk model with its
family's app-side post-processing; `load_separator` finds one from a path or the latest pipeline export."""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from components.inference.exported import SIDECAR, ExportLayout
from configs.errors import SeparateError

DEFAULT_CHUNK_SECONDS = 10.0  # --chunk-seconds when the model declares no chunk of its own


class SavedModelSeparator:
    """The exported SavedModel's `serving_default`; any chunk length."""

    def __init__(self, path: Path):
        import tensorflow as tf

        self.path = Path(path)
        self.sidecar = find_sidecar(path)
        # the loader warns about every function whose graph had a custom gradient (never used: no training here)
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.ERROR)
        try:
            loaded = tf.saved_model.load(str(path))
        finally:
            absl.setLevel(level)
        self._loaded = loaded  # keep the trackable alive
        self.signature = loaded.signatures["serving_default"]
        self.sample_rate = int(self.sidecar["sample_rate"])
        self.nb_channels = int(self.sidecar["nb_channels"])
        self.targets = list(self.sidecar["targets"])
        self.chunk_seconds = None
        # the family's chunk for bounded memory at its size (models.base.SeparationModel.separation_chunk_samples)
        declared = self.sidecar.get("separation_chunk_samples")
        self.default_chunk_seconds = declared / self.sample_rate if declared else DEFAULT_CHUNK_SECONDS

    def __call__(self, batch):
        import tensorflow as tf

        return {k: v.numpy() for k, v in self.signature(waveform=tf.constant(batch)).items()}


class TFLiteSeparator:
    """A .tflite chunk model plus the app-side post-processing of its family (e.g. Wiener + ISTFT).

    The file takes one chunk `(1, chunk, channels)`, as a phone app streaming chunk after chunk uses it; every
    chunk starts from the zero LSTM state (`export.TFLiteChunkRunner`). `workers` > 1 interpreters of one
    thread each separate that many chunks at the same time (default `WORKERS`); `workers=1` is one interpreter
    of `THREADS` threads."""

    THREADS = 2  # of the single interpreter (XNNPACK and the fused LSTM's GEMM backend)
    # chunks at once, one 1-thread interpreter each: measured 1.8x one 2-thread interpreter on a quiet 2-core
    # machine (UMX-HQ, 30 s: 2.10 s against 3.78 s, `pipeline/benchmark.py separate with paper`)
    WORKERS = 2

    def __init__(self, path: Path, workers: int = None):
        from components.inference.exported import TFLiteChunkRunner

        description_path = path.parent / (path.name.split(".")[0] + ".json")
        export_sidecar = path.parent.parent / SIDECAR
        if not description_path.is_file() or not export_sidecar.is_file():
            raise SeparateError(f"{path}: missing {description_path.name} / {SIDECAR} beside the export; "
                                "use a .tflite from an export stage directory")
        self.description = json.loads(description_path.read_text())
        self.sidecar = json.loads(export_sidecar.read_text())
        self.sample_rate = int(self.sidecar["sample_rate"])
        self.nb_channels = int(self.sidecar["nb_channels"])
        self.targets = list(self.sidecar["targets"])
        self.chunk_seconds = self.default_chunk_seconds = self.description["chunk_seconds"]  # the .tflite's fixed chunk
        self.batch_size = workers or self.WORKERS  # chunks per call, one per interpreter
        self.runner = TFLiteChunkRunner(model_path=str(path), workers=self.batch_size,
                                        threads_per_worker=self.THREADS if self.batch_size == 1 else 1)
        self._lock = threading.Lock()  # an interpreter runs one call at a time: files separated in threads queue

    def __call__(self, batch):
        with self._lock:
            return self.runner(batch)  # every family's file is the whole separator: waveforms in, stems out


def find_sidecar(saved_model: Path) -> dict:
    for candidate in (saved_model / "assets.extra" / SIDECAR, saved_model.parent.parent.parent / SIDECAR):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise SeparateError(f"{saved_model}: no {SIDECAR} sidecar (sample rate, targets); export with the pipeline")


def load_separator(model: str | None, artifacts_dir: str, workers: int = None):
    if model is None:
        export = ExportLayout(Path(artifacts_dir) / "export")
        meta = export.root / "artifact.json"
        if not meta.is_file():
            raise SeparateError(f"no exported model in {export}; run `python pipeline/run.py --stage all` "
                                "or pass --model")
        model = str(export.latest_saved_model())
    path = Path(model)
    if path.suffix == ".tflite" and path.is_file():
        return TFLiteSeparator(path, workers)
    if (path / "saved_model.pb").is_file():
        return SavedModelSeparator(path)
    if path.is_dir():  # a TF Serving model folder: take the highest version
        versions = sorted((p for p in path.iterdir() if p.name.isdigit() and (p / "saved_model.pb").is_file()),
                          key=lambda p: int(p.name))
        if versions:
            return SavedModelSeparator(versions[-1])
    raise SeparateError(f"{model}: not a SavedModel directory or .tflite file")
