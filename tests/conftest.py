"""Session-wide fixtures: one tiny pipeline run that every test file reading its artifacts shares.

Before, test_export, test_train, test_recipes, test_scale and test_reliability each ran (parts of) the same
`--stage all with unittest` through their own CLI processes; each CLI process pays TensorFlow's import again.
"""
from __future__ import annotations

import pytest

from tests.cli import cli


@pytest.fixture(scope="session")
def umx_pipeline(tmp_path_factory):
    """The artifacts directory of one `python pipeline/run.py --stage all with unittest` (Open-Unmix, the default
    family): prepare, train, evaluate and export artifacts, the generated data and the cached MIX/IRM baselines.

    Read-only: copy what a test changes (tests.shared_artifacts.copy_stages). At the end of the session every
    artifact must still verify, so a test that wrote into it fails the run."""
    from components import artifacts

    root = tmp_path_factory.mktemp("umx_pipeline") / "artifacts"
    cli("--stage", "all", "--no-file-observer", "-q", "with", "unittest", f"artifacts_dir={root}")
    stages = ("prepare", "train", "evaluate", "export")
    listed = {stage: sorted(artifacts.load(root, stage).meta["files"]) for stage in stages}
    yield root
    for stage in stages:
        artifact = artifacts.load(root, stage)
        assert artifact is not None, f"a test damaged the shared {stage} artifact in {root}"
        artifacts.verify(artifact)
        assert sorted(artifact.meta["files"]) == listed[stage], f"a test rewrote the shared {stage} artifact"
