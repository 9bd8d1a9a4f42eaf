"""The import stage: released checkpoints -> the train artifact, parity with the authors' code.

Fixtures in tests/fixtures/ were written once by the committed `make_*.py` scripts (each says how)
from the reference implementations with small random weights; these tests need neither torch nor
the reference code.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from components import importer
from configs.errors import CheckpointError, StageError
from models.checkpoints import Placeholder, load_torch, plain
from pipeline.experiment import resolve
from tests.cli import cli, cli_here, separate
from tests.model_harness import fixture_script

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def sdr(reference, estimate) -> float:
    reference, estimate = np.asarray(reference, np.float64), np.asarray(estimate, np.float64)
    return float(10 * np.log10(np.sum(reference ** 2) / np.sum((reference - estimate) ** 2)))


def imported(path, family: str, preset: str = "unittest", **updates):
    """(config, model) of a release imported through the stage's own functions, as `--stage import` does."""
    from components.training.trained import build_model
    from models import registry

    base = {"import": {"path": str(path)}, "model": {"name": family}}
    for key, value in updates.items():
        node = base
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    overrides = importer.release_overrides(resolve(base, [preset]))
    config = resolve(importer.merge_overrides(base, overrides, "test"), [preset])
    model = build_model(config, stats={})
    mapping = registry.module(family).assign_released(model, importer.read(config))
    return config, model, mapping


# ------------------------------------------------------------------------------------ torch-free reader
@pytest.mark.parametrize("name", ["zip.pth", "legacy.pth"])
def test_reader_rebuilds_every_tensor_exactly(name):
    expected = np.load(FIXTURES / "torch_reader" / "expected.npz")
    loaded = load_torch(FIXTURES / "torch_reader" / name)
    assert loaded["epoch"] == 7 and loaded["names"] == ["a", "b"] and loaded["pair"] == (1, 2.5)
    tensors = loaded["state_dict"]
    assert sorted(tensors) == sorted(k for k in expected.files if k != "lightning_weight")
    for key in tensors:
        assert tensors[key].dtype == expected[key].dtype, key
        assert tensors[key].shape == expected[key].shape, key
        np.testing.assert_array_equal(tensors[key], expected[key], err_msg=key)


def test_reader_turns_unknown_classes_into_inert_placeholders(tmp_path):
    loaded = load_torch(FIXTURES / "torch_reader" / "lightning.ckpt")
    np.testing.assert_array_equal(loaded["state_dict"]["weight"],
                                  np.load(FIXTURES / "torch_reader" / "expected.npz")["lightning_weight"])
    config = loaded["hyper_parameters"]["config"]
    assert isinstance(config, Placeholder) and config.qualified_name == "__main__.HyperParameters"
    assert plain(config) == {"n_fft": 6144, "targets": ["vocals"]}
    # a pickle that would run a shell command builds a placeholder instead and runs nothing
    import pickle

    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError, match="evil.pth: neither a zip nor a legacy torch.save file"):
        load_torch(evil)
    with open(evil, "wb") as handle:  # the legacy layout around the same payload
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, handle)
        handle.write(pickle.dumps(Exploit()))
        pickle.dump([], handle)
    result = load_torch(evil)
    assert isinstance(result, Placeholder) and result.qualified_name in ("posix.system", "os.system")
    assert not marker.exists()


# ------------------------------------------------------------------------------------ Open-Unmix
UMX = FIXTURES / "umx"


