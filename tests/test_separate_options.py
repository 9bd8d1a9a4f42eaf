"""`separate`'s choices of stems and files (--stems, --two-stems, --format/--bit-depth/--mp3-bitrate, --filename,
folders and glob patterns, -j) and the Python API it calls (`pipeline.api.Separator`), on the shared pipeline's
export (the `unittest` Open-Unmix, 8 kHz stereo)."""
from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from configs.errors import SeparateError

RATE = 8000
TARGETS = ["vocals", "drums", "bass", "other"]


def _song(path: Path, seconds: float = 2.0, rate: int = RATE, channels: int = 2, seed: int = 0,
          subtype: str = "FLOAT") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    audio = np.random.default_rng(seed).normal(0, 0.1, (int(seconds * rate), channels)).astype(np.float32)
    sf.write(str(path), audio, rate, subtype=subtype)
    return path


@pytest.fixture(scope="module")
def separator(umx_pipeline):
    from pipeline.api import Separator

    return Separator.from_artifacts(umx_pipeline)


# ----------------------------------------------------------------------------------------- the choices, checked
def test_stem_plans_and_their_one_line_errors():
    from components.inference.files import stem_plan

    assert stem_plan(TARGETS) == {t: (t,) for t in TARGETS}
    assert stem_plan(TARGETS, stems=["drums", "vocals", "drums"]) == {"drums": ("drums",), "vocals": ("vocals",)}
    assert stem_plan(TARGETS, two_stems="vocals") == {"vocals": ("vocals",), "no_vocals": ("drums", "bass", "other")}
    assert stem_plan(["vocals", "accompaniment"], two_stems="vocals") == {"vocals": ("vocals",),
                                                                          "no_vocals": ("accompaniment",)}
    for kwargs, message in (
            (dict(stems=["vocals", "guitar"]), "--stems vocals,guitar: the model has no stem 'guitar'; its stems: "
                                               "vocals, drums, bass, other"),
            (dict(two_stems="piano"), "--two-stems piano: the model has no stem 'piano'; its stems: vocals, drums, "
                                      "bass, other"),
            (dict(stems=["", " "]), "--stems: name at least one of vocals, drums, bass, other"),
            (dict(stems=["bass"], two_stems="vocals"), "--stems bass and --two-stems vocals both given; choose one")):
        with pytest.raises(SeparateError) as error:
            stem_plan(TARGETS, **kwargs)
        assert str(error.value) == message


def test_output_choices_and_their_one_line_errors(tmp_path):
    from components.inference.files import StemOutput

    assert StemOutput().subtype == "FLOAT" and StemOutput(fmt="flac").subtype == "PCM_24"
    assert StemOutput(fmt="wav", bit_depth=16).subtype == "PCM_16" and StemOutput(fmt="mp3").subtype is None
    paths = StemOutput(filename="{stem}/{track}.{ext}", fmt="flac").paths(tmp_path, "album/song", ["vocals"])
    assert paths == {"vocals": tmp_path / "vocals" / "album" / "song.flac"}
    for kwargs, message in (
            (dict(fmt="flac", bit_depth=32), "--bit-depth 32: flac takes 16, 24 (FLAC has no float samples; use "
                                             "--format wav for 32-bit float)"),
            (dict(fmt="mp3", bit_depth=16), "--bit-depth 16 with --format mp3: an mp3 has no bit depth; choose its "
                                            "quality with --mp3-bitrate"),
            (dict(fmt="mp3", mp3_bitrate=100), "--mp3-bitrate 100: one of 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, "
                                               "192, 224, 256, 320 kbit/s"),
            (dict(filename="{track}.{ext}"), "--filename {track}.{ext}: needs {stem}, or every stem goes to one file; "
                                             "e.g. {track}/{stem}.{ext}"),
            (dict(filename="{track}/{name}.{ext}"), "--filename {track}/{name}.{ext}: unknown field {name}; use "
                                                    "{track}, {stem} and {ext}, e.g. {track}/{stem}.{ext}"),
            (dict(filename="../{stem}.{ext}"), "--filename ../{stem}.{ext}: must stay inside the output folder (no "
                                               "leading / or ..); e.g. {track}/{stem}.{ext}")):
        with pytest.raises(SeparateError) as error:
            StemOutput(**kwargs)
        assert str(error.value) == message


