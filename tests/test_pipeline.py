"""The stage contract (ComponentSpec outputs, side caches, setup hook), create_pipeline, and the shape of the
tree: one error hierarchy in a module that imports nothing, configs/ that imports no model."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from components import artifacts
from components.base import ComponentSpec
from configs import errors
from configs.config import Config, defaults
from pipeline import definition

ROOT = Path(__file__).resolve().parents[1]


def project_imports(path: Path) -> set:
    """Top-level package names that `path` imports (module level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_errors_module_imports_nothing_and_every_error_is_a_user_error():
    assert project_imports(ROOT / "configs" / "errors.py") == set()
    classes = [errors.ConfigError, errors.StageError, errors.LockedError, errors.CheckpointError,
               errors.SeparateError, errors.SweepError]
    assert all(issubclass(cls, errors.UserError) for cls in classes)
    # the built-in bases callers of each layer rely on stay
    assert issubclass(errors.ConfigError, ValueError) and issubclass(errors.CheckpointError, ValueError)
    assert issubclass(errors.StageError, RuntimeError) and issubclass(errors.LockedError, errors.StageError)


def test_configs_import_nothing_from_models_pipeline_or_components():
    for path in sorted((ROOT / "configs").glob("*.py")):
        assert project_imports(path) & {"models", "pipeline", "components"} == set(), path.name


def test_create_pipeline_returns_the_specs_in_order():
    specs = definition.create_pipeline("all")
    assert [spec.command for spec in specs] == ["prepare", "train", "evaluate", "export"]
    assert all(isinstance(spec, ComponentSpec) for spec in specs)
    train = specs[1]
    assert train.side_caches == (".train-work",) and train.setup is not None
    assert train.outputs == ("model.weights.h5", "best.weights.h5", "history.json")
    (imported,) = definition.create_pipeline("import")
    assert (imported.name, imported.command, imported.setup) == ("train", "import", None)
    with pytest.raises(errors.StageError, match="^unknown stage 'nope'; choose one of prepare, train"):
        definition.create_pipeline("nope")


def _config(tmp_path) -> Config:
    return Config.from_dict({**defaults(), "artifacts_dir": str(tmp_path)})


def test_declared_outputs_are_checked_before_the_commit_and_side_caches_are_declared(tmp_path):
    seen = {}

    def executor(context):
        (context.output_dir / "written.json").write_text("{}")
        cache = context.side_cache("scratch")
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "note.txt").write_text("kept between runs")
        seen["cache"] = cache
        with pytest.raises(KeyError, match="side cache 'other' is not declared"):
            context.side_cache("other")
        return {"figures": {"n": 1}}

    config = _config(tmp_path)
    complete = ComponentSpec(name="toy", inputs=(), config_sections=("data",), executor=executor,
                             outputs=("written.json",), side_caches=("scratch",))
    artifact, skipped = definition.run_component(complete, config)
    assert not skipped and seen["cache"] == tmp_path / "scratch"
    assert (tmp_path / "scratch" / "note.txt").read_text() == "kept between runs"
    assert json.loads((artifact.path / "artifact.json").read_text())["figures"] == {"n": 1}

    broken = ComponentSpec(name="toy2", inputs=(), config_sections=("data",), executor=executor,
                           outputs=("written.json", "missing.json"), side_caches=("scratch",))
    with pytest.raises(RuntimeError, match="^stage toy2: declared output missing.json was not written$"):
        definition.run_component(broken, config)
    assert artifacts.load(tmp_path, "toy2") is None  # nothing half-made is committed


def test_the_driver_runs_each_stage_setup_hook_before_the_stages(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from pipeline import experiment

    calls = []
    spec = ComponentSpec(name="toy", inputs=(), config_sections=(), executor=lambda context: {},
                         setup=lambda config: calls.append(("setup", config.artifacts_dir)))
    monkeypatch.setattr(definition, "create_pipeline", lambda stage: [spec, spec])
    monkeypatch.setattr(experiment, "release_updates", lambda stages, updates, named, config=None: updates)
    monkeypatch.setattr(experiment, "_run_stage",
                        lambda experiment_, args, updates, named, stage, meta=None: calls.append(("run", stage)))
    args = SimpleNamespace(stage="toy", print_config=False)
    config = _config(tmp_path)
    assert experiment.run_stages(None, args, {}, [], config) == 0
    assert calls == [("setup", str(tmp_path)), ("setup", str(tmp_path)), ("run", "toy"), ("run", "toy")]


@pytest.mark.parametrize("option,message", [
    (["--overlap", "2"], "error: --overlap 2: must be a fraction in [0, 1); e.g. --overlap 0.25"),
    (["--chunk-seconds", "0"], "error: --chunk-seconds 0: must be > 0; e.g. --chunk-seconds 10"),
    (["--workers", "0"], "error: --workers 0: must be at least 1; e.g. --workers 2"),
])
def test_separate_refuses_bad_chunking_in_one_line_before_loading_a_model(option, message, tmp_path, capsys):
    from pipeline import separate

    code = separate.main([*option, "-o", str(tmp_path / "out"), str(tmp_path / "song.wav")])
    assert code == 2 and capsys.readouterr().err == message + "\n"
    assert not (tmp_path / "out").exists()
