"""Export (SavedModel serving contract, TFLite built-ins + parity) and the `separate` command."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.cli import ROOT, separate, separate_here

SAMPLE_MP4 = ROOT.parent / "shared" / "data" / "musdb18-sample" / "train" / "Music Delta - 80s Rock.stem.mp4"


@pytest.fixture(scope="module")
def exported(umx_pipeline):
    """The session's `--stage all with unittest` artifacts (tests/conftest.py): read, never written."""
    return umx_pipeline


def test_serving_layout_and_signature_contract(exported):
    export = exported / "export"
    meta = json.loads((export / "artifact.json").read_text())
    version = export / "saved_model" / "umx" / "1"
    assert (version / "saved_model.pb").is_file() and (version / "variables").is_dir()
    assert 'name: "umx"' in (export / "saved_model" / "models.config").read_text()
    sidecar = json.loads((export / "model.json").read_text())
    assert sidecar["sample_rate"] == 8000 and sidecar["targets"] == ["vocals", "drums", "bass", "other"]
    assert sidecar["parameters"] == meta["figures"]["parameters"] == 46_112  # umx, unittest preset
    assert sidecar["train_fingerprint"] == json.loads((exported / "train" / "artifact.json").read_text())["fingerprint"]
    shown = subprocess.run(["saved_model_cli", "show", "--dir", str(version), "--tag_set", "serve",
                            "--signature_def", "serving_default"], capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    text = shown.stdout
    assert "inputs['waveform'] tensor_info:" in text
    assert "dtype: DT_FLOAT" in text and "shape: (-1, -1, 2)" in text
    for target in sidecar["targets"]:
        assert f"outputs['{target}'] tensor_info:" in text
    assert text.count("shape: (-1, -1, 2)") == 1 + len(sidecar["targets"])
    assert meta["figures"]["saved_model_max_abs_diff"] <= 1e-5


def test_serving_graph_needs_no_xla_and_export_xla_keeps_it(exported, tmp_path):
    """TensorFlow Serving (and the C API, TF Java) run with XLA's CPU JIT off unless told otherwise; a function
    marked _XlaMustCompile fails there on the first request. The default export holds none; `export.xla=true`
    keeps the STFT, LSTM loops, Wiener statistics and per-source functions compiled (for servers started with
    --xla_cpu_compilation_enabled=true), with the same numbers."""
    from components import artifacts
    from components.export import write_saved_model
    from components.inference.exported import xla_functions
    from components.training.trained import load_trained
    from pipeline.experiment import resolve

    served = exported / "export" / "saved_model" / "umx" / "1"
    meta = json.loads((exported / "export" / "artifact.json").read_text())
    assert xla_functions(served) == [] and meta["figures"]["saved_model_xla_functions"] == 0
    assert json.loads((exported / "export" / "model.json").read_text())["xla"] is False

    config = resolve({"artifacts_dir": str(exported)}, ["unittest"])
    model = load_trained(artifacts.load(exported, "train"), config)
    write_saved_model(model.separator, tmp_path / "xla", config.data.nb_channels, xla=True)
    compiled = xla_functions(tmp_path / "xla")
    counts = {part: sum(f"_{part}_" in name for name in compiled)
              for part in ("stft", "lstm_forward", "statistics_fn", "source_fn")}
    assert counts == {"stft": 1, "lstm_forward": 1, "statistics_fn": 1, "source_fn": 1}, compiled

    waveform = np.random.default_rng(2).normal(0, 0.1, (1, 9000, 2)).astype(np.float32)
    np.save(tmp_path / "in.npy", waveform)
    keras_out = model.separator(waveform, training=False)
    for folder, ok in ((served, True), (tmp_path / "xla", False)):
        result = _serve_without_xla(folder, tmp_path / "in.npy", tmp_path / "out.npz", tmp_path)
        if not ok:  # the server's own error, on the first request
            assert result.returncode != 0 and "XLA compilation disabled" in result.stderr
            continue
        assert result.returncode == 0, result.stderr[-2000:]
        out = np.load(tmp_path / "out.npz")
        assert max(np.max(np.abs(out[t] - np.asarray(keras_out[t]))) for t in config.data.targets) <= 1e-5


def test_wav_signature_separates_wav_bytes_like_the_float_signature(exported):
    """`wav`: WAV bytes in, one 16-bit WAV per target out (REST sends them base64); the stems are the float32
    signature's to 16-bit rounding; mono input is spread over both channels; another rate is refused."""
    import io

    import soundfile as sf
    import tensorflow as tf

    from components.inference.exported import WAV_INPUT, WAV_SIGNATURE

    loaded = tf.saved_model.load(str(exported / "export" / "saved_model" / "umx" / "1"))
    sidecar = json.loads((exported / "export" / "model.json").read_text())
    rate, targets = sidecar["sample_rate"], sidecar["targets"]
    clip = (0.1 * np.random.default_rng(5).standard_normal((2 * rate, 2))).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, clip, rate, format="WAV", subtype="PCM_16")
    replies = loaded.signatures[WAV_SIGNATURE](**{WAV_INPUT: tf.constant(buffer.getvalue())})
    assert sorted(replies) == sorted(f"{t}_bytes" for t in targets)
    pcm = sf.read(io.BytesIO(buffer.getvalue()), dtype="float32")[0]  # the clip as the server decodes it
    floats = loaded.signatures["serving_default"](waveform=tf.constant(pcm[None]))
    for target in targets:
        stem, stem_rate = sf.read(io.BytesIO(replies[f"{target}_bytes"].numpy()), dtype="float32")
        reference = np.clip(floats[target].numpy()[0], -1, 1)
        assert stem_rate == rate and stem.shape == clip.shape
        assert np.max(np.abs(stem - reference)) <= 1.0 / 32768 + 1e-6  # 16-bit rounding only
        sdr = 10 * np.log10(np.sum(reference ** 2) / np.sum((stem - reference) ** 2))
        assert sdr > 60, (target, sdr)
    mono = io.BytesIO()
    sf.write(mono, clip[:, :1], rate, format="WAV", subtype="PCM_16")
    stem = sf.read(io.BytesIO(loaded.signatures[WAV_SIGNATURE](**{WAV_INPUT: tf.constant(mono.getvalue())})[
        f"{targets[0]}_bytes"].numpy()))[0]
    assert stem.shape == clip.shape
    other = io.BytesIO()
    sf.write(other, clip, rate * 2, format="WAV", subtype="PCM_16")
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"the WAV must be at {rate} Hz, the model rate"):
        loaded.signatures[WAV_SIGNATURE](**{WAV_INPUT: tf.constant(other.getvalue())})


