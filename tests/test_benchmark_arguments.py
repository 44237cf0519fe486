"""The benchmark script's argument checks, which run before any case starts."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import PROJECT_ROOT


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_training", PROJECT_ROOT / "benchmarks" / "bench_training.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--repeats", "0"], "--repeats must be at least 1; got 0"),
        (["--memory-images", "400"], "--memory-images must be above the 400 images of the small memory run"),
        (["--data", "{missing}"], "has no manifest.csv; pass the PatchCamelyon folder"),
    ],
)
def test_benchmark_rejects_bad_arguments(tmp_path, capsys, arguments, message):
    (tmp_path / "pcam").mkdir()
    (tmp_path / "pcam" / "manifest.csv").write_text("path,label\n", encoding="utf-8")
    arguments = [argument.format(missing=tmp_path / "missing") for argument in arguments]
    benchmark = _load_benchmark()

    with pytest.raises(SystemExit) as stopped:
        benchmark.parse_arguments(["--data", str(tmp_path / "pcam"), *arguments])

    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_benchmark_accepts_defaults_with_data(tmp_path):
    (tmp_path / "manifest.csv").write_text("path,label\n", encoding="utf-8")

    args = _load_benchmark().parse_arguments(["--data", str(tmp_path)])

    assert args.repeats == 4
    assert args.epochs == 20
    assert args.data == tmp_path
