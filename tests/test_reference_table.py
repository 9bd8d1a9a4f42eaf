"""The recipe presets against the reference table (`configs/recipes.py`): every value the authors' code sets, value
by value, with each deliberate difference named; a drifted value fails."""
import copy

import pytest

from configs.presets import RECIPE_PRESETS
from configs.recipes import DIFFERENCES, REFERENCE, describe


def _get(config, key):
    section, *rest = key.split(".")
    if section == "model":
        family, knob = rest
        return config.model.families[family][knob]
    value = getattr(config, section)
    for part in rest:
        value = getattr(value, part)
    return value


def _same(got, want):
    if isinstance(got, (tuple, list)) or isinstance(want, (tuple, list)):
        return list(got) == list(want)
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        return abs(got - want) <= 1e-12 * max(1.0, abs(want))
    return got == want and type(got) is type(want) or (got is None and want is None)


def drift(name, reference, differences):
    """[(key, ours, expected)] where preset `name` differs from the table (authors' value, or ours if named)."""
    from pipeline.experiment import resolve

    config = resolve({}, [name])
    found = []
    for key, (value, repo, path, _commit) in reference.items():
        assert repo and path, f"{name} {key}: no source"
        expected = differences[key][1] if key in differences else value
        got = _get(config, key)
        if not _same(got, expected):
            found.append((key, got, expected))
    for key, (_theirs, ours, reason) in differences.items():
        assert reason, f"{name} {key}: a difference without its reason"
        if not _same(_get(config, key), ours):
            found.append((key, _get(config, key), ours))
    return found


def test_every_recipe_preset_has_a_table():
    assert set(REFERENCE) == set(RECIPE_PRESETS) == set(DIFFERENCES)
    assert all(len(rows) >= 15 for rows in REFERENCE.values())


@pytest.mark.parametrize("name", RECIPE_PRESETS)
def test_preset_equals_the_authors_recipe_value_by_value(name):
    assert drift(name, REFERENCE[name], DIFFERENCES[name]) == []


def test_the_comparison_fails_on_drift():
    reference = copy.deepcopy(REFERENCE["dttnet_paper"])
    value, *source = reference["train.lr"]
    reference["train.lr"] = (value * 1.01, *source)  # the table says 2.02e-4: the preset's 2e-4 now drifts
    assert drift("dttnet_paper", reference, DIFFERENCES["dttnet_paper"]) == [("train.lr", 2e-4, 2e-4 * 1.01)]
    reference = copy.deepcopy(REFERENCE["paper"])
    reference["data.gain_range"] = ([0.25, 1.0], *reference["data.gain_range"][1:])
    assert [key for key, *_ in drift("paper", reference, {})] == ["data.gain_range"]
    differences = {"train.batch_size": (16, 6, "ours")}  # a named difference must hold ours
    assert [key for key, *_ in drift("dttnet_paper", {}, differences)] == ["train.batch_size"]


def test_describe_lists_each_difference_with_its_reason():
    lines = describe("dttnet_paper")
    assert len(lines) == 2 and "train.batch_size: ours 8, authors 16" in lines[1] and "synchronized BN" in lines[1]
    assert describe("paper") == []
