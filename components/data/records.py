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

import logging
import os
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np

from components.artifacts import Artifact, file_digest
from components.data.manifest import Manifest, Shard
from configs.errors import StageError

PCM_DTYPES = {"int16": "<i2", "float16": "<f2", "float32": "<f4"}
INT16_SCALE = 32768.0  # x -> round(x * 32768), decoded as q / 32768: 16-bit wav values round-trip exactly
SUFFIXES = {"": ".tfrecord", "GZIP": ".tfrecord.gz", "ZLIB": ".tfrecord.zlib"}
STEM_KEY = "stem/{}"


# -- encoding ------------------------------------------------------------------------------------------
def encode_pcm(audio: np.ndarray, pcm: str) -> Tuple[bytes, int]:
    """float32 `(nb_timesteps, nb_channels)` -> (little-endian bytes, number of clipped samples)."""
    if pcm == "int16":
        # float32 x 2**15 is exact (a power-of-two scale), so rounding in float32 gives the float64 result
        # at half the memory traffic; float64 input keeps float64
        audio = np.asarray(audio)
        dtype = np.float32 if audio.dtype == np.float32 else np.float64
        scaled = np.rint(audio.astype(dtype, copy=False) * dtype(INT16_SCALE))
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


def encode_segments(stems: Mapping[str, np.ndarray], *, segment_samples: int, pcm: str):
    """The PCM of each segment of a track, numpy only (no TensorFlow: runs in worker processes).

    stems: {target: float32 `(nb_timesteps, nb_channels)`}; yields (offset, length, {target: bytes}, nb_clipped).
    """
    first = next(iter(stems.values()))
    nb_timesteps, nb_channels = first.shape
    for offset, length in segment_bounds(nb_timesteps, segment_samples):
        blobs, clipped = {}, 0
        for target, audio in stems.items():
            segment = np.zeros((segment_samples, nb_channels), dtype=np.float32)
            segment[:length] = audio[offset:offset + length]
            blobs[target], count = encode_pcm(segment, pcm)
            clipped += count
        yield offset, length, blobs, clipped


