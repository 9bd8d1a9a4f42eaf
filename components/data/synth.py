"""The embedded default data set: a deterministic multitrack synthesizer in the MUSDB18-HQ layout.

`<root>/<split>/<track>/{vocals,drums,bass,other,mixture}.wav`, 16-bit PCM, stereo. Four sources
that differ the way real stems do, so separation is learnable and measurable:

- vocals: a band-limited glottal pulse train (wavetable per note) with vibrato and portamento, one
  vowel per syllable shaped by three formant resonators, syllable envelopes and consonant noise;
- drums:  kick (pitch-swept sine, exponential decay), snare (noise burst + tone), hi-hats (high-passed
  noise) on a tempo grid with accents, fills and a little timing jitter;
- bass:   plucked low notes (< 200 Hz) following the chord roots;
- other:  sustained chords of organ/saw/electric-piano partials in the mid range, spread in stereo.

Each track draws its own tempo, key, mode, progression, patterns, timbres, levels and panning from
`numpy.random.default_rng([seed, split, index])`, so a track does not change when the counts do.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Dict, Mapping, Tuple

import numpy as np

from components.artifacts import process_alive
from configs.config import MUSDB_TARGETS as SOURCES  # the synthesizer writes MUSDB's four stems
SPLITS = ("train", "valid", "test")
MARKER = "synth.json"
GENERATOR_VERSION = 1

MAJOR = (0, 2, 4, 5, 7, 9, 11)
MINOR = (0, 2, 3, 5, 7, 8, 10)
PROGRESSIONS = ((0, 4, 5, 3), (0, 5, 3, 4), (5, 3, 0, 4), (0, 3, 4, 3), (0, 3, 5, 4), (0, 6, 5, 4))
KEY_NAMES = ("C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab", "A", "Bb", "B")
# (F1, F2, F3) in Hz of sung vowels a, e, i, o, u
VOWELS = np.array([(800, 1150, 2900), (450, 1900, 2600), (320, 2300, 3000), (500, 850, 2500), (350, 700, 2450)])
# relative level (dB) of each source before the per-track jitter: vocals and drums lead
LEVELS_DB = {"vocals": -17.0, "drums": -17.0, "bass": -20.0, "other": -22.0}
PEAK = 0.9


def params_of(data) -> dict:
    """The generator parameters from a DataConfig: what the marker records and the fingerprint covers."""
    return {"generator_version": GENERATOR_VERSION, "sample_rate": int(data.sample_rate),
            "tracks": [int(n) for n in data.synth_tracks], "seconds": float(data.synth_seconds),
            "seed": int(data.synth_seed)}


def ensure(root, params: Mapping, logger=None) -> Path:
    """Generate the data set into `root` unless its marker says it is complete with these `params`.

    Generation goes to a hidden sibling directory that is renamed into place, so a killed run never
    leaves a half-written data set behind a marker.
    """
    root = Path(root)
    marker = root / MARKER
    if marker.is_file():
        try:
            found = json.loads(marker.read_text())
        except json.JSONDecodeError:
            found = {}
        if found.get("complete") and found.get("params") == dict(params):
            return root
    elif root.exists() and any(root.iterdir()):
        from configs.errors import StageError

        raise StageError(f"{root}: not empty and not made by the synthesizer (no {MARKER}); "
                         f"point data.root at an empty or new directory for data.format=default")
    root.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(root)
    stamp = f"{os.getpid()}-{int(time.time() * 1000)}"
    tmp = root.parent / f".{root.name}.staging-{stamp}"
    started = time.time()
    try:
        counts = generate(tmp, **{k: params[k] for k in ("sample_rate", "tracks", "seconds", "seed")})
        (tmp / MARKER).write_text(json.dumps({"complete": True, "params": dict(params), "tracks": counts}, indent=2))
        trash = None
        if root.exists():
            trash = root.parent / f".{root.name}.old-{stamp}"
            os.replace(root, trash)
        os.replace(tmp, root)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if logger is not None:
        logger.info("synthesized the default data set into %s (%s tracks) in %.1f s",
                    root, sum(counts.values()), time.time() - started)
    return root


def _clean_leftovers(root: Path) -> None:
    for entry in root.parent.glob(f".{root.name}.*-*-*"):
        pid = entry.name.rsplit("-", 2)[-2]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def generate(root, *, sample_rate: int, tracks: Tuple[int, int, int], seconds: float, seed: int) -> Dict[str, int]:
    """Write every split's tracks under `root`; returns {split: nb_tracks}."""
    import soundfile

    root = Path(root)
    counts = {}
    for split_index, (split, count) in enumerate(zip(SPLITS, tracks)):
        counts[split] = int(count)
        for index in range(int(count)):
            rng = np.random.default_rng([int(seed), split_index, index])
            name, stems = synthesize_track(rng, sample_rate=sample_rate, seconds=seconds)
            folder = root / split / f"{split}-{index:03d} {name}"
            folder.mkdir(parents=True)
            mixture = np.zeros_like(stems["vocals"])
            for source in SOURCES:
                soundfile.write(str(folder / f"{source}.wav"), stems[source], sample_rate, subtype="PCM_16")
                mixture += stems[source]
            soundfile.write(str(folder / "mixture.wav"), mixture, sample_rate, subtype="PCM_16")
    return counts


