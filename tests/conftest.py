"""Session-wide fixtures: the tiny pipeline runs that tests read, started in the background as soon as the session
knows it needs them.

Before, test_export, test_train, test_recipes, test_scale and test_reliability each ran (parts of) the same
`--stage all with unittest` through their own CLI processes, and the long CLI runs (every family through the
pipeline, the imported release, the real MUSDB18 sample, the streaming export, the tiny sweep) ran one after the
other while the machine's second core stayed mostly idle (a pipeline run keeps about one core busy). Now one
background worker runs them, one process at a time and at a lower CPU priority than the tests, in the order the test
files need them, while the tests that do not need them go on (the files that read a run are moved after the others);
a fixture waits for its run only when a test asks for it. Each run is the same command as before, and the test that
reads it asserts what it asserted.
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
MUSDB_SAMPLE = ROOT.parent / "shared" / "data" / "musdb18-sample"
SWEEP_GRID = ("--grid", "model.umx.unidirectional=false,true", "--epochs", "1")
_POOL = pytest.StashKey[ThreadPoolExecutor]()
_jobs: dict = {}  # name -> Future
_running: list = []  # Popen of the background run in progress (killed if the session stops early)


def background_families() -> tuple:
    from models.registry import names

    return tuple(sorted((name for name in names() if name not in ELSEWHERE), key=lambda name: name != "dttnet"))


def _run(script: str, args, log: Path) -> subprocess.CompletedProcess:
    """`python pipeline/<script>.py *args` at a lower priority (stdout also kept in `log`); a non-zero exit raises
    with the end of its stderr."""
    argv = command(script, *args)
    if shutil.which("nice"):
        argv = ["nice", "-n", "10", *argv]
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _running.append(process)
    try:
        out, err = process.communicate()
    finally:
        _running.remove(process)
    log.write_text(out)
    if process.returncode != 0:
        raise AssertionError(f"{script}.py {' '.join(map(str, args))} failed ({process.returncode}):\n{err[-3000:]}")
    return subprocess.CompletedProcess(argv, process.returncode, out, err)


def _umx_pipeline(folder: Path) -> Path:
    root = folder / "artifacts"
    _run("run", ["--stage", "all", "--no-file-observer", "-q", "with", "unittest", f"artifacts_dir={root}"],
         folder / "stdout.txt")
    return root


def _imported_pipeline(folder: Path) -> Path:
    """`--stage import` of the tiny TFC-TDF-UNet v3 release fixture, then `--stage prepare`, `evaluate`, `export`
    with nothing but the unittest preset (the stages take the imported settings from the train artifact), in an
    artifacts directory seeded with the shared pipeline's prepared data and MIX/IRM baselines."""
    root = seed_data(_jobs["umx_pipeline"].result(), folder / "artifacts")
    release = ROOT / "tests" / "fixtures" / "tfc_tdf_v3" / "multi"
    _run("run", ["--stage", "import", "--no-file-observer", "-q", "with", "unittest", "model.name=tfc_tdf_v3",
                 f"import.path={release}", f"artifacts_dir={root}"], folder / "import.txt")
    for stage in ("prepare", "evaluate", "export"):
        _run("run", ["--stage", stage, "--no-file-observer", "-q", "with", "unittest", f"artifacts_dir={root}"],
             folder / f"{stage}.txt")
    return root


def _musdb_pipeline(folder: Path) -> Path:
    """prepare -> train -> evaluate on the real MUSDB18 sample (stem mp4 through musdb/stempeg/ffmpeg)."""
    common = ["--no-file-observer", "-q", "with", "unittest", "data.format=musdb", f"data.root={MUSDB_SAMPLE}",
              f"artifacts_dir={folder}", "evaluate.split=train"]
    for stage in ("prepare", "train", "evaluate"):
        _run("run", ["--stage", stage, *common], folder.parent / f"{stage}.txt")
    return folder


def _family(family: str, folder: Path) -> Path:
    # the shared pipeline's data and baselines (the same data fingerprint): prepare skips, evaluate scores the model
    root = seed_data(_jobs["umx_pipeline"].result(), folder / "artifacts")
    _run("run", ["--stage", "all", "--no-file-observer", "-q", "with", "unittest", f"model.name={family}",
                 f"artifacts_dir={root}", "train.steps_per_epoch=1"], folder / "stdout.txt")
    return root


def _stream_pipeline(folder: Path) -> Path:
    """`--stage all` of a unidirectional Open-Unmix (its export stage writes the stream), Sacred runs recorded."""
    root = seed_data(_jobs["umx_pipeline"].result(), folder / "artifacts")
    _run("run", ["--stage", "all", "--runs-dir", folder / "runs", "with", "unittest", "model.umx.unidirectional=True",
                 f"artifacts_dir={root}"], folder / "stdout.txt")
    return root