def test_warmup_file_holds_one_request_per_signature_and_each_runs(exported):
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    version = exported / "export" / "saved_model" / "umx" / "1"
    loaded = tf.saved_model.load(str(version))
    logs = [prediction_log_pb2.PredictionLog.FromString(record.numpy()) for record in
            tf.data.TFRecordDataset(str(version / "assets.extra" / "tf_serving_warmup_requests"))]
    requests = [log.predict_log.request for log in logs]
    assert sorted(r.model_spec.signature_name for r in requests) == ["metadata", "serving_default", "wav"]
    expected = {"serving_default": {"vocals", "drums", "bass", "other"},
                "wav": {"vocals_bytes", "drums_bytes", "bass_bytes", "other_bytes"},
                "metadata": {"sample_rate", "nb_channels", "chunk_samples", "targets"}}
    for request in requests:
        inputs = {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()}
        outputs = loaded.signatures[request.model_spec.signature_name](**{k: tf.constant(v) for k, v in inputs.items()})
        assert set(outputs) == expected[request.model_spec.signature_name] and request.model_spec.name == "umx"


def test_publish_adds_versions_beside_keeps_the_newest_and_rewrites_models_config(exported, tmp_path):
    """TF Serving's model folder: each new export is the next version, renamed into place complete; the newest
    `keep` stay; the same export again adds nothing; a publication killed before its rename leaves a hidden
    folder that the next one removes; models.config lists every model published there."""
    import tensorflow as tf

    from components.inference.exported import publish, versions

    saved = exported / "export" / "saved_model" / "umx" / "1"
    root = tmp_path / "serving"
    assert publish(saved, root, "umx", keep=2, identity="a") == root / "umx" / "1"
    assert publish(saved, root, "umx", keep=2, identity="a") == root / "umx" / "1"  # unchanged: no new version
    (root / "umx" / ".publishing-9-123").mkdir()  # killed before its rename: never a numeric folder
    assert publish(saved, root, "umx", keep=2, identity="b") == root / "umx" / "2"
    assert [p.name for p in versions(root / "umx")] == ["1", "2"] and not list((root / "umx").glob(".publishing-*"))
    publish(saved, root, "umx", keep=2, identity="c")
    publish(saved, root, "other", keep=2, identity="c")
    assert [p.name for p in versions(root / "umx")] == ["2", "3"]
    assert sorted(p.name for p in (root / "umx").iterdir()) == ["2", "3"]
    text = (root / "models.config").read_text()
    assert text.count("config {") == 2 and 'base_path: "/models/umx"' in text and 'name: "other"' in text
    version = root / "umx" / "3"
    assert (version / "variables" / "variables.index").stat().st_ino == \
        (saved / "variables" / "variables.index").stat().st_ino  # hard links: no second copy of the weights
    assert "serving_default" in tf.saved_model.load(str(version)).signatures