def test_folders_and_patterns_expand_to_their_audio_files_with_the_tree_mirrored(tmp_path):
    from components.inference.files import clashing_inputs, expand_inputs, track_name

    album = tmp_path / "album"
    for name in ("b/mixture.wav", "a/mixture.wav", "a/cover.jpg", "a/.hidden.wav", "x.flac"):
        (album / name).parent.mkdir(parents=True, exist_ok=True)
        (album / name).write_bytes(b"")
    found = expand_inputs([str(album), str(tmp_path / "album" / "*" / "*.wav"), "-"])
    assert [(Path(name).relative_to(tmp_path).as_posix() if name != "-" else name, root) for name, root in found] == [
        ("album/a/mixture.wav", album), ("album/b/mixture.wav", album), ("album/x.flac", album),
        ("album/a/mixture.wav", None), ("album/b/mixture.wav", None), ("-", None)]
    assert [track_name(Path(name), root) for name, root in found[:3]] == ["a/mixture", "b/mixture", "x"]
    assert clashing_inputs(found[:3], tmp_path / "out") is None  # the tree keeps them apart ...
    first, second, folder = clashing_inputs(found[3:5], tmp_path / "out")  # ... a pattern names files alone
    assert (first, second, folder) == (found[3][0], found[4][0], tmp_path / "out" / "mixture")
    (tmp_path / "empty").mkdir()
    for name, message in ((tmp_path / "empty", "is a directory without audio files"),
                          (tmp_path / "*.ogg", "no audio file matches this pattern")):
        with pytest.raises(SeparateError, match=message):
            expand_inputs([str(name)])


# ------------------------------------------------------------------------------------------- the Python API
def test_the_api_separates_a_waveform_as_the_command_separates_the_file(separator, umx_pipeline, tmp_path):
    """`separator(waveform, rate)` gives the stems the files hold (float wav: the same numbers), at the input's
    rate and shape; a mono 11.025 kHz waveform comes back mono at 11.025 kHz."""
    from tests.cli import separate_here

    song = _song(tmp_path / "song.wav")
    result = separate_here(str(song), "--artifacts-dir", str(umx_pipeline), "-o", str(tmp_path / "out"), "-q")
    assert result.returncode == 0, result.stderr
    waveform, rate = sf.read(str(song), dtype="float32")
    stems = separator(waveform, rate)
    assert list(stems) == TARGETS == separator.stems
    for target in TARGETS:
        written, _ = sf.read(str(tmp_path / "out" / "song" / f"{target}.wav"), dtype="float32")
        np.testing.assert_allclose(stems[target], written, atol=1e-6)
        assert np.abs(written).max() > 1e-4
    mono = waveform.mean(axis=1)[: int(1.5 * RATE)]
    from components.data.audio import resample

    mono = resample(mono[:, None], RATE, 11025)[:, 0]
    out = separator(mono, 11025)
    assert all(stem.shape == mono.shape and stem.dtype == np.float32 for stem in out.values())
    with pytest.raises(SeparateError, match=r"waveform of shape \(4, 1000\): give \(samples,\) or"):
        separator(np.zeros((4, 1000)), RATE)


def test_two_stems_are_the_target_and_the_sum_of_the_others(separator, tmp_path):
    from pipeline.api import Separator

    waveform, _ = sf.read(str(_song(tmp_path / "song.wav")), dtype="float32")
    every = separator(waveform, RATE)
    two = Separator(separator.model, two_stems="vocals")(waveform, RATE)
    assert list(two) == ["vocals", "no_vocals"]
    np.testing.assert_allclose(two["vocals"], every["vocals"], atol=1e-6)
    np.testing.assert_allclose(two["no_vocals"], every["drums"] + every["bass"] + every["other"], atol=1e-5)
    some = Separator(separator.model, stems=["bass", "vocals"])(waveform, RATE)
    assert list(some) == ["bass", "vocals"]
    np.testing.assert_allclose(some["bass"], every["bass"], atol=1e-6)


@pytest.mark.parametrize("fmt, bit_depth, subtype", [("wav", 16, "PCM_16"), ("wav", 24, "PCM_24"),
                                                     ("wav", 32, "FLOAT"), ("wav", None, "FLOAT"),
                                                     ("flac", 16, "PCM_16"), ("flac", None, "PCM_24")])
def test_every_format_and_bit_depth_reads_back(separator, tmp_path, fmt, bit_depth, subtype):
    song = _song(tmp_path / "song.wav")
    files = separator.separate_file(song, tmp_path / "out", format=fmt, bit_depth=bit_depth)
    reference = separator(sf.read(str(song), dtype="float32")[0], RATE)
    for target, path in files.items():
        info = sf.info(str(path))
        assert (path.suffix, info.format, info.subtype, info.samplerate, info.frames, info.channels) == (
            f".{fmt}", fmt.upper(), subtype, RATE, 2 * RATE, 2)
        written, _ = sf.read(str(path), dtype="float32")
        step = 2.0 ** -(15 if subtype == "PCM_16" else 23 if subtype == "PCM_24" else 40)
        np.testing.assert_allclose(written, np.clip(reference[target], -1, 1), atol=step)
    assert sorted(p.name for p in (tmp_path / "out" / "song").iterdir()) == sorted(f"{t}.{fmt}" for t in TARGETS)