def serialize_segment(name: str, split: str, offset: int, length: int, blobs: Mapping[str, bytes], *,
                      sample_rate: int, nb_channels: int) -> bytes:
    """One serialized `tf.train.Example` (the layout in this module's docstring)."""
    import tensorflow as tf

    def feature_bytes(value):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def feature_int(value):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))

    features = {"track": feature_bytes(name.encode()), "split": feature_bytes(split.encode()),
                "offset": feature_int(offset), "length": feature_int(length),
                "sample_rate": feature_int(sample_rate), "nb_channels": feature_int(nb_channels)}
    for target, blob in blobs.items():
        features[STEM_KEY.format(target)] = feature_bytes(blob)
    # deterministic: map entries sorted by key, so every process (and Beam worker) writes the same bytes
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString(deterministic=True)


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

    def close(self) -> List[Shard]:
        """Final names `<split>-00000-of-000NN<suffix>`; returns the shards (file, examples, bytes, sha256)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        shards, total = [], len(self._written)
        for index, (path, count) in enumerate(self._written):
            final = self.output_dir / f"{self.split}-{index:05d}-of-{total:05d}{SUFFIXES[self.compression]}"
            os.replace(path, final)
            shards.append(Shard(file=final.name, examples=count, bytes=final.stat().st_size,
                                sha256=file_digest(final)))
        return shards


# -- artifact access -----------------------------------------------------------------------------------
ArtifactLike = Union[Artifact, str, Path]


def shard_paths(prepare_artifact: ArtifactLike, split: str) -> List[str]:
    entry = Manifest.read(prepare_artifact).split(split, _path(prepare_artifact))
    return [str(_path(prepare_artifact) / shard.file) for shard in entry.shards]


def verify_shards(prepare_artifact: ArtifactLike, splits) -> None:
    """StageError naming the first shard of `splits` whose size or sha256 differs from the manifest.

    Run before a stage reads them: TensorFlow's own error for a damaged record names no file. Costs one
    sequential read of the shards (about 1 GB/s)."""
    found = Manifest.read(prepare_artifact)
    for split in splits:
        for shard in (found.splits[split].shards if split in found.splits else ()):
            path = _path(prepare_artifact) / shard.file
            if not path.is_file():
                problem = "missing"
            elif path.stat().st_size != shard.bytes:
                problem = f"{path.stat().st_size} bytes, {shard.bytes} when written"
            elif shard.sha256 and file_digest(path) != shard.sha256:
                problem = "sha256 differs from the prepare manifest"
            else:
                continue
            raise StageError(f"{path}: damaged TFRecord shard ({problem}); redo the prepare stage with "
                             "`python pipeline/run.py --stage prepare --force`")


def target_energy(prepare_artifact: ArtifactLike, split: str = "train") -> Dict[str, float]:
    """Mean energy (mean square) per target over a split: the figure used for loss weighting."""
    return dict(Manifest.read(prepare_artifact).splits[split].energy)


def _path(prepare_artifact: ArtifactLike) -> Path:
    return prepare_artifact.path if isinstance(prepare_artifact, Artifact) else Path(prepare_artifact)


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

    found = Manifest.read(prepare_artifact)
    pcm, nb_channels, targets = found.pcm, found.nb_channels, found.targets
    files = _nonempty_shards(prepare_artifact, split)
    records = tf.data.TFRecordDataset(files, compression_type=found.compression or None)
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
    `data.mixing=independent`: every source from its own random track (tracks equally likely) and offset,
    sources quieter than `data.quiet_threshold` (mean |x|) redrawn; one shuffle buffer per target then.
    `data.silent_energy` > 0 drops examples with a silent source (M-U-Net). Offsets fall inside segments:
    make `data.segment_seconds` a few times `train.seq_seconds` for offsets close to uniform over a track.
    augment=False (validation/test): segments in order, cut into consecutive windows, no augmentation.
    The mixture is the sum of the returned sources, so targets and input always agree.
    Same `seed` -> same batches; `seed=None` lets tf.data run nondeterministically (faster).
    """
    import tensorflow as tf

    found = Manifest.read(prepare_artifact)
    targets = found.targets
    if tuple(data_config.targets) != targets:
        raise StageError(f"data.targets={list(data_config.targets)} but the prepare artifact holds {list(targets)}; "
                         f"rerun prepare with these targets")
    segment_samples, nb_channels, pcm = found.segment_samples, found.nb_channels, found.pcm
    seq_samples = int(seq_samples)
    if not 0 < seq_samples <= segment_samples:
        raise StageError(f"excerpt of {seq_samples} samples does not fit a prepared segment of {segment_samples}; "
                         f"make train.seq_seconds <= data.segment_seconds")
    files = _nonempty_shards(prepare_artifact, split)
    parallel = workers or tf.data.AUTOTUNE
    deterministic = seed is not None or not augment
    nb_examples = found.splits[split].nb_examples

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

    source_features = {"length": tf.io.FixedLenFeature([], tf.int64), "track": tf.io.FixedLenFeature([], tf.string)}

    def parse_source(serialized, target):
        """One target's stem of a record, still encoded: (PCM bytes, valid length, track name)."""
        wanted = {**source_features, STEM_KEY.format(target): tf.io.FixedLenFeature([], tf.string)}
        example = tf.io.parse_single_example(serialized, wanted)
        return example[STEM_KEY.format(target)], example["length"], example["track"]

    def decode_source(blob):
        values = tf.cast(tf.io.decode_raw(blob, dtype, little_endian=True), tf.float32)
        if pcm == "int16":
            values = values / INT16_SCALE
        return tf.reshape(values, [segment_samples, nb_channels])

    buffer = max(1, min(data_config.shuffle_buffer, nb_examples))
    if augment:  # serialized PCM is the smallest form to hold in the shuffle buffer
        buffer_bytes = buffer * segment_samples * nb_channels * len(targets) * int(PCM_DTYPES[pcm][-1])
        if buffer_bytes > 2e9:
            logging.getLogger("pipeline").warning(
                "shuffle buffer of %d segments holds %.1f GB; lower data.shuffle_buffer or data.segment_seconds "
                "if memory is short", buffer, buffer_bytes / 1e9)

    def one_pass(pass_seed=None, shuffle_records: bool = True):
        """Every record once; shuffled (shards, then segments unless shuffle_records=False) when augmenting."""
        records = tf.data.Dataset.from_tensor_slices(files)
        if augment:
            records = records.shuffle(len(files), seed=pass_seed, reshuffle_each_iteration=pass_seed is None)
        records = records.interleave(
            lambda path: tf.data.TFRecordDataset(path, compression_type=found.compression or None),
            cycle_length=min(len(files), 4), num_parallel_calls=parallel, deterministic=deterministic)
        if augment and shuffle_records:
            records = records.shuffle(buffer, seed=pass_seed, reshuffle_each_iteration=pass_seed is None)
        return records

    def shuffled_records(stream: int = 0, prepare=None):
        """Every record, shuffled, repeated; `stream` > 0: an independent order (its own seeds); `prepare`:
        maps records before the segment shuffle (one source's bytes: a quarter of the buffer's memory)."""
        def one(pass_seed=None):
            if pass_seed is not None:
                # tf.data's get_seed compares (graph seed, op seed) with (0, 0) in Python, which fails for a
                # tensor op seed when the global seed is 0: the pass seed alone decides, whatever the global seed
                graph = tf.compat.v1.get_default_graph()
                graph_seed, graph.seed = graph.seed, None
                try:
                    return unseeded(pass_seed)
                finally:
                    graph.seed = graph_seed
            return unseeded(pass_seed)

        def unseeded(pass_seed):
            if prepare is None:
                return one_pass(pass_seed)
            found_records = one_pass(pass_seed, shuffle_records=False).map(
                prepare, num_parallel_calls=parallel, deterministic=deterministic)
            return found_records.shuffle(buffer, seed=pass_seed, reshuffle_each_iteration=pass_seed is None)

        if augment and seed is not None:
            # Each pass takes its shuffle seed from its index rather than from a seed generator that every
            # iterator of this dataset would share (and race on): any two iterators give the same batches.
            base = tf.cast(seed + 7919 * stream, tf.int64) * 1_000_003
            passes = tf.data.Dataset.counter() if repeat else tf.data.Dataset.range(1)
            return passes.flat_map(lambda index: one(base + index))
        found_records = one()
        return found_records.repeat() if repeat else found_records

    records = shuffled_records()
    examples = records.map(parse, num_parallel_calls=parallel, deterministic=deterministic)

    if augment:
        low, high = (float(v) for v in data_config.gain_range)
        swap = bool(data_config.channel_swap) and nb_channels == 2
        silent_energy = float(data_config.silent_energy)

        def augment_source(audio, seeds, index):
            """Gain uniform in `data.gain_range`, then a random channel swap (named steps, each a config key)."""
            audio = random_gain(audio, seeds(2 * index), low, high)
            return random_channel_swap(audio, seeds(2 * index + 1)) if swap else audio

        if data_config.mixing == "independent":
            examples = independent_examples(
                shuffled_records, parse_source, decode_source, targets, seq_samples=seq_samples,
                nb_channels=nb_channels,
                seed=seed, quiet_threshold=float(data_config.quiet_threshold), augment_source=augment_source,
                track_weights=_track_acceptance(found.splits[split].tracks), parallel=parallel,
                deterministic=deterministic)
        else:
            randomness = tf.data.Dataset.random(seed=seed)

            def augment_one(example, key):
                stems, length = example
                seeds = lambda index: tf.stack([key, tf.constant(index, tf.int64)])  # noqa: E731
                start = crop_start(length, seq_samples, seeds(0))
                out = {target: random_crop(stems[target], start, seq_samples, nb_channels) for target in targets}
                return out, key

            examples = tf.data.Dataset.zip((examples, randomness)).map(
                augment_one, num_parallel_calls=parallel, deterministic=deterministic)
            if silent_energy > 0:
                examples = examples.filter(lambda stems, key: has_no_silent_source(stems, silent_energy))

            def augment_all(stems, key):
                seeds = lambda index: tf.stack([key, tf.constant(index, tf.int64)])  # noqa: E731
                return {t: augment_source(stems[t], seeds, i) for i, t in enumerate(targets, start=1)}, key

            examples = examples.map(augment_all, num_parallel_calls=parallel, deterministic=deterministic)
        if data_config.mixing == "independent" and silent_energy > 0:
            examples = examples.filter(lambda stems, key: has_no_silent_source(stems, silent_energy))
        batches = examples.batch(batch_size, drop_remainder=True)
        probability = float(data_config.remix_probability)
        batches = batches.map(lambda stems, keys: remix(stems, keys, targets, probability, batch_size),
                              num_parallel_calls=parallel, deterministic=deterministic)
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


