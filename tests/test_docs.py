"""The user's guide stays true: README.md and docs/ build as a site, and every command in them is run or checked.

Every fenced shell block (```bash, ```sh, ```shell, ```console) in README.md and docs/*.md carries a marker on the
line before it, and an unmarked one fails here:

- `<!-- docs: run -->`: the block is executed by bash (with `set -e`) from the project root, on the tiny `unittest`
  preset, with these variables set: `$ARTIFACTS`, a copy of the shared `--stage all with unittest` artifacts
  directory (tests/conftest.py `umx_pipeline`: its stages are complete, so a documented `--stage all` there skips
  them); `$SONG`, a 2-second stereo wav at 44.1 kHz; `$OUT`, an empty folder. `musicsep` and `python` are this
  checkout's (a shell function running `pipeline/cli.py`, and the interpreter running the tests).
- `<!-- docs: check -->`: the block needs data, servers or hours the tests do not have. Each project command in
  it (`python pipeline/<script>.py`, `musicsep <command>`, `separate`, `sweep`) is parsed by that command's own
  argument parser, and the configuration after `with` is resolved (every key and value validated), so a renamed
  flag or key fails here. Other programs in the block (pip, ffmpeg, docker, ...) are not checked.
- `<!-- docs: skip -->`: not a project command (docker, curl, tensorboard, the installer).

```python blocks are executed (with the same `$ARTIFACTS`, `$SONG` and `$OUT` substituted in their text) unless
marked `<!-- docs: skip -->`. `mkdocs build --strict` must pass: a broken link or anchor fails it.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.cli import ROOT, environment
from tests.shared_artifacts import BASELINES, DATA, copy_stages

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
MARKER = re.compile(r"^<!--\s*docs:\s*(run|check|skip)\s*-->$")
SCRIPTS = {"run", "separate", "sweep", "compare", "benchmark"}


@dataclass
class Block:
    page: Path
    line: int
    language: str
    marker: str  # run, check, skip, or "" when unmarked
    text: str

    def __str__(self):
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks_of(page: Path):
    lines = page.read_text().split("\n")
    found, index = [], 0
    while index < len(lines):
        fence = re.match(r"^```(\S*)\s*$", lines[index])
        if not fence:
            index += 1
            continue
        end = next(j for j in range(index + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j].strip() for j in range(index - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(before)
        found.append(Block(page, index + 1, fence.group(1).lower(), marker.group(1) if marker else "",
                           "\n".join(lines[index + 1:end])))
        index = end + 1
    return found


BLOCKS = [block for page in PAGES for block in blocks_of(page)]


def commands(text: str):
    """The project commands of a shell block as (script, argv) pairs: continuation lines joined, comments dropped,
    pipelines and `&&` lists split, leading `VAR=value` assignments skipped."""
    joined = re.sub(r"\\\n", " ", text)
    found = []
    for line in joined.split("\n"):
        tokens = shlex.split(line, comments=True)
        segment = []
        for token in tokens + ["|"]:
            if token in ("|", "&&", ";", "||"):
                while segment and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", segment[0]):
                    segment = segment[1:]
                command = _project_command(segment)
                if command:
                    found.append(command)
                segment = []
            else:
                segment.append(token)
    return found


def _project_command(tokens):
    if tokens[:3] == ["python", "-m", "pytest"]:
        return ("pytest", tokens[3:])
    if len(tokens) >= 2 and tokens[0] in ("python", "python3") and re.match(r"^pipeline/(\w+)\.py$", tokens[1]):
        name = re.match(r"^pipeline/(\w+)\.py$", tokens[1]).group(1)
        return (name, tokens[2:]) if name in SCRIPTS else None
    if tokens and tokens[0] == "musicsep":
        return ("musicsep", tokens[1:])
    if tokens and tokens[0] in ("separate", "sweep"):
        return (tokens[0], tokens[1:])
    return None


PLACEHOLDERS = {"$ARTIFACTS": "/tmp/docs-artifacts", "$SONG": "/tmp/docs-song.wav", "$OUT": "/tmp/docs-out"}


def check_command(script: str, argv) -> None:
    """Parse `argv` with the script's own parser and resolve its `with` configuration; AssertionError otherwise."""
    import importlib

    from pipeline.experiment import resolve
    from pipeline.run import split_updates

    if script == "pytest":  # the test command: its paths exist, and CI runs the same command
        missing = [token for token in argv if not token.startswith("-") and not (ROOT / token).exists()]
        assert not missing, f"pytest paths {missing} do not exist"
        assert f"python -m pytest {' '.join(argv)}" in (ROOT / ".ci" / "run").read_text(), "CI runs another command"
        return
    argv = [PLACEHOLDERS.get(token, token) for token in argv]
    for name, value in PLACEHOLDERS.items():
        argv = [token.replace(name, value) for token in argv]
    if script == "musicsep":
        from pipeline import cli

        if not argv or argv[0] in ("-h", "--help"):
            return
        assert argv[0] in cli.SUBCOMMANDS, f"musicsep has no command {argv[0]!r}"
        script, argv = argv[0], argv[1:]
    split = argv.index("with") if "with" in argv else len(argv)
    own, configuration = argv[:split], argv[split:]
    parser = importlib.import_module(f"pipeline.{script}").get_parser()
    parser.allow_abbrev = False  # a documented flag must be spelled in full: a renamed one must not match by prefix
    try:
        parser.parse_args(own)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise AssertionError(f"`{script} {' '.join(own)}` does not parse") from None
    if configuration:
        updates, named = split_updates(configuration)
        resolve(updates, named or ["default"])