def test_re_export_publishes_the_next_version_beside_the_served_one(exported, tmp_path):
    from tests.cli import cli
    from tests.shared_artifacts import copy_stages

    served = exported / "serving" / "umx"
    assert [p.name for p in served.iterdir() if p.name.isdigit()] == ["1"]  # the shared --stage all published it
    assert json.loads((exported / "export" / "artifact.json").read_text())["figures"]["published_version"] == 1
    root = copy_stages(exported, tmp_path / "a", "prepare", "train", "export", "serving")
    cli("--stage", "export", "--no-file-observer", "-q", "with", "unittest", f"artifacts_dir={root}",
        "export.tflite_chunk_seconds=2.0")  # another export: the next version; version 1 stays
    assert sorted(p.name for p in (root / "serving" / "umx").iterdir()) == ["1", "2"]
    assert (root / "serving" / "umx" / "2" / "assets.extra" / "model.json").is_file()
    assert 'name: "umx"' in (root / "serving" / "models.config").read_text()
    from components.inference.separators import load_separator

    assert load_separator(str(root / "serving" / "umx"), str(root)).path.name == "2"


# A fresh process that loads the SavedModel as TensorFlow Serving does by default: XLA compilation disabled with
# the same C++ call (tensorflow::DisableXlaCompilation) the server makes for --xla_cpu_compilation_enabled=false.
FRESH_LOAD = textwrap.dedent("""
    import ctypes, os, sys, numpy as np, tensorflow as tf
    ctypes.CDLL(os.path.join(os.path.dirname(tf.__file__), "libtensorflow_cc.so.2"))._ZN10tensorflow21DisableXlaCompilationEv()
    model = tf.saved_model.load(sys.argv[1])
    out = model.signatures["serving_default"](waveform=tf.constant(np.load(sys.argv[2])))
    np.savez(sys.argv[3], **{k: v.numpy() for k, v in out.items()})
    print(sorted(m for m in sys.modules if m.split(".")[0] in ("models", "components", "pipeline", "configs")))
""")


def _serve_without_xla(saved_model, waveform, out, cwd):
    return subprocess.run([sys.executable, "-c", FRESH_LOAD, str(saved_model), str(waveform), str(out)],
                          capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})


