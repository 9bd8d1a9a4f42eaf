"""TFRecord shards of fixed-length segments, and the two ways to read them back.

One `tf.train.Example` is one segment of `segment_samples = round(data.segment_seconds * sample_rate)`
timesteps of every target stem of one track:

    track        bytes   track name
    split        bytes   split name
    offset       int64   first sample of the segment in the track
    length       int64   valid samples (the last segment of a track is zero-padded to segment_samples)
    sample_rate  int64
    nb_channels  int64
    stem/<target> bytes  little-endian PCM (int16 | float16 | float32), `(segment_samples, nb_channels)`

Shards are `<split>-00000-of-000NN.tfrecord[.gz|.zlib]`, each about `data.shard_megabytes` of PCM.

Readers:
    load_dataset(...)  training/validation batches `(mixture, {target: stems})` through tf.data
    read_tracks(...)   whole tracks reassembled in offset order, exact length (evaluation)
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np

from components.artifacts import META_FILE, Artifact, StageError, file_digest

PCM_DTYPES = {"int16": "<i2", "float16": "<f2", "float32": "<f4"}
INT16_SCALE = 32768.0  # x -> round(x * 32768), decoded as q / 32768: 16-bit wav values round-trip exactly
SUFFIXES = {"": ".tfrecord", "GZIP": ".tfrecord.gz", "ZLIB": ".tfrecord.zlib"}
STEM_KEY = "stem/{}"


# -- encoding ------------------------------------------------------------------------------------------
def encode_pcm(audio: np.ndarray, pcm: str) -> Tuple[bytes, int]:
    """float32 `(nb_timesteps, nb_channels)` -> (little-endian bytes, number of clipped samples)."""
    if pcm == "int16":
        scaled = np.round(np.asarray(audio, dtype=np.float64) * INT16_SCALE)
        clipped = int(np.count_nonzero(np.abs(scaled) > 32768))  # +1.0 -> 32767 is within quantisation error
        return np.clip(scaled, -32768, 32767).astype(PCM_DTYPES[pcm]).tobytes(), clipped
    if pcm == "float16":
        clipped = int(np.count_nonzero(np.abs(audio) > 65504))
        return np.asarray(audio).astype(PCM_DTYPES[pcm]).tobytes(), clipped
    return np.asarray(audio).astype(PCM_DTYPES[pcm]).tobytes(), 0


def decode_pcm(blob: bytes, pcm: str, nb_channels: int) -> np.ndarray:
    values = np.frombuffer(blob, dtype=PCM_DTYPES[pcm]).astype(np.float32)
    if pcm == "int16":
        values /= INT16_SCALE
    return values.reshape(-1, nb_channels)


def segment_bounds(nb_timesteps: int, segment_samples: int) -> List[Tuple[int, int]]:
    """[(offset, valid length)] covering a track; the last segment may be shorter (then padded)."""
    return [(offset, min(segment_samples, nb_timesteps - offset)) for offset in range(0, nb_timesteps, segment_samples)]


def track_examples(track, *, segment_samples: int, pcm: str, sample_rate: int):
    """Serialized examples of one `datasets.Track`; yields (bytes, nb_clipped_samples)."""
    import tensorflow as tf

    def feature_bytes(value):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def feature_int(value):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))

    nb_channels = next(iter(track.stems.values())).shape[1]
    for offset, length in segment_bounds(track.nb_timesteps, segment_samples):
        features = {"track": feature_bytes(track.name.encode()), "split": feature_bytes(track.split.encode()),
                    "offset": feature_int(offset), "length": feature_int(length),
                    "sample_rate": feature_int(sample_rate), "nb_channels": feature_int(nb_channels)}
        clipped = 0
        for target, audio in track.stems.items():
            segment = np.zeros((segment_samples, nb_channels), dtype=np.float32)
            segment[:length] = audio[offset:offset + length]
            blob, count = encode_pcm(segment, pcm)
            clipped += count
            features[STEM_KEY.format(target)] = feature_bytes(blob)
        example = tf.train.Example(features=tf.train.Features(feature=features))
        yield example.SerializeToString(), clipped


class ShardWriter:
    """Writes one split's examples into shards of about `shard_bytes`; `close()` names and checksums them."""

    def __init__(self, output_dir, split: str, *, shard_bytes: float, compression: str = ""):
        self.output_dir, self.split = Path(output_dir), split
        self.shard_bytes, self.compression = max(1.0, float(shard_bytes)), compression
        self._writer, self._written, self._size = None, [], 0  # _written: [(tmp path, nb_examples)]

    def write(self, serialized: bytes) -> None:
        import tensorflow as tf

        if self._writer is None:
            path = self.output_dir / f".{self.split}-{len(self._written):05d}.partial"
            self._writer = tf.io.TFRecordWriter(str(path), options=tf.io.TFRecordOptions(self.compression or None))
            self._written.append([path, 0])
            self._size = 0
        self._writer.write(serialized)
        self._written[-1][1] += 1
        self._size += len(serialized)
        if self._size >= self.shard_bytes:
            self._writer.close()
            self._writer = None

    def close(self) -> List[dict]:
        """Final names `<split>-00000-of-000NN<suffix>`; returns [{file, examples, bytes, sha256}]."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        shards, total = [], len(self._written)
        for index, (path, count) in enumerate(self._written):
            final = self.output_dir / f"{self.split}-{index:05d}-of-{total:05d}{SUFFIXES[self.compression]}"
            os.replace(path, final)
            shards.append({"file": final.name, "examples": count, "bytes": final.stat().st_size,
                           "sha256": file_digest(final)})
        return shards


# -- artifact access -----------------------------------------------------------------------------------
ArtifactLike = Union[Artifact, str, Path]


def manifest(prepare_artifact: ArtifactLike) -> dict:
    """The manifest of a prepare artifact (an Artifact, or the path of its directory)."""
    meta = _meta(prepare_artifact)
    if "manifest" not in meta:
        raise StageError(f"{_path(prepare_artifact)}: not a prepare artifact (no manifest); run --stage prepare")
    return meta["manifest"]


def shard_paths(prepare_artifact: ArtifactLike, split: str) -> List[str]:
    found = manifest(prepare_artifact)
    if split not in found["splits"]:
        raise StageError(f"{_path(prepare_artifact)}: split '{split}' was not prepared "
                         f"(prepared: {', '.join(found['splits'])}); add it to data.splits and rerun prepare")
    return [str(_path(prepare_artifact) / shard["file"]) for shard in found["splits"][split]["shards"]]


def verify_shards(prepare_artifact: ArtifactLike, splits) -> None:
    """StageError naming the first shard of `splits` whose size or sha256 differs from the manifest.

    Run before a stage reads them: TensorFlow's own error for a damaged record names no file. Costs one
    sequential read of the shards (about 1 GB/s)."""
    found = manifest(prepare_artifact)
    for split in splits:
        for shard in found["splits"].get(split, {}).get("shards", []):
            path = _path(prepare_artifact) / shard["file"]
            if not path.is_file():
                problem = "missing"
            elif path.stat().st_size != shard["bytes"]:
                problem = f"{path.stat().st_size} bytes, {shard['bytes']} when written"
            elif shard.get("sha256") and file_digest(path) != shard["sha256"]:
                problem = "sha256 differs from the prepare manifest"
            else:
                continue
            raise StageError(f"{path}: damaged TFRecord shard ({problem}); redo the prepare stage with "
                             "`python pipeline/run.py --stage prepare --force`")


def target_energy(prepare_artifact: ArtifactLike, split: str = "train") -> Dict[str, float]:
    """Mean energy (mean square) per target over a split: the figure used for loss weighting."""
    return dict(manifest(prepare_artifact)["splits"][split]["energy"])


def _path(prepare_artifact: ArtifactLike) -> Path:
    return prepare_artifact.path if isinstance(prepare_artifact, Artifact) else Path(prepare_artifact)


def _meta(prepare_artifact: ArtifactLike) -> Mapping:
    if isinstance(prepare_artifact, Artifact):
        return prepare_artifact.meta
    meta_path = Path(prepare_artifact) / META_FILE
    if not meta_path.is_file():
        raise StageError(f"{prepare_artifact}: no {META_FILE}; run `python pipeline/run.py --stage prepare` first")
    return json.loads(meta_path.read_text())


def _nonempty_shards(prepare_artifact, split) -> List[str]:
    files = shard_paths(prepare_artifact, split)
    if not files:
        raise StageError(f"{_path(prepare_artifact)}: split '{split}' has no tracks (empty in the data set); "
                         f"add tracks for it or read another split")
    return files


# -- whole tracks (evaluation) ---------------------------------------------------------------------------
def read_tracks(prepare_artifact: ArtifactLike, split: str) -> Iterator[Tuple[str, Dict[str, np.ndarray]]]:
    """(track name, {target: float32 (nb_timesteps, nb_channels)}) per track, at its exact original length."""
    import tensorflow as tf

    found = manifest(prepare_artifact)
    pcm, nb_channels, targets = found["pcm"], found["nb_channels"], found["targets"]
    files = _nonempty_shards(prepare_artifact, split)
    records = tf.data.TFRecordDataset(files, compression_type=found["compression"] or None)
    current, segments, seen = None, [], set()

    def assemble():
        segments.sort(key=lambda item: item[0])
        stems = {}
        for target in targets:
            stems[target] = np.concatenate([audio[target][:length] for _, length, audio in segments], axis=0)
        return current, stems

    for serialized in records.as_numpy_iterator():
        feature = tf.train.Example.FromString(serialized).features.feature
        name = feature["track"].bytes_list.value[0].decode()
        if name != current:
            if current is not None:
                yield assemble()
            if name in seen:
                raise StageError(f"{_path(prepare_artifact)}: segments of track '{name}' are not contiguous; "
                                 f"rerun prepare with --force")
            seen.add(name)
            current, segments = name, []
        audio = {t: decode_pcm(feature[STEM_KEY.format(t)].bytes_list.value[0], pcm, nb_channels) for t in targets}
        segments.append((feature["offset"].int64_list.value[0], feature["length"].int64_list.value[0], audio))
    if current is not None:
        yield assemble()


# -- training / validation batches (tf.data) ---------------------------------------------------------------
def load_dataset(prepare_artifact: ArtifactLike, split: str, *, seq_samples: int, batch_size: int, augment: bool,
                 data_config, seed: Optional[int] = None, repeat: bool = True, workers: Optional[int] = None):
    """Batches `(mixture, {target: stems})`, float32 `(batch_size, seq_samples, nb_channels)`.

    augment=True (training): shuffled segments, a random crop of `seq_samples` inside the valid part of
    a segment, per-source gain uniform in `data.gain_range`, per-source random channel swap, optional
    remixing of sources across the examples of a batch (`data.remix_probability`), full batches only.
    augment=False (validation/test): segments in order, cut into consecutive windows, no augmentation.
    The mixture is the sum of the returned sources, so targets and input always agree.
    Same `seed` -> same batches; `seed=None` lets tf.data run nondeterministically (faster).
    """
    import tensorflow as tf

    found = manifest(prepare_artifact)
    targets = tuple(found["targets"])
    if tuple(data_config.targets) != targets:
        raise StageError(f"data.targets={list(data_config.targets)} but the prepare artifact holds {list(targets)}; "
                         f"rerun prepare with these targets")
    segment_samples, nb_channels, pcm = found["segment_samples"], found["nb_channels"], found["pcm"]
    seq_samples = int(seq_samples)
    if not 0 < seq_samples <= segment_samples:
        raise StageError(f"excerpt of {seq_samples} samples does not fit a prepared segment of {segment_samples}; "
                         f"make train.seq_seconds <= data.segment_seconds")
    files = _nonempty_shards(prepare_artifact, split)
    parallel = workers or tf.data.AUTOTUNE
    deterministic = seed is not None or not augment
    nb_examples = sum(s["examples"] for s in found["splits"][split]["shards"])

    features = {"length": tf.io.FixedLenFeature([], tf.int64)}
    features.update({STEM_KEY.format(t): tf.io.FixedLenFeature([], tf.string) for t in targets})
    dtype = {"int16": tf.int16, "float16": tf.float16, "float32": tf.float32}[pcm]

    def parse(serialized):
        example = tf.io.parse_single_example(serialized, features)
        stems = {}
        for target in targets:
            values = tf.io.decode_raw(example[STEM_KEY.format(target)], dtype, little_endian=True)
            values = tf.cast(values, tf.float32)
            if pcm == "int16":
                values = values / INT16_SCALE
            stems[target] = tf.reshape(values, [segment_samples, nb_channels])
        return stems, example["length"]

    buffer = max(1, min(data_config.shuffle_buffer, nb_examples))
    if augment:  # serialized PCM is the smallest form to hold in the shuffle buffer
        buffer_bytes = buffer * segment_samples * nb_channels * len(targets) * int(PCM_DTYPES[pcm][-1])
        if buffer_bytes > 2e9:
            logging.getLogger("pipeline").warning(
                "shuffle buffer of %d segments holds %.1f GB; lower data.shuffle_buffer or data.segment_seconds "
                "if memory is short", buffer, buffer_bytes / 1e9)

    def one_pass(pass_seed=None):
        """Every record once; shuffled (shards, then segments) when augmenting."""
        records = tf.data.Dataset.from_tensor_slices(files)
        if augment:
            records = records.shuffle(len(files), seed=pass_seed, reshuffle_each_iteration=pass_seed is None)
        records = records.interleave(
            lambda path: tf.data.TFRecordDataset(path, compression_type=found["compression"] or None),
            cycle_length=min(len(files), 4), num_parallel_calls=parallel, deterministic=deterministic)
        if augment:
            records = records.shuffle(buffer, seed=pass_seed, reshuffle_each_iteration=pass_seed is None)
        return records

    if augment and seed is not None:
        # Each pass takes its shuffle seed from its index rather than from a seed generator that every
        # iterator of this dataset would share (and race on): any two iterators give the same batches.
        passes = tf.data.Dataset.counter() if repeat else tf.data.Dataset.range(1)
        records = passes.flat_map(lambda index: one_pass(tf.cast(seed, tf.int64) * 1_000_003 + index))
    else:
        records = one_pass()
        if repeat:
            records = records.repeat()
    examples = records.map(parse, num_parallel_calls=parallel, deterministic=deterministic)

    if augment:
        randomness = tf.data.Dataset.random(seed=seed)
        low, high = (float(v) for v in data_config.gain_range)
        swap = bool(data_config.channel_swap) and nb_channels == 2

        def augment_one(example, key):
            stems, length = example
            seeds = lambda index: tf.stack([key, tf.constant(index, tf.int64)])  # noqa: E731
            # crop inside the valid samples when they are long enough, else from the start
            last_start = tf.maximum(length - seq_samples, 0)
            start = tf.random.stateless_uniform([], seeds(0), minval=0, maxval=last_start + 1, dtype=tf.int64)
            out = {}
            for index, target in enumerate(targets, start=1):
                audio = tf.ensure_shape(tf.slice(stems[target], [start, 0], [seq_samples, nb_channels]),
                                        [seq_samples, nb_channels])
                audio = audio * tf.random.stateless_uniform([], seeds(2 * index), minval=low, maxval=high)
                if swap:
                    flip = tf.random.stateless_uniform([], seeds(2 * index + 1)) < 0.5
                    audio = tf.cond(flip, lambda a=audio: tf.reverse(a, axis=[1]), lambda a=audio: a)
                out[target] = audio
            return out, key

        examples = tf.data.Dataset.zip((examples, randomness)).map(
            augment_one, num_parallel_calls=parallel, deterministic=deterministic)
        batches = examples.batch(batch_size, drop_remainder=True)
        probability = float(data_config.remix_probability)

        def remix(stems, keys):
            if probability <= 0 or batch_size < 2:
                return stems
            out = {}
            for index, target in enumerate(targets):
                seed_pair = tf.stack([keys[0], tf.constant(1000 + index, tf.int64)])
                order = tf.argsort(tf.random.stateless_uniform([batch_size], seed_pair))
                chosen = tf.random.stateless_uniform([batch_size], seed_pair + [0, 500]) < probability
                out[target] = tf.where(chosen[:, None, None], tf.gather(stems[target], order), stems[target])
            return out

        batches = batches.map(remix, num_parallel_calls=parallel, deterministic=deterministic)
    else:
        nb_windows_max = segment_samples // seq_samples

        def windows(stems, length):
            # consecutive windows that hold valid samples: ceil(length / seq), at most what fits the segment
            count = tf.minimum(tf.maximum((length + seq_samples - 1) // seq_samples, 1), nb_windows_max)
            cut = {t: tf.reshape(a[: nb_windows_max * seq_samples], [nb_windows_max, seq_samples, nb_channels])[:count]
                   for t, a in stems.items()}
            return tf.data.Dataset.from_tensor_slices(cut)

        batches = examples.flat_map(windows).batch(batch_size, drop_remainder=False)

    def with_mixture(stems):
        # Summed in float64 then rounded once: the correctly rounded sum of the sources, whatever order
        # grappler gives the additions (a float32 chain may be rewritten into AddN and round differently).
        mixture = tf.add_n([tf.cast(stems[t], tf.float64) for t in targets])
        return tf.cast(mixture, tf.float32), stems

    batches = batches.map(with_mixture, num_parallel_calls=parallel, deterministic=deterministic)
    options = tf.data.Options()
    options.deterministic = deterministic
    return batches.with_options(options).prefetch(tf.data.AUTOTUNE)
