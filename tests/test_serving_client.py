"""`separate --server HOST:PORT`: songs separated by TensorFlow Serving over gRPC.

The TF Serving binary is not installable on these machines (no registry ships it), so the server here is a
STAND-IN: an in-process gRPC `PredictionService` on 127.0.0.1 that loads the exported SavedModel and answers
`Predict` as the server does (signature by name, tensors as TensorProtos, NOT_FOUND for an unknown model). The
client under test is the real one (tensorflow-serving-api's stub)."""
from __future__ import annotations

import socket
import time
from concurrent import futures

import numpy as np
import pytest

from tests.cli import separate_here

grpc = pytest.importorskip("grpc")
pytest.importorskip("tensorflow_serving.apis")


class StandInServer:
    """TF Serving's PredictionService.Predict for the SavedModels `models` {name: version folder}."""

    def __init__(self, models, delay: float = 0.0, message_limit: int = 1 << 30):
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

        loaded = {name: tf.saved_model.load(str(path)) for name, path in models.items()}
        server = self

        class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
            def Predict(self, request, context):
                name = request.model_spec.name
                if name not in loaded:
                    context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({name})")
                signature = request.model_spec.signature_name or "serving_default"
                if signature == "serving_default":
                    server.chunks += 1
                    time.sleep(server.delay)
                inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
                reply = predict_pb2.PredictResponse()
                reply.model_spec.CopyFrom(request.model_spec)
                for key, value in loaded[name].signatures[signature](**inputs).items():
                    reply.outputs[key].CopyFrom(tf.make_tensor_proto(value.numpy()))
                return reply

        self.delay, self.chunks = delay, 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                                  options=[("grpc.max_receive_message_length", message_limit),
                                           ("grpc.max_send_message_length", message_limit)])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def stop(self):
        self.server.stop(grace=None)


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    import soundfile as sf

    path = tmp_path_factory.mktemp("song") / "song.wav"
    rng = np.random.default_rng(7)
    sf.write(path, (0.1 * rng.standard_normal((8000 * 5, 2))).astype(np.float32), 8000, subtype="FLOAT")
    return path


@pytest.fixture(scope="module")
def served(umx_pipeline):
    version = umx_pipeline / "export" / "saved_model" / "umx" / "1"
    server = StandInServer({"umx": version})
    yield server, version
    server.stop()


def _stems(folder):
    import soundfile as sf

    return {p.stem: sf.read(p, dtype="float32")[0] for p in sorted(folder.glob("*.wav"))}


def test_server_separation_equals_local_separation_of_the_same_export(served, song, tmp_path):
    server, version = served
    remote = separate_here(str(song), "--server", server.address, "--server-model", "umx", "--chunk-seconds", "1.5",
                           "-o", str(tmp_path / "remote"), "-q")
    assert remote.returncode == 0, remote.stderr
    local = separate_here(str(song), "--model", str(version), "--chunk-seconds", "1.5", "-o", str(tmp_path / "local"),
                          "-q")
    assert local.returncode == 0, local.stderr
    ours, theirs = _stems(tmp_path / "remote" / "song"), _stems(tmp_path / "local" / "song")
    assert sorted(ours) == ["bass", "drums", "other", "vocals"] and server.chunks >= 4
    for target, stem in ours.items():
        assert stem.shape == (40000, 2) and np.abs(stem).max() > 1e-4
        sdr = 10 * np.log10(np.sum(theirs[target] ** 2) / max(np.sum((stem - theirs[target]) ** 2), 1e-30))
        assert sdr >= 80, (target, sdr)


