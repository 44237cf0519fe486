"""Project files that must stay in step: environment.yml against pyproject.toml, notebooks without outputs."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import PROJECT_ROOT


def test_environment_yml_matches_pyproject():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    environment = yaml.safe_load((PROJECT_ROOT / "environment.yml").read_text())
    pip_section = next(item["pip"] for item in environment["dependencies"] if isinstance(item, dict))

    expected = set(project["dependencies"]) | set(project["optional-dependencies"]["test"])
    assert set(pip_section) - {"-e ."} == expected
    assert "-e ." in pip_section


def test_notebooks_are_committed_without_outputs():
    for path in sorted((PROJECT_ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = [cell for cell in cells if cell["cell_type"] == "code"]
        assert all(not cell.get("outputs") for cell in code), path.name
        assert all(cell.get("execution_count") is None for cell in code), path.name