@pytest.mark.parametrize("folder, window", [("bidirectional", 50), ("bidirectional", 0), ("unidirectional", 25)])
def test_open_unmix_network_and_separator_match_openunmix(folder, window):
    reference = np.load(UMX / "reference.npz")
    config, model, mapping = imported(UMX / folder, "umx", **{"model.umx.wiener_win_len": window})
    nb_targets = len(reference[f"{folder}/targets"])
    per_target = 43 if folder == "bidirectional" else 31  # 4 fixed + 3 fc + 12 BN + 4 or 2 per LSTM layer x 3
    assert mapping["tensors_mapped"] == mapping["weights_assigned"] == nb_targets * per_target
    assert config.data.sample_rate == 8000
    assert config.model.params("umx")["hidden_size"] == (16 if folder == "bidirectional" else 12)
    magnitude = np.transpose(reference[f"{folder}/magnitude"], (0, 3, 2, 1))  # -> (samples, frames, bins, channels)
    for target, network in model.inference.networks.items():
        ours = np.asarray(network(magnitude, training=False))
        theirs = np.transpose(reference[f"{folder}/network/{target}"], (0, 3, 2, 1))
        assert np.max(np.abs(ours - theirs)) <= 1e-4 * np.max(np.abs(theirs)), target
    estimates = model.separator(np.transpose(reference["mixture"], (0, 2, 1)), training=False)
    theirs = reference[f"{folder}/separator/{window}"][0]  # (targets, channels, samples)
    order = list(reference[f"{folder}/targets"])
    for target in model.targets:
        assert sdr(theirs[order.index(target)], np.asarray(estimates[target])[0].T) >= 80, target
    if window:  # the block length matters: whole-chunk filtering is measurably different
        other = reference["bidirectional/separator/0" if folder == "bidirectional" else "bidirectional/separator/50"]
        if folder == "bidirectional":
            assert sdr(other[0, 0], theirs[0]) < 40


def test_blockwise_wiener_filters_every_block_on_its_own():
    """`wiener_win_len`: each block of frames is filtered alone (the zero-padded last block too), exactly."""
    from models.filtering import blockwise_wiener, wiener

    rng = np.random.default_rng(0)
    magnitudes = rng.uniform(0, 1, (2, 23, 5, 2, 3)).astype(np.float32)  # (B, F, K, C, J)
    mix = rng.normal(0, 1, (2, 23, 5, 2, 2)).astype(np.float32)
    ours = np.asarray(blockwise_wiener(magnitudes, mix, 10, niter=2, residual=True))
    for start in (0, 10, 20):
        block = np.asarray(wiener(magnitudes[:, start:start + 10], mix[:, start:start + 10], niter=2, residual=True))
        np.testing.assert_allclose(ours[:, start:start + 10], block, rtol=1e-5, atol=1e-6)
    whole = np.asarray(blockwise_wiener(magnitudes, mix, 0, niter=2, residual=True))
    np.testing.assert_allclose(whole, np.asarray(wiener(magnitudes, mix, niter=2, residual=True)), rtol=1e-6)
    assert np.max(np.abs(whole - ours)) > 1e-3  # blocks are not the whole


def test_open_unmix_mapping_covers_the_published_umxhq_and_umxl_layouts():
    """Every tensor of open-unmix's published networks (shapes from the reference, random values)."""
    from components.training.trained import build_model
    from models.base import count_parameters
    from models.checkpoints import ReleasedCheckpoint
    from models.open_unmix import assign_released

    shapes = json.loads((UMX / "published_shapes.json").read_text())
    rng = np.random.default_rng(0)
    for name, hidden in (("umxhq", 512), ("umxl", 1024)):
        config = resolve({"data": {"sample_rate": 44100, "targets": ["vocals"]},
                          "model": {"name": "umx", "umx": {"hidden_size": hidden, "residual": True}}}, ["paper"])
        model = build_model(config, stats={})
        tensors = {f"vocals/{k}": rng.standard_normal(v).astype(np.float32) for k, v in shapes[name].items()}
        released = ReleasedCheckpoint("umx", {}, tensors, [], ignorable={
            f"vocals/bn{i}.num_batches_tracked": "counter" for i in (1, 2, 3)})
        mapping = assign_released(model, released)
        assert mapping["tensors_mapped"] == 43 and len(mapping["tensors_ignored"]) == 3
        # the reference's parameter count (running statistics and counters are buffers, not parameters)
        reference_count = sum(int(np.prod(v)) for k, v in shapes[name].items() if "running" not in k and "num_batches" not in k)
        assert count_parameters(model.train_model) == reference_count == {"umxhq": 8_893_348, "umxl": 28_257_188}[name]
        np.testing.assert_array_equal(model.inference.networks["vocals"].lstms[2].directions[1]["kernel"].numpy(),
                                      tensors["vocals/lstm.weight_ih_l2_reverse"].T)