# -- named augmentation and mixing steps (training batches) -----------------------------------------------------
def crop_start(length, seq_samples: int, seed):
    """A uniform start inside the valid samples of a segment when they are long enough, else 0."""
    import tensorflow as tf

    last_start = tf.maximum(length - seq_samples, 0)
    return tf.random.stateless_uniform([], seed, minval=0, maxval=last_start + 1, dtype=tf.int64)


def random_crop(audio, start, seq_samples: int, nb_channels: int):
    """`(segment_samples, nb_channels)` -> the `seq_samples` from `start`."""
    import tensorflow as tf

    return tf.ensure_shape(tf.slice(audio, [start, 0], [seq_samples, nb_channels]), [seq_samples, nb_channels])


def random_gain(audio, seed, low: float, high: float):
    """Scale a source by a gain uniform in [low, high]."""
    import tensorflow as tf

    return audio * tf.random.stateless_uniform([], seed, minval=low, maxval=high)


def random_channel_swap(audio, seed):
    """Swap left and right with probability 1/2."""
    import tensorflow as tf

    flip = tf.random.stateless_uniform([], seed) < 0.5
    return tf.cond(flip, lambda: tf.reverse(audio, axis=[1]), lambda: audio)


def remix(stems, keys, targets, probability: float, batch_size: int):
    """With `probability`, a source takes the same source of another example of the batch."""
    import tensorflow as tf

    if probability <= 0 or batch_size < 2:
        return stems
    out = {}
    for index, target in enumerate(targets):
        seed_pair = tf.stack([keys[0], tf.constant(1000 + index, tf.int64)])
        order = tf.argsort(tf.random.stateless_uniform([batch_size], seed_pair))
        chosen = tf.random.stateless_uniform([batch_size], seed_pair + [0, 500]) < probability
        out[target] = tf.where(chosen[:, None, None], tf.gather(stems[target], order), stems[target])
    return out


