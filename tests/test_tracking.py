"""Sacred run tracking against a real PostgreSQL server (CI starts one: .ci/postgres), and driver errors."""
from __future__ import annotations

import json
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