def test_open_unmix_published_file_name_selects_its_configuration(tmp_path):
    """A bare `<target>-<hash>.pth` is read with the published model's settings (here UMX-HQ's, which
    the tiny fixture does not fit: a one-line error naming both tensors, and nothing is built)."""
    bare = tmp_path / "vocals-b62c91ce.pth"
    shutil.copy(UMX / "bidirectional" / "vocals.pth", bare)
    overrides = importer.release_overrides(resolve({"import": {"path": str(bare)}, "model": {"name": "umx"}},
                                                   ["unittest"]))
    assert overrides["data.sample_rate"] == 44100 and overrides["model.umx.hidden_size"] == 512
    assert overrides["data.targets"] == ["vocals"]
    with pytest.raises(CheckpointError, match=r"tensor 'vocals/input_mean' \(97,\) does not fit Keras weight "
                                              r".*input_mean \(1487,\)"):
        imported(bare, "umx", **{"model.umx.residual": True})
    with pytest.raises(StageError, match="name the published model with import.model"):
        shutil.move(bare, tmp_path / "vocals.pth")
        importer.release_overrides(resolve({"import": {"path": str(tmp_path / "vocals.pth")},
                                            "model": {"name": "umx"}}, ["unittest"]))


def test_import_cli_writes_the_train_artifact_and_refuses_conflicts(tmp_path):
    root = tmp_path / "artifacts"
    runs = tmp_path / "runs"
    folder = UMX / "unidirectional"
    # the refusal through the driver's main in this process (the same exit code and line); the import itself below
    # runs the CLI
    bad = cli_here("--stage", "import", "--no-file-observer", "-q", "with", "unittest", "model.name=umx",
                   f"import.path={folder}", "data.sample_rate=44100", f"artifacts_dir={root}")
    assert bad.returncode == 2 and not (root / "train").exists()
    assert bad.stderr.strip().splitlines()[-1] == ("error: import: data.sample_rate=44100 on the command line but the "
                                                   "released checkpoint has 8000; drop data.sample_rate from the "
                                                   "command line")
    cli("--stage", "import", "--runs-dir", str(runs), "-q", "with", "unittest", "model.name=umx",
        f"import.path={folder}", f"artifacts_dir={root}")
    meta = json.loads((root / "train" / "artifact.json").read_text())
    assert sorted(p.name for p in (root / "train").iterdir()) == ["artifact.json", "best.weights.h5",
                                                                 "model.weights.h5"]
    assert meta["stage"] == "train" and meta["complete"] and meta["model"]["name"] == "umx"
    assert meta["model"]["family_config"]["unidirectional"] is True and meta["model"]["family_config"]["hidden_size"] == 12
    assert meta["figures"]["tensors_mapped"] == 62 and meta["figures"]["tensors_ignored"] == 12
    import hashlib

    files = {Path(f["path"]).name: f["sha256"] for f in meta["imported"]["files"]}
    assert set(files) == {"vocals.pth", "accompaniment.pth", "vocals.json", "accompaniment.json", "separator.json"}
    assert files["vocals.pth"] == hashlib.sha256((folder / "vocals.pth").read_bytes()).hexdigest()
    assert meta["imported"]["config_overrides"]["data.targets"] == ["vocals", "accompaniment"]
    run = json.loads((runs / "1" / "run.json").read_text())
    assert run["command"] == "import" and run["status"] == "COMPLETED"
    assert json.loads((runs / "1" / "config.json").read_text())["import"]["path"] == str(folder)


# ------------------------------------------------------------------------------------ TFC-TDF-UNet v3
@pytest.mark.parametrize("release, tensors", [("multi", 80), ("single", 203)])
def test_tfc_tdf_v3_network_and_forward_match_kuielab(release, tensors):
    reference = np.load(FIXTURES / "tfc_tdf_v3" / "reference.npz")
    config, model, mapping = imported(FIXTURES / "tfc_tdf_v3" / release, "tfc_tdf_v3")
    assert mapping["tensors_mapped"] == mapping["weights_assigned"] == tensors and not mapping["tensors_ignored"]
    assert config.model.params("tfc_tdf_v3")["num_scales"] == (2 if release == "multi" else 3)
    assert config.data.targets == (("vocals", "drums", "bass", "other") if release == "multi" else ("vocals",))
    folded = np.transpose(reference[f"{release}/net_input"], (0, 3, 2, 1))  # (1, dim_c, f, t) -> (1, t, f, dim_c)
    ours = np.asarray(model.inference.network(folded, training=False))
    theirs = np.transpose(reference[f"{release}/net_output"], (0, 3, 2, 1))
    assert np.max(np.abs(ours - theirs)) <= 1e-4 * np.max(np.abs(theirs))
    estimates = model.separator(np.transpose(reference[f"{release}/mixture"], (0, 2, 1)), training=False)
    separated = reference[f"{release}/separated"][0]  # (targets, channels, samples), or (channels, samples)
    separated = separated if separated.ndim == 3 else separated[None]
    for index, target in enumerate(model.targets):
        assert sdr(separated[index], np.asarray(estimates[target])[0].T) >= 80, target