def synthesize_track(rng: np.random.Generator, *, sample_rate: int, seconds: float):
    """(name, {source: float32 (nb_timesteps, 2)}) for one track."""
    nb_timesteps = int(round(seconds * sample_rate))
    song = _Song(rng, sample_rate, nb_timesteps)
    stems = {"vocals": song.vocals(), "drums": song.drums(), "bass": song.bass(), "other": song.other()}
    for source, audio in stems.items():  # realistic relative levels, then a common gain against clipping
        level = np.sqrt(np.mean(np.square(audio.sum(axis=1) * 0.5))) + 1e-12
        stems[source] = audio * (10 ** ((LEVELS_DB[source] + rng.uniform(-1.5, 1.5)) / 20) / level)
    mixture = sum(stems.values())
    peak = max([np.abs(mixture).max()] + [np.abs(a).max() for a in stems.values()])
    scale = min(1.0, PEAK / peak)
    stems = {source: (audio * scale).astype(np.float32) for source, audio in stems.items()}
    mode = "major" if song.scale == MAJOR else "minor"
    return f"{song.bpm}bpm {KEY_NAMES[song.key % 12]} {mode}", stems


def _pan(mono: np.ndarray, position: float) -> np.ndarray:
    """Constant-power pan, position in [-1 (left), 1 (right)] -> (nb_timesteps, 2)."""
    angle = (position + 1) * np.pi / 4
    return np.stack([mono * np.cos(angle), mono * np.sin(angle)], axis=1)


def _resonator(frequency: float, bandwidth: float, sample_rate: int):
    """Two-pole resonance with unit gain at `frequency`."""
    radius = np.exp(-np.pi * bandwidth / sample_rate)
    theta = 2 * np.pi * frequency / sample_rate
    return [(1 - radius) * abs(1 - radius * np.exp(-2j * theta))], [1, -2 * radius * np.cos(theta), radius ** 2]


def _midi_hz(midi):
    return 440.0 * 2 ** ((np.asarray(midi, dtype=np.float64) - 69) / 12)


