"""The cellnb command: parameter handling, run directory refusal, and end-to-end runs through papermill."""

from __future__ import annotations

import json
import subprocess
import sys

import nbformat
import pandas as pd
import pytest

from cellnb import cli
from cellnb.errors import ParameterError, RunDirectoryError

from conftest import PCAM_DIR, PROJECT_ROOT

FAST = ["-p", "epochs", "2", "-p", "image_size", "32", "-p", "batch_size", "8"]


def test_collect_parameters_types_values():
    values = cli.collect_parameters([["epochs", "8"], ["skip_unreadable", "false"], ["classes", "normal,tumor"]], None)

    assert values == {"epochs": 8, "skip_unreadable": False, "classes": ["normal", "tumor"]}


def test_collect_parameters_rejects_wrong_type():
    with pytest.raises(ParameterError, match=r"parameter 'epochs' received 'many' \(str\); expected int"):
        cli.collect_parameters([["epochs", "many"]], None)


def test_collect_parameters_rejects_unknown_name():
    with pytest.raises(ParameterError, match=r"unknown parameter 'epoch'; did you mean 'epochs'\? The valid parameters are \["):
        cli.collect_parameters([["epoch", "3"]], None)
    with pytest.raises(ParameterError, match=r"unknown parameter 'lr'; valid parameters are \["):
        cli.collect_parameters([["lr", "0.1"]], None)


def test_parameters_file_unknown_name_suggests(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("epochs: 5\nlearning_rat: 0.01\n")

    with pytest.raises(ParameterError, match=r"unknown parameter 'learning_rat' in '.*params.yaml'; "
                                             r"did you mean 'learning_rate'\? The valid parameters are \["):
        cli.collect_parameters([], str(path))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--data-dir", "{a}", "-p", "data_dir", "{b}"],
         "--data-dir '{a}' and -p data_dir '{b}' name different folders; give the folder once, with --data-dir or with -p data_dir"),
        (["--data-dir", "{a}", "-f", "{yaml}"],
         "--data-dir '{a}' and data_dir from '{yaml}' '{b}' name different folders; give the folder once, with "
         "--data-dir or in the file"),
        (["--run-dir", "{a}", "-p", "run_dir", "{b}", "-p", "epochs", "1"],
         "--run-dir '{a}' and -p run_dir '{b}' name different folders; give the folder once, with --run-dir or with -p run_dir"),
        (["--resume", "{a}", "-p", "run_dir", "{b}"],
         "--resume '{a}' and -p run_dir '{b}' name different run directories; give the run directory once, with --resume"),
        (["--name", "trial", "--run-dir", "{a}"],
         "--name 'trial' chooses the run directory outputs/trial, but --run-dir '{a}' chooses another; give only one of them"),
        (["--name", "trial", "-p", "run_dir", "{a}"],
         "--name 'trial' chooses the run directory outputs/trial, but -p run_dir '{a}' chooses another"),
        (["--resume", "{a}", "--name", "trial"],
         "--resume continues with the training parameters in the run's config.json, so --name cannot be changed"),
    ],
    ids=["data_dir_from_p", "data_dir_from_file", "run_dir_from_p", "resume_and_run_dir", "name_and_run_dir",
         "name_and_run_dir_parameter", "resume_and_name"],
)
def test_run_rejects_option_and_parameter_that_differ(tmp_path, capsys, arguments, message):
    names = {"a": str(tmp_path / "a"), "b": str(tmp_path / "b"), "yaml": str(tmp_path / "params.yaml")}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "params.yaml").write_text(f"data_dir: {names['b']}\n")

    status = cli.main(["run", *[argument.format(**names) for argument in arguments]])

    error = capsys.readouterr().err
    assert status == 2
    assert error.startswith("error: " + message.format(**names))
    assert not (tmp_path / "a" / "notebooks").exists()


def test_parameters_file_type_error_names_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("image_memory_mb: -5\n")

    with pytest.raises(ParameterError) as raised:
        cli.collect_parameters([], str(path))

    assert str(raised.value).startswith(f"in parameters file '{path}': ")
    assert "image_memory_mb" in str(raised.value)


