"""Fine-tuning (`train.init_from`, `train.freeze`, `train.init_targets`): an imported Open-Unmix release (the tiny
fixture in tests/fixtures/umx/bidirectional) fine-tuned on the real MUSDB18 sample and on the unittest data."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.cli import cli, cli_here, kill_training_after, separate
from tests.conftest import MUSDB_SAMPLE
from tests.shared_artifacts import seed_data

RELEASE = Path(__file__).resolve().parent / "fixtures" / "umx" / "bidirectional"


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    """Artifacts directory of `--stage import` of the tiny Open-Unmix release (8 kHz, four targets)."""
    root = tmp_path_factory.mktemp("released")
    cli("--stage", "import", "--no-file-observer", "-q", "with", "unittest", "model.name=umx",
        f"import.path={RELEASE}", f"artifacts_dir={root}")
    return root


def _model(root: Path):
    """The SeparationModel of `root`'s train artifact with its best weights, built as evaluate builds it."""
    from components.artifacts import load
    from components.training.trained import load_trained
    from pipeline.experiment import release_updates, resolve

    updates = release_updates(["evaluate"], {"artifacts_dir": str(root)}, ["unittest"])
    return load_trained(load(root, "train"), resolve(updates, ["unittest"]))


def _pairs(tuned, init, origins):
    """(inner weight path, fine-tuned value, init value) of every weight of every target network."""
    for target, origin in origins.items():
        network, source = tuned.inference.networks[target], init.inference.networks[origin]
        for mine, theirs in zip(network.weights, source.weights):
            inner = mine.path.split("/", 1)[1]
            assert inner == theirs.path.split("/", 1)[1]
            yield f"{target}:{inner}", np.asarray(mine), np.asarray(theirs)


@pytest.mark.skipif(not MUSDB_SAMPLE.is_dir(), reason=f"the real MUSDB18 sample is not at {MUSDB_SAMPLE}")
def test_finetune_on_musdb_sample_changes_weights_keeps_frozen_parts_and_records_the_init(released, tmp_path):
    root = tmp_path / "tuned"
    args = ["--no-file-observer", "-q", "with", "unittest", "data.format=musdb", f"data.root={MUSDB_SAMPLE}",
            "evaluate.split=train", f"artifacts_dir={root}", f"train.init_from={released}",
            'data.targets=["vocals", "accompaniment"]', 'train.init_targets={"accompaniment": "other"}',
            'train.freeze=["encoder", "lstm"]', "train.steps_per_epoch=3"]
    cli("--stage", "prepare", *args)
    cli("--stage", "train", *args)
    meta = json.loads((root / "train" / "artifact.json").read_text())
    init_meta = json.loads((released / "train" / "artifact.json").read_text())
    init = meta["init"]
    assert init["path"] == str((released / "train").resolve()) and init["fingerprint"] == init_meta["fingerprint"]
    assert init["sha256"]["best.weights.h5"] == init_meta["files"]["best.weights.h5"]["sha256"]
    assert init["imported"] and init["target_origins"] == {"vocals": "vocals", "accompaniment": "other"}
    assert meta["config"]["model"]["umx"]["hidden_size"] == 16 and meta["config"]["data"]["sample_rate"] == 8000
    assert meta["config"]["data"]["targets"] == ["vocals", "accompaniment"]

    tuned, source = _model(root), _model(released)
    frozen = re.compile(r"^(fc1|bn1)/|^lstm_\d+/")
    changed, kept = [], []
    for name, mine, theirs in _pairs(tuned, source, init["target_origins"]):
        inner = name.split(":", 1)[1]
        if frozen.search(inner):  # weights and BatchNorm statistics of the frozen parts: bit-identical
            assert np.array_equal(mine, theirs), name
            kept.append(name)
        elif not np.array_equal(mine, theirs):
            changed.append(name)
    # every frozen weight (BatchNorm statistics included) of both networks, and nothing else, kept its value
    assert len(kept) == init["frozen_weights"] and {"vocals:bn1/moving_mean", "accompaniment:bn1/moving_variance",
                                                    "accompaniment:fc1/kernel"} <= set(kept)
    assert sum(name.startswith("vocals:lstm_") for name in kept) >= 3
    # the parts left free moved: the decoder's kernels and its BatchNorm statistics, in both networks
    for name in ("vocals:fc2/kernel", "accompaniment:fc3/kernel", "vocals:bn2/moving_mean"):
        assert name in changed, (name, changed)

    # an unchanged rerun is skipped (the init's sha256 are part of the fingerprint): artifact.json untouched
    stamp = (root / "train" / "artifact.json").stat().st_mtime_ns
    cli("--stage", "train", *args)
    assert (root / "train" / "artifact.json").stat().st_mtime_ns == stamp