def test_tfc_tdf_v3_wrong_family_and_missing_config_are_one_line_errors(tmp_path):
    shutil.copy(FIXTURES / "tfc_tdf_v3" / "multi" / "model.ckpt", tmp_path / "model.ckpt")
    with pytest.raises(StageError, match=r"no yaml config beside the checkpoint; pass the release's config with "
                                         r"import.config=<file.yaml>"):
        imported(tmp_path / "model.ckpt", "tfc_tdf_v3")
    with pytest.raises(StageError, match=r"umx/unidirectional/vocals.pth: vocals.pth has no 'first_conv.weight'; it is not a "
                                         r"TFC-TDF-UNet v3 checkpoint"):
        imported(UMX / "unidirectional" / "vocals.pth", "tfc_tdf_v3",
                 **{"import.config": str(FIXTURES / "tfc_tdf_v3" / "multi" / "config.yaml")})


LAYOUTS = FIXTURES / "checkpoint_layouts"


@pytest.mark.parametrize("name, layout", [
    ("zfturbo_full.ckpt", "weights under 'model_state_dict'"),
    ("htdemucs_state.th", "weights under 'state'"),
    ("dataparallel.pth", "'module.' prefix removed"),
    ("sdx23_ema.ckpt", "EMA weights (a plain parameter dict: sdx23's EMAHelper shadow)"),
    ("ddim_list.pth", "EMA weights preferred over the training weights (the last entry of a [model, optimizer"),
    ("averaged.ckpt", "EMA weights preferred over the training weights ('ema_state_dict')"),
])
def test_released_checkpoint_layouts_import_with_parity(name, layout):
    """ZFTurbo's full checkpoints, HTDemucs' `state`, DataParallel prefixes and the EMA layouts (sdx23's EMAHelper
    shadow, ddim's list, AveragedModel beside the training weights): the same network, the EMA copy where the
    training weights differ (they are noisy in ddim_list / averaged: only the EMA reproduces the reference)."""
    reference = np.load(FIXTURES / "tfc_tdf_v3" / "reference.npz")
    options = {"import.config": str(FIXTURES / "tfc_tdf_v3" / "multi" / "config.yaml")}
    config, model, mapping = imported(LAYOUTS / name, "tfc_tdf_v3", **options)
    assert mapping["tensors_mapped"] == 80 and not mapping["tensors_ignored"]
    assert layout in importer.read(config).description
    folded = np.transpose(reference["multi/net_input"], (0, 3, 2, 1))
    ours = np.asarray(model.inference.network(folded, training=False))
    theirs = np.transpose(reference["multi/net_output"], (0, 3, 2, 1))
    assert sdr(theirs, ours) >= 80


def test_training_weights_of_an_ema_checkpoint_differ_and_unknown_layouts_are_one_line_errors():
    from models.checkpoints import state_dict_of

    loaded = load_torch(LAYOUTS / "averaged.ckpt")
    training, ema = state_dict_of(loaded["model_state_dict"], "x"), state_dict_of(loaded, "x")
    assert sdr(ema["first_conv.weight"], training["first_conv.weight"]) < 40  # the preference matters
    with pytest.raises(CheckpointError, match=r"^\S*unrecognised.pth: holds no state dict \(name -> tensor\) but a dict "
                                              r"with the top-level keys 'weights', 'epoch'; pass the released weights "
                                              r"file \(a state dict, or a checkpoint with model_state_dict, state or "
                                              r"state_dict\)$"):
        state_dict_of(load_torch(LAYOUTS / "unrecognised.pth"), LAYOUTS / "unrecognised.pth")
    with pytest.raises(CheckpointError, match=r"holds no state dict \(name -> tensor\) but a list of 2 items "
                                              r"\(int, str\);"):
        state_dict_of([1, "a"], "list.pth")
    with pytest.raises(StageError, match=r"unrecognised.pth: holds no state dict .* top-level keys 'weights', 'epoch'"):
        imported(LAYOUTS / "unrecognised.pth", "tfc_tdf_v3",
                 **{"import.config": str(FIXTURES / "tfc_tdf_v3" / "multi" / "config.yaml")})