def test_fresh_process_savedmodel_matches_keras(exported, tmp_path):
    from components import artifacts
    from components.training.trained import load_trained
    from pipeline.experiment import resolve

    config = resolve({"artifacts_dir": str(exported)}, ["unittest"])
    model = load_trained(artifacts.load(exported, "train"), config)
    rng = np.random.default_rng(1)
    waveform = rng.normal(0, 0.1, (2, 12345, 2)).astype(np.float32)  # odd length, batch of two
    np.save(tmp_path / "in.npy", waveform)
    result = _serve_without_xla(exported / "export" / "saved_model" / "umx" / "1", tmp_path / "in.npy",
                                tmp_path / "out.npz", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", "the fresh process imported project code"
    served = np.load(tmp_path / "out.npz")
    keras_out = model.separator(waveform, training=False)
    for target in config.data.targets:
        assert served[target].shape == waveform.shape
        assert np.max(np.abs(served[target] - np.asarray(keras_out[target]))) <= 1e-5


def test_tflite_builtin_ops_only_and_parity(exported):
    from components.export import parity_db
    from components.inference.exported import run_tflite, tflite_ops
    from components import artifacts
    from components.training.trained import load_trained
    from pipeline.experiment import resolve

    folder = exported / "export" / "tflite"
    description = json.loads((folder / "umx.json").read_text())
    config = resolve({"artifacts_dir": str(exported)}, ["unittest"])
    model = load_trained(artifacts.load(exported, "train"), config)
    chunk = description["chunk_samples"]
    rng = np.random.default_rng(2)
    probe = rng.normal(0, 0.1, (1, chunk, 2)).astype(np.float32)
    reference = {k: np.asarray(v) for k, v in model.separator(probe, training=False).items()}  # waveforms
    thresholds = {"float32": 80.0, "float16": 25.0, "dynamic": 25.0}
    assert set(description["variants"]) == {"float32", config.export.quantize}
    assert description["outputs_are"] == "waveforms" and description["chunk_samples"] == chunk
    # only fused LSTM ops (the float16 file's) keep a state from one invoke to the next
    assert description["reset_variables_before_each_chunk"] is (config.export.quantize == "float16")
    for variant, info in description["variants"].items():
        blob = (folder / info["file"]).read_bytes()
        ops = tflite_ops(blob)
        assert ops == info["ops"]
        assert not [op for op in ops if op.startswith("Flex") or op in ("CUSTOM", "DELEGATE")], ops
        assert "FULLY_CONNECTED" in ops
        # float32 and dynamic: one WHILE loop per layer over all targets and directions; float16: every LSTM
        # direction of every target one fused sequence op. Nothing unrolled either way
        from ai_edge_litert.interpreter import Interpreter

        kernels = [op["op_name"] for op in Interpreter(model_content=blob)._get_ops_details()]
        if variant in ("float32", "dynamic"):
            assert "UNIDIRECTIONAL_SEQUENCE_LSTM" not in ops and kernels.count("WHILE") == model.config.nb_layers
        else:
            assert kernels.count("UNIDIRECTIONAL_SEQUENCE_LSTM") == 4 * 2 * model.config.nb_layers
            assert "WHILE" not in ops
        assert "LOGISTIC" not in ops  # the sigmoids only inside the fused ops or the loop bodies
        assert parity_db(reference, run_tflite(blob, probe)) >= thresholds[variant], variant
    sizes = {v: (folder / i["file"]).stat().st_size for v, i in description["variants"].items()}
    # the tiny model's file is mostly graph (unrolled LSTM steps), not weights; the default preset's halves
    assert sizes[config.export.quantize] < sizes["float32"]


def test_quantized_tflite_loses_at_most_half_a_db_on_real_musdb(exported):
    # the exported float32 and quantized files separate the real MUSDB18-HQ excerpt (resampled to the model's
    # 8 kHz) chunk by chunk as an app would; SDR against the true stems, mean over the four targets
    from components.inference.exported import TFLiteChunkRunner
    from components.inference.separation import separate_array
    from pipeline.benchmark import MUSDB_EXCERPT, _mean_sdr, musdb_excerpt

    if MUSDB_EXCERPT is None:
        pytest.skip("real MUSDB18-HQ excerpt absent (../shared/data/musdb18hq-sample)")
    description = json.loads((exported / "export" / "tflite" / "umx.json").read_text())
    mixture, stems = musdb_excerpt(8000, 2, ("vocals", "drums", "bass", "other"))
    assert mixture.shape == (54428, 2)  # 300,032 samples at 44.1 kHz
    sdr = {}
    for variant, info in description["variants"].items():
        # as `separate --model x.tflite`: every chunk from the zero LSTM state, two chunks at a time
        runner = TFLiteChunkRunner(model_path=str(exported / "export" / "tflite" / info["file"]), workers=2)
        estimates = separate_array(runner, mixture, sample_rate=8000, chunk_seconds=description["chunk_seconds"],
                                   overlap=0.0, batch_size=2)
        sdr[variant] = _mean_sdr(stems, estimates)
    quantized = next(variant for variant in sdr if variant != "float32")
    assert np.isfinite(sdr["float32"]) and sdr["float32"] > -20, sdr
    print("mean SDR on the real excerpt (dB):", sdr)
    assert sdr["float32"] - sdr[quantized] <= 0.5, sdr


def test_float16_tflite_is_finite_where_every_target_estimate_is_zero():
    # float16 stores the Wiener filter's eps = 1e-10 as 0: bins where all targets estimate 0 must stay 0, not NaN
    from components.export import convert_tflite, parity_db
    from components.inference.exported import run_tflite
    from components.training.trained import build_model
    from pipeline.experiment import resolve

    config = resolve({}, ["unittest"])
    model = build_model(config, {})
    for network in model.inference.networks.values():
        scale = np.ones(network.output_scale.shape, np.float32)
        scale[40:] = 0.0  # mask = relu(0 * x + 0) = 0 above bin 40 for every target
        network.output_scale.assign(scale)
        network.output_mean.assign(np.where(scale > 0, 1.0, 0.0).astype(np.float32))
    chunk = model.input_samples(4000)
    probe = np.random.default_rng(4).normal(0, 0.1, (1, chunk, 2)).astype(np.float32)
    reference = {k: np.asarray(v) for k, v in model.separator(probe, training=False).items()}
    outputs = run_tflite(convert_tflite(model.inference.mobile(chunk), chunk, 2, "float16"), probe)
    assert all(np.all(np.isfinite(value)) for value in outputs.values())
    assert parity_db(reference, outputs) >= 25.0


def test_tflite_chunk_runner_runs_chunks_on_parallel_interpreters_with_the_one_chunk_numbers():
    # `separate --model x.tflite` hands a batch of chunks to one interpreter per worker: the same bits as the
    # chunks run one by one, and the workers' invokes overlap in time (the interpreter releases the GIL)
    import threading
    import time

    from ai_edge_litert.interpreter import Interpreter

    from components.export import convert_tflite, parity_db
    from components.inference.exported import SIGNATURE, TFLiteChunkRunner
    from components.training.trained import build_model
    from pipeline.experiment import resolve

    model = build_model(resolve({}, ["unittest"]), {})
    chunk = model.input_samples(4000)
    blob = convert_tflite(model.inference.mobile(chunk), chunk, 2)
    batch = np.random.default_rng(5).normal(0, 0.1, (5, chunk, 2)).astype(np.float32)
    # each chunk on a fresh interpreter: a reused one would start from the previous chunk's LSTM state
    rows = [Interpreter(model_content=blob, num_threads=1).get_signature_runner(SIGNATURE)(
        waveform=batch[index:index + 1]) for index in range(len(batch))]
    expected = {name: np.concatenate([row[name] for row in rows]) for name in rows[0]}
    keras_out = model.separator(batch, training=False)
    assert parity_db({k: np.asarray(v) for k, v in keras_out.items()}, expected) >= 80.0
    # why the runner resets the state: the float16 file's fused LSTMs keep it in variable tensors from one
    # invoke to the next; the float32 file's WHILE loops start from zeros on every invoke
    for quantize, stale_db in (("", lambda db: db == 200.0), ("float16", lambda db: db < 80.0)):
        file = blob if not quantize else convert_tflite(model.inference.mobile(chunk), chunk, 2, quantize)
        fresh = Interpreter(model_content=file, num_threads=1).get_signature_runner(SIGNATURE)(waveform=batch[1:2])
        reused = Interpreter(model_content=file, num_threads=1)
        stale = [reused.get_signature_runner(SIGNATURE)(waveform=batch[index:index + 1]) for index in range(2)][1]
        assert stale_db(parity_db(fresh, stale)), quantize

    runner = TFLiteChunkRunner(blob, workers=2)
    spans = []
    for worker, signature_runner in enumerate(runner.runners):
        def timed(signature_runner=signature_runner, **inputs):
            started = time.perf_counter()
            outputs = signature_runner(**inputs)
            spans.append((started, time.perf_counter(), threading.get_ident()))
            return outputs
        runner.runners[worker] = timed
    got = runner(batch)
    assert sorted(got) == sorted(expected) == sorted(model.targets)
    for name in expected:
        assert got[name].shape == batch.shape and np.array_equal(got[name], expected[name]), name
    assert len(spans) == 5 and len({thread for _, _, thread in spans}) == 2
    first, second = ([span for span in spans if span[2] == thread] for thread in {s[2] for s in spans})
    assert any(a[0] < b[1] and b[0] < a[1] for a in first for b in second), "the interpreters never ran at once"
    one = runner(batch[2:3])  # a batch of one (the last, padded call of a song can be shorter in an app)
    assert all(np.array_equal(one[name], expected[name][2:3]) for name in expected)
    with pytest.raises(ValueError, match="workers"):
        TFLiteChunkRunner(blob, workers=0)
    runner.close()


def _numpy_lstm(inputs, kernel, recurrent_kernel, bias):
    """PyTorch's LSTM recurrence (gates i, f, g, o) in float64: `(nb_frames, nb_samples, features)` -> hidden states."""
    def sigmoid(x):
        return 1.0 / (1.0 + np.exp(-x))

    units = recurrent_kernel.shape[0]
    h = np.zeros((inputs.shape[1], units))
    c = np.zeros_like(h)
    hidden, cells = [], []
    for x in inputs.astype(np.float64):
        i, f, g, o = np.split(x @ kernel + h @ recurrent_kernel + bias, 4, axis=-1)
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        hidden.append(h)
        cells.append(c)
    return np.stack(hidden), np.stack(cells)


def test_sequence_lstm_is_one_fused_tflite_op_without_cell_clipping():
    import tensorflow as tf

    from components.export import parity_db
    from components.inference.exported import tflite_ops
    from models.layers import sequence_lstm

    nb_frames, nb_samples, features, units = 40, 2, 24, 16
    rng = np.random.default_rng(3)
    kernel = rng.normal(0, 0.3, (features, 4 * units)).astype(np.float32)
    recurrent_kernel = rng.normal(0, 0.3, (units, 4 * units)).astype(np.float32)
    # input and forget gates open, cell input saturated for half the units: their cell state grows past 10
    # (the value TFLite's own LSTM conversions clip at); nothing may clip it here
    bias = np.concatenate([np.full(units, 4.0), np.full(units, 6.0),
                           np.r_[np.full(units // 2, 3.0), np.zeros(units - units // 2)], np.zeros(units)])
    bias = bias.astype(np.float32)
    inputs = rng.normal(0, 0.5, (nb_frames, nb_samples, features)).astype(np.float32)
    expected, cells = _numpy_lstm(inputs, kernel, recurrent_kernel, bias)
    assert np.max(np.abs(cells)) > 20

    class Module(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec(inputs.shape, tf.float32)])
        def run(self, x):
            return {"hidden": sequence_lstm(x, kernel, recurrent_kernel, bias)}

    module = Module()
    eager = module.run(tf.constant(inputs))["hidden"].numpy()
    assert parity_db({"h": expected}, {"h": eager}) > 100
    converter = tf.lite.TFLiteConverter.from_concrete_functions([module.run.get_concrete_function()], module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    blob = converter.convert()
    assert tflite_ops(blob) == ["UNIDIRECTIONAL_SEQUENCE_LSTM"]
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=blob).get_signature_runner()
    got = runner(x=inputs)["hidden"]
    assert parity_db({"h": expected}, {"h": got}) > 100


def _write(path: Path, audio: np.ndarray, rate: int):
    import soundfile

    soundfile.write(str(path), audio, rate, subtype="PCM_16")


def test_separate_generated_three_minute_file_and_stems_sum_to_mixture(exported, tmp_path):
    import soundfile

    rate = 44100
    t = np.arange(3 * 60 * rate) / rate
    song = np.stack([0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * np.sin(2 * np.pi * 3000 * t),
                     0.2 * np.sin(2 * np.pi * 110 * t + 0.5)], axis=1).astype(np.float32)
    _write(tmp_path / "song.wav", song, rate)
    mono = song[: rate * 5, :1]
    _write(tmp_path / "mono.flac", mono, 22050)
    out = tmp_path / "out"
    separate(tmp_path / "song.wav", tmp_path / "mono.flac", "--artifacts-dir", exported, "-o", out, "-q", timeout=900)
    stems = {t: soundfile.read(str(out / "song" / f"{t}.wav"), dtype="float32")[0]
             for t in ("vocals", "drums", "bass", "other")}
    for stem in stems.values():
        assert stem.shape == song.shape and np.all(np.isfinite(stem))
    # Wiener filtering is a partition of the mixture; resampling back to 44.1 kHz is linear.
    reconstruction = sum(stems.values())
    inner = slice(rate, -rate)
    error = np.max(np.abs(reconstruction[inner] - soundfile.read(str(tmp_path / "song.wav"), dtype="float32")[0][inner]))
    assert error < 2e-3, error
    mono_stem, mono_rate = soundfile.read(str(out / "mono" / "vocals.wav"), dtype="float32", always_2d=True)
    assert mono_rate == 22050 and mono_stem.shape == mono.shape


@pytest.mark.skipif(not SAMPLE_MP4.is_file(), reason=f"real MUSDB18 sample absent: {SAMPLE_MP4}")
def test_separate_real_musdb_mp4_with_tflite(exported, tmp_path):
    import soundfile

    tflite = exported / "export" / "tflite" / "umx.float32.tflite"
    out = tmp_path / "out"
    separate(SAMPLE_MP4, "--model", tflite, "-o", out, "-q", timeout=900)
    folder = out / "Music Delta - 80s Rock"
    for target in ("vocals", "drums", "bass", "other"):
        stem, rate = soundfile.read(str(folder / f"{target}.wav"), dtype="float32")
        assert rate == 44100 and stem.shape[1] == 2 and abs(stem.shape[0] - 300032) < 2048, (rate, stem.shape)
        assert np.all(np.isfinite(stem))


def test_separate_bad_inputs_and_overwrite(exported, tmp_path):
    from components.inference.files import safe_name

    rate = 8000
    good = tmp_path / "good.wav"
    _write(good, np.zeros((rate, 2), np.float32) + 0.01, rate)
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "junk.mp3").write_bytes(b"this is not audio" * 100)
    out = tmp_path / "out"
    options = ["--artifacts-dir", exported, "-o", out, "-q"]
    result = separate(tmp_path / "missing.wav", tmp_path / "empty.wav", tmp_path / "junk.mp3", good, *options,
                      check=False)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3
    assert "missing.wav: no such file" in errors[0]
    assert "empty.wav: empty file" in errors[1]
    assert "junk.mp3" in errors[2]
    assert (out / "good" / "vocals.wav").is_file()
    again = separate_here(good, *options)  # main() in this process: the same exit code and message
    assert again.returncode == 1 and "use --force" in again.stderr
    forced = separate_here(good, *options, "--force")
    assert forced.returncode == 0 and forced.stderr == "", forced.stderr
    for hostile in ("../../x", "..", "a/../../b", "/etc/passwd"):
        name = safe_name(hostile)
        assert (out / name).resolve().parent == out.resolve(), hostile
