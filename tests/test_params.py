"""Parameter declarations: parsing command-line text, checking types and ranges, notebook defaults."""

from __future__ import annotations

import ast
import json

import pytest

from cellnb import params
from cellnb.errors import ParameterError

from conftest import PROJECT_ROOT


def _parameters_cell(notebook: str) -> dict:
    cells = json.loads((PROJECT_ROOT / "notebooks" / f"{notebook}.ipynb").read_text())["cells"]
    tagged = [cell for cell in cells if "parameters" in cell.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{notebook} must have exactly one cell tagged parameters"
    values = {}
    for node in ast.parse("".join(tagged[0]["source"])).body:
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


@pytest.mark.parametrize("notebook", sorted(params.NOTEBOOKS))
def test_notebook_defaults_match_declarations(notebook):
    defaults = _parameters_cell(notebook)
    declared = params.declared(notebook)

    assert list(defaults) == list(declared)
    for name, parameter in declared.items():
        assert defaults[name] == parameter.default, name
    assert params.check_parameters(notebook, defaults) == defaults


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("epochs", "8", 8),
        ("epochs", "007", 7),
        ("learning_rate", "1e-4", 1e-4),
        ("skip_unreadable", "false", False),
        ("skip_unreadable", "Yes", True),
        ("weights", "None", None),
        ("weights", "/models/vgg16.h5", "/models/vgg16.h5"),
        ("classes", "normal,tumor", ["normal", "tumor"]),
        ("classes", '["normal", "tumor"]', ["normal", "tumor"]),
        ("split_fractions", "0.8,0.1,0.1", [0.8, 0.1, 0.1]),
        ("data_dir", "it's \"quoted\"\nand; import os", "it's \"quoted\"\nand; import os"),
    ],
)
def test_parse_text_types(name, text, expected):
    parameter = params.all_parameters()[name]

    assert params.coerce_value(parameter, params.parse_text(parameter, text)) == expected


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("epochs", "eight", r"parameter 'epochs' received 'eight' \(str\); expected int"),
        ("epochs", 0, r"parameter 'epochs' received 0; expected int in \[1, 10000\]"),
        ("epochs", True, r"parameter 'epochs' received True \(bool\); expected int"),
        ("epochs", 2.5, r"parameter 'epochs' received 2.5 \(float\); expected int"),
        ("batch_size", -4, r"parameter 'batch_size' received -4"),
        ("image_memory_mb", -1, r"expected int in \[0, 1000000\] \(.*at 0, they are decoded from disk every epoch\)"),
        ("trainable_layers", -2, r"expected int >= -1 \(.*0 = frozen, -1 = all\)"),
        ("head", "softmax1", r"parameter 'head' received 'softmax1'; valid values are \['softmax2', 'sigmoid1'\]"),
        ("backbone", "vgg19", r"valid values are \['small_cnn', 'vgg16', 'mobilenet_v2', 'resnet50'\]"),
        ("classes", ["a"], r"expected two different class folder names"),
        ("split_fractions", [0.5, 0.5, 0.5], r"summing to 1"),
        ("skip_unreadable", "maybe", r"parameter 'skip_unreadable' received 'maybe' \(str\); expected bool "
                                     r"\(1, on, true, yes or 0, false, no, off on the command line\)"),
        ("learning_rate", float("nan"), r"expected a finite number"),
        ("run_dir", None, r"parameter 'run_dir' received None \(NoneType\); expected str"),
    ],
)
def test_bad_values_name_parameter_and_type(name, value, message):
    parameter = params.all_parameters()[name]

    with pytest.raises(ParameterError, match=message):
        params.coerce_value(parameter, value)


def test_check_parameters_reads_papermill_strings():
    checked = params.check_parameters("01_train", {"skip_unreadable": "false", "epochs": 3, "learning_rate": 1})

    assert checked["skip_unreadable"] is False
    assert checked["learning_rate"] == 1.0
    assert isinstance(checked["learning_rate"], float)


def test_unknown_notebook_lists_valid_ones():
    with pytest.raises(ParameterError, match="valid notebooks are"):
        params.declared("04_missing")


def test_unknown_notebook_suggests_closest():
    with pytest.raises(ParameterError, match=r"unknown notebook '01_trian'; did you mean '01_train'\? The valid notebooks are"):
        params.declared("01_trian")


def test_check_parameters_warns_about_misspelt_name(caplog):
    import json as module

    values = {"epoch": 5, "rundir": module, "preprocessing_in_effect": "vgg16", "_epochs": 3, "learning_rate": 0.01}

    with caplog.at_level("WARNING", logger="cellnb.params"):
        checked = params.check_parameters("01_train", values)

    assert checked["epochs"] == 30
    assert checked["learning_rate"] == 0.01
    assert [record.getMessage() for record in caplog.records] == [
        "'epoch' is not a parameter of 01_train, so it has no effect; did you mean 'epochs'?"
    ]
