"""The export stage: a SavedModel for TensorFlow Serving and TFLite models for phones.

Layout written into `artifacts_dir/export/`:

    saved_model/<model_name>/<version>/      SavedModel, `serving_default`: waveform -> {target: waveform}
    saved_model/models.config                TF Serving model config list (serves every model folder)
    model.json                               sidecar: rate, targets, STFT parameters, fingerprints, metrics
    tflite/<model_name>.float32.tflite       fixed-length chunk model, TFLite built-in ops only
    tflite/<model_name>.<quantize>.tflite    quantized variant (float16 or dynamic-range int8)
    tflite/<model_name>.json                 what the .tflite takes and returns, chunk length, op lists
    stream/saved_model/, stream/stream.float32.tflite, stream/stream.json
                                             unidirectional Open-Unmix only: the hop-by-hop streaming model,
                                             signature `stream_step` with the state as inputs/outputs
"""
from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from configs.config import to_plain
from configs.errors import StageError
from components.base import ComponentSpec, StageContext
from components.data.manifest import Manifest
from components.inference.exported import (INPUT_NAME, METADATA_INPUT, METADATA_SIGNATURE, SERVING_CACHE, SIDECAR,
                                           SIGNATURE, WAV_INPUT, WAV_SIGNATURE, ExportLayout, publish, run_tflite,
                                           saved_model_stream_step,
                                           serving_config, tflite_ops, tflite_stream_step, xla_functions)

log = logging.getLogger("pipeline.export")



# --------------------------------------------------------------------------------------------
# SavedModel
# --------------------------------------------------------------------------------------------
def write_saved_model(separator, path: Path, nb_channels: int, xla: bool = False, sample_rate: Optional[int] = None,
                      targets: tuple = (), chunk_samples: Optional[int] = None) -> None:
    """`serving_default`: float32 `(batch, samples, channels)` (any batch, any length) -> {target: same}.
    With `sample_rate`, also `wav` (WAV_SIGNATURE): one WAV file's bytes in (`audio_bytes`), one 16-bit PCM WAV
    per target out (`<target>_bytes`): a quarter of the float32 reply's size, base64 over REST; and `metadata`
    (METADATA_SIGNATURE): what a remote client needs (rate, channels, targets, the family's chunk) over Predict.

    `xla=False`: traced inside `transforms.without_xla()`, so no function must be XLA-compiled and stock
    TensorFlow Serving (XLA's CPU JIT off by default) runs it; `xla=True` keeps the compiled functions."""
    from models.transforms import without_xla

    with (contextlib.nullcontext() if xla else without_xla()):
        _write_endpoints(separator, path, nb_channels, sample_rate, tuple(targets), chunk_samples)


def _write_endpoints(separator, path: Path, nb_channels: int, sample_rate: Optional[int], targets: tuple,
                     chunk_samples: Optional[int]) -> None:
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    # no `archive.track(separator)`: the endpoint tracks the tf.Variables it reads, and tracking the model as
    # well saved every weight a second time (as its keras.Variables): twice the file, and twice the weights in
    # memory when `separate` loads it (M-U-Net: 996 MB instead of 498 MB)
    archive.add_endpoint(
        name=SIGNATURE,
        fn=lambda waveform: separator(waveform, training=False),
        input_signature=[tf.TensorSpec([None, None, nb_channels], tf.float32, name=INPUT_NAME)],
    )
    if sample_rate is not None:
        def separate_wav(audio_bytes):
            audio, rate = tf.audio.decode_wav(audio_bytes)  # (samples, channels) in [-1, 1)
            tf.debugging.assert_equal(rate, tf.constant(sample_rate, tf.int32),
                                      message=f"the WAV must be at {sample_rate} Hz, the model rate; resample it first")
            if nb_channels == 2:  # mono in: the same signal on both channels (as `separate` does)
                audio = tf.cond(tf.shape(audio)[1] == 1, lambda: tf.tile(audio, [1, 2]), lambda: audio[:, :2])
            else:
                audio = tf.reduce_mean(audio, axis=1, keepdims=True)
            # batch of one, its size left dynamic as in `serving_default`'s graph
            stems = separator(tf.reshape(audio, [-1, tf.shape(audio)[0], nb_channels]), training=False)
            return {f"{target}_bytes": tf.audio.encode_wav(tf.clip_by_value(stem[0], -1.0, 1.0), sample_rate)
                    for target, stem in stems.items()}

        archive.add_endpoint(name=WAV_SIGNATURE, fn=separate_wav,
                             input_signature=[tf.TensorSpec([], tf.string, name=WAV_INPUT)])
        def metadata(unused):
            del unused  # Predict needs an input; the answer is the same for any
            return {"sample_rate": tf.constant(sample_rate, tf.int32),
                    "nb_channels": tf.constant(nb_channels, tf.int32),
                    "chunk_samples": tf.constant(chunk_samples or 0, tf.int32),
                    "targets": tf.constant(list(targets), tf.string)}

        archive.add_endpoint(name=METADATA_SIGNATURE, fn=metadata,
                             input_signature=[tf.TensorSpec([], tf.float32, name=METADATA_INPUT)])
    # a server never differentiates: no custom-gradient functions in the file (nor their tracing at save time)
    archive.write_out(str(path), options=tf.saved_model.SaveOptions(experimental_custom_gradients=False),
                      verbose=False)


