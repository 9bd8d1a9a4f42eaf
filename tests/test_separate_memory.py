"""Peak memory of `separate` (issue 12): the song is decoded chunk by chunk, stems stream to disk, the model's
declared chunk is the default, and a SavedModel holds each weight once. No TensorFlow model is run here except
the tiny Open-Unmix of the SavedModel check: the separator is an identity stub whose calls are recorded."""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile

from components.inference.separation import iter_separate, separate_array
from configs.errors import SeparateError
from components.inference import files, separators
from pipeline import separate


class IdentityStub:
    """The SavedModelSeparator's interface: every target gets the mixture back; records each batch's shape."""

    def __init__(self, sample_rate=8000, nb_channels=2, default_chunk_seconds=None):
        self.sample_rate, self.nb_channels = sample_rate, nb_channels
        self.targets = ["vocals", "drums", "bass", "other"]
        self.chunk_seconds = None
        self.default_chunk_seconds = default_chunk_seconds or separators.DEFAULT_CHUNK_SECONDS
        self.shapes = []

    def __call__(self, batch):
        self.shapes.append(batch.shape)
        return {target: batch for target in self.targets}


def _song(path: Path, seconds: float, rate: int = 8000, channels: int = 2, subtype: str = "FLOAT", seed: int = 0):
    rng = np.random.default_rng(seed)
    with soundfile.SoundFile(str(path), "w", samplerate=rate, channels=channels, subtype=subtype) as handle:
        for start in range(0, int(seconds * rate), 60 * rate):
            handle.write(0.1 * rng.standard_normal((min(60 * rate, int(seconds * rate) - start), channels)))
    return path


@pytest.mark.parametrize("file_channels, model_channels", [(2, 2), (1, 2), (2, 1)])
def test_a_file_decoded_chunk_by_chunk_separates_exactly_as_the_whole_decoded_array(tmp_path, file_channels,
                                                                                       model_channels):
    from components.data.audio import conform

    path = _song(tmp_path / "song.wav", 7.3, channels=file_channels)
    whole = conform(soundfile.read(str(path), dtype="float32", always_2d=True)[0], 8000, path, sample_rate=8000,
                    nb_channels=model_channels)
    lazy = files.FileMixture.open(path, 8000, model_channels)
    assert lazy.shape == whole.shape and lazy.file_channels == file_channels

    def identity(batch):
        return {"a": batch * 0.5, "b": batch}

    expected = separate_array(identity, whole, sample_rate=8000, chunk_seconds=1.1, overlap=0.4)
    pieces = list(iter_separate(identity, lazy, sample_rate=8000, chunk_seconds=1.1, overlap=0.4))
    for target in ("a", "b"):
        np.testing.assert_array_equal(np.concatenate([blocks[target] for _, _, blocks in pieces]), expected[target])
    with pytest.raises(ValueError, match="reads forward only"):
        lazy[0:10]
    lazy.close()
    # another rate than the model's, or an ffmpeg format: decoded whole by read_any (and resampled)
    assert files.FileMixture.open(path, 16000, model_channels) is None


def test_nan_in_a_float_file_is_refused_before_any_stem_is_written(tmp_path):
    audio = np.zeros((800, 2), np.float32)
    audio[[3, 500], 1] = np.nan
    soundfile.write(str(tmp_path / "bad.wav"), audio, 8000, subtype="FLOAT")
    with pytest.raises(SeparateError, match=r"bad.wav: 2 NaN/Inf samples; re-export the file from its source"):
        files.separate_file(IdentityStub(), tmp_path / "bad.wav", tmp_path / "out", chunk_seconds=1.0,
                            overlap=0.25, force=False, progress=False)
    assert not (tmp_path / "out" / "bad").exists() or not any((tmp_path / "out" / "bad").iterdir())


def test_separating_a_long_song_holds_chunks_not_the_song_and_uses_the_models_chunk(tmp_path, monkeypatch):
    """20 minutes of stereo at 8 kHz: 77 MB of float32 per whole-song signal (mixture, or each of 4 stems). The
    separation's own allocations (numpy, traced) stay under 8 MB: chunks of the model's declared 2.5 s."""
    path = _song(tmp_path / "long.wav", 20 * 60, subtype="PCM_16")
    song_bytes = 20 * 60 * 8000 * 2 * 4
    stub = IdentityStub(default_chunk_seconds=2.5)
    monkeypatch.setattr("components.inference.separators.load_separator",
                        lambda model, artifacts_dir, workers=None: stub)
    monkeypatch.setattr("pipeline.quiet.import_tensorflow", lambda: None)  # (its import would be traced too)
    tracemalloc.start()
    try:
        code = separate.main([str(path), "--model", "stub", "-o", str(tmp_path / "out"), "-q"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 0
    assert {shape for shape in stub.shapes} == {(1, 20000, 2)}  # 2.5 s at 8 kHz: the model's chunk, not 10 s
    assert len(stub.shapes) == int(np.ceil((20 * 60 * 8000 - 5000) / 15000))  # overlap 0.25
    assert peak < 8e6, f"separate allocated {peak / 1e6:.1f} MB at once; a whole-song signal is {song_bytes / 1e6:.0f} MB"
    stem, rate = soundfile.read(str(tmp_path / "out" / "long" / "vocals.wav"), dtype="float32", always_2d=True)
    mixture, _ = soundfile.read(str(path), dtype="float32", always_2d=True)
    assert rate == 8000 and stem.shape == mixture.shape
    assert np.max(np.abs(stem - mixture)) < 1e-6  # identity model: the overlap-add gives the song back


def test_a_saved_model_stores_each_weight_once(tmp_path):
    """keras's ExportArchive with `track(model)` saved every weight twice (tf.Variables and keras.Variables):
    twice the file and twice the memory of `separate` loading it."""
    import tensorflow as tf

    from components.export import write_saved_model
    from tests import model_harness as harness

    model = harness.build_tiny("umx")
    write_saved_model(model.separator, tmp_path / "saved", model.nb_channels)
    stored = [name for name, _ in tf.train.list_variables(str(tmp_path / "saved" / "variables" / "variables"))
              if name.endswith("VARIABLE_VALUE")]
    assert len(stored) == len(model.separator.weights)
    floats = sum(int(np.prod(shape)) for name, shape in tf.train.list_variables(
        str(tmp_path / "saved" / "variables" / "variables")) if name.endswith("VARIABLE_VALUE"))
    assert floats == sum(int(np.prod(w.shape)) for w in model.separator.weights)


def test_the_declared_separation_chunks_are_whole_network_inputs():
    """TFC-TDF-UNet v3 and DTTNet declare frames (a multiple of 2 ** num_scales, as every input they take),
    M-U-Net whole patches; at the paper sizes all three are about 2.95 s at 44.1 kHz."""
    from configs.errors import ConfigError
    from models import dttnet, m_unet, tfc_tdf_unet, unet_core

    for family in (tfc_tdf_unet, dttnet):
        config = family.Config()
        assert config.hop_length * (config.separate_dim_t - 1) == 130_048
        assert family.valid_samples(config, 130_048) == 130_048
        with pytest.raises(ConfigError, match="separate_dim_t must be a positive multiple of 2\\*\\*num_scales"):
            family.Config(separate_dim_t=2 ** config.num_scales + 2)
    config = m_unet.Config()
    assert unet_core.whole_patches(config.separate_patches * config.patch_frames * config.hop_length,
                                   n_fft=config.n_fft, hop_length=config.hop_length,
                                   patch_frames=config.patch_frames) == 130_816 == 256 * (2 * 256 - 1)
