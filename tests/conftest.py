"""Session-wide fixtures: the tiny pipeline runs that several test files read, started in the background as soon as
the session knows it needs them.

Before, test_export, test_train, test_recipes, test_scale and test_reliability each ran (parts of) the same
`--stage all with unittest` through their own CLI processes, and the all-families test ran every family one after
the other while the machine's second core stayed mostly idle (a pipeline run keeps about one core busy). Now one
background worker runs them, one process at a time and at a lower CPU priority than the tests, while the tests that
do not need them go on; a fixture waits for its run only when a test asks for it.
"""
from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.cli import ROOT, command
from tests.shared_artifacts import seed_data

STAGES = ("prepare", "train", "evaluate", "export")
# the families whose `--stage all` runs only for the all-families test (test_reliability); Open-Unmix is the shared
# pipeline below and Wave-U-Net that file's lock-race run. DTTNet, the slowest, first.
ELSEWHERE = ("umx", "wave_u_net")
_POOL = pytest.StashKey[ThreadPoolExecutor]()
_jobs: dict = {}  # name -> Future of an artifacts directory
_running: list = []  # Popen of the background run in progress (ended if the session stops early)


def background_families() -> tuple:
    from models.registry import names

    return tuple(sorted((name for name in names() if name not in ELSEWHERE), key=lambda name: name != "dttnet"))


def _run(args, stdout_path: Path) -> None:
    """`python pipeline/run.py *args` at a lower priority; a non-zero exit raises with the end of its stderr."""
    argv = command("run", *args)
    if shutil.which("nice"):
        argv = ["nice", "-n", "10", *argv]
    with open(stdout_path, "w") as out:
        process = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.PIPE, text=True)
        _running.append(process)
        try:
            _, err = process.communicate()
        finally:
            _running.remove(process)
    if process.returncode != 0:
        raise AssertionError(f"run.py {' '.join(map(str, args))} failed ({process.returncode}):\n{err[-3000:]}")


def _pipeline(root: Path) -> Path:
    _run(["--stage", "all", "--no-file-observer", "-q", "with", "unittest", f"artifacts_dir={root}"],
         root.parent / "stdout.txt")
    return root


def _family(family: str, folder: Path, pipeline: Future) -> Path:
    seed_data(pipeline.result(), folder)  # the same data fingerprint: prepare skips, evaluate scores the model only
    _run(["--stage", "all", "--no-file-observer", "-q", "with", "unittest", f"model.name={family}",
          f"artifacts_dir={folder}", "train.steps_per_epoch=1"], folder.parent / "stdout.txt")
    return folder


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: only the runs the selected tests read
def pytest_collection_modifyitems(session, config, items):
    if config.option.collectonly:
        return
    needed = set()
    for item in items:
        needed.update(getattr(item, "fixturenames", ()))
    if not needed & {"umx_pipeline", "family_runs"}:
        return
    factory = config._tmp_path_factory
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="background-run")
    config.stash[_POOL] = pool
    _jobs["umx_pipeline"] = pool.submit(_pipeline, factory.mktemp("umx_pipeline") / "artifacts")
    if "family_runs" in needed:
        for family in background_families():
            _jobs[family] = pool.submit(_family, family, factory.mktemp(family) / "artifacts", _jobs["umx_pipeline"])



def pytest_sessionfinish(session, exitstatus):
    pool = session.config.stash.get(_POOL, None)
    if pool is None:
        return
    pool.shutdown(wait=False, cancel_futures=True)
    for process in list(_running):  # a session that stopped early does not wait for a run nobody reads
        process.kill()


@pytest.fixture(scope="session")
def umx_pipeline(tmp_path_factory):
    """The artifacts directory of one `python pipeline/run.py --stage all with unittest` (Open-Unmix, the default
    family): prepare, train, evaluate and export artifacts, the generated data and the cached MIX/IRM baselines.

    Read-only: copy what a test changes (tests.shared_artifacts.copy_stages). At the end of the session every
    artifact must still verify, so a test that wrote into it fails the run."""
    from components import artifacts

    if "umx_pipeline" not in _jobs:  # asked for by a test that does not name it (request.getfixturevalue)
        _jobs["umx_pipeline"] = Future()
        _jobs["umx_pipeline"].set_result(_pipeline(tmp_path_factory.mktemp("umx_pipeline") / "artifacts"))
    root = _jobs["umx_pipeline"].result()
    listed = {stage: sorted(artifacts.load(root, stage).meta["files"]) for stage in STAGES}
    yield root
    for stage in STAGES:
        artifact = artifacts.load(root, stage)
        assert artifact is not None, f"a test damaged the shared {stage} artifact in {root}"
        artifacts.verify(artifact)
        assert sorted(artifact.meta["files"]) == listed[stage], f"a test rewrote the shared {stage} artifact"


@pytest.fixture(scope="session")
def family_runs(umx_pipeline):
    """{family: Future of its artifacts directory} of `python pipeline/run.py --stage all with unittest
    model.name=<family> train.steps_per_epoch=1` for every registered family but Open-Unmix and Wave-U-Net, each
    in its own artifacts directory seeded with the shared pipeline's prepared data and MIX/IRM baselines."""
    return {family: _jobs[family] for family in background_families()}