def test_run_checks_folders_given_with_p(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "history.csv").write_text("epoch\n1\n")
    missing = tmp_path / "missing"

    data_status = cli.main(["run", "-p", "data_dir", str(missing), "--kernel", "no-such-kernel"])
    data_error = capsys.readouterr().err
    run_status = cli.main(["run", "-p", "run_dir", str(finished), "--kernel", "no-such-kernel"])
    run_error = capsys.readouterr().err

    assert data_status == 2
    assert data_error.startswith(f"error: -p data_dir '{missing}' not found; pass the folder that contains your images")
    assert run_status == 2
    assert run_error.startswith(f"error: run directory '{finished}' already contains a run")


def test_parameters_file_is_checked_and_p_wins(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("epochs: 5\nlearning_rate: 0.01\nhead: sigmoid1\n")

    values = cli.collect_parameters([["epochs", "9"]], str(path))

    assert values == {"epochs": 9, "learning_rate": 0.01, "head": "sigmoid1"}
    path.write_text("epochs: five\n")
    with pytest.raises(ParameterError, match="parameter 'epochs' received 'five'"):
        cli.collect_parameters([], str(path))


def test_run_dir_with_a_finished_run_is_refused(tmp_path):
    (tmp_path / "history.csv").write_text("epoch\n1\n")

    with pytest.raises(RunDirectoryError, match="already contains a run; pass --overwrite"):
        cli.prepare_run_dir(tmp_path, overwrite=False)
    cli.prepare_run_dir(tmp_path, overwrite=True)
    assert not (tmp_path / "history.csv").exists()


def test_cli_prints_error_without_traceback(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "cellnb.cli", "run", "--run-dir", str(tmp_path / "r"), "-p", "epochs", "zero"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120,
    )

    assert completed.returncode == 2
    assert "error: parameter 'epochs' received 'zero' (str); expected int" in completed.stderr
    assert "Traceback" not in completed.stderr


def _run(arguments, cwd, timeout=900):
    return subprocess.run([sys.executable, "-m", "cellnb.cli", "run", *arguments], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def _assert_run_directory(run_dir):
    for name in ("config.json", "samples.csv", "history.csv", "trajectories.npz", "model.keras"):
        assert (run_dir / name).is_file(), name
    for name in ("01_train", "02_inspect_validation", "03_explain_loss"):
        notebook = nbformat.read(run_dir / "notebooks" / f"{name}.ipynb", as_version=4)
        errors = [output for cell in notebook.cells if cell.cell_type == "code"
                  for output in cell.get("outputs", []) if output.get("output_type") == "error"]
        assert errors == [], name
        report = (run_dir / "reports" / f"{name}.html").read_text()
        assert "data:image/png;base64," in report, name
    index = (run_dir / "reports" / "index.html").read_text()
    assert 'href="01_train.html"' in index
    assert "minimum validation loss" in index


@pytest.mark.slow
def test_run_end_to_end_on_tiny_synthetic(tiny_synthetic, tmp_path):
    run_dir = tmp_path / "run"

    completed = _run(["--data-dir", str(tiny_synthetic), "--run-dir", str(run_dir), *FAST], PROJECT_ROOT)

    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "epoch 2/2" in completed.stdout
    _assert_run_directory(run_dir)
    samples = pd.read_csv(run_dir / "samples.csv")
    assert samples.groupby("split").size().to_dict() == {"test": 6, "train": 32, "valid": 12}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["epochs"] == 2
    assert config["scored_class"] == "positive"
    assert set(config["versions"]) == {"cellnb", "tensorflow", "keras", "python"}
    assert len(pd.read_csv(run_dir / "history.csv")) == 2

    again = _run(["--data-dir", str(tiny_synthetic), "--run-dir", str(run_dir), *FAST], PROJECT_ROOT)
    assert again.returncode == 2
    assert "already contains a run" in again.stderr


@pytest.mark.slow
def test_failing_notebook_exits_nonzero_and_names_the_cell(tiny_synthetic, tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    for path in (PROJECT_ROOT / "notebooks").glob("*.ipynb"):
        notebook = nbformat.read(path, as_version=4)
        if path.stem == "02_inspect_validation":
            notebook.cells.append(nbformat.v4.new_code_cell("raise ValueError('deliberate failure for the test')"))
        nbformat.write(notebook, notebooks / path.name)
    run_dir = tmp_path / "run"

    completed = _run(["--data-dir", str(tiny_synthetic), "--run-dir", str(run_dir), "--notebooks", str(notebooks), *FAST],
                     PROJECT_ROOT)

    assert completed.returncode == 1
    assert "notebook 02_inspect_validation failed at cell" in completed.stderr
    assert "raise ValueError('deliberate failure for the test')" in completed.stderr
    assert "ValueError: deliberate failure for the test" in completed.stderr
    assert "This notebook FAILED" in (run_dir / "reports" / "02_inspect_validation.html").read_text()
    assert not (run_dir / "notebooks" / "03_explain_loss.ipynb").exists()


@pytest.mark.slow
@pytest.mark.skipif(not PCAM_DIR.is_dir(), reason=f"real PCam patches not found at {PCAM_DIR}")
def test_run_on_real_pcam_patches_counts_match_manifest(tmp_path):
    run_dir = tmp_path / "pcam"

    completed = _run(["--data-dir", str(PCAM_DIR), "--run-dir", str(run_dir), "-p", "epochs", "2", "-p", "image_size", "48"],
                     PROJECT_ROOT)

    assert completed.returncode == 0, completed.stdout + completed.stderr
    _assert_run_directory(run_dir)
    manifest = pd.read_csv(PCAM_DIR / "manifest.csv")
    samples = pd.read_csv(run_dir / "samples.csv")
    expected = manifest.groupby(["source_split", "label"]).size().to_dict()
    assert samples.groupby(["split", "label_name"]).size().rename(index={"valid": "valid"}).to_dict() == expected
    assert samples.groupby("split").size().to_dict() == {"train": 800, "valid": 200, "test": 200}


def test_synth_command_writes_the_default_layout(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "cellnb.cli", "synth", str(tmp_path / "cells"), "--image-size", "16"],
                               capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)

    assert completed.returncode == 0, completed.stderr
    assert "wrote 514 images" in completed.stdout
    assert len(list((tmp_path / "cells" / "valid" / "positive").glob("*.png"))) == 26
    again = subprocess.run([sys.executable, "-m", "cellnb.cli", "synth", str(tmp_path / "cells")],
                           capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)
    assert again.returncode == 2
    assert again.stderr.startswith("error: ")
    assert "Traceback" not in again.stderr


@pytest.mark.slow
def test_run_lists_corrupt_hidden_and_misnamed_files(tiny_synthetic, tmp_path):
    import shutil

    data_dir = tmp_path / "data"
    shutil.copytree(tiny_synthetic, data_dir)
    (data_dir / "train" / "negative" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    checkpoint = data_dir / "valid" / "positive" / ".ipynb_checkpoints"
    checkpoint.mkdir()
    shutil.copy(next((data_dir / "valid" / "positive").glob("*.png")), checkpoint / "copy-checkpoint.png")
    shutil.move(next((data_dir / "train" / "positive").glob("*.png")), data_dir / "train" / "positive" / "really_a_png.jpg")
    run_dir = tmp_path / "run"

    completed = _run(["--data-dir", str(data_dir), "--run-dir", str(run_dir), *FAST], PROJECT_ROOT)

    assert completed.returncode == 0, completed.stdout + completed.stderr
    training_report = (run_dir / "reports" / "01_train.html").read_text()
    assert "train/negative/corrupt.png" in training_report
    assert "not an image that Pillow can identify" in training_report
    assert "valid/positive/.ipynb_checkpoints/" in training_report
    audit_report = (run_dir / "reports" / "02_inspect_validation.html").read_text()
    assert "train/negative/corrupt.png" in audit_report
    assert "really_a_png.jpg" in audit_report
    assert ".ipynb_checkpoints" in audit_report
    samples = pd.read_csv(run_dir / "samples.csv")
    assert "train/positive/really_a_png.jpg" in set(samples["sample_id"])
    assert "train/negative/corrupt.png" not in set(samples["sample_id"])


def test_run_rejects_values_that_would_fail_after_training(tmp_path):
    for arguments, message in [
        (["-p", "epochs", "1"], "cellnb run explains the change of the validation loss between two epochs"),
        (["-p", "weights", str(tmp_path / "absent.h5")], "neither 'imagenet', None nor an existing file"),
        (["--data-dir", str(tmp_path / "file.txt")], "is a file; pass the folder that contains your images"),
    ]:
        (tmp_path / "file.txt").write_text("x")
        completed = _run([*arguments, "--run-dir", str(tmp_path / "run")], PROJECT_ROOT, timeout=120)
        assert completed.returncode == 2, arguments
        assert message in completed.stderr, completed.stderr
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["epoch_from", "epoch_to"])
def test_run_rejects_comparison_epoch_beyond_training(tmp_path, capsys, name):
    status = cli.main(["run", "--run-dir", str(tmp_path / "run"), "-p", "epochs", "2", "-p", "fine_tune_epochs", "0",
                       "-p", name, "5"])

    error = capsys.readouterr().err
    assert status == 2
    assert error.startswith(f"error: parameter '{name}' received 5, but the run trains 2 epochs; "
                            f"choose an epoch from 1 to 2, or 0 for the default")
    assert not (tmp_path / "run").exists()


def test_run_rejects_fine_tuning_of_small_cnn(tmp_path, capsys):
    status = cli.main(["run", "--run-dir", str(tmp_path / "run"), "-p", "backbone", "small_cnn",
                       "-p", "fine_tune_epochs", "2"])

    error = capsys.readouterr().err
    assert status == 2
    assert error.startswith("error: fine_tune_epochs applies to a pretrained backbone, but small_cnn")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["", ".", "..", "../elsewhere", "a/b", "/tmp/x", "a\\b", " ", "~", ".hidden", "two\nlines"])
def test_run_rejects_invalid_name(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)

    status = cli.main(["run", "--name", name])

    error = capsys.readouterr().err
    assert status == 2
    assert error.startswith(f"error: --name {name!r} is not a plain folder name")
    assert not (tmp_path / "outputs").exists()


def test_overwrite_keeps_data_folder_inside_run_dir(split_tree, tmp_path, capsys):
    run_dir = tmp_path / "project"
    data_dir = run_dir / "mydata"
    run_dir.mkdir()
    split_tree.rename(data_dir)
    (run_dir / "config.json").write_text("{}")

    status = cli.main(["run", "--run-dir", str(run_dir), "--data-dir", str(data_dir), "--overwrite",
                       "-p", "epochs", "2", "-p", "image_size", "16"])

    error = capsys.readouterr().err
    assert status == 2
    assert f"--overwrite would empty the run directory {str(run_dir)!r}, which contains the data of" in error
    assert (data_dir / "train").is_dir()
    assert (run_dir / "config.json").is_file()


def test_overwrite_keeps_images_linked_from_run_dir(split_tree, tmp_path, capsys):
    # The data root lies outside the run directory, but its split folders are links into it.
    run_dir = tmp_path / "project"
    run_dir.mkdir()
    split_tree.rename(run_dir / "images")
    (run_dir / "config.json").write_text("{}")
    linked = tmp_path / "linked"
    linked.mkdir()
    for split in ("train", "valid", "test"):
        (linked / split).symlink_to(run_dir / "images" / split)

    status = cli.main(["run", "--run-dir", str(run_dir), "--data-dir", str(linked), "--overwrite",
                       "-p", "epochs", "2", "-p", "image_size", "16"])

    error = capsys.readouterr().err
    assert status == 2
    assert "--overwrite would empty the run directory" in error
    assert len(list((run_dir / "images" / "train").rglob("*.png"))) == 12


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["-p", "epoch_from", "3", "-p", "epoch_to", "2"], "received 3, which is not earlier than epoch_to 2; choose"),
        (["-p", "epoch_from", "4"], "received 4, which is not earlier than epoch_to 4 (the last epoch); choose"),
    ],
)
def test_run_rejects_comparison_epochs_out_of_order(tmp_path, capsys, arguments, message):
    status = cli.main(["run", "--run-dir", str(tmp_path / "run"), "-p", "epochs", "4", "-p", "fine_tune_epochs", "0",
                       *arguments])

    error = capsys.readouterr().err
    assert status == 2
    assert error.startswith(f"error: parameter 'epoch_from' {message}")
    assert not (tmp_path / "run").exists()