WARMUP_FILE = "tf_serving_warmup_requests"
TFLITE_OVERLAP = 0.25  # the chunk overlap the TFLite sidecar describes for apps (and `separate --overlap`'s default)


def write_warmup(saved_model: Path, name: str, sample_rate: int, nb_channels: int, seconds: float = 1.0) -> None:
    """`assets.extra/tf_serving_warmup_requests`: a TFRecord of PredictionLog, one representative request per
    signature (a second of quiet noise as float32 and as WAV bytes), which TF Serving runs once when it loads
    the version, so that the first user's request does not pay for graph set-up and memory allocation."""
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    waveform = (0.05 * np.random.default_rng(0).standard_normal((1, int(seconds * sample_rate), nb_channels)))
    waveform = waveform.astype(np.float32)
    requests = []
    for signature, key, value in ((SIGNATURE, INPUT_NAME, waveform),
                                  (WAV_SIGNATURE, WAV_INPUT, tf.audio.encode_wav(waveform[0], sample_rate).numpy()),
                                  (METADATA_SIGNATURE, METADATA_INPUT, np.float32(0))):
        request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=name, signature_name=signature))
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        requests.append(request)
    (saved_model / "assets.extra").mkdir(exist_ok=True)
    with tf.io.TFRecordWriter(str(saved_model / "assets.extra" / WARMUP_FILE)) as writer:
        for request in requests:
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())


def write_sidecar(saved_model: Path, sidecar: dict) -> None:
    """`sidecar` (rate, channels, targets, ...: what `separate --model` reads) as `assets.extra/model.json` of a
    SavedModel version folder: TF Serving ignores it; it makes the folder self-describing."""
    (saved_model / "assets.extra").mkdir(exist_ok=True)
    (saved_model / "assets.extra" / SIDECAR).write_text(json.dumps(sidecar, indent=1, default=str))


# --------------------------------------------------------------------------------------------
# TFLite
# --------------------------------------------------------------------------------------------
def convert_tflite(keras_model, chunk: int, nb_channels: int, quantize: str = "") -> bytes:
    """Convert a static-shape model to .tflite with TFLite built-in ops only (no Flex / Select TF ops)."""
    import tensorflow as tf

    from models.transforms import tflite_graph

    with tempfile.TemporaryDirectory() as tmp:
        # a bare module holding the variables and the one static-shape function: keras.export.ExportArchive
        # would also trace every layer's default (dynamic-batch) signature, which only costs time here
        module = tf.Module()
        module.variables_ = [variable.value for variable in keras_model.variables]
        module.serve = tf.function(lambda waveform: keras_model(waveform, training=False), input_signature=[
            tf.TensorSpec([1, chunk, nb_channels], tf.float32, name=INPUT_NAME)])
        # traced here, with TFLite's built-in ops only. float32 and dynamic-int8 files run the recurrences as WHILE
        # loops (measured faster than the fused sequence-LSTM ops in both); float16 keeps the fused ops, whose
        # weights are dequantized once (a BATCH_MATMUL over float16 weights would dequantize them every step)
        with tflite_graph(lstm_loop=quantize in ("", "dynamic")):
            tf.saved_model.save(module, tmp, signatures={SIGNATURE: module.serve.get_concrete_function()})
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=[SIGNATURE])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantize == "float16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        elif quantize == "dynamic":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        elif quantize:
            raise StageError(f"export.quantize must be float16 or dynamic; got '{quantize}'")
        try:
            return converter.convert()
        except Exception as error:  # the converter's message lists the ops it could not lower
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise StageError(f"TFLite conversion with built-in ops only failed: {first}") from None


PARITY_CAP_DB = 200.0  # identical outputs: a finite figure for model.json


