"""End to end on the real MUSDB18 sample (stem mp4 through musdb/stempeg/ffmpeg): prepare -> train -> evaluate."""
from __future__ import annotations

import json

import pytest

from tests.cli import ROOT

SAMPLE = ROOT.parent / "shared" / "data" / "musdb18-sample"


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"real MUSDB18 sample absent: {SAMPLE}")
def test_real_musdb_sample_prepares_trains_and_evaluates(musdb_pipeline):
    # `run.py --stage prepare`, `train`, `evaluate` with unittest data.format=musdb data.root=<sample>
    # evaluate.split=train: three CLI processes, run in the background since the session started (tests/conftest.py)
    root = musdb_pipeline
    manifest = json.loads((root / "prepare" / "artifact.json").read_text())["manifest"]
    assert [t["name"] for t in manifest["splits"]["train"]["tracks"]] == ["Music Delta - 80s Rock"]
    assert sorted(manifest["empty_splits"]) == ["test", "valid"]
    metrics = json.loads((root / "evaluate" / "metrics.json").read_text())
    assert metrics["tracks"] == ["Music Delta - 80s Rock"]
    mix, irm = metrics["baselines"]["mix"]["mean"]["SDR"], metrics["baselines"]["irm"]["mean"]["SDR"]
    assert irm > mix + 5, (mix, irm)  # the oracle beats the mixture on real music
    for target in ("vocals", "drums", "bass", "other"):
        for key in ("SDR", "SIR", "ISR", "SAR", "uSDR"):
            assert key in metrics["model"][target]
    assert (root / "evaluate" / "sdr_boxplot.png").stat().st_size > 1000
