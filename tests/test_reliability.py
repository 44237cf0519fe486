"""Bad input, parameter injection, pre-run checks and failed notebooks: each gets a clear message, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import nbformat
import pandas as pd
import pytest

from cellnb import cli, data, params, runner
from cellnb.errors import CellnbError, DataError, ParameterError

from conftest import PROJECT_ROOT, write_image, write_split_tree

# --- malformed data trees ---------------------------------------------------------------------


def _missing_directory(root):
    return root / "not_here"


def _empty_directory(root):
    root.mkdir(parents=True)
    (root / ".DS_Store").write_bytes(b"\x00")
    return root


def _missing_split(root):
    return write_split_tree(root, {"train": (2, 2)})


def _missing_class(root):
    write_split_tree(root, {"train": (2, 2), "valid": (2, 2)})
    for path in (root / "train" / "positive").iterdir():
        path.unlink()
    (root / "train" / "positive").rmdir()
    return root


def _empty_class(root):
    write_split_tree(root, {"train": (2, 2), "valid": (2, 0)})
    (root / "valid" / "positive").mkdir()
    return root


def _classes_differ(root):
    write_split_tree(root, {"train": (2, 2)})
    write_split_tree(root, {"valid": (2, 2)}, classes=("negative", "tumor"))
    return root


def _one_image_per_class(root):
    return write_split_tree(root, {"train": (2, 2), "valid": (1, 1)})


def _one_test_image(root):
    return write_split_tree(root, {"train": (2, 2), "valid": (2, 2), "test": (1, 2)})


def _manifest_tree(root, rows=None, columns=("path", "label", "split")):
    rows = rows if rows is not None else []
    for label, name in enumerate(("negative", "positive")):
        for index in range(4):
            path = f"{name}/{index}.png"
            write_image(root / path, seed=index + 10 * label)
            rows.append({"path": path, "label": name, "split": "train" if index < 2 else "valid"})
    pd.DataFrame(rows)[list(columns)].to_csv(root / "manifest.csv", index=False)
    return root


def _manifest_without_label(root):
    return _manifest_tree(root, columns=("path", "split"))


def _manifest_without_path(root):
    return _manifest_tree(root, columns=("label", "split"))


def _manifest_unknown_label(root):
    _manifest_tree(root)
    manifest = pd.read_csv(root / "manifest.csv")
    manifest.loc[0, "label"] = "tumour"
    manifest.to_csv(root / "manifest.csv", index=False)
    return root


def _manifest_parent_path(root):
    write_image(root.parent / "secret.png", seed=99)
    return _manifest_tree(root, rows=[{"path": "../secret.png", "label": "negative", "split": "train"}])


def _manifest_absolute_path(root):
    outside = write_image(root.parent / "elsewhere.png", seed=98)
    return _manifest_tree(root, rows=[{"path": str(outside), "label": "negative", "split": "train"}])


def _manifest_symlink_outside(root):
    outside = write_image(root.parent / "linked.png", seed=97)
    _manifest_tree(root)
    (root / "negative" / "link.png").symlink_to(outside)
    manifest = pd.read_csv(root / "manifest.csv")
    manifest.loc[len(manifest)] = {"path": "negative/link.png", "label": "negative", "split": "train"}
    manifest.to_csv(root / "manifest.csv", index=False)
    return root


MALFORMED = [
    ("missing_directory", _missing_directory, r"not_here' not found; pass the folder that contains your images"),
    ("empty_directory", _empty_directory, r"data directory '.*' is empty; put the images in class folders"),
    ("missing_split", _missing_split, r"has a train/ folder but no valid/ or val/ or validation/; add the valid split"),
    ("missing_class", _missing_class, r"train' has no class folder 'positive'; found \['negative'\]; create it"),
    ("empty_class", _empty_class, r"the valid split has 0 readable image\(s\) of class 'positive'; a binary split needs"),
    ("classes_differ", _classes_differ,
     r"different class folders: valid/ has \['negative', 'tumor'\] but train/ has \['negative', 'positive'\]"),
    ("one_image_per_class", _one_image_per_class, r"the valid split has 1 readable image\(s\) of class 'negative'"),
    ("one_test_image", _one_test_image, r"the test split has 1 readable image\(s\) of class 'negative'"),
    ("manifest_without_label", _manifest_without_label, r"manifest.csv has no column 'label'; its columns are \['path', 'split'\]"),
    ("manifest_without_path", _manifest_without_path, r"manifest.csv has no column 'path'"),
    ("manifest_unknown_label", _manifest_unknown_label, r"manifest.csv has label 'tumour'; valid labels are"),
    ("manifest_parent_path", _manifest_parent_path, r"lists path '../secret.png', which is empty, absolute or outside the data root"),
    ("manifest_absolute_path", _manifest_absolute_path, r"lists path '/.*elsewhere.png', which is empty, absolute or outside"),
    ("manifest_symlink_outside", _manifest_symlink_outside,
     r"negative/link.png under '.*' resolves to '.*linked.png', outside the data root, so it was not read"),
]


AUDIT_VALUES = {
    "missing_directory": "not_here' not found",
    "empty_directory": "no class folder 'negative'",
    "missing_split": "no valid/",
    "missing_class": "train/ has ['negative']",
    "empty_class": "of class 'positive'",
    "classes_differ": "'tumor'",
    "one_image_per_class": "1 readable image(s) of class 'negative'",
    "one_test_image": "the test split has 1 readable image(s)",
    "manifest_without_label": "has no column 'label'",
    "manifest_without_path": "has no column 'path'",
    "manifest_unknown_label": "label 'tumour'",
    "manifest_parent_path": "'../secret.png'",
    "manifest_absolute_path": "elsewhere.png'",
    "manifest_symlink_outside": "outside the data root",
}


@pytest.mark.parametrize(("case", "build", "message"), MALFORMED, ids=[case[0] for case in MALFORMED])
def test_malformed_tree_python_api(tmp_path, case, build, message):
    root = build(tmp_path / "data")

    with pytest.raises(DataError, match=message):
        data.discover_samples(root)


def test_outside_paths_are_never_read(tmp_path, monkeypatch):
    opened = []
    original = data.inspect_image
    monkeypatch.setattr(data, "inspect_image", lambda path: opened.append(str(path)) or original(path))

    for build in (_manifest_parent_path, _manifest_absolute_path, _manifest_symlink_outside):
        root = build(tmp_path / build.__name__ / "data")
        with pytest.raises(DataError):
            data.discover_samples(root)

    assert opened == []


def _cellnb(*arguments, timeout=300):
    return subprocess.run([sys.executable, "-m", "cellnb.cli", *arguments], capture_output=True, text=True,
                          cwd=PROJECT_ROOT, timeout=timeout)


@pytest.mark.parametrize(("case", "build", "message"), MALFORMED, ids=[case[0] for case in MALFORMED])
def test_malformed_tree_cellnb_audit(tmp_path, case, build, message):
    root = build(tmp_path / "data")

    completed = _cellnb("audit", str(root))

    output = completed.stdout + completed.stderr
    assert "Traceback" not in completed.stderr
    assert completed.returncode in (0, 2)
    # The audit words some structure errors itself; it must still name the offending value.
    assert AUDIT_VALUES[case] in output, output


@pytest.mark.parametrize(("case", "build", "message"), MALFORMED, ids=[case[0] for case in MALFORMED])
def test_malformed_tree_cellnb_run(tmp_path, case, build, message):
    root = build(tmp_path / "data")

    completed = _cellnb("run", "--data-dir", str(root), "--run-dir", str(tmp_path / "run"))

    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.startswith("error: ")
    assert "Traceback" not in completed.stderr
    assert pd.Series([completed.stderr]).str.contains(message).item(), completed.stderr
    assert not (tmp_path / "run" / "notebooks").exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["-p", "image_size", "0"], r"parameter 'image_size' received 0; expected int in \[16, 1024\]"),
        (["-p", "image_size", "32.5"], r"parameter 'image_size' received '32.5' \(str\); expected int"),
        (["-p", "batch_size", "-1"], r"parameter 'batch_size' received -1; expected int in \[1, 4096\]"),
        (["-p", "backbone", "vgg19"], r"parameter 'backbone' received 'vgg19'; valid values are \['small_cnn', 'vgg16'"),
        (["-p", "head", "softmax1"], r"parameter 'head' received 'softmax1'; valid values are \['softmax2', 'sigmoid1'\]"),
    ],
)
def test_bad_parameter_cellnb_run(tmp_path, arguments, message):
    completed = _cellnb("run", "--run-dir", str(tmp_path / "run"), *arguments)

    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert pd.Series([completed.stderr]).str.contains(message).item(), completed.stderr


@pytest.mark.parametrize(("name", "value"), [("image_size", 0), ("image_size", 2.0), ("batch_size", True), ("batch_size", -3)])
def test_make_dataset_rejects_bad_sizes(split_tree, name, value):
    samples = data.discover_samples(split_tree).samples
    options = {"image_size": 16, "batch_size": 4, name: value}

    with pytest.raises(ParameterError, match=f"{name} must be a positive integer; got {value!r}"):
        data.make_dataset(samples, **options)


def test_finished_run_refused_without_overwrite_or_resume(tmp_path):
    (tmp_path / "config.json").write_text("{}")

    completed = _cellnb("run", "--run-dir", str(tmp_path))

    assert completed.returncode == 2
    assert "already contains a run; pass --overwrite to replace it, --resume" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_overwrite_and_resume_are_exclusive(tmp_path):
    completed = _cellnb("run", "--overwrite", "--resume", str(tmp_path))

    assert completed.returncode == 2
    assert "not allowed with argument" in completed.stderr


# --- parameters through papermill -------------------------------------------------------------

TRICKY_PATH = "it's \"quoted\"\nsecond line'''; import os; os.system('echo hacked') #\\"


def _injected_values(notebook_path) -> dict:
    notebook = nbformat.read(str(notebook_path), as_version=4)
    injected = [cell for cell in notebook.cells if "injected-parameters" in cell.metadata.get("tags", [])]
    assert len(injected) == 1
    namespace: dict = {}
    exec(compile(injected[0].source, "injected-parameters", "exec"), {}, namespace)  # noqa: S102 - the test checks what papermill wrote
    return namespace


def _papermill(*arguments):
    return subprocess.run([sys.executable, "-m", "papermill", "--prepare-only", *arguments], capture_output=True,
                          text=True, cwd=PROJECT_ROOT, timeout=120)


def test_papermill_injects_tricky_string_verbatim(tmp_path):
    output = tmp_path / "01.ipynb"

    completed = _papermill("notebooks/01_train.ipynb", str(output), "-p", "data_dir", TRICKY_PATH, "-p", "epochs", "007")

    assert completed.returncode == 0, completed.stderr
    injected = _injected_values(output)
    assert injected["data_dir"] == TRICKY_PATH
    checked = params.check_parameters("01_train", injected)
    assert checked["data_dir"] == TRICKY_PATH
    assert checked["epochs"] == 7


def test_cellnb_values_inject_tricky_string_verbatim(tmp_path):
    import papermill

    values = cli.collect_parameters([["data_dir", TRICKY_PATH], ["skip_unreadable", "false"]], None)
    output = tmp_path / "01.ipynb"

    papermill.execute_notebook(str(PROJECT_ROOT / "notebooks" / "01_train.ipynb"), str(output), parameters=values,
                               prepare_only=True)

    injected = _injected_values(output)
    assert injected["data_dir"] == TRICKY_PATH
    assert injected["skip_unreadable"] is False


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["-p", "skip_unreadable", "maybe"], r"parameter 'skip_unreadable' received 'maybe' \(str\); expected bool"),
        (["-p", "epochs", "3.5"], r"parameter 'epochs' received 3.5 \(float\); expected int"),
        (["-p", "group_pattern", "007"], r"parameter 'group_pattern' received 7 \(int\); expected str or None; papermill -p"),
    ],
)
def test_papermill_guessed_types_checked(tmp_path, arguments, message):
    notebook = "notebooks/01_train.ipynb" if arguments[1] in params.declared("01_train") else "notebooks/02_inspect_validation.ipynb"
    output = tmp_path / "prepared.ipynb"
    completed = _papermill(notebook, str(output), *arguments)
    assert completed.returncode == 0, completed.stderr
    name = "01_train" if "01_train" in notebook else "02_inspect_validation"

    with pytest.raises(ParameterError, match=message):
        params.check_parameters(name, _injected_values(output))


def test_papermill_false_text_becomes_bool(tmp_path):
    output = tmp_path / "prepared.ipynb"

    completed = _papermill("notebooks/01_train.ipynb", str(output), "-p", "skip_unreadable", "false",
                           "-p", "classes", '["normal", "tumor"]')

    assert completed.returncode == 0, completed.stderr
    injected = _injected_values(output)
    assert injected["skip_unreadable"] == "false"
    checked = params.check_parameters("01_train", injected)
    assert checked["skip_unreadable"] is False
    assert checked["classes"] == ["normal", "tumor"]


def test_papermill_yaml_file_checked(tmp_path):
    yaml_path = tmp_path / "params.yaml"
    yaml_path.write_text("epochs: '12'\ndata_dir: \"a 'b'\\nc\"\nlearning_rate: 1\ndropout: yes\n")
    output = tmp_path / "prepared.ipynb"

    completed = _papermill("notebooks/01_train.ipynb", str(output), "-f", str(yaml_path))

    assert completed.returncode == 0, completed.stderr
    injected = _injected_values(output)
    assert injected["data_dir"] == "a 'b'\nc"
    with pytest.raises(ParameterError, match=r"parameter 'dropout' received True \(bool\); expected float"):
        params.check_parameters("01_train", injected)
    injected["dropout"] = 0.1
    checked = params.check_parameters("01_train", injected)
    assert checked["epochs"] == 12
    assert checked["learning_rate"] == 1.0


def test_cellnb_yaml_file_wrong_type(tmp_path):
    yaml_path = tmp_path / "params.yaml"
    yaml_path.write_text("data_dir: 7\n")

    with pytest.raises(ParameterError, match=r"parameter 'data_dir' received 7 \(int\); expected str"):
        cli.collect_parameters([], str(yaml_path))


def test_every_notebook_checks_parameters_after_parameters_cell():
    for name in runner.NOTEBOOKS:
        notebook = nbformat.read(str(PROJECT_ROOT / "notebooks" / f"{name}.ipynb"), as_version=4)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert "parameters" in code[0].metadata.get("tags", []), name
        assert f'params.check_parameters("{name}", globals())' in code[1].source, name


SYSTEM_PYTHON = "/usr/bin/python3"

# --- before a run -----------------------------------------------------------------------------


def test_notebook_without_parameters_cell_rejected(tmp_path):
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("run_dir = 'x'")]
    nbformat.write(notebook, tmp_path / "01_train.ipynb")

    with pytest.raises(CellnbError, match=r"has no code cell tagged 'parameters'.*add the tag 'parameters'"):
        runner.check_parameters_cell(tmp_path / "01_train.ipynb")
    with pytest.raises(CellnbError, match=r"notebook .*02_inspect_validation.ipynb not found; pass --notebooks"):
        runner.check_parameters_cell(tmp_path / "02_inspect_validation.ipynb")


def test_unknown_kernel_lists_installed_ones():
    with pytest.raises(CellnbError, match=r"Jupyter kernel 'no_such_kernel' not found; installed kernels are \[.*'python3'"):
        runner.check_kernel("no_such_kernel")


@pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason=f"{SYSTEM_PYTHON}, a Python without TensorFlow, not found")
def test_kernel_without_tensorflow_rejected(tmp_path, monkeypatch):
    kernel = tmp_path / "kernels" / "bare"
    kernel.mkdir(parents=True)
    (kernel / "kernel.json").write_text(
        '{"argv": ["%s", "-m", "ipykernel_launcher", "-f", "{connection_file}"], '
        '"display_name": "bare", "language": "python"}' % SYSTEM_PYTHON
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))

    with pytest.raises(CellnbError, match=r"kernel 'bare' .* cannot import tensorflow and cellnb: .*No module named"):
        runner.check_kernel("bare")


def test_cellnb_run_stops_on_missing_kernel(tmp_path):
    completed = _cellnb("run", "--run-dir", str(tmp_path / "run"), "--kernel", "no_such_kernel")

    assert completed.returncode == 2
    assert completed.stderr.startswith("error: Jupyter kernel 'no_such_kernel' not found")
    assert "Traceback" not in completed.stderr


# --- after a run: a notebook that stopped early -----------------------------------------------


def _tiny_notebooks(folder, failing_source):
    folder.mkdir()
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    parameters_cell = nbformat.v4.new_code_cell('run_dir = "outputs/demo"')
    parameters_cell.metadata["tags"] = ["parameters"]
    notebook.cells = [parameters_cell, nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell(failing_source),
                      nbformat.v4.new_code_cell("print('after')")]
    nbformat.write(notebook, folder / "02_inspect_validation.ipynb")
    return folder


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("raise ValueError('deliberate')", "ValueError: deliberate"),
        ("import sys\nsys.exit(0)", "SystemExit: 0"),
        ("import sys\nsys.exit(3)", "SystemExit: 3"),
        ("%no_such_magic", "UsageError: Line magic function `%no_such_magic` not found"),
        ("%load_ext no_such_extension", "ModuleNotFoundError: No module named 'no_such_extension'"),
    ],
    ids=["exception", "sys_exit_0", "sys_exit_3", "missing_magic", "failed_magic_import"],
)
def test_stopped_notebook_is_failed(tmp_path, source, error):
    notebooks = _tiny_notebooks(tmp_path / "notebooks", source)
    run_dir = tmp_path / "run"

    with pytest.raises(runner.NotebookFailed) as raised:
        runner.run_notebooks(run_dir, {}, notebooks_dir=notebooks, names=("02_inspect_validation",), echo=lambda line: None)

    assert raised.value.notebook == "02_inspect_validation"
    assert source in raised.value.source
    assert error in raised.value.error
    report = (run_dir / "reports" / "02_inspect_validation.html").read_text()
    body = report.index("<body")
    assert body < report.index("This notebook FAILED") < report.index("jp-CodeCell", body)
    assert "FAILED" in (run_dir / "reports" / "index.html").read_text()


def test_unexecuted_cell_is_a_failure(tmp_path):
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("x = 1", execution_count=1), nbformat.v4.new_code_cell("y = 2")]
    path = tmp_path / "executed.ipynb"
    nbformat.write(notebook, path)

    failure = runner.find_failed_cell(path, "01_train")

    assert failure is not None
    assert failure.source == "y = 2"
    assert "never ran" in failure.error
    notebook.cells[1].execution_count = 2
    nbformat.write(notebook, path)
    assert runner.find_failed_cell(path, "01_train") is None


def test_cellnb_run_exits_1_on_sys_exit(tmp_path):
    notebooks = _tiny_notebooks(tmp_path / "notebooks", "import sys\nsys.exit(0)")
    for name in ("01_train", "03_explain_loss"):
        os.link(notebooks / "02_inspect_validation.ipynb", notebooks / f"{name}.ipynb")

    completed = _cellnb("run", "--run-dir", str(tmp_path / "run"), "--notebooks", str(notebooks))

    assert completed.returncode == 1
    assert "notebook 01_train failed at cell" in completed.stderr
    assert "SystemExit: 0" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert "This notebook FAILED" in (tmp_path / "run" / "reports" / "01_train.html").read_text()
