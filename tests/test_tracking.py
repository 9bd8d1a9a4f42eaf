"""Sacred run tracking against a real PostgreSQL server (CI starts one: .ci/postgres), and driver errors."""
from __future__ import annotations

import json
import re
import os
import uuid

import pytest

from tests.cli import cli, cli_here

POSTGRES_URL = os.environ.get("MUSICSEP_TEST_POSTGRES_URL")


@pytest.mark.skipif(not POSTGRES_URL, reason="no PostgreSQL server: set MUSICSEP_TEST_POSTGRES_URL (.ci/postgres starts one)")
def test_sql_observer_records_runs_in_postgresql(tmp_path):
    import sqlalchemy as sa

    marker = uuid.uuid4().hex[:8]
    cli("--stage", "prepare", "-q", "--no-file-observer", "--sql", POSTGRES_URL, "with", "unittest",
        f"artifacts_dir={tmp_path / marker}", timeout=600)
    engine = sa.create_engine(POSTGRES_URL)
    with engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT status, command, result, config FROM run ORDER BY id")).fetchall()
    ours = [row for row in rows if marker in str(row[3])]
    assert len(ours) == 1
    status, command, value, config = ours[0]
    assert (status, command, value) == ("COMPLETED", "prepare", 16.0)
    assert json.loads(config)["data"]["sample_rate"] == 8000


@pytest.mark.parametrize("args, message", [
    (["with", "nosuchpreset"], "unknown preset 'nosuchpreset'"),
    (["with", "unittest", "model.name=nosuchmodel"], "model.name 'nosuchmodel' is not a registered model"),
    (["with", "unittest", "model.umx.hidden_sise=3"], "unknown config key 'model.umx.hidden_sise'"),
    (["with", "unittest", "train.epochs=many"], "train.epochs"),
    (["with", "unittest", "data.format=musdb"], "data.format=musdb needs data.root"),
])
def test_config_errors_are_one_line_and_exit_2(tmp_path, args, message):
    # the driver's main in this process (the same exit code and message; the CLI process: test_reliability)
    result = cli_here("--stage", "prepare", "--no-file-observer", *args, f"artifacts_dir={tmp_path}")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr[-2000:]
    assert not (tmp_path / "prepare").exists()


def test_stage_all_is_one_chain_of_runs_with_files_git_and_tensorboard(tmp_path, umx_pipeline):
    """`--stage all with unittest` under a SQLite observer: the four runs share the invocation id, each names its
    upstream runs (ids and fingerprints), the readers' files are attached, git commit and dirty flag recorded; the
    TensorBoard logs in train/tensorboard hold the learning rate, per-target losses and snapshot audio."""
    import sqlalchemy as sa

    from tests.shared_artifacts import seed_data

    root = seed_data(umx_pipeline, tmp_path / "artifacts")
    database = tmp_path / "runs.db"
    cli("--stage", "all", "-q", "--no-file-observer", "--sql", f"sqlite:///{database}", "with", "unittest",
        f"artifacts_dir={root}", "train.steps_per_epoch=2", "train.epochs=2", "train.snapshot_every_steps=2",
        timeout=900)
    engine = sa.create_engine(f"sqlite:///{database}")
    with engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT run_id, command, status, info FROM run ORDER BY id")).fetchall()
        files = connection.execute(sa.text("SELECT run_id, filename FROM artifact")).fetchall()
    runs = {command: (run_id, status, json.loads(info)) for run_id, command, status, info in rows}
    assert list(runs) == ["prepare", "train", "evaluate", "export"]
    invocation = runs["prepare"][2]["invocation"]
    # the chain, found by the invocation id alone
    with engine.connect() as connection:
        chain = connection.execute(sa.text("SELECT command FROM run WHERE json_extract(info, '$.invocation') = :id "
                                           "ORDER BY id"), {"id": invocation}).fetchall()
    assert [c for (c,) in chain] == ["prepare", "train", "evaluate", "export"]
    assert all(status == "COMPLETED" for _, status, _ in runs.values())
    prepare_id, train_id = runs["prepare"][0], runs["train"][0]
    train_info, evaluate_info = runs["train"][2], runs["evaluate"][2]
    # (the SQL table keeps run ids as text; the info JSON as Sacred's observer gave them)
    assert str(train_info["upstream"]["prepare"]["run_id"]) == prepare_id
    assert train_info["upstream"]["prepare"]["fingerprint"] == runs["prepare"][2]["fingerprint"]
    upstream = dict(evaluate_info["upstream"]["train"], run_id=str(evaluate_info["upstream"]["train"]["run_id"]))
    assert upstream == {"run_id": train_id, "fingerprint": train_info["fingerprint"], "path": str(root / "train")}
    assert str(runs["export"][2]["upstream"]["train"]["run_id"]) == train_id
    assert str(runs["export"][2]["upstream"]["evaluate"]["run_id"]) == runs["evaluate"][0]
    git = runs["export"][2]["git"]
    assert re.fullmatch(r"[0-9a-f]{40}", git["commit"]) and isinstance(git["dirty"], bool)
    attached = {(run_id, name) for run_id, name in files}
    for command, name in [("train", "train.history.json"), ("train", "train.training_curves.png"),
                          ("evaluate", "evaluate.metrics.json"), ("evaluate", "evaluate.per_track.csv"),
                          ("evaluate", "evaluate.sdr_boxplot.png"), ("export", "export.model.json"),
                          ("train", "train.artifact.json")]:
        assert (runs[command][0], name) in attached, name
    assert not any(name.endswith(".h5") for _, name in files)  # weights stay in the artifacts directory

    tags, audio = _tensorboard(root / "train" / "tensorboard")
    assert {"epoch_loss", "epoch_vocals_loss", "epoch_learning_rate", "snapshot_sdr"} <= tags, tags
    assert {"estimate/vocals", "estimate/drums", "estimate/bass", "estimate/other"} <= audio, audio


def _tensorboard(folder):
    """(scalar tags, audio tags) of every event file under `folder`."""
    import tensorflow as tf

    scalars, audio = set(), set()
    for path in folder.rglob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                plugin = value.metadata.plugin_data.plugin_name
                (audio if plugin == "audio" else scalars).add(value.tag)
    return scalars, audio
