"""The house's layout holds: imports run down the floors (pipeline -> components -> models -> configs), the
libraries in components/ never reach up into the stages or the command lines, no import circles, and no module
uses another module's private (`_name`) names. Parsed from the source (ast), imports inside functions included."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "components", "models", "configs")
FLOORS = {"pipeline": 3, "components": 2, "models": 1, "configs": 0}
STAGES = {"components.prepare", "components.train", "components.evaluate", "components.export", "components.importer"}


def project_modules() -> dict:
    """{dotted module name: path} of every module of the four packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


MODULES = project_modules()


def imports_of(name: str, path: Path):
    """[(imported module, [names taken from it], line)] of the project modules `name` imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] in PACKAGES:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if submodule in MODULES:  # `from components.data import audio`: the module audio
                    found.append((submodule, [], node.lineno))
                else:
                    found.append((node.module, [alias.name], node.lineno))
    return found


def graph(modules=MODULES) -> dict:
    edges = {}
    for name, path in modules.items():
        edges[name] = {target for target, _, _ in imports_of(name, path) if target in modules and target != name}
    return edges


def cycles(edges: dict) -> list:
    """Every strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _package_parents(name: str):
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_import_circles():
    edges = graph()
    # a package's __init__ importing its own modules is no circle of the code
    for name in edges:
        edges[name] -= _package_parents(name)
    assert cycles(edges) == []


def test_the_circle_check_finds_a_circle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]


def test_imports_run_down_the_floors_and_libraries_never_reach_the_stages():
    wrong = []
    for name, path in MODULES.items():
        floor = FLOORS[name.split(".")[0]]
        for target, _, line in imports_of(name, path):
            if FLOORS[target.split(".")[0]] > floor:
                wrong.append(f"{name}:{line} imports {target} (a higher floor)")
            library = name.startswith("components.") and name.count(".") >= 2  # components/<concern>/<module>
            if library and (target in STAGES or target.split(".")[0] == "pipeline"):
                wrong.append(f"{name}:{line} imports {target} (a library reaching into a stage or a command line)")
    assert wrong == []


def test_no_module_uses_another_modules_private_names():
    wrong = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for target, names, line in imports_of(name, path):
            wrong += [f"{name}:{line} imports {target}.{n}" for n in names
                      if n.startswith("_") and not n.startswith("__")]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in MODULES:
                        aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in MODULES and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                wrong.append(f"{name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert wrong == []


@pytest.mark.parametrize("forbidden", ["import soundfile", "FileMixture", "SavedModelSeparator", "TFLiteSeparator",
                                       "StreamingSeparator", "\ndef separate_file", "\ndef read_any"])
def test_the_command_lines_hold_no_separator_or_audio_code(forbidden):
    """The command lines and the Python API (pipeline/api.py, whose `Separator.separate_file` method hands the
    file to components.inference.files) hold no separation or audio code of their own."""
    holders = [path.name for path in sorted((ROOT / "pipeline").glob("*.py"))
               if forbidden in path.read_text().replace(REFERENCE_PIPELINE, "")]
    assert holders == []


# benchmark.py's `command` writes open-unmix's own pipeline (soundfile in, its Separator, soundfile out) as the
# script it times: the reference's code, not ours
REFERENCE_PIPELINE = "import soundfile, torch\n"


# --------------------------------------------------------------------------------------------
# The family contract (models/registry.py `Family`, `ReleasedFamily`)
# --------------------------------------------------------------------------------------------
def test_every_registered_family_keeps_the_written_contract():
    import dataclasses
    import inspect

    from models import registry

    for name in registry.names():
        family = registry.module(name)
        assert isinstance(family, registry.Family), name
        assert dataclasses.is_dataclass(family.Config), name
        family.Config()  # every field has its published default
        parameters = inspect.signature(family.build).parameters
        assert list(parameters)[:1] == ["config"], name
        for keyword in ("data", "stats"):
            assert parameters[keyword].kind is inspect.Parameter.KEYWORD_ONLY, (name, keyword)
        assert parameters["stats"].default is None, name
        # a family reads released weights with both halves or not at all
        assert hasattr(family, "read_released") == hasattr(family, "assign_released") == registry.importable(name)
    assert {name for name in registry.names() if registry.importable(name)} == {
        "umx", "wave_u_net", "unet", "tfc_tdf_v3", "dttnet"}


def test_the_contract_check_refuses_a_module_without_build():
    import types

    from models import registry

    half = types.SimpleNamespace(Config=type("Config", (), {}))
    assert not isinstance(half, registry.Family)
    assert isinstance(types.SimpleNamespace(Config=object, build=lambda config, *, data, stats=None: None),
                      registry.Family)