def test_new_target_starts_as_the_source_target_before_the_first_step(released):
    from components.training import finetune
    from components.training.trained import build_model
    from pipeline.experiment import release_updates, resolve

    updates = {"train": {"init_from": str(released), "init_targets": {"accompaniment": "other"}},
               "data": {"targets": ["vocals", "accompaniment"]}}
    config = resolve(release_updates(["train"], updates, ["unittest"]), ["unittest"])
    finetune.check(config)
    model = build_model(config, {})
    record = finetune.apply_init(model, config, build_model)
    source = _model(released)
    assert record["weights_copied"] == 2 * len(source.inference.networks["other"].weights)
    for target, origin in (("accompaniment", "other"), ("vocals", "vocals")):
        for mine, theirs in zip(model.inference.networks[target].weights, source.inference.networks[origin].weights):
            assert np.array_equal(np.asarray(mine), np.asarray(theirs)), (target, mine.path)
    # and differs from the targets it did not come from
    for other in ("drums", "bass", "vocals"):
        assert not np.array_equal(*(next(np.asarray(w) for w in network.weights if w.path.endswith("/fc1/kernel"))
                                    for network in (model.inference.networks["accompaniment"],
                                                    source.inference.networks[other])))


def test_resume_after_kill_resumes_the_finetune(released, umx_pipeline, tmp_path):
    root = seed_data(umx_pipeline, tmp_path / "k")
    args = ["--stage", "train", "--no-file-observer", "-q", "with", "unittest", f"artifacts_dir={root}",
            f"train.init_from={released}", 'train.freeze=["lstm"]', "train.epochs=12", "train.steps_per_epoch=3"]
    done_before = kill_training_after(args, root)
    assert not (root / "train" / "artifact.json").exists()
    killed_at = len(done_before)
    assert 2 <= killed_at < 12

    cli(*args)
    history = json.loads((root / "train" / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 13))
    assert [h["pid"] for h in history[:killed_at]] == [done_before[0]["pid"]] * killed_at  # not started over
    tuned, source = _model(root), _model(released)
    for name, mine, theirs in _pairs(tuned, source, {t: t for t in ("vocals", "drums", "bass", "other")}):
        if re.search(r"^lstm_\d+/", name.split(":", 1)[1]):
            assert np.array_equal(mine, theirs), name  # still the init's after the resume


@pytest.mark.parametrize("updates, message", [
    (["model.name=dttnet"], 'train.init_from: model.name="dttnet" on the command line but the init model '),
    (['data.targets=["vocals", "accompaniment"]'], "train.init_from: the init model has no 'accompaniment' network "
                                                   "(it has vocals, drums, bass, other); map it, e.g. "
                                                   'train.init_targets={"accompaniment": "other"}'),
    (['train.freeze=["wings"]'], "train.freeze: umx has no part 'wings'; choose from input_norm, encoder, lstm, "
                                 "decoder"),
    (["model.umx.hidden_size=32"], 'train.init_from: model.umx.hidden_size=32 on the command line but the init '
                                   "model"),
])
def test_mismatched_init_is_one_line_and_writes_nothing(released, tmp_path, updates, message):
    root = tmp_path / "a"
    result = cli_here("--stage", "train", "--no-file-observer", "with", "unittest", f"artifacts_dir={root}",
                      f"train.init_from={released}", *updates)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr[-2000:]
    assert not root.exists()


def test_missing_init_is_one_line_and_writes_nothing(tmp_path):
    root = tmp_path / "a"
    result = cli_here("--stage", "all", "--no-file-observer", "with", "unittest", f"artifacts_dir={root}",
                      f"train.init_from={tmp_path / 'nowhere'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: train.init_from={tmp_path / 'nowhere'}: no such file or folder; give an artifacts directory or its "
        "train/ folder")
    assert not root.exists()


