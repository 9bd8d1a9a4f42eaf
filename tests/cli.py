"""The command lines as the tests run them: `python pipeline/<script>.py ...` in a subprocess from the project root.

Every test that runs a CLI (run.py, separate.py, compare.py, sweep.py) or a `python -c` script goes through
here, so that the interpreter, working directory, import path and failure report are the same everywhere.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "pipeline" / "run.py")]
SEPARATE = [sys.executable, str(ROOT / "pipeline" / "separate.py")]


def command(script: str, *args) -> list:
    """argv of `python pipeline/<script>.py *args`."""
    return [sys.executable, str(ROOT / "pipeline" / f"{script}.py"), *map(str, args)]


def environment(env=None) -> dict:
    """`env` (default: this process's) with the project root first on PYTHONPATH, for `python -c` scripts."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _run(argv, label, check, timeout, kwargs):
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    result = subprocess.run(argv, cwd=ROOT, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        stderr = result.stderr.decode(errors="replace") if isinstance(result.stderr, bytes) else result.stderr
        raise AssertionError(f"{label} failed ({result.returncode}):\n{(stderr or '')[-3000:]}")
    return result


def script(name: str, *args, check=True, timeout=900, **kwargs):
    """Run `pipeline/<name>.py *args`; with `check`, a non-zero exit fails with the end of stderr."""
    return _run(command(name, *args), f"{name}.py {' '.join(map(str, args))}", check, timeout, kwargs)


def cli(*args, check=True, timeout=900, **kwargs):
    """Run `pipeline/run.py *args`; with `check`, a non-zero exit fails with the end of stderr."""
    return script("run", *args, check=check, timeout=timeout, **kwargs)


def separate(*args, check=True, timeout=600, **kwargs):
    """Run the `separate` CLI (`pipeline/separate.py *args`)."""
    return script("separate", *args, check=check, timeout=timeout, **kwargs)


def python(code: str, *args, check=True, timeout=600, env=None, **kwargs):
    """Run `python -c code *args` from the project root with the project on the import path."""
    return _run([sys.executable, "-c", code, *map(str, args)], "python -c script", check, timeout,
                {**kwargs, "env": environment(env)})


def _in_process(name: str, main, args) -> subprocess.CompletedProcess:
    import contextlib
    import io
    import signal

    argv = [str(arg) for arg in args]
    out, err = io.StringIO(), io.StringIO()
    previous = signal.getsignal(signal.SIGTERM)  # separate's main() installs its own SIGTERM handler
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return subprocess.CompletedProcess([name, *argv], code, out.getvalue(), err.getvalue())


def separate_here(*args) -> subprocess.CompletedProcess:
    """`separate *args` run by its `main` in this process: the exit code and what it printed, as `separate(...,
    check=False)` returns them, without a new process paying TensorFlow's import and the model's load again.
    For tests of what `separate` does with files; its command line itself is tested through `separate`."""
    from pipeline import separate as separate_module

    return _in_process("separate", separate_module.main, args)


def cli_here(*args) -> subprocess.CompletedProcess:
    """`pipeline/run.py *args` run by its `main` in this process, as `cli(..., check=False)` returns it: for the
    driver's refusals (one-line errors, exit 2) that happen before a stage does any work. What `main` prints is
    captured; log records are not (they go to the test's log capture). The command line itself: `cli`."""
    from pipeline import run

    return _in_process("run.py", run.main, args)


def describe(*tokens) -> str:
    """What `python pipeline/run.py --describe-model with *tokens` prints (without its last newline), computed in
    this process: the same function, without paying TensorFlow's import in a new process."""
    from pipeline.run import describe_model, split_updates

    updates, named = split_updates(["with", *tokens])
    return describe_model(updates, named or ["default"])


def start(argv, **kwargs) -> subprocess.Popen:
    """Start `argv` (`RUN + [...]`, `SEPARATE + [...]`, `command(...)` or `python_argv(...)`) in the background
    from the project root, for tests that interrupt or race it; stdout and stderr are pipes unless given."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    kwargs.setdefault("text", True)
    return subprocess.Popen(list(map(str, argv)), cwd=ROOT, **kwargs)


def interrupt_when(argv, ready, signum=None, *, timeout: float = 300) -> subprocess.CompletedProcess:
    """Start `argv`, wait until `ready()` is true (e.g. a staging folder or a `.part` file exists), send it
    `signum` (SIGINT by default) and wait for it to end; fails when it ended before it could be interrupted."""
    import signal
    import time

    process = start(argv)
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not ready():
        time.sleep(0.05)
    assert process.poll() is None, "finished before it could be interrupted"
    process.send_signal(signal.SIGINT if signum is None else signum)
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def kill_training_after(args, root: Path, epochs: int = 2, *, timeout: float = 300) -> list:
    """Start `run.py *args` (a train stage into artifacts directory `root`) in its own session, SIGKILL the whole
    group once `epochs` epochs are in the work folder's history.json, and return that history (what the killed
    run finished; a resume must keep it). Fails when training ended before it could be killed."""
    import json
    import signal
    import time

    import pytest

    process = start([*RUN, *args], stdout=subprocess.DEVNULL, start_new_session=True)
    deadline, history_files = time.time() + timeout, []
    while time.time() < deadline:
        history_files = list((root / ".train-work").glob("*/history.json")) if (root / ".train-work").exists() else []
        if history_files and len(json.loads(history_files[0].read_text() or "[]")) >= epochs:
            break
        if process.poll() is not None:
            pytest.fail(f"training ended before it could be killed: {process.stderr.read()[-2000:]}")
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert history_files, f"no epoch finished within {timeout:.0f} s"
    return json.loads(history_files[0].read_text())


def python_argv(code: str, *args) -> list:
    """argv of `python -c code *args` for `start` (pass `env=environment()` so the project imports)."""
    return [sys.executable, "-c", code, *map(str, args)]
