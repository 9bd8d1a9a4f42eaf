"""Separating through TensorFlow Serving: a separator object for `separate_file` whose chunks go to a server.

    separator = ServingSeparator("localhost:8500", "umx")     # asks the export's `metadata` signature
    separate_file(separator, Path("song.mp3"), Path("stems"), ...)

Each chunk is one gRPC `Predict` on `serving_default` (float32 in and out); `batch_size` chunks are in flight at
once (one future each), and `separate_file` does the rest exactly as for a local model: reading and resampling,
overlap-add of the chunks, the progress bar and the stems written beside and renamed. The chunk is the longest
whose reply (targets x samples x channels x 4 bytes) fits the message limit (`max_message_mb`, gRPC's 4 MB by
default, which proxies and clients enforce even when the server does not).
"""
from __future__ import annotations

import numpy as np

from configs.errors import SeparateError

DEFAULT_CHUNK_SECONDS = 10.0
IN_FLIGHT = 3  # chunks sent before the first reply is awaited


class ServingSeparator:
    """A model served by TF Serving at `address` (host:port, gRPC) under `model_name`."""

    def __init__(self, address: str, model_name: str, *, timeout: float = 60.0, max_message_mb: float = 4.0,
                 in_flight: int = IN_FLIGHT):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        self.address, self.model_name, self.timeout = address, model_name, timeout
        self.max_message_bytes = int(max_message_mb * (1 << 20))
        options = [("grpc.max_receive_message_length", self.max_message_bytes + (1 << 20)),
                   ("grpc.max_send_message_length", self.max_message_bytes + (1 << 20))]
        self.channel = grpc.insecure_channel(address, options=options)
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        metadata = self._metadata()
        self.sample_rate = int(metadata["sample_rate"])
        self.nb_channels = int(metadata["nb_channels"])
        self.targets = [t.decode() if isinstance(t, bytes) else str(t) for t in metadata["targets"]]
        self.batch_size = max(1, in_flight)
        # the reply must fit the message limit: targets x samples x channels float32, plus the proto's framing
        fitting = (self.max_message_bytes - (1 << 16)) // (4 * self.nb_channels * max(1, len(self.targets)))
        declared = int(metadata["chunk_samples"]) or int(DEFAULT_CHUNK_SECONDS * self.sample_rate)
        self.chunk_seconds = None
        self.default_chunk_seconds = min(declared, fitting) / self.sample_rate
        self.max_chunk_seconds = fitting / self.sample_rate

    def _request(self, signature: str, inputs: dict):
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = signature
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        return request

    def _metadata(self) -> dict:
        import tensorflow as tf

        from components.inference.exported import METADATA_INPUT, METADATA_SIGNATURE

        try:
            reply = self.stub.Predict(self._request(METADATA_SIGNATURE, {METADATA_INPUT: np.float32(0)}),
                                      timeout=self.timeout)
        except Exception as error:  # grpc.RpcError
            raise self._problem(error, "asking for its metadata") from None
        return {key: tf.make_ndarray(value) for key, value in reply.outputs.items()}

    def _problem(self, error, doing: str) -> SeparateError:
        """A one-line SeparateError for a failed call: server down, unknown model, timeout, message too large."""
        import grpc

        code = error.code() if isinstance(error, grpc.RpcError) else None
        where = f"TF Serving at {self.address}"
        if code == grpc.StatusCode.UNAVAILABLE:
            return SeparateError(f"cannot reach {where} ({doing}); start the server (deploy/docker-compose.yml) or "
                                 "check --server HOST:PORT")
        if code == grpc.StatusCode.NOT_FOUND:
            return SeparateError(f"{where} has no model '{self.model_name}' (or it has no metadata signature: "
                                 "re-export it with this version); check --server-model")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return SeparateError(f"{where} did not answer within {self.timeout:g} s ({doing}); raise "
                                 "--server-timeout or lower --chunk-seconds")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return SeparateError(f"{where}: a message passed the size limit ({doing}); lower --chunk-seconds "
                                 f"(at most {getattr(self, 'max_chunk_seconds', 0):.1f} s fit "
                                 "--server-max-message-mb)")
        details = error.details() if isinstance(error, grpc.RpcError) else str(error)
        return SeparateError(f"{where} failed ({doing}): {' '.join(str(details).split())}")

    def __call__(self, batch) -> dict:
        """`(n, chunk, channels)` chunks -> {target: `(n, chunk, channels)`}: n Predict calls in flight."""
        import tensorflow as tf

        from components.inference.exported import INPUT_NAME, SIGNATURE

        batch = np.asarray(batch, np.float32)
        reply_bytes = 4 * batch.shape[1] * batch.shape[2] * len(self.targets)
        if reply_bytes > self.max_message_bytes:
            raise SeparateError(f"a {batch.shape[1] / self.sample_rate:.1f} s chunk's reply ({reply_bytes / 1e6:.1f} "
                                f"MB) passes the {self.max_message_bytes / 1e6:.1f} MB message limit; use "
                                f"--chunk-seconds {self.max_chunk_seconds:.1f} or less")
        futures = [self.stub.Predict.future(self._request(SIGNATURE, {INPUT_NAME: chunk[None]}), timeout=self.timeout)
                   for chunk in batch]
        outputs = {target: np.empty(batch.shape, np.float32) for target in self.targets}
        for index, future in enumerate(futures):
            try:
                reply = future.result()
            except Exception as error:  # grpc.RpcError
                for pending in futures[index + 1:]:
                    pending.cancel()
                raise self._problem(error, "separating a chunk") from None
            for target in self.targets:
                outputs[target][index] = tf.make_ndarray(reply.outputs[target])[0]
        return outputs

    def close(self) -> None:
        self.channel.close()


def check_address(address: str) -> None:
    """A one-line SeparateError for an address that is not HOST:PORT."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SeparateError(f"--server {address}: give HOST:PORT, e.g. --server localhost:8500")


def connect(address: str, model_name: str, timeout: float, max_message_mb: float) -> ServingSeparator:
    """`ServingSeparator`, with `address` checked first."""
    check_address(address)
    return ServingSeparator(address, model_name, timeout=timeout, max_message_mb=max_message_mb)