def test_mp3_at_the_asked_bit_rate_and_another_input_rate(separator, tmp_path):
    """mp3 stems (ffmpeg's LAME) at --mp3-bitrate, at the input's rate (22.05 kHz here, the model runs at 8 kHz)
    and channel count; they decode to the float stems within mp3's error."""
    song = _song(tmp_path / "song.wav", rate=22050, channels=1, subtype="PCM_16")
    files = separator.separate_file(song, tmp_path / "out", format="mp3", mp3_bitrate=128)
    reference = separator(sf.read(str(song), dtype="float32")[0], 22050)
    for target, path in files.items():
        probe = json.loads(subprocess.run(["ffprobe", "-v", "error", "-show_entries",
                                           "stream=codec_name,sample_rate,channels,bit_rate", "-of", "json",
                                           str(path)], capture_output=True, text=True, check=True).stdout)
        stream = probe["streams"][0]
        assert (stream["codec_name"], stream["sample_rate"], stream["channels"], stream["bit_rate"]) == (
            "mp3", "22050", 1, "128000")
        decoded, rate = sf.read(str(path), dtype="float32")
        assert rate == 22050 and abs(len(decoded) - 2 * 22050) < 2400  # an mp3 frame of encoder delay/padding
    assert sorted(p.name for p in (tmp_path / "out" / "song").iterdir()) == sorted(f"{t}.mp3" for t in TARGETS)
    assert set(reference) == set(files)


def test_a_cancelled_separation_leaves_nothing(separator, tmp_path):
    from components.inference.files import Cancelled

    song = _song(tmp_path / "song.wav")
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        separator.separate_file(song, tmp_path / "out", filename="{stem}/{track}.{ext}", cancel=cancel)
    assert list((tmp_path / "out").iterdir()) == []


# ------------------------------------------------------------------------------------------ the command line
def test_folder_input_template_stems_and_parallel_jobs(umx_pipeline, tmp_path):
    """A folder (recursively, the tree mirrored, non-audio files skipped), --stems, --filename and -j 2: the
    stems equal one-at-a-time separation of each file; a rerun skips them all with --skip-existing (exit 0)."""
    from tests.cli import separate_here

    album = tmp_path / "album"
    songs = [_song(album / "a" / "mixture.wav", seed=1), _song(album / "b" / "mixture.wav", seed=2),
             _song(album / "c.flac", seed=3, subtype="PCM_24")]
    (album / "notes.txt").write_text("not audio")
    common = ["--artifacts-dir", str(umx_pipeline), "--stems", "vocals,bass", "--filename", "{stem}/{track}.{ext}",
              "--format", "flac", "-q", "--cpu"]
    result = separate_here(str(album), "-o", str(tmp_path / "par"), "-j", "2", *common)
    assert result.returncode == 0, result.stderr
    written = sorted(p.relative_to(tmp_path / "par").as_posix() for p in (tmp_path / "par").rglob("*") if p.is_file())
    assert written == ["bass/a/mixture.flac", "bass/b/mixture.flac", "bass/c.flac",
                       "vocals/a/mixture.flac", "vocals/b/mixture.flac", "vocals/c.flac"]
    assert result.stdout.splitlines() == [f"{songs[0]} -> {tmp_path / 'par'}", f"{songs[1]} -> {tmp_path / 'par'}",
                                          f"{songs[2]} -> {tmp_path / 'par'}"]
    for index, (song, track) in enumerate(zip(songs, ("a/mixture", "b/mixture", "c"))):
        alone = separate_here(str(song), "-o", str(tmp_path / f"one{index}"), *common)
        assert alone.returncode == 0, alone.stderr
        for stem in ("vocals", "bass"):
            one = sf.read(str(tmp_path / f"one{index}" / stem / f"{Path(track).name}.flac"))[0]
            assert np.array_equal(sf.read(str(tmp_path / "par" / stem / f"{track}.flac"))[0], one)
    again = separate_here(str(album), "-o", str(tmp_path / "par"), "-j", "2", "--skip-existing", *common)
    assert again.returncode == 0 and again.stdout.count("(already separated, skipped)") == 3


def test_command_line_refusals_are_one_line_before_any_model(tmp_path):
    from tests.cli import separate_here

    song = _song(tmp_path / "song.wav")
    none = ["--artifacts-dir", str(tmp_path / "no-export"), "-o", str(tmp_path / "out")]
    for extra, message in ((["--format", "flac", "--bit-depth", "32"], "--bit-depth 32: flac takes 16, 24"),
                           (["--filename", "{track}.{ext}"], "--filename {track}.{ext}: needs {stem}"),
                           (["-j", "0"], "--jobs 0: must be at least 1; e.g. -j 2"),
                           (["--stream", "--stems", "vocals"], "--stems vocals: --stream writes every stem"),
                           (["--stream", "--format", "mp3"], "--format mp3: --stream writes wav or flac")):
        result = separate_here(str(song), *none, *extra)
        assert result.returncode == 2 and result.stderr.startswith(f"error: {message}"), (extra, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    result = separate_here(str(tmp_path / "*.ogg"), *none)
    assert result.returncode == 2 and result.stderr.strip() == f"error: {tmp_path / '*.ogg'}: no audio file matches " \
                                                               "this pattern"
    result = separate_here(str(song), "--stems", "vocals,guitar", "-o", str(tmp_path / "out"), "--artifacts-dir",
                           str(tmp_path / "no-export"))
    assert result.returncode == 2 and "no exported model in" in result.stderr  # the model comes first, then its stems
