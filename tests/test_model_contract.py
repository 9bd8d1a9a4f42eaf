"""The contract every registered model family meets (tests/model_harness.py), on its `unittest`-preset model.

Two targets, vocals and bass: the per-target families (Open-Unmix, U-Net) then build, trace and convert two networks
instead of four (DTTNet, the slowest to convert, one: its bass network).

One parametrized test over `models.registry.names()`: a new family is checked as soon as it is registered.
Family files (tests/test_<family>.py) keep what only their family has (published counts, reference parity).
"""
from __future__ import annotations

import numpy as np
import pytest

from configs.config import deep_merge
from models import registry
from tests import model_harness as harness

# What a family adds to the contract: preset overrides, the lengths the SavedModel is probed at, the TFLite chunk
# (default `input_samples(2001)`), ops its .tflite must (not) contain. Tolerances are the same for every family.
TARGETS = ("vocals", "bass")
CASES = {
    # chunks of 100 output samples: the reference's chunked prediction, unrolled into slices for TFLite (no WHILE);
    # 50 samples is shorter than one chunk, 1001 several chunks with the last one moved to the end
    "wave_u_net": dict(overrides={"model": {"wave_u_net": {"predict_frames": 100}}}, saved_lengths=(50, 1001),
                       chunk=300, forbidden_ops=("WHILE",)),
    # the whole separator inside; float32: one WHILE loop per LSTM layer over all targets and directions (nothing
    # unrolled: no LOGISTIC in the main graph; the quantized file's fused LSTMs: tests/test_export.py)
    "umx": dict(forbidden_ops=("LOGISTIC", "UNIDIRECTIONAL_SEQUENCE_LSTM"),
                required_ops=("RFFT2D", "FULLY_CONNECTED", "TANH", "WHILE")),
    "unet": dict(required_ops=("RFFT2D", "CONV_2D", "TRANSPOSE_CONV")),
    # an n_fft that is not a power of two, as M-U-Net's paper and `default` 1022 (its hop does not divide it either):
    # TFLite's RFFT2D refuses such a file when it is loaded, so the transforms are DFT-table products
    # (the unittest pipeline's export covers the power-of-two form)
    "m_unet": dict(overrides={"model": {"m_unet": {"n_fft": 254}}}, forbidden_ops=("RFFT2D",),
                   required_ops=("FULLY_CONNECTED", "CONV_2D", "TRANSPOSE_CONV")),
    "c_unet": dict(required_ops=("RFFT2D", "CONV_2D", "TRANSPOSE_CONV")),
    "tfc_tdf_v3": dict(required_ops=("RFFT2D", "CONV_2D", "TRANSPOSE_CONV", "FULLY_CONNECTED", "GELU")),
    # BLSTMs unrolled over frames and bins; one network per target, identical but for the bins: one target (the
    # narrower bass network) halves the slowest case (tests/test_dttnet.py checks the four side by side)
    "dttnet": dict(overrides={"data": {"targets": ["bass"]}}, targets=("bass",), forbidden_ops=("WHILE",),
                   required_ops=("RFFT2D", "CONV_2D", "TRANSPOSE_CONV", "LOGISTIC", "TANH")),
}
SAVED_MODEL_MAX_ABS_DIFF = 1e-5  # SavedModel vs Keras, same float32 graph (measured <= 1.2e-7: umx)
# TFLite float32 (waveform in, stems out) vs Keras separator: the project's "faithful". Measured: dttnet 118 dB (vocals+bass),
# tfc_tdf_v3 126, m_unet 121, umx 136, c_unet 140, wave_u_net 141, unet 200 (bit-identical, the cap)
TFLITE_MIN_PARITY_DB = 80.0


@pytest.mark.parametrize("name", registry.names())
def test_every_family_meets_the_contract(name, tmp_path):
    case = CASES.get(name, {})
    overrides = deep_merge({"data": {"targets": list(TARGETS)}}, case.get("overrides", {}))
    model = harness.build_tiny(name, overrides=overrides)
    family = harness.family_module(name)
    harness.check_config_round_trip(family, model.config)
    assert model.targets == case.get("targets", TARGETS)
    assert (model.sample_rate, model.nb_channels) == (8000, 2)

    train_shapes = harness.check_train_shapes(model, nb_timesteps=2001)
    assert len(set(train_shapes.values())) == 1, train_shapes  # every target in the same training domain
    outputs = harness.check_separator_shapes(model, nb_timesteps=2001)
    assert set(model.targets) <= set(outputs)
    assert harness.check_shared_weights(model) > 0

    loss, moved = harness.check_train_step_moves_weights(model, nb_timesteps=2001)
    assert loss > 0 and moved >= 0.95

    worst = harness.check_saved_model_parity(model, tmp_path / "saved_model", lengths=case.get("saved_lengths", (1001,)),
                                             max_abs_diff=SAVED_MODEL_MAX_ABS_DIFF)
    assert worst <= SAVED_MODEL_MAX_ABS_DIFF

    if model.inference.mobile is None:
        return
    chunk = case.get("chunk", model.input_samples(2001))
    tflite = harness.check_tflite_parity(model, chunk, min_parity_db=TFLITE_MIN_PARITY_DB,
                                         forbidden_ops=case.get("forbidden_ops", ()),
                                         required_ops=case.get("required_ops", ()))
    assert tflite["parity_db"] >= TFLITE_MIN_PARITY_DB and tflite["megabytes"] > 0


def test_parity_db_is_exact_for_quiet_outputs_and_finite_for_identical_ones():
    from components.export import PARITY_CAP_DB, parity_db

    quiet = np.full((1, 1000, 2), 1e-3)  # sum r^2 = 2e-3: the metric's 1e-8 epsilon would cap at 53 dB
    off = quiet * (1 + 1e-5)  # error 1e-5 of the signal: exactly 100 dB
    assert parity_db({"a": quiet}, {"a": off}) == pytest.approx(100.0, abs=0.01)
    assert parity_db({"a": quiet, "b": quiet}, {"a": quiet, "b": quiet * 1.01}) == pytest.approx(40.0, abs=0.01)
    assert parity_db({"a": quiet}, {"a": quiet}) == PARITY_CAP_DB
    with pytest.raises(ValueError, match="differ in shape"):
        parity_db({"a": quiet}, {"a": quiet[:, :10]})