def _tiny_sweep(folder: Path):
    return folder, _run("sweep", [*SWEEP_GRID, "--dir", folder, "with", "unittest"], folder.parent / "stdout.txt")


# fixture name -> (function of a fresh folder, whether it is wanted), in the order the test files read them
JOBS = {
    "umx_pipeline": (_umx_pipeline, lambda: True),
    "imported_pipeline": (_imported_pipeline, lambda: True),
    "musdb_pipeline": (_musdb_pipeline, MUSDB_SAMPLE.is_dir),
    "family_runs": (None, lambda: True),  # one job per family, below
    "stream_pipeline": (_stream_pipeline, lambda: True),
    "tiny_sweep": (_tiny_sweep, lambda: True),
}
NEEDS_UMX = ("imported_pipeline", "family_runs", "stream_pipeline")


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: only the runs the selected tests read
def pytest_collection_modifyitems(session, config, items):
    needed = set()
    for item in items:
        needed.update(getattr(item, "fixturenames", ()))
    # the test files that read a background run go last (whole files: their module fixtures are built once), so
    # that the others run meanwhile; among them, a file after the files that read only earlier runs of the queue
    def module(item):
        return getattr(getattr(item, "module", None), "__name__", None)

    rank = {name: index for index, name in enumerate(JOBS)}
    late = {}
    for item in items:
        jobs = [rank[name] for name in getattr(item, "fixturenames", ()) if name in rank]
        if jobs and module(item) is not None:
            late[module(item)] = max(late.get(module(item), 0), *jobs)
    items[:] = ([item for item in items if module(item) not in late]
                + sorted((item for item in items if module(item) in late), key=lambda item: late[module(item)]))
    if config.option.collectonly:
        return
    wanted = [name for name, (_, available) in JOBS.items() if name in needed and available()]
    if any(name in NEEDS_UMX for name in wanted) and "umx_pipeline" not in wanted:
        wanted.insert(0, "umx_pipeline")
    if not wanted:
        return
    factory = config._tmp_path_factory
    pool = config.stash[_POOL] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="background-run")
    for name in wanted:
        if name == "family_runs":
            for family in background_families():
                _jobs[family] = pool.submit(_family, family, factory.mktemp(family))
        else:
            _jobs[name] = pool.submit(JOBS[name][0], factory.mktemp(name))


def pytest_sessionfinish(session, exitstatus):
    pool = session.config.stash.get(_POOL, None)
    if pool is None:
        return
    pool.shutdown(wait=False, cancel_futures=True)
    for process in list(_running):  # a session that stopped early does not wait for a run nobody reads
        process.kill()


def _result(name: str, factory):
    """The background job's result, or (for a fixture reached without being named, request.getfixturevalue)
    the job run now."""
    if name not in _jobs:
        _jobs[name] = Future()
        _jobs[name].set_result(JOBS[name][0](factory.mktemp(name)))
    return _jobs[name].result()


@pytest.fixture(scope="session")
def umx_pipeline(tmp_path_factory):
    """The artifacts directory of one `python pipeline/run.py --stage all with unittest` (Open-Unmix, the default
    family): prepare, train, evaluate and export artifacts, the generated data and the cached MIX/IRM baselines.

    Read-only: copy what a test changes (tests.shared_artifacts.copy_stages). At the end of the session every
    artifact must still verify, so a test that wrote into it fails the run."""
    from components import artifacts

    root = _result("umx_pipeline", tmp_path_factory)
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


@pytest.fixture(scope="session")
def imported_pipeline(tmp_path_factory, umx_pipeline):
    """Artifacts directory of `run.py --stage import` (the tiny TFC-TDF-UNet v3 release in tests/fixtures), then
    `--stage prepare`, `evaluate` and `export` with unittest: four CLI processes."""
    return _result("imported_pipeline", tmp_path_factory)


@pytest.fixture(scope="session")
def musdb_pipeline(tmp_path_factory):
    """Artifacts directory of prepare, train and evaluate (three `run.py` processes) on the real MUSDB18 sample."""
    return _result("musdb_pipeline", tmp_path_factory)


@pytest.fixture(scope="session")
def stream_pipeline(tmp_path_factory, umx_pipeline):
    """Artifacts directory of `run.py --stage all --runs-dir <dir>/runs with unittest model.umx.unidirectional=True`
    (seeded with the shared pipeline's prepared data and baselines)."""
    return _result("stream_pipeline", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory):
    """(sweep folder, CompletedProcess) of `pipeline/sweep.py --grid model.umx.unidirectional=false,true --epochs 1
    --dir <folder> with unittest`. test_sweep resumes it (its second test changes the folder, as before)."""
    return _result("tiny_sweep", tmp_path_factory)