def parity_db(reference: dict, estimate: dict) -> float:
    """Worst (over outputs) SDR of `estimate` against `reference`, in dB: 10 log10(Σ r² / Σ (r − e)²), at most 200.

    No absolute epsilon (the evaluation metric's 1e-8 would cap a quiet output: a 1e-3-rms chunk could not score
    above ~50 dB however exact the export, which made DTTNet's untrained TFLite look 59 dB off)."""
    worst = PARITY_CAP_DB
    for key in reference:
        ref = np.asarray(reference[key], np.float64)
        est = np.asarray(estimate[key], np.float64)
        if ref.shape != est.shape:
            raise ValueError(f"parity of '{key}': reference {ref.shape} and estimate {est.shape} differ in shape")
        signal, noise = float(np.sum(ref ** 2)), float(np.sum((ref - est) ** 2))
        if noise > 0:
            worst = min(worst, 10.0 * np.log10(signal / noise) if signal > 0 else -PARITY_CAP_DB)
    return float(worst)


# --------------------------------------------------------------------------------------------
# Streaming (unidirectional Open-Unmix, models/streaming.py): one hop in, one hop per target out
# --------------------------------------------------------------------------------------------
def _stream_archive(stream, path: Path, nb_samples) -> None:
    """SavedModel whose `stream_step` signature takes `audio` and the state and returns the hops and the new state."""
    import keras

    from models.streaming import STEP_SIGNATURE

    archive = keras.export.ExportArchive()  # no `track`: it would store every weight twice (write_saved_model)
    archive.add_endpoint(name=STEP_SIGNATURE, fn=stream.step, input_signature=stream.input_signature(nb_samples))
    archive.write_out(str(path), verbose=False)


def write_stream_saved_model(stream, path: Path) -> None:
    """The state-passing streaming SavedModel (any batch)."""
    _stream_archive(stream, path, None)


def convert_stream_tflite(stream) -> bytes:
    """The streaming step as .tflite with built-in ops only; batch 1, the state as inputs and outputs."""
    import tensorflow as tf

    from models.streaming import STEP_SIGNATURE
    from models.transforms import tflite_graph

    with tempfile.TemporaryDirectory() as tmp:
        with tflite_graph():
            _stream_archive(stream, Path(tmp), 1)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=[STEP_SIGNATURE])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        try:
            return converter.convert()
        except Exception as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise StageError(f"streaming TFLite conversion with built-in ops only failed: {first}") from None


def export_stream(model, folder: Path, probe: np.ndarray, logger=log) -> dict:
    """`folder/saved_model/` and `folder/<name>.stream.tflite` plus their description (the `stream` entry of
    model.json), with SavedModel-vs-Keras and TFLite-vs-SavedModel parity over `probe` `(nb_timesteps, nb_channels)`."""
    from models.streaming import StreamingOpenUnmix, stream_array

    stream = StreamingOpenUnmix(model)
    folder.mkdir(parents=True, exist_ok=True)
    write_stream_saved_model(stream, folder / "saved_model")
    blob = convert_stream_tflite(stream)
    ops = tflite_ops(blob)
    flex = [op for op in ops if op.startswith("Flex") or op in ("CUSTOM", "DELEGATE")]
    if flex:
        raise StageError(f"streaming TFLite export needs non-builtin ops {flex}; it would not run on a phone")
    (folder / "stream.float32.tflite").write_bytes(blob)
    keras_out = stream_array(stream.compiled(), stream.initial_state(), probe, stream.hop_length)
    saved_out = stream_array(saved_model_stream_step(folder / "saved_model"), stream.initial_state(), probe,
                             stream.hop_length)
    tflite_out = stream_array(tflite_stream_step(blob), stream.initial_state(), probe, stream.hop_length)
    description = stream.describe()
    description.update(
        saved_model="stream/saved_model",
        tflite={"file": "stream/stream.float32.tflite", "megabytes": round(len(blob) / 1e6, 3), "ops": ops},
        saved_model_parity_db=round(parity_db(keras_out, saved_out), 2),
        tflite_parity_db=round(parity_db(saved_out, tflite_out), 2),
    )
    logger.info("streaming model: hop %d, latency %.1f ms, SavedModel vs Keras %.1f dB, TFLite vs SavedModel %.1f dB",
                stream.hop_length, description["latency_ms"], description["saved_model_parity_db"],
                description["tflite_parity_db"])
    (folder / "stream.json").write_text(json.dumps(description, indent=1))
    return description