# ------------------------------------------------------------------------------------ DTTNet
DTTNET = FIXTURES / "dttnet"


def test_dttnet_networks_and_chunk_separator_match_the_reference():
    reference = np.load(DTTNET / "reference.npz")
    config, model, mapping = imported(DTTNET, "dttnet", **{"import.config": str(DTTNET / "vocals.yaml")})
    # per target: 6 (first conv + BN) + 3 blocks x 28 + 6 + 6 (down / up + BN) + 2 x 12 (dual path) + 2 (final)
    assert mapping["tensors_mapped"] == mapping["weights_assigned"] == 2 * 128
    assert len(mapping["tensors_ignored"]) == 2 * (2 + 18)  # window, freq_pad and 18 BN step counters
    assert config.data.targets == ("vocals", "bass") and config.data.sample_rate == 8000
    settings = config.model.params("dttnet")
    assert (settings["dim_f"], settings["bass_dim_f"], settings["num_heads"], settings["growth"]) == (32, 16, 2, 16)
    for target in model.targets:
        network = model.inference.networks[target]
        ours = np.asarray(network(np.transpose(reference[f"{target}/net_input"], (0, 3, 2, 1)), training=False))
        theirs = np.transpose(reference[f"{target}/net_output"], (0, 3, 2, 1))
        assert np.max(np.abs(ours - theirs)) <= 1e-4 * np.max(np.abs(theirs)), target
        estimates = model.separator(np.transpose(reference[f"{target}/mixture"], (0, 2, 1)), training=False)
        assert sdr(reference[f"{target}/separated"][0], np.asarray(estimates[target])[0].T) >= 80, target


def test_dttnet_at_the_papers_block_structure_matches_the_reference(tmp_path):
    """tests/fixtures/make_dttnet_paper.py: 2 scales, l = 3, bn = 8, 4 dual-path layers with 3 GroupNorm groups,
    fan-in scaled seeded weights so the output has an ordinary magnitude. The checkpoint is written here from the
    fixture's state listing and seed, as the script fed the reference (1.3 M weights are not committed)."""
    from tests.torch_files import save_torch

    folder = FIXTURES / "dttnet_paper"
    script = fixture_script(FIXTURES / "make_dttnet_paper.py")
    save_torch(script.checkpoint(script.seeded_state(json.loads((folder / "state.json").read_text()))),
               tmp_path / "vocals.ckpt")
    reference = np.load(folder / "reference.npz")
    config, model, mapping = imported(tmp_path / "vocals.ckpt", "dttnet",
                                      **{"import.config": str(folder / "vocals.yaml")})
    assert mapping["tensors_mapped"] == mapping["weights_assigned"] == 388
    settings = config.model.params("dttnet")
    assert (settings["num_scales"], settings["tfc_layers"], settings["bottleneck_factor"],
            settings["num_dual_path_layers"]) == (2, 3, 8, 4)
    features = settings["growth"] * (settings["num_scales"] + 1) // settings["num_heads"]
    assert features // settings["group_size"] == 3  # GroupNorm groups, as the paper's 96 channels over 2 heads
    theirs = np.transpose(reference["net_output"], (0, 3, 2, 1))
    assert 0.05 < float(np.sqrt(np.mean(theirs ** 2))) < 5  # not the exploding magnitudes of N(0, 0.3) weights
    ours = np.asarray(model.inference.networks["vocals"](np.transpose(reference["net_input"], (0, 3, 2, 1)),
                                                         training=False))
    assert sdr(theirs, ours) >= 80
    estimates = model.separator(np.transpose(reference["mixture"], (0, 2, 1)), training=False)
    assert sdr(reference["separated"][0], np.asarray(estimates["vocals"])[0].T) >= 80