def test_import_finetune_evaluate_export_separate(released, umx_pipeline, tmp_path):
    import soundfile

    root = seed_data(umx_pipeline, tmp_path / "e2e")
    cli("--stage", "all", "--no-file-observer", "-q", "with", "unittest", f"artifacts_dir={root}",
        f"train.init_from={released}", 'train.freeze=["input_norm", "encoder"]', "train.steps_per_epoch=2")
    train = json.loads((root / "train" / "artifact.json").read_text())
    evaluated = json.loads((root / "evaluate" / "artifact.json").read_text())
    exported = json.loads((root / "export" / "artifact.json").read_text())
    assert train["init"]["family"] == "umx" and train["config"]["model"]["umx"]["hidden_size"] == 16
    assert evaluated["inputs"]["train"]["fingerprint"] == exported["inputs"]["train"]["fingerprint"] == \
        train["fingerprint"]
    assert np.isfinite(evaluated["figures"]["SDR"])
    assert exported["figures"]["saved_model_max_abs_diff"] < 1e-5
    rate = 8000
    t = np.arange(2 * rate) / rate
    song = np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.2 * np.sin(2 * np.pi * 330 * t)], axis=1).astype(np.float32)
    soundfile.write(str(tmp_path / "song.wav"), song, rate)
    separate(tmp_path / "song.wav", "--artifacts-dir", root, "-o", tmp_path / "stems", "-q")
    for target in ("vocals", "drums", "bass", "other"):
        stem, stem_rate = soundfile.read(str(tmp_path / "stems" / "song" / f"{target}.wav"), dtype="float32")
        assert stem_rate == rate and stem.shape == song.shape and np.all(np.isfinite(stem))


HQ_SAMPLE = MUSDB_SAMPLE.parent / "musdb18hq-sample" / "train" / "Music Delta - 80s Rock"


@pytest.mark.skipif(not HQ_SAMPLE.is_dir(), reason=f"the real MUSDB18-HQ sample is not at {HQ_SAMPLE}")
def test_finetune_on_own_stems_with_a_new_target_name(released, tmp_path):
    """data.format=folder with stems named vocals and guitar: guitar starts from the release's `other`."""
    track = tmp_path / "stems" / "train" / "song"
    track.mkdir(parents=True)
    (track / "vocals.wav").symlink_to(HQ_SAMPLE / "vocals.wav")
    (track / "guitar.wav").symlink_to(HQ_SAMPLE / "other.wav")
    root = tmp_path / "tuned"
    args = ["--no-file-observer", "-q", "with", "unittest", "data.format=folder", f"data.root={tmp_path / 'stems'}",
            "evaluate.split=train", f"artifacts_dir={root}", f"train.init_from={released}",
            'data.targets=["vocals", "guitar"]', 'train.init_targets={"guitar": "other"}', "train.steps_per_epoch=2",
            "train.replicas=2"]  # under MirroredStrategy (two logical CPU devices)
    cli("--stage", "prepare", *args)
    cli("--stage", "train", *args)
    meta = json.loads((root / "train" / "artifact.json").read_text())
    assert meta["figures"]["replicas"] == 2, meta["figures"]
    assert meta["init"]["target_origins"] == {"vocals": "vocals", "guitar": "other"}
    tuned, source = _model(root), _model(released)
    moved = [name for name, mine, theirs in _pairs(tuned, source, meta["init"]["target_origins"])
             if not np.array_equal(mine, theirs)]
    assert any(name.startswith("guitar:fc1/") for name in moved) and any(name.startswith("vocals:") for name in moved)
    # the guitar network is the release's `other` network fine-tuned: still much closer to it than to `drums`
    def kernel(network):
        return next(np.asarray(w) for w in network.weights if w.path.endswith("/fc1/kernel"))

    mine = kernel(tuned.inference.networks["guitar"])
    assert np.abs(mine - kernel(source.inference.networks["other"])).mean() < \
        0.1 * np.abs(mine - kernel(source.inference.networks["drums"])).mean()