def is_loud(audio, threshold: float):
    """sdx23's quiet-chunk test (`dataset.py`): mean |x| over samples and channels >= threshold."""
    import tensorflow as tf

    return tf.reduce_mean(tf.abs(audio)) >= threshold


def has_no_silent_source(stems, min_energy: float):
    """M-U-Net's filter (multichannel-unet-bss dataset/preprocessing.py + filter_musdb_split.py: a chunk whose
    source energy sum |x|^2 rounds to 0 is dropped): every source's energy of its channel mean >= min_energy."""
    import tensorflow as tf

    energies = [tf.reduce_sum(tf.square(tf.reduce_mean(audio, axis=-1))) for audio in stems.values()]
    return tf.reduce_all(tf.stack(energies) >= min_energy)


def _track_acceptance(tracks) -> Dict[str, float]:
    """Per track, the chance to keep a drawn segment so that every track is drawn equally often (the references
    pick a track uniformly, then an offset): min segments / the track's segments."""
    counts = {t.name: max(1, int(t.segments)) for t in tracks}
    fewest = min(counts.values()) if counts else 1
    return {name: fewest / count for name, count in counts.items()}


def independent_examples(shuffled_records, parse_source, decode_source, targets, *, seq_samples: int,
                         nb_channels: int, seed,
                         quiet_threshold: float, augment_source, track_weights: Mapping[str, float], parallel,
                         deterministic: bool):
    """Examples `({target: (seq_samples, nb_channels)}, key)` whose sources come each from its own random track
    and offset (kuielab/sdx23 `dataset.py` MSSDataset.load_source, DTTNet `musdb.py` MusdbTrainDataset):
    one independently shuffled stream of segments per target, tracks drawn uniformly (segments of long tracks
    thinned), a random crop, a quiet source redrawn (mean |x| < quiet_threshold), then `augment_source`."""
    import tensorflow as tf

    names = tf.constant(list(track_weights) or [""])
    weights = tf.constant(list(track_weights.values()) or [1.0], tf.float32)
    table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(names, weights), default_value=1.0)
    streams = []
    for index, target in enumerate(targets):
        stream_seed = None if seed is None else seed + 7919 * (index + 1)
        sources = shuffled_records(index + 1, prepare=lambda serialized, t=target: parse_source(serialized, t))
        keyed = tf.data.Dataset.zip((sources, tf.data.Dataset.random(seed=stream_seed)))

        def draw(source, key):
            blob, length, track = source
            audio = decode_source(blob)
            seeds = lambda i: tf.stack([key, tf.constant(i, tf.int64)])  # noqa: E731
            keep = tf.random.stateless_uniform([], seeds(0)) < table.lookup(track)
            excerpt = random_crop(audio, crop_start(length, seq_samples, seeds(1)), seq_samples, nb_channels)
            return excerpt, keep

        drawn = keyed.map(draw, num_parallel_calls=parallel, deterministic=deterministic)
        drawn = drawn.filter(lambda excerpt, keep: keep)
        if quiet_threshold > 0:
            drawn = drawn.filter(lambda excerpt, keep: is_loud(excerpt, quiet_threshold))
        streams.append(drawn.map(lambda excerpt, keep: excerpt))
    keys = tf.data.Dataset.random(seed=None if seed is None else seed + 104729)

    def assemble(*items):
        *excerpts, key = items
        seeds = lambda i: tf.stack([key, tf.constant(i, tf.int64)])  # noqa: E731
        return {t: augment_source(excerpts[i], seeds, i + 1) for i, t in enumerate(targets)}, key

    return tf.data.Dataset.zip((*streams, keys)).map(assemble, num_parallel_calls=parallel,
                                                     deterministic=deterministic)