def test_dttnet_single_checkpoint_without_config_assumes_the_published_rate():
    overrides = importer.release_overrides(resolve({"import": {"path": str(DTTNET / "bass.ckpt")},
                                                    "model": {"name": "dttnet"}}, ["unittest"]))
    assert overrides["data.targets"] == ["bass"] and overrides["data.sample_rate"] == 44100
    assert overrides["model.dttnet.hop_length"] == 1024 and overrides["model.dttnet.bass_dim_f"] == 16


# ------------------------------------------------------------------------------------ Wave-U-Net
WAVE_U_NET = FIXTURES / "wave_u_net"


def predict_track(network, song, input_length, output_length):
    """The reference's `Evaluate.predict_track` (its full separator) around a network: zero-pad by the context,
    predict output-length chunks on the output grid, the last one moved to end at the song's end."""
    pad = (input_length - output_length) // 2
    padded = np.pad(song, [(pad, pad), (0, 0)])
    estimates = {}
    for position in list(range(0, len(song) - output_length, output_length)) + [len(song) - output_length]:
        parts = network(padded[None, position:position + input_length], training=False)
        for target, part in parts.items():
            estimates.setdefault(target, np.zeros_like(song))[position:position + output_length] = np.asarray(part)[0]
    return estimates


@pytest.mark.parametrize("release, tensors, ignored", [("m4", 16, 35), ("m5/full_tiny-1", 18, 39)])
def test_wave_u_net_tf1_checkpoint_matches_the_reference_graph(release, tensors, ignored):
    import dataclasses

    from components.inference.separation import compiled
    from models import wave_u_net as wun

    key = release.split("/")[0]
    reference = np.load(WAVE_U_NET / "reference.npz")
    config, model, mapping = imported(WAVE_U_NET / release, "wave_u_net")
    # every variable of the checkpoint is either mapped or optimizer state (Adam slots, beta powers, step)
    assert mapping["tensors_mapped"] == mapping["weights_assigned"] == tensors
    assert len(mapping["tensors_ignored"]) == ignored
    assert config.model.params("wave_u_net")["upsampling"] == ("linear" if key == "m4" else "learned")
    assert config.data.targets == (("accompaniment", "vocals") if key == "m4" else ("bass", "drums", "other", "vocals"))
    network_input = reference[f"{key}/network_input"]
    outputs = model.train_model(network_input, training=False)
    for target in model.targets:  # incl. the difference output (mixture - the others, clipped at inference)
        theirs = reference[f"{key}/network/{target}"]
        assert np.max(np.abs(np.asarray(outputs[target]) - theirs)) <= 1e-4 * np.max(np.abs(theirs)), target
    song = reference[f"{key}/song"]
    output_length = np.asarray(outputs[model.targets[0]]).shape[1]
    assert model.config.predict == "chunks" and model.config.predict_frames == 200  # num_frames of config.json
    assert wun.chunk_lengths(model.config) == (network_input.shape[1], output_length)
    estimates = predict_track(model.train_model, song, network_input.shape[1], output_length)
    ours = model.separator(song[None], training=False)  # the full separator: the reference's chunked prediction
    served = compiled(model.separator, model.nb_channels)(song[None])  # traced with a dynamic length
    one_pass = wun.separator_model(model.train_model, dataclasses.replace(model.config, predict="one_pass"),
                                   model.targets, model.nb_channels)(song[None], training=False)
    for target in model.targets:
        theirs = reference[f"{key}/separated/{target}"]
        assert sdr(theirs, estimates[target]) >= 80, target
        assert sdr(theirs, np.asarray(ours[target])[0]) >= 80, target
        assert sdr(theirs, served[target][0]) >= 80, target
        # one pass over the song decimates on another grid than the reference's chunks: a different separation
        assert 10 < sdr(theirs, np.asarray(one_pass[target])[0]) < 40, target