# --------------------------------------------------------------------------------------------
# The executor
# --------------------------------------------------------------------------------------------
def _probe_chunk(context: StageContext, samples: int) -> np.ndarray:
    """A real mixture chunk for parity checks (the first prepared track), else seeded noise (no prepare
    artifact: an imported release is exported from its checkpoint alone)."""
    from components.data import records

    prepare = context.inputs.get("prepare")
    split = None if prepare is None else Manifest.read(prepare).first_split_with_tracks(("test", "valid", "train"))
    if split is not None:
        _, stems = next(iter(records.read_tracks(prepare, split)))
        mixture = np.sum(list(stems.values()), axis=0).astype(np.float32)
        start = max(0, (len(mixture) - samples) // 2)
        mixture = mixture[start:start + samples]
        if len(mixture) == samples:
            return mixture[None]
    rng = np.random.default_rng(0)
    return rng.normal(0, 0.1, (1, samples, context.config.data.nb_channels)).astype(np.float32)


def run(context: StageContext) -> dict:
    from components.training.trained import load_trained
    from models.base import count_parameters

    config = context.config
    name = config.model.name
    out = context.output_dir
    layout = ExportLayout(Path(out))
    model = load_trained(context.inputs["train"], config)
    rate = config.data.sample_rate
    channels = config.data.nb_channels
    figures = {"parameters": count_parameters(model.train_model)}

    # SavedModel for TF Serving
    saved = layout.saved_model(name, config.export.version)
    write_saved_model(model.separator, saved, channels, xla=config.export.xla, sample_rate=rate,
                      targets=model.targets, chunk_samples=model.inference.separation_chunk_samples)
    write_warmup(saved, name, rate, channels)
    figures["saved_model_xla_functions"] = len(xla_functions(saved))
    layout.serving_config.write_text(serving_config([name]))
    probe = _probe_chunk(context, int(round(min(5.0, config.data.segment_seconds) * rate)))
    keras_out = {k: np.asarray(v) for k, v in model.separator(probe, training=False).items()}
    figures["saved_model_megabytes"] = round(sum(f.stat().st_size for f in saved.rglob("*") if f.is_file()) / 1e6, 3)
    figures["saved_model_max_abs_diff"] = _saved_model_parity(saved, probe, keras_out)
    context.logger.info("SavedModel %s: %.1f MB, max |SavedModel - Keras| = %.2e", saved,
                        figures["saved_model_megabytes"], figures["saved_model_max_abs_diff"])

    # TFLite for phones
    tflite = {}
    if model.inference.mobile is None:
        context.logger.warning("model %s has no TFLite-compatible form; skipping TFLite export", name)
    else:
        tflite = _export_tflite(context, model, layout.tflite, figures)

    # hop-by-hop real-time form (unidirectional Open-Unmix)
    stream = _export_stream_if_supported(context, model, layout.stream, figures)

    evaluate = context.inputs.get("evaluate")
    sidecar = {
        "model": name,
        "version": config.export.version,
        "sample_rate": rate,
        "nb_channels": channels,
        "targets": list(model.targets),
        "signature": {"name": SIGNATURE, "input": {INPUT_NAME: ["batch", "samples", channels]},
                      "outputs": {t: ["batch", "samples", channels] for t in model.targets}},
        "wav_signature": {"name": WAV_SIGNATURE, "input": {WAV_INPUT: f"WAV file bytes at {rate} Hz"},
                          "outputs": {f"{t}_bytes": "16-bit PCM WAV bytes" for t in model.targets}},
        "family_config": to_plain(model.config),
        "config": {"data": config.section("data"), "model": config.section("model")},
        "train_fingerprint": context.inputs["train"].fingerprint,
        "parameters": figures["parameters"],
        "separation_chunk_samples": model.inference.separation_chunk_samples,
        "evaluation": (json.loads(evaluate.file("metrics.json").read_text()).get("mean")
                       if evaluate is not None and evaluate.file("metrics.json").is_file() else None),
        "tflite": tflite,
        "xla": config.export.xla,  # true: the server must run with XLA's CPU JIT on
    }
    if stream is not None:
        sidecar["stream"] = stream
    layout.sidecar.write_text(json.dumps(sidecar, indent=1, default=str))
    write_sidecar(saved, sidecar)

    # TF Serving's folder: this export as the next version, the newest export.keep_versions kept
    serving_root = Path(config.export.serving_dir) if config.export.serving_dir else context.side_cache(SERVING_CACHE)
    published = publish(saved, serving_root, name, keep=config.export.keep_versions, identity=context.fingerprint,
                        minimum=config.export.version)
    figures["published_version"] = int(published.name)
    context.logger.info("published for TF Serving: %s (models.config in %s)", published, serving_root)
    return {"figures": figures, "result": figures.get("tflite_float32_parity_db")}


def _saved_model_parity(path: Path, probe: np.ndarray, keras_out: dict) -> float:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    served = loaded.signatures[SIGNATURE](**{INPUT_NAME: tf.constant(probe)})
    return float(max(np.max(np.abs(np.asarray(served[k]) - keras_out[k])) for k in keras_out))


def _export_tflite(context: StageContext, model, folder: Path, figures: dict) -> dict:
    config = context.config
    name = config.model.name
    rate = config.data.sample_rate
    chunk = int(round(config.export.tflite_chunk_seconds * rate))
    chunk = model.input_samples(chunk)
    mobile = model.inference.mobile(chunk)
    probe = _probe_chunk(context, chunk)
    # every family's file is the whole separator: waveform chunk in, one waveform per target out
    reference = {k: np.asarray(v) for k, v in model.separator(probe, training=False).items()}
    folder.mkdir(parents=True)
    variants = {}
    for variant in ("float32", config.export.quantize):
        blob = convert_tflite(mobile, chunk, config.data.nb_channels, "" if variant == "float32" else variant)
        ops = tflite_ops(blob)
        flex = [op for op in ops if op.startswith("Flex") or op in ("CUSTOM", "DELEGATE")]
        if flex:
            raise StageError(f"TFLite export of {name} needs non-builtin ops {flex}; it would not run on a phone")
        path = folder / f"{name}.{variant}.tflite"
        path.write_bytes(blob)
        outputs = run_tflite(blob, probe)
        parity = parity_db(reference, outputs)
        variants[variant] = {"file": path.name, "megabytes": round(len(blob) / 1e6, 3), "ops": ops,
                             "parity_db": round(parity, 2)}
        figures[f"tflite_{variant}_megabytes"] = variants[variant]["megabytes"]
        figures[f"tflite_{variant}_parity_db"] = variants[variant]["parity_db"]
        context.logger.info("TFLite %s: %.2f MB, SDR vs Keras %.1f dB, ops %s", variant,
                            variants[variant]["megabytes"], parity, ", ".join(ops))
    description = {
        "chunk_samples": chunk,
        "chunk_seconds": chunk / rate,
        "latency_seconds": chunk / rate,
        "input": {INPUT_NAME: [1, chunk, config.data.nb_channels]},
        "outputs": {k: list(v.shape) for k, v in reference.items()},
        "outputs_are": "waveforms",
        "sample_rate": rate,
        "nb_channels": config.data.nb_channels,
        "targets": list(model.targets),
        # an app separates a song chunk by chunk: chunks start every `hop_samples` (chunk x (1 - overlap)); each
        # chunk's output is weighted by sin^2 over its first `overlap_samples` and cos^2 over its last (flat at the
        # song's ends) and the weighted outputs are summed: the weights of neighbouring chunks add up to one
        # (components/inference/separation.py chunk_weights). overlap 0: chunks side by side, weights 1
        "overlap_add": {"overlap": TFLITE_OVERLAP, "hop_samples": chunk - int(round(TFLITE_OVERLAP * chunk)),
                        "overlap_samples": int(round(TFLITE_OVERLAP * chunk)),
                        "fade_in": "sin^2", "fade_out": "cos^2"},
        # the fused LSTM ops keep their state in variable tensors across invokes: an app resets them before
        # every chunk (Interpreter.resetVariableTensors() / ResetVariableTensors() / reset_all_variables())
        "reset_variables_before_each_chunk": any("UNIDIRECTIONAL_SEQUENCE_LSTM" in info["ops"]
                                                 for info in variants.values()),
        "variants": variants,
    }
    (folder / f"{name}.json").write_text(json.dumps(description, indent=1))
    return description


def _export_stream_if_supported(context: StageContext, model, folder: Path, figures: dict):
    from models import streaming

    if not streaming.supports(model):
        return None
    probe = _probe_chunk(context, int(round(min(3.0, context.config.data.segment_seconds) * model.sample_rate)))[0]
    description = export_stream(model, folder, probe, context.logger)
    figures["stream_latency_ms"] = description["latency_ms"]
    figures["stream_tflite_parity_db"] = description["tflite_parity_db"]
    return description


SPEC = ComponentSpec(name="export", inputs=("train",), optional_inputs=("prepare", "evaluate"),
                     config_sections=("data", "model", "train", "export"), executor=run,
                     outputs=("model.json", "saved_model/models.config"), side_caches=(SERVING_CACHE,))
