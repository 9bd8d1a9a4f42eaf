"""deploy/: the docker-compose file and the TF Serving configuration it mounts, parsed as the server would."""
from __future__ import annotations

import re

import pytest

from tests.cli import ROOT

DEPLOY = ROOT / "deploy"


def _batching_parameters_class():
    """TF Serving's BatchingParameters (tensorflow_serving/servables/tensorflow/session_bundle_config.proto) as a
    dynamic message: tensorflow-serving-api ships the client protos only, not this server-side one."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

    proto = descriptor_pb2.FileDescriptorProto(name="batching_parameters_test.proto", package="tensorflow.serving",
                                               dependency=["google/protobuf/wrappers.proto"], syntax="proto3")
    message = proto.message_type.add(name="BatchingParameters")
    fields = [("max_batch_size", 1, ".google.protobuf.Int64Value"), ("batch_timeout_micros", 2,
              ".google.protobuf.Int64Value"), ("max_enqueued_batches", 3, ".google.protobuf.Int64Value"),
              ("num_batch_threads", 4, ".google.protobuf.Int64Value"), ("thread_pool_name", 5,
              ".google.protobuf.StringValue")]
    for name, number, type_name in fields:
        message.field.add(name=name, number=number, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                          type_name=type_name, label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    message.field.add(name="allowed_batch_sizes", number=6, type=descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
                      label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED)
    message.field.add(name="pad_variable_length_inputs", number=7, type=descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
                      label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))


def test_compose_file_serves_the_published_models_with_the_documented_flags():
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    (service,) = compose["services"].values()
    assert service["image"].startswith("tensorflow/serving:")
    assert sorted(service["ports"]) == ["8500:8500", "8501:8501"]
    mounts = dict(volume.rsplit(":", 2)[:2] for volume in service["volumes"])
    assert mounts["../artifacts/serving"] == "/models"  # what the export publishes (export.serving_dir)
    assert (DEPLOY / "batching.config").is_file() and mounts["./batching.config"] == "/config/batching.config"
    flags = dict(flag.lstrip("-").split("=", 1) for flag in service["command"])
    assert flags["model_config_file"] == "/models/models.config" and flags["port"] == "8500"
    assert flags["batching_parameters_file"] == mounts["./batching.config"]
    # the serving graph needs no XLA: the server's default (off) runs it; batching is opt-in
    assert flags["xla_cpu_compilation_enabled"] == "${TF_SERVING_XLA:-false}"
    assert flags["enable_batching"] == "${TF_SERVING_BATCHING:-false}"
    assert int(flags["model_config_file_poll_wait_seconds"]) > 0


def test_batching_parameters_parse_as_tf_serving_reads_them():
    from google.protobuf import text_format

    parameters = text_format.Parse((DEPLOY / "batching.config").read_text(), _batching_parameters_class()())
    assert parameters.max_batch_size.value == 4 and parameters.batch_timeout_micros.value == 5000
    assert parameters.num_batch_threads.value == 2 and parameters.max_enqueued_batches.value == 16
    assert parameters.pad_variable_length_inputs is False
    with pytest.raises(text_format.ParseError):  # the parser is strict: a misspelt field fails
        text_format.Parse("max_batch_sizes { value: 4 }", _batching_parameters_class()())


def test_published_models_config_parses_as_a_model_server_config(umx_pipeline):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = text_format.Parse((umx_pipeline / "serving" / "models.config").read_text(),
                               model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == ("umx", "/models/umx", "tensorflow")
    assert re.fullmatch(r"\d+", next(p.name for p in (umx_pipeline / "serving" / "umx").iterdir()))