def test_resume_rejects_comparison_epoch_beyond_training(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"epochs": 4, "fine_tune_epochs": 1}))

    status = cli.main(["run", "--resume", str(tmp_path), "-p", "epoch_from", "500"])

    error = capsys.readouterr().err
    assert status == 2
    assert error.startswith("error: parameter 'epoch_from' received 500, but the run trains 5 epochs")
    assert not (tmp_path / "notebooks").exists()


def test_notebook_training_rejects_a_finished_run_directory(split_tree, tmp_path):
    from cellnb import params, train

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "history.csv").write_text("epoch,loss\n1,0.5\n")
    values = params.check_parameters("01_train", {"data_dir": str(split_tree), "run_dir": str(run_dir)})

    with pytest.raises(RunDirectoryError, match="already contains a trained run"):
        train.prepare_run(values)
    assert (run_dir / "history.csv").read_text() == "epoch,loss\n1,0.5\n"


def _interrupt_after_epoch(arguments: list[str], run_dir, epoch: int) -> tuple[int, str, str]:
    """Start ``cellnb ARGUMENTS``, send it SIGINT once progress.json reaches ``epoch``; return its status and output."""
    import signal
    import time

    process = subprocess.Popen([sys.executable, "-m", "cellnb.cli", *arguments],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=PROJECT_ROOT)
    progress_path = run_dir / "progress.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        progress = json.loads(progress_path.read_text()) if progress_path.exists() else {}
        if progress.get("epoch", 0) >= epoch:
            break
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout, stderr


