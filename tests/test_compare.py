"""pipeline/compare.py: every family on one budget (a sweep over model.name), seeds with error bars (tiny preset)."""
from __future__ import annotations

import json

from tests.cli import script


def test_compare_two_seeds_reports_mean_and_spread(tmp_path):
    script("compare", "--models", "umx", "--seeds", "2", "--budget", "2", "--dir", tmp_path, "with", "unittest")
    (row,) = json.loads((tmp_path / "comparison.json").read_text())
    assert row["model"] == "umx" and row["seeds"] == 2 and [r["seed"] for r in row["runs"]] == [0, 1]
    sdrs = [r["sdr"] for r in row["runs"]]
    assert abs(row["sdr"] - sum(sdrs) / 2) < 1e-9
    assert abs(row["sdr_std"] - abs(sdrs[0] - sdrs[1]) / 2 ** 0.5) < 1e-9  # sample std of two values
    assert sdrs[0] != sdrs[1]  # different seeds, different models
    # a trained model must beat the mixture itself (and stay below the oracle): this fails when it is worse than MIX
    for run in [row] + row["runs"]:
        assert run["mix_sdr"] < run["sdr"] < run["irm_sdr"], run
        assert 0 < run["q"] < 1
    assert (tmp_path / "umx" / "seed0" / "train" / "artifact.json").is_file()
    assert (tmp_path / "umx" / "seed1" / "evaluate" / "metrics.json").is_file()
    table = (tmp_path / "comparison.md").read_text()
    assert "| umx | 46,112 |" in table and " ± " in table
    # it is a sweep: the sweep's own tables and plots are there too, and a second run redoes nothing
    assert (tmp_path / "results.csv").is_file() and (tmp_path / "sdr_vs_train_seconds.png").is_file()
    assert json.loads((tmp_path / "umx" / "seed1" / "point.json").read_text())["values"] == {"model.name": "umx"}