# ------------------------------------------------------------------------------------ end to end
def test_imported_model_through_prepare_evaluate_export_and_separate(tmp_path, imported_pipeline):
    """`--stage import`, then the unchanged stages and `separate` on the imported TFC-TDF-UNet v3: they take the
    imported settings from the train artifact (8 kHz, the four targets, the network sizes)."""
    import soundfile

    # `run.py --stage import ... model.name=tfc_tdf_v3 import.path=fixtures/tfc_tdf_v3/multi`, then `--stage prepare`,
    # `evaluate`, `export` with unittest alone: CLI processes run in the background since the session started, in
    # a directory holding the session's prepared unittest data and MIX/IRM baselines (tests/conftest.py), so
    # prepare finds its artifact up to date (other settings would not match its fingerprint and prepare again)
    root = imported_pipeline
    imported_meta = json.loads((root / "train" / "artifact.json").read_text())
    evaluated = json.loads((root / "evaluate" / "artifact.json").read_text())
    assert evaluated["inputs"]["train"]["fingerprint"] == imported_meta["fingerprint"]
    assert evaluated["config"]["model"]["tfc_tdf_v3"]["num_scales"] == 2 and evaluated["config"]["data"]["sample_rate"] == 8000
    assert set(evaluated["figures"]["targets"]) == {"vocals", "drums", "bass", "other"}
    assert np.isfinite(evaluated["figures"]["SDR"])
    exported = json.loads((root / "export" / "artifact.json").read_text())["figures"]
    assert exported["parameters"] == imported_meta["figures"]["parameters"] == 10_808
    assert exported["saved_model_max_abs_diff"] < 1e-5 and exported["tflite_float32_parity_db"] > 80
    sidecar = json.loads((root / "export" / "model.json").read_text())
    assert sidecar["train_fingerprint"] == imported_meta["fingerprint"] and sidecar["sample_rate"] == 8000

    rate = 8000
    t = np.arange(3 * rate) / rate
    song = np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.2 * np.sin(2 * np.pi * 330 * t)], axis=1).astype(np.float32)
    soundfile.write(str(tmp_path / "song.wav"), song, rate)
    separate(tmp_path / "song.wav", "--artifacts-dir", root, "-o", tmp_path / "stems", "-q")
    for target in ("vocals", "drums", "bass", "other"):
        stem, stem_rate = soundfile.read(str(tmp_path / "stems" / "song" / f"{target}.wav"), dtype="float32")
        assert stem_rate == rate and stem.shape == song.shape and np.all(np.isfinite(stem))
        assert np.sqrt(np.mean(stem ** 2)) > 1e-4, target


def test_missing_extra_and_misshapen_tensors_are_one_line_errors_and_nothing_is_assigned():
    import dataclasses

    from components.training.trained import build_model
    from models.tfc_tdf_unet import assign_released

    base = {"import": {"path": str(FIXTURES / "tfc_tdf_v3" / "multi")}, "model": {"name": "tfc_tdf_v3"}}
    config = resolve(importer.merge_overrides(base, importer.release_overrides(resolve(base, ["unittest"])), "t"),
                     ["unittest"])
    released = importer.read(config)
    model = build_model(config, stats={})
    before = [w.numpy().copy() for w in model.train_model.weights]
    cases = {
        "missing": ({k: v for k, v in released.tensors.items() if k != "final_conv.2.weight"},
                    r"^import tfc_tdf_v3: the released files have no tensor 'final_conv.2.weight' \(needed for "
                    r"final_conv2/kernel\); import a complete checkpoint of this family$"),
        "extra": ({**released.tensors, "decoder_blocks.9.upscale.conv.2.weight": np.zeros((4, 4, 2, 2), np.float32)},
                  r"^import tfc_tdf_v3: tensor 'decoder_blocks.9.upscale.conv.2.weight' \(4, 4, 2, 2\) of the released "
                  r"files is not used \(1 unused\); the files are not a tfc_tdf_v3 checkpoint of this configuration$"),
        "shape": ({**released.tensors, "first_conv.weight": np.zeros((4, 8, 3, 3), np.float32)},
                  r"^import tfc_tdf_v3: tensor 'first_conv.weight' \(4, 8, 3, 3\) does not fit Keras weight "
                  r"first_conv/kernel \(1, 1, 8, 4\);"),
    }
    for name, (tensors, message) in cases.items():
        with pytest.raises(CheckpointError, match=message):
            assign_released(model, dataclasses.replace(released, tensors=tensors))
    for old, weight in zip(before, model.train_model.weights):  # nothing was assigned
        np.testing.assert_array_equal(old, weight.numpy())