def test_default_chunks_fit_the_message_limit(served, song, tmp_path):
    from components.inference.serving_client import ServingSeparator

    server, _ = served
    separator = ServingSeparator(server.address, "umx", max_message_mb=0.25)
    assert (separator.sample_rate, separator.nb_channels, separator.targets) == (8000, 2, ["vocals", "drums", "bass",
                                                                                          "other"])
    # 4 targets x 2 channels x 4 bytes per sample; 64 kB kept for the message's framing: 0.768 s at 8 kHz
    assert separator.max_chunk_seconds == (0.25 * (1 << 20) - (1 << 16)) / (4 * 2 * 4) / 8000 == 0.768
    assert separator.default_chunk_seconds <= separator.max_chunk_seconds
    before = server.chunks
    result = separate_here(str(song), "--server", server.address, "--server-model", "umx",
                           "--server-max-message-mb", "0.25", "-o", str(tmp_path / "small"), "-q")
    assert result.returncode == 0, result.stderr
    assert server.chunks - before >= 5 and len(_stems(tmp_path / "small" / "song")) == 4
    too_big = separate_here(str(song), "--server", server.address, "--server-model", "umx", "--chunk-seconds", "4",
                            "--server-max-message-mb", "0.25", "-o", str(tmp_path / "big"), "-q")
    assert too_big.returncode == 1 and "passes the 0.3 MB message limit; use --chunk-seconds 0.8 or less" in \
        too_big.stderr.strip().splitlines()[-1]
    assert not list((tmp_path / "big").rglob("*.wav"))


def _closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_server_faults_are_one_line_and_write_nothing(served, song, umx_pipeline, tmp_path):
    server, version = served
    down = separate_here(str(song), "--server", f"127.0.0.1:{_closed_port()}", "--server-model", "umx",
                         "--server-timeout", "5", "-o", str(tmp_path / "a"))
    assert down.returncode == 2 and down.stderr.strip().splitlines()[-1].startswith(
        "error: cannot reach TF Serving at 127.0.0.1:")
    wrong = separate_here(str(song), "--server", server.address, "--server-model", "nope", "-o", str(tmp_path / "b"))
    assert wrong.returncode == 2 and f"error: TF Serving at {server.address} has no model 'nope'" in wrong.stderr
    bad = separate_here(str(song), "--server", "localhost", "-o", str(tmp_path / "c"))
    assert bad.returncode == 2 and "error: --server localhost: give HOST:PORT" in bad.stderr
    slow = StandInServer({"umx": version}, delay=2.0)
    try:
        late = separate_here(str(song), "--server", slow.address, "--server-model", "umx", "--server-timeout", "0.5",
                             "-o", str(tmp_path / "d"), "-q")
    finally:
        slow.stop()
    assert late.returncode == 1 and f"did not answer within 0.5 s (separating a chunk)" in late.stderr
    for folder in "abcd":
        assert not list((tmp_path / folder).rglob("*.wav")), folder
    # without --server-model: the name of the export in --artifacts-dir
    named = separate_here(str(song), "--server", server.address, "--artifacts-dir", str(umx_pipeline),
                          "-o", str(tmp_path / "e"), "-q")
    assert named.returncode == 0, named.stderr


def test_a_server_with_a_smaller_message_limit_is_one_line(served, song, tmp_path):
    """The server's own limit below the client's: it refuses the request (RESOURCE_EXHAUSTED), told in one line."""
    _, version = served
    strict = StandInServer({"umx": version}, message_limit=64 * 1024)
    try:  # a 2 s chunk at 8 kHz stereo float32: a 128 kB request
        refused = separate_here(str(song), "--server", strict.address, "--server-model", "umx", "--chunk-seconds", "2",
                                "-o", str(tmp_path / "strict"), "-q")
    finally:
        strict.stop()
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 1 and lines[-1].startswith(f"error: TF Serving at {strict.address}: a message "
                                                            "passed the size limit (separating a chunk)"), lines
    assert "--chunk-seconds" in lines[-1]
    assert not list((tmp_path / "strict").rglob("*.wav"))


def test_server_and_stream_together_are_refused(served, song, tmp_path):
    server, _ = served
    both = separate_here(str(song), "--server", server.address, "--stream", "-o", str(tmp_path / "both"))
    assert both.returncode == 2 and both.stderr.strip() == (
        f"error: --server {server.address} and --stream both given; the server separates whole files, drop one")
    assert not (tmp_path / "both").exists()