class _Song:
    """Shared musical decisions of one track (tempo, key, chords) and one method per source."""

    def __init__(self, rng, sample_rate, nb_timesteps):
        self.rng, self.sr, self.n = rng, sample_rate, nb_timesteps
        self.bpm = int(rng.integers(84, 141))
        self.beat = 60.0 / self.bpm
        self.key = int(rng.integers(28, 40))  # bass register root, E1..Eb2
        self.scale = MAJOR if rng.random() < 0.6 else MINOR
        self.progression = PROGRESSIONS[rng.integers(len(PROGRESSIONS))]
        self.bars_per_chord = 1 if self.bpm < 110 else 2
        self.jitter = rng.uniform(0.002, 0.008)  # seconds of human timing
        self.nb_bars = int(np.ceil(nb_timesteps / sample_rate / (4 * self.beat))) + 1

    def note(self, degree: int, octave: int = 0) -> int:
        return self.key + 12 * (octave + degree // 7) + self.scale[degree % 7]

    def chord(self, bar: int) -> int:
        return self.progression[(bar // self.bars_per_chord) % len(self.progression)]

    def at(self, beats: float, jitter: bool = True) -> int:
        t = beats * self.beat + (self.rng.normal(0, self.jitter) if jitter else 0.0)
        return max(0, int(round(t * self.sr)))

    def place(self, out: np.ndarray, start: int, sound: np.ndarray) -> None:
        stop = min(start + len(sound), len(out))
        if stop > start:
            out[start:stop] += sound[: stop - start]

    # -- drums --------------------------------------------------------------------------------
    def drums(self) -> np.ndarray:
        rng, sr = self.rng, self.sr
        t = np.arange(int(0.5 * sr)) / sr
        sweep = rng.uniform(90, 140)
        kick_hz = 45 + sweep * np.exp(-t / rng.uniform(0.02, 0.04))
        kick = np.sin(2 * np.pi * np.cumsum(kick_hz) / sr) * np.exp(-t / rng.uniform(0.1, 0.2))
        snare_noise = _bandpass(rng.standard_normal(len(t)), 900, 6000, sr)
        snare = (snare_noise * np.exp(-t / rng.uniform(0.05, 0.1))
                 + 0.5 * np.sin(2 * np.pi * rng.uniform(170, 230) * t) * np.exp(-t / 0.04))
        hats = [_highpass(rng.standard_normal(len(t)), 7000, sr) * np.exp(-t / decay) for decay in (0.025, 0.04, 0.2)]
        kick, snare = kick / np.abs(kick).max(), snare / np.abs(snare).max()
        hats = [hat / np.abs(hat).max() for hat in hats]
        pans = {"kick": 0.0, "snare": rng.uniform(-0.2, 0.2), "hat": rng.choice([-1, 1]) * rng.uniform(0.3, 0.6)}
        channels = {name: np.zeros(self.n) for name in pans}
        sixteenths = rng.random() < 0.4
        kick_extra = rng.uniform(0.1, 0.4)
        for bar in range(self.nb_bars):
            base = 4 * bar
            fill = bar % 4 == 3 and rng.random() < 0.5
            for eighth in range(8):
                beat = base + eighth / 2
                if eighth in (0, 4) or (eighth % 2 == 1 and rng.random() < kick_extra):
                    self.place(channels["kick"], self.at(beat), kick * rng.uniform(0.8, 1.0))
                if eighth in (2, 6):
                    self.place(channels["snare"], self.at(beat), snare * rng.uniform(0.8, 1.0))
            if fill:
                for step in range(8):
                    self.place(channels["snare"], self.at(base + 2 + step / 4), snare * rng.uniform(0.3, 0.7))
            steps = 16 if sixteenths else 8
            for step in range(steps):
                accent = 1.0 if step % (steps // 4) == 0 else 0.6
                hat = hats[2] if (step == steps - 2 and rng.random() < 0.3) else hats[int(rng.random() < 0.5)]
                self.place(channels["hat"], self.at(base + 4 * step / steps), 0.35 * accent * hat)
        return sum(_pan(channels[name], pans[name]) for name in pans)

    # -- bass ---------------------------------------------------------------------------------
    def bass(self) -> np.ndarray:
        rng, sr = self.rng, self.sr
        patterns = ((0, 2, 4, 6), (0, 3, 4, 6, 7), (0, 1, 2, 4, 5, 6), (0, 4), (0, 3, 6))
        pattern = patterns[rng.integers(len(patterns))]
        harmonics = np.array([1.0, rng.uniform(0.2, 0.5), rng.uniform(0.05, 0.2)])
        decay = rng.uniform(0.3, 0.8)
        out = np.zeros(self.n)
        for bar in range(self.nb_bars):
            root = self.note(self.chord(bar))
            for i, eighth in enumerate(pattern):
                following = pattern[i + 1] if i + 1 < len(pattern) else 8
                length = int((following - eighth) / 2 * self.beat * sr * 0.9)
                midi = root + (7 if rng.random() < 0.15 else 0) + (12 if rng.random() < 0.1 else 0)
                t = np.arange(length) / sr
                phase = 2 * np.pi * _midi_hz(midi) * t
                tone = sum(weight * np.sin((k + 1) * phase) for k, weight in enumerate(harmonics))
                release = np.minimum(1, (length - np.arange(length)) / (0.02 * sr))
                envelope = np.minimum(1, t / 0.005) * np.exp(-t / decay) * release
                self.place(out, self.at(4 * bar + eighth / 2), tone * envelope)
        return _pan(out, rng.uniform(-0.1, 0.1))

    # -- other (chords) -----------------------------------------------------------------------
    def other(self) -> np.ndarray:
        rng, sr = self.rng, self.sr
        timbre = rng.integers(3)  # 0 organ, 1 saw pad, 2 electric piano
        if timbre == 0:
            partials = np.array([1.0, 0.7, 0.5, 0.0, 0.3, 0.0, 0.0, 0.2])
        elif timbre == 1:
            partials = 1.0 / np.arange(1, 11) * np.exp(-np.arange(10) / 6)
        else:
            partials = np.array([1.0, 0.3, 0.15, 0.05])
        spread = rng.uniform(0.3, 0.8)
        left, right = np.zeros(self.n), np.zeros(self.n)
        bar_samples = 4 * self.beat * sr * self.bars_per_chord
        for change in range(0, self.nb_bars, self.bars_per_chord):
            degree = self.chord(change)
            voicing = [self.note(degree + step, octave=2) for step in (0, 2, 4)]
            if rng.random() < 0.5:
                voicing.append(self.note(degree + 6, octave=2))  # seventh
            length = int(bar_samples + 0.15 * sr)
            t = np.arange(length) / sr
            if timbre == 2:
                envelope = np.minimum(1, t / 0.005) * np.exp(-t / 1.2)
            else:
                envelope = np.minimum(1, t / 0.08) * np.minimum(1, (length - np.arange(length)) / (0.15 * sr))
            start = self.at(4 * change, jitter=False)
            for i, midi in enumerate(voicing):
                f0 = _midi_hz(midi) * (1 + rng.normal(0, 0.001))
                usable = partials[: max(1, int(0.45 * sr / f0))]
                tone = _wavetable(usable, f0 * t + rng.uniform(0, 1))
                voice = _pan(tone * envelope, spread * (2 * i / max(1, len(voicing) - 1) - 1))
                self.place(left, start, voice[:, 0])
                self.place(right, start, voice[:, 1])
        return np.stack([left, right], axis=1)

    # -- vocals -------------------------------------------------------------------------------
    def vocals(self) -> np.ndarray:
        rng, sr = self.rng, self.sr
        vibrato_hz, vibrato_depth = rng.uniform(4.8, 6.5), rng.uniform(0.25, 0.6)  # semitones
        tilt = rng.uniform(0.8, 1.2)  # glottal spectral slope: amplitude of harmonic k ~ k^-tilt
        formant_shift = rng.uniform(0.9, 1.15)  # vocal tract length
        out = np.zeros(self.n)
        pitch = self.note(0, octave=2) + int(rng.integers(0, 5))
        for phrase_bar in range(0, self.nb_bars, 2):
            if phrase_bar > 0 and rng.random() < 0.25:  # a rest of two bars now and then, never first
                continue
            beat, end = 4.0 * phrase_bar, 4.0 * phrase_bar + rng.uniform(5.0, 7.5)
            while beat < end:
                length_beats = rng.choice([0.5, 1.0, 1.0, 1.5, 2.0])
                chord_tones = [self.note(self.chord(int(beat // 4)) + s, octave=2) for s in (0, 2, 4, 7, 9, 11)]
                target = min(chord_tones, key=lambda m: abs(m - pitch) + rng.uniform(0, 4))
                previous, pitch = pitch, int(np.clip(target, self.key + 22, self.key + 40))
                length = int(length_beats * self.beat * sr * rng.uniform(0.8, 0.95))
                t = np.arange(length) / sr
                glide = np.exp(-t / 0.04)  # portamento from the previous note
                depth = vibrato_depth * np.minimum(1, t / 0.3)  # vibrato fades in
                midi = pitch + (previous - pitch) * glide + depth * np.sin(2 * np.pi * vibrato_hz * t)
                f0 = _midi_hz(midi)
                nb_harmonics = max(1, int(0.45 * sr / f0.max()))
                # band-limited glottal-like pulse: harmonics falling as k^-tilt, up to the Nyquist frequency
                source = _wavetable(np.arange(1, nb_harmonics + 1) ** -tilt, np.cumsum(f0) / sr)
                source += 0.03 * rng.standard_normal(length)  # breath
                vowel = VOWELS[rng.integers(len(VOWELS))] * formant_shift
                voiced = np.zeros(length)
                from scipy.signal import lfilter

                for formant, bandwidth, gain in zip(vowel, (90, 120, 160), (1.0, 0.7, 0.45)):
                    if formant < 0.45 * sr:
                        b, a = _resonator(formant, bandwidth, sr)
                        voiced += gain * lfilter(b, a, source)
                voiced = lfilter([1, -0.9], [1], voiced)  # lip radiation: +6 dB per octave
                envelope = (np.minimum(1, t / 0.03) * np.minimum(1, (length - np.arange(length)) / (0.05 * sr))
                            * (1 - 0.2 * t / max(t[-1], 1e-3)))
                syllable = voiced * envelope
                if rng.random() < 0.4:  # a consonant: short high-passed noise before the vowel
                    consonant = _highpass(rng.standard_normal(int(0.04 * sr)), 3500, sr)
                    consonant *= np.hanning(len(consonant)) * 0.3 * np.abs(voiced).max()
                    syllable[: len(consonant)] += consonant
                self.place(out, self.at(beat), syllable)
                beat += length_beats
        return _pan(out, rng.uniform(-0.05, 0.05))


def _wavetable(partials, cycles, table_size: int = 2048):
    """Sum of harmonics `partials[k-1] * sin(2 pi k cycles)` by table lookup; `cycles` in periods."""
    grid = np.arange(table_size + 1) / table_size * 2 * np.pi
    table = sum(weight * np.sin((k + 1) * grid) for k, weight in enumerate(partials) if weight)
    position = (np.asarray(cycles) % 1.0) * table_size
    index = position.astype(np.int64)  # linear interpolation on a uniform grid (np.interp bisects)
    return table[index] + (position - index) * (table[index + 1] - table[index])


def _highpass(signal, cutoff, sample_rate):
    from scipy.signal import butter, sosfilt

    cutoff = min(cutoff, 0.7 * sample_rate / 2)
    return sosfilt(butter(4, cutoff, btype="highpass", fs=sample_rate, output="sos"), signal)


def _bandpass(signal, low, high, sample_rate):
    from scipy.signal import butter, sosfilt

    high = min(high, 0.9 * sample_rate / 2)
    low = min(low, 0.5 * high)
    return sosfilt(butter(2, [low, high], btype="bandpass", fs=sample_rate, output="sos"), signal)


def write_song(path, seconds: float, sample_rate: int = 44100, nb_channels: int = 2) -> None:
    """A long synthetic stereo song for benchmarks, written block by block (memory stays small): a few tones and
    noise, 16-bit PCM."""
    import numpy as np
    import soundfile

    rng = np.random.default_rng(0)
    block = 10 * sample_rate
    with soundfile.SoundFile(str(path), "w", samplerate=sample_rate, channels=nb_channels, subtype="PCM_16") as f:
        for start in range(0, int(seconds * sample_rate), block):
            t = (start + np.arange(min(block, int(seconds * sample_rate) - start))) / sample_rate
            tones = sum(0.1 * np.sin(2 * np.pi * f0 * t) for f0 in (110.0, 440.0, 1320.0))
            audio = tones[:, None] + 0.05 * rng.standard_normal((len(t), nb_channels))
            f.write(audio.astype(np.float32))
