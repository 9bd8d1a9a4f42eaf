"""pipeline/sweep.py: grid parsing, a tiny grid end to end (tables, plots, Sacred runs), resuming, MUSDB previews."""
from __future__ import annotations

import csv
import json
import urllib.error
from pathlib import Path

import pytest

from configs.config import nested
from pipeline import sweep
from configs.errors import SweepError
from tests.cli import script


def run_sweep_cli(*args):
    return script("sweep", *args, check=False, timeout=1200)


def run_info(run_dir: Path) -> dict:
    return json.loads((run_dir / "info.json").read_text())


def sacred_runs(runs_dir: Path) -> list:
    return sorted((p for p in runs_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


# ------------------------------------------------------------------------------------- fast units
def test_grid_parsing_points_and_labels():
    grid = sweep.parse_grid(["train.batch_size=4,8", "model.umx.unidirectional=false,true", "train.lr=1e-3",
                             "model.name=umx"])
    assert grid == {"train.batch_size": [4, 8], "model.umx.unidirectional": [False, True], "train.lr": [0.001],
                    "model.name": ["umx"]}
    found = sweep.points(grid, seeds=3)
    assert len(found) == 2 * 2 * 3 and [seed for _, seed in found[:4]] == [0, 1, 2, 0]
    assert found[3] == ({"train.batch_size": 4, "model.umx.unidirectional": True, "train.lr": 0.001,
                         "model.name": "umx"}, 0)
    assert sweep.label(found[3][0], 0) == ("train.batch_size=4,model.umx.unidirectional=true,train.lr=0.001,"
                                           "model.name=umx,seed=0")
    assert nested({"model.umx.hidden_size": 8}) == {"model": {"umx": {"hidden_size": 8}}}
    assert sweep.points({}, seeds=2) == [({}, 0), ({}, 1)]
    for bad in ("train.batch_size", "=4", "train.batch_size=", "train..x=1"):
        with pytest.raises(SweepError, match="expected KEY=V1,V2"):
            sweep.parse_grid([bad])
    with pytest.raises(SweepError, match="given twice"):
        sweep.parse_grid(["train.lr=1", "train.lr=2"])


def test_seed_study_is_a_named_sweep():
    _, grid = sweep.SWEEPS["seed_study"]
    assert grid == {"train.batch_size": [4, 8, 16, 32], "model.umx.hidden_size": [256, 512],
                    "train.samples_per_track": [16, 32], "model.umx.unidirectional": [False, True]}
    result = run_sweep_cli("--sweep", "seed_study", "--seeds", "3", "--list")
    assert result.returncode == 0, result.stderr[-2000:]
    listed = result.stdout.split()
    assert len(listed) == 32 * 3 and listed[0] == ("train.batch_size=4,model.umx.hidden_size=256,"
                                                   "train.samples_per_track=16,model.umx.unidirectional=false,seed=0")


def test_summary_is_mean_and_sample_std_over_seeds():
    runs = [{"values": {"k": 1}, "seed": s, "per_target_sdr": {"vocals": sdr}, "SDR": sdr, "q": q,
             **{m: 1.0 for m in sweep.MEASURES if m not in ("SDR", "q")}}
            for s, (sdr, q) in enumerate([(1.0, 0.2), (2.0, 0.4), (6.0, 0.9)])]
    runs.append({**runs[0], "values": {"k": 2}, "seed": 0})
    first, second = sweep.summarise(runs)
    assert first["seeds"] == 3 and first["SDR"] == pytest.approx(3.0) and first["q"] == pytest.approx(0.5)
    assert first["SDR_std"] == pytest.approx(2.6457513, abs=1e-6)  # sqrt(((1-3)^2 + (2-3)^2 + (6-3)^2) / 2)
    assert first["per_target_sdr"] == {"vocals": pytest.approx(3.0)}
    assert second["seeds"] == 1 and second["SDR"] == 1.0 and second["SDR_std"] == 0.0


def test_bad_grid_key_is_a_one_line_error(tmp_path, capsys):
    code = sweep.main(["--grid", "train.batch_sise=4,8", "--dir", str(tmp_path), "with", "unittest"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("error: sweep: point train.batch_sise=4,seed=0: unknown config key 'train.batch_sise'")
    assert not (tmp_path / "points").exists()  # every point is resolved before anything runs


# --------------------------------------------------------------------------- MUSDB18 7-second previews
class FakeDB:
    calls = []

    def __init__(self, root=None, download=False, **kwargs):
        FakeDB.calls.append({"root": root, "download": download, **kwargs})
        (Path(root) / "train").mkdir(parents=True, exist_ok=True)  # what musdb's download unzips


def test_musdb_preview_downloads_through_musdb_and_sets_the_data(tmp_path, monkeypatch):
    import musdb

    FakeDB.calls = []
    monkeypatch.setattr(musdb, "DB", FakeDB)
    captured = {}

    def fake_run_sweep(**kwargs):
        captured.update(kwargs)
        return []

    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    monkeypatch.setattr(sweep, "report", lambda *a: "")
    root = tmp_path / "MUSDB18-7"
    assert sweep.main(["--musdb-preview", str(root), "--epochs", "1", "--dir", str(tmp_path / "s"),
                       "with", "unittest"]) == 0
    assert FakeDB.calls == [{"root": str(root), "download": True, "subsets": ["train"]}]
    assert captured["updates"]["data"] == {"format": "musdb", "root": str(root)}
    assert captured["budget"] == {"train": {"epochs": 1, "max_seconds": None}}
    assert captured["named"] == ["unittest"]


def test_musdb_preview_without_network_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import musdb

    def offline(**kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(musdb, "DB", offline)
    assert sweep.main(["--musdb-preview", str(tmp_path / "m"), "--dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: sweep: --musdb-preview {tmp_path / 'm'}: the musdb package "
                                              "could not download MUSDB18's 7-second previews (")
    assert "Temporary failure in name resolution" in err


# ------------------------------------------------------------------------------- tiny grid, end to end
@pytest.fixture(scope="module")
def swept(tiny_sweep):
    """`sweep.py --grid model.umx.unidirectional=false,true --epochs 1 --dir <root> with unittest`, run in the
    background since the session started (tests/conftest.py)."""
    root, result = tiny_sweep
    assert result.returncode == 0, result.stderr[-3000:]
    return root, result


def test_tiny_grid_writes_tables_plots_and_sacred_runs(swept):
    root, result = swept
    with open(root / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["model.umx.unidirectional"], r["seed"]) for r in rows] == [("false", "0"), ("true", "0")]
    # unittest UMX (hidden 16, 4 targets): BLSTM 8 units per direction vs one LSTM of 16 units
    assert [int(r["parameters"]) for r in rows] == [46_112, 48_160]
    for row in rows:
        assert row["epochs"] == "1" and float(row["train_seconds"]) > 0 and float(row["x_realtime"]) > 0
        assert float(row["mix_sdr"]) < float(row["SDR"]) < float(row["irm_sdr"])  # trained beats the mixture
        assert 0 < float(row["q"]) < 1 and float(row["train_loss"]) > 0 and float(row["val_loss"]) > 0
        for metric in ("SIR", "ISR", "SAR", "uSDR"):
            assert row[metric] != ""
    table = (root / "results.md").read_text()
    assert table.startswith("| unidirectional | seeds | parameters | train loss | val loss |")
    assert "| false | 1 | 46,112 |" in table and "| true | 1 | 48,160 |" in table
    assert table in result.stdout
    for plot in ("loss_vs_epoch.png", "sdr_vs_train_seconds.png"):
        assert (root / plot).stat().st_size > 10_000
    # every stage a Sacred run: prepare (once per point, the second one skipped), train and evaluate per point
    runs = sacred_runs(root / "runs")
    commands = [json.loads((r / "run.json").read_text())["command"] for r in runs]
    assert commands == ["prepare", "train", "evaluate"] * 2
    config = json.loads((runs[4] / "config.json").read_text())
    assert config["model"]["umx"]["unidirectional"] is True and config["train"]["epochs"] == 1
    assert run_info(runs[3])["skipped"] is True and run_info(runs[0])["skipped"] is False  # shared prepare
    # one invocation; every run records its sweep point (grid values, seed) and its upstream runs within the point
    infos = [run_info(r) for r in runs]
    assert len({info["invocation"] for info in infos}) == 1
    assert [info["sweep"]["values"] for info in infos] == [{"model.umx.unidirectional": False}] * 3 + \
        [{"model.umx.unidirectional": True}] * 3
    assert all(info["sweep"]["seed"] == 0 and info["sweep"]["grid"] == {"model.umx.unidirectional": [False, True]}
               for info in infos)
    assert str(infos[5]["upstream"]["train"]["run_id"]) == runs[4].name


def test_interrupted_sweep_resumes_without_redoing_points(swept):
    root, _ = swept
    before = len(sacred_runs(root / "runs"))
    again = run_sweep_cli("--grid", "model.umx.unidirectional=false,true", "--epochs", "1", "--dir", str(root),
                          "with", "unittest")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("complete (fingerprint") == 2
    assert len(sacred_runs(root / "runs")) == before  # nothing ran
    # a point interrupted after training: its evaluate and results are redone, its training is not
    point = root / "points" / "model.umx.unidirectional=true,seed=0"
    (point / "point.json").unlink()
    import shutil

    shutil.rmtree(point / "evaluate")
    resumed = run_sweep_cli("--grid", "model.umx.unidirectional=false,true", "--epochs", "1", "--dir", str(root),
                            "with", "unittest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    new_runs = sacred_runs(root / "runs")[before:]
    infos = [(json.loads((r / "run.json").read_text())["command"], run_info(r)["skipped"]) for r in new_runs]
    assert infos == [("prepare", True), ("train", True), ("evaluate", False)]
    assert (point / "point.json").is_file() and (point / "evaluate" / "metrics.json").is_file()