@pytest.mark.slow
def test_ctrl_c_stops_training_and_keeps_finished_epochs(tiny_synthetic, tmp_path):
    run_dir = tmp_path / "run"
    status, stdout, stderr = _interrupt_after_epoch(
        ["run", "--data-dir", str(tiny_synthetic), "--run-dir", str(run_dir),
         "-p", "epochs", "200", "-p", "image_size", "32", "-p", "batch_size", "8"], run_dir, 2)

    assert status == 130, stdout + stderr
    assert "training stops after the current epoch" in stdout
    assert f"continue with `cellnb run --resume {run_dir}`" in stderr
    assert "stopped 01_train.ipynb in" in stdout
    history = pd.read_csv(run_dir / "history.csv")
    assert 2 <= len(history) < 200
    assert (run_dir / "model.keras").is_file()
    assert not (run_dir / "notebooks" / "02_inspect_validation.ipynb").exists()
    assert not (run_dir / "stop_requested").exists()
    assert "Traceback" not in stderr
    index = (run_dir / "reports" / "index.html").read_text()
    assert f"stopped by Ctrl-C after epoch {len(history)} of 200; continue with cellnb run --resume {run_dir}" in index
    assert json.loads((run_dir / "progress.json").read_text())["state"] == "stopped"
    assert f"not run: skipped after Ctrl-C; run it with cellnb run --resume {run_dir}" in index

    # A Ctrl-C during --resume stops after an epoch in the same way.
    stopped_after = len(history)
    status, stdout, stderr = _interrupt_after_epoch(["run", "--resume", str(run_dir)], run_dir, stopped_after + 2)

    assert status == 130, stdout + stderr
    assert "training stops after the current epoch" in stdout
    assert f"continue with `cellnb run --resume {run_dir}`" in stderr
    history = pd.read_csv(run_dir / "history.csv")
    assert stopped_after + 2 <= len(history) < 200
    assert list(history["epoch"]) == list(range(1, len(history) + 1))
    assert json.loads((run_dir / "progress.json").read_text())["state"] == "stopped"
    index = (run_dir / "reports" / "index.html").read_text()
    assert f"stopped by Ctrl-C after epoch {len(history)} of 200; continue with cellnb run --resume {run_dir}" in index
    assert "Traceback" not in stderr
