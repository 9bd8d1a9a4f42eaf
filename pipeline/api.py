"""The Python API of `separate`: a released model by name, a pipeline export, a model file or a TF Serving server,
as one object that separates waveforms and files.

    from pipeline import Separator

    separator = Separator.from_pretrained("umxhq")           # downloaded, checked, converted and cached once
    stems = separator(waveform, 44100)                       # {stem: float32 array shaped like waveform}
    files = separator.separate_file("song.mp3", "stems/")    # {stem: Path}, stems/song/<stem>.wav

`stems=["vocals"]` keeps only those stems; `two_stems="vocals"` gives `vocals` and `no_vocals`, the sum of the
model's other estimates. The `separate` command is this class plus argument parsing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from components.inference.files import DEFAULT_FILENAME, StemOutput, combine, separate_file, stem_plan
from configs.errors import SeparateError, StageError


def check_chunking(chunk_seconds: Optional[float], overlap: float) -> None:
    """A SeparateError (one line) for a chunk length or overlap that cannot work."""
    if not 0 <= overlap < 1:
        raise SeparateError(f"--overlap {overlap:g}: must be a fraction in [0, 1); e.g. --overlap 0.25")
    if chunk_seconds is not None and not chunk_seconds > 0:
        raise SeparateError(f"--chunk-seconds {chunk_seconds:g}: must be > 0; e.g. --chunk-seconds 10")


class Separator:
    """A loaded model plus the stems asked for; call it on a waveform, or `separate_file` on a file.

    model:         a separator from `components.inference` (SavedModel, .tflite or TF Serving client): float32
                   `(batch, samples, channels)` at `model.sample_rate` -> {target: same shape}
    stems:         keep only these of the model's targets (default all)
    two_stems:     a target `t`: give `t` and `no_t` (the sum of every other target's estimate)
    chunk_seconds: chunk length, bounds memory (default: the model's own chunk, else 10 s)
    overlap:       fraction of a chunk shared with the next (crossfaded)
    """

    def __init__(self, model, *, stems: Optional[Sequence[str]] = None, two_stems: Optional[str] = None,
                 chunk_seconds: Optional[float] = None, overlap: float = 0.25):
        check_chunking(chunk_seconds, overlap)
        self.model = model
        self.plan = stem_plan(model.targets, stems, two_stems)
        self.chunk_seconds = chunk_seconds or model.default_chunk_seconds
        self.overlap = overlap

    # -- where the model comes from ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name: Optional[str] = None, *, quiet: bool = True, workers: Optional[int] = None,
                        **options) -> "Separator":
        """A released model of the catalogue (`separate --list-models`; default: the catalogue's default model),
        downloaded, checked, converted and cached on first use."""
        from components.inference import catalogue
        from pipeline.experiment import convert_release

        name = name or catalogue.default_name()
        return cls.from_artifacts(convert_release(name, quiet), workers=workers, **options)

    @classmethod
    def from_artifacts(cls, artifacts_dir: str | Path = "artifacts", *, workers: Optional[int] = None,
                       **options) -> "Separator":
        """The latest export of a pipeline run in `artifacts_dir` (its SavedModel)."""
        from components.inference.separators import load_separator

        return cls(load_separator(None, str(artifacts_dir), workers), **options)

    @classmethod
    def from_model(cls, path: str | Path, *, workers: Optional[int] = None, **options) -> "Separator":
        """A SavedModel directory, a TF Serving model folder (its highest version) or an exported .tflite file
        (`workers` interpreters separate that many chunks at once)."""
        from components.inference.separators import load_separator

        return cls(load_separator(str(path), "", workers), **options)

    @classmethod
    def from_server(cls, address: str, model_name: str, *, timeout: float = 60.0, max_message_mb: float = 4.0,
                    **options) -> "Separator":
        """A model served by TensorFlow Serving at `address` (host:port, gRPC) under `model_name`."""
        from components.inference import serving_client

        serving_client.check_address(address)
        return cls(serving_client.connect(address, model_name, timeout, max_message_mb), **options)

    # -- what it separates into ----------------------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return self.model.sample_rate

    @property
    def nb_channels(self) -> int:
        return self.model.nb_channels

    @property
    def stems(self) -> list:
        """The names of the stems this separator gives, in order."""
        return list(self.plan)

    def __call__(self, waveform, sample_rate: int) -> Dict[str, np.ndarray]:
        """{stem: float32 array} of `waveform` (`(samples,)` or `(samples, channels)`, any rate): each stem has
        the waveform's shape and rate (resampled to the model's rate and back)."""
        from components.data.audio import conform, resample
        from components.inference.separation import separate_array

        audio = np.asarray(waveform, dtype=np.float32)
        if audio.ndim not in (1, 2) or (audio.ndim == 2 and audio.shape[1] > 2):
            raise SeparateError(f"waveform of shape {audio.shape}: give (samples,) or (samples, channels) with 1 "
                                "or 2 channels (transpose a (channels, samples) array)")
        shape = audio.shape
        audio = audio.reshape(shape[0], -1)
        try:
            mixture = conform(audio, int(sample_rate), "waveform", sample_rate=self.sample_rate,
                              nb_channels=self.nb_channels)
        except StageError as error:
            raise SeparateError(str(error)) from None
        estimates = separate_array(self.model, mixture, sample_rate=self.sample_rate,
                                   chunk_seconds=self.model.chunk_seconds or self.chunk_seconds, overlap=self.overlap,
                                   batch_size=getattr(self.model, "batch_size", 1))
        stems = {}
        for stem, estimate in combine(self.plan, estimates).items():
            if int(sample_rate) != self.sample_rate:
                estimate = resample(estimate, self.sample_rate, int(sample_rate))[:shape[0]]
                estimate = np.pad(estimate, ((0, shape[0] - len(estimate)), (0, 0)))
            if estimate.shape[1] != audio.shape[1]:
                estimate = (estimate.mean(axis=1, keepdims=True) if audio.shape[1] == 1
                            else np.repeat(estimate, audio.shape[1], axis=1))
            stems[stem] = estimate.reshape(shape).astype(np.float32, copy=False)
        return stems

    def separate_file(self, path: str | Path, out_dir: str | Path = "separated", *, format: str = "wav",
                      bit_depth: Optional[int] = None, mp3_bitrate: int = 320, filename: str = DEFAULT_FILENAME,
                      track: Optional[str] = None, force: bool = False, progress: bool = False,
                      output: Optional[StemOutput] = None, cancel=None) -> Dict[str, Path]:
        """Separate an audio file into stem files: `out_dir/<track>/<stem>.<format>` unless `filename` (a
        template with `{track}`, `{stem}`, `{ext}`) says otherwise; returns {stem: file}. Memory is bounded by
        the chunk, not the song; a track gets all its stems or none; existing stems are kept unless `force`."""
        output = output or StemOutput(fmt=format, bit_depth=bit_depth, mp3_bitrate=mp3_bitrate, filename=filename)
        return separate_file(self.model, Path(path), Path(out_dir), chunk_seconds=self.chunk_seconds,
                             overlap=self.overlap, force=force, progress=progress, output=output, plan=self.plan,
                             track=track, cancel=cancel)

    def finished(self, path: str | Path, out_dir: str | Path, output: StemOutput,
                 track: Optional[str] = None) -> bool:
        """Whether every stem file of `path` already exists (what `--skip-existing` skips)."""
        from components.inference.files import track_name

        track = track if track is not None else track_name(Path(path))
        return all(file.exists() for file in output.paths(Path(out_dir), track, self.plan).values())