def test_every_shell_block_is_marked():
    unmarked = [str(block) for block in BLOCKS if block.language in SHELL and not block.marker]
    assert not unmarked, f"shell blocks without <!-- docs: run|check|skip -->: {unmarked}"
    assert sum(block.marker == "run" for block in BLOCKS) >= 8  # the guide's runnable examples are run


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.language in SHELL and b.marker in ("check", "run")], ids=str)
def test_documented_commands_parse_and_their_configuration_resolves(block, capsys):
    found = commands(block.text)
    assert found, f"{block}: a checked block with no project command; mark it skip"
    for script, argv in found:
        try:
            check_command(script, argv)
        except Exception as error:
            raise AssertionError(f"{block}: `{script} {' '.join(argv)}`: {error}") from None


def test_the_checker_fails_on_a_renamed_flag_or_key():
    with pytest.raises(AssertionError, match="does not parse"):
        check_command("run", ["--stage", "all", "--runs-directory", "runs"])
    with pytest.raises(AssertionError, match="does not parse"):
        check_command("musicsep", ["separate", "song.wav", "--skip-existant"])
    from configs.errors import UserError

    with pytest.raises(UserError, match="model.umx.hidden_sise"):
        check_command("run", ["--stage", "train", "with", "unittest", "model.umx.hidden_sise=3"])


@pytest.fixture(scope="module")
def docs_env(umx_pipeline, tmp_path_factory):
    import soundfile

    folder = tmp_path_factory.mktemp("docs")
    artifacts = copy_stages(umx_pipeline, folder / "artifacts", "prepare", "train", "evaluate", "export", DATA,
                            BASELINES)
    song = folder / "song.wav"
    soundfile.write(str(song), 0.1 * np.random.default_rng(0).standard_normal((88200, 2)), 44100)
    return artifacts, song, folder


def _variables(docs_env, out: Path) -> dict:
    artifacts, song, _ = docs_env
    out.mkdir(parents=True, exist_ok=True)
    return {"ARTIFACTS": str(artifacts), "SONG": str(song), "OUT": str(out)}


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.language in SHELL and b.marker == "run"], ids=str)
def test_runnable_shell_blocks_run(block, docs_env, tmp_path):
    variables = _variables(docs_env, tmp_path / "out")
    prologue = (f'musicsep() {{ "{sys.executable}" "{ROOT / "pipeline" / "cli.py"}" "$@"; }}\n'
                f'python() {{ "{sys.executable}" "$@"; }}\nset -e\n')
    env = environment({**os.environ, **variables})
    result = subprocess.run(["bash", "-c", prologue + block.text], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"{block} failed ({result.returncode}):\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.language == "python" and b.marker != "skip"], ids=str)
def test_python_blocks_run(block, docs_env, tmp_path):
    text = block.text
    for name, value in _variables(docs_env, tmp_path / "out").items():
        text = text.replace(f"${name}", value)
    result = subprocess.run([sys.executable, "-c", text], cwd=ROOT, env=environment(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"{block} failed:\n{result.stderr[-3000:]}"


def test_the_site_builds_strictly(tmp_path):
    mkdocs = shutil.which("mkdocs")
    if mkdocs is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]'); CI installs it with the dev extra")
    result = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "getting-started" / "index.html").is_file()


def test_the_readme_is_a_short_guide():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 250
    assert "python pipeline/run.py --stage all" in text
    for page in PAGES:
        words = page.read_text()
        assert not re.search(r"\b(this|last|next|previous|earlier|second|third) round\b|a round ago|\bissue \d+|not (yet )?explained", words, re.I), page
