"""Interrupted training: files stay consistent after SIGKILL, and resuming equals an uninterrupted run."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from cellnb import data, resume, rundir
from cellnb.errors import ModelError

from conftest import PROJECT_ROOT, write_split_tree

EPOCHS = 5
DRIVER = """
import sys
from cellnb import params, resume, train

mode, run_dir, data_dir = sys.argv[1:4]
if mode == "resume":
    resume.resume_training(run_dir)
else:
    config = params.check_parameters("01_train", {
        "data_dir": data_dir, "run_dir": run_dir, "image_size": 32, "batch_size": 8, "epochs": %d,
        "record_train": True, "dropout": 0.3, "seed": 3,
    })
    setup = train.prepare_run(config)
    model = train.build_for_run(setup)
    train.train(setup, model, callbacks=[resume.EpochCheckpoint(setup.run_dir)])
""" % EPOCHS


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_split_tree(root / "data", {"train": (8, 8), "valid": (4, 4)}, size=32)
    (root / "driver.py").write_text(DRIVER)
    reference = root / "reference"
    _driver(root, "fresh", reference).check_returncode()
    return root


def _driver(root, mode, run_dir, *, wait=True):
    command = [sys.executable, str(root / "driver.py"), mode, str(run_dir), str(root / "data")]
    if not wait:
        return subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)


def _kill_after_epoch(root, run_dir, epoch):
    process = _driver(root, "fresh", run_dir, wait=False)
    history = run_dir / rundir.HISTORY_FILE
    deadline = time.time() + 300
    try:
        while time.time() < deadline and process.poll() is None:
            if history.is_file() and len(pd.read_csv(history)) >= epoch:
                break
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_then_resume_matches_uninterrupted(workspace, seed):
    kill_epoch = random.Random(seed).randint(1, EPOCHS - 1)
    run_dir = workspace / f"killed_{seed}"

    _kill_after_epoch(workspace, run_dir, kill_epoch)

    history = pd.read_csv(run_dir / rundir.HISTORY_FILE)
    recorded = rundir.read_trajectories(run_dir / rundir.TRAJECTORIES_FILE)
    assert len(history) >= kill_epoch
    assert abs(len(recorded.epochs) - len(history)) <= 1
    point = resume.find_resume_point(run_dir)
    assert point.epoch >= kill_epoch - 1
    if point.epoch > 0:
        assert resume.load_checkpoint(point.checkpoint).optimizer.iterations.numpy() == point.epoch * 2

    completed = _driver(workspace, "resume", run_dir)
    assert completed.returncode == 0, completed.stderr[-3000:]

    reference = rundir.load_run(workspace / "reference")
    resumed = rundir.load_run(run_dir)
    assert list(resumed.trajectories.epochs) == list(range(1, EPOCHS + 1))
    np.testing.assert_allclose(resumed.trajectories.probabilities, reference.trajectories.probabilities, atol=1e-5)
    np.testing.assert_allclose(resumed.trajectories.train_probabilities, reference.trajectories.train_probabilities, atol=1e-5)
    np.testing.assert_allclose(resumed.history["val_loss"], reference.history["val_loss"], rtol=1e-5)
    np.testing.assert_allclose(resumed.history["loss"], reference.history["loss"], rtol=1e-4)
    assert (run_dir / rundir.MODEL_FILE).is_file()


def test_find_resume_point_takes_epoch_all_agree_on(tmp_path):
    probabilities = np.linspace(0.1, 0.9, 4 * 3, dtype=np.float32).reshape(4, 3)
    rundir.write_trajectories(tmp_path / rundir.TRAJECTORIES_FILE, rundir.Trajectories(
        epochs=np.arange(1, 5), sample_ids=np.asarray(["a", "b", "c"]), labels=np.asarray([0, 1, 1]),
        probabilities=probabilities))
    rundir.write_csv(tmp_path / rundir.HISTORY_FILE, pd.DataFrame({"epoch": [1, 2, 3], "val_loss": [0.5, 0.4, 0.3]}))
    (tmp_path / "checkpoints").mkdir()
    for epoch in (2, 3, 4):
        resume.checkpoint_path(tmp_path, epoch).write_bytes(b"")

    point = resume.find_resume_point(tmp_path)

    assert point.epoch == 3
    assert list(point.history["epoch"]) == [1, 2, 3]
    assert list(point.trajectories.epochs) == [1, 2, 3]
    np.testing.assert_array_equal(point.trajectories.probabilities, probabilities[:3])
    assert point.checkpoint.name == "epoch_0003.keras"
    resume.checkpoint_path(tmp_path, 3).unlink()
    assert resume.find_resume_point(tmp_path).epoch == 2


def test_find_resume_point_without_checkpoint_is_zero(tmp_path):
    rundir.write_csv(tmp_path / rundir.HISTORY_FILE, pd.DataFrame({"epoch": [1]}))

    assert resume.find_resume_point(tmp_path).epoch == 0


def test_shuffle_order_depends_on_seed_and_epoch(split_tree):
    samples = data.discover_samples(split_tree).split("train")

    def order(dataset):
        return [item.decode() for batch in dataset for item in batch["sample_id"].numpy()]

    fresh = data.make_dataset(samples, image_size=16, batch_size=5, shuffle=True, seed=7)
    passes = [order(fresh) for _ in range(3)]
    with data.shuffle_from_epoch(2):
        resumed = data.make_dataset(samples, image_size=16, batch_size=5, shuffle=True, seed=7)
    other_seed = data.make_dataset(samples, image_size=16, batch_size=5, shuffle=True, seed=8)

    assert order(resumed) == passes[2]
    assert passes[0] != passes[1]
    assert sorted(passes[0]) == sorted(samples["sample_id"])
    assert order(other_seed) != passes[0]
    assert list(data.shuffle_order(12, 7, 2)) == list(data.shuffle_order(12, 7, 2))


def test_load_model_rejects_lambda_layer(tmp_path):
    import keras

    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda values: values * 2.0)(inputs)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)

    with pytest.raises(ModelError, match=r"lambda.keras' was rejected because loading it would run stored Python code"):
        resume.load_model(path)


def test_load_model_reads_safe_model(tmp_path):
    import keras

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="logits")(inputs))
    path = tmp_path / "safe.keras"
    model.save(path)

    loaded = resume.load_model(path)

    np.testing.assert_allclose(loaded.get_layer("logits").get_weights()[0], model.get_layer("logits").get_weights()[0])
    with pytest.raises(ModelError, match="not found"):
        resume.load_model(tmp_path / "missing.keras")


@pytest.mark.slow
def test_cellnb_run_resume_finishes_and_runs_notebooks(workspace):
    run_dir = workspace / "cli_resume"
    _kill_after_epoch(workspace, run_dir, 2)

    refused = subprocess.run([sys.executable, "-m", "cellnb.cli", "run", "--run-dir", str(run_dir)],
                             capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300)
    completed = subprocess.run([sys.executable, "-m", "cellnb.cli", "run", "--resume", str(run_dir)],
                               capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=900)

    assert refused.returncode == 2
    assert "--resume" in refused.stderr
    assert completed.returncode == 0, completed.stdout + completed.stderr[-3000:]
    assert "\n  resuming after epoch" in completed.stdout
    assert re.search(r"\n  epoch \d+/", completed.stdout), completed.stdout
    assert len(pd.read_csv(run_dir / rundir.HISTORY_FILE)) == EPOCHS
    for name in ("02_inspect_validation", "03_explain_loss"):
        assert (run_dir / "reports" / f"{name}.html").is_file(), name
    assert json.loads((run_dir / rundir.PROGRESS_FILE).read_text())["epoch"] == EPOCHS
    index = (run_dir / "reports" / "index.html").read_text()
    training_row = index[index.index("<tr><td>01_train</td>"):]
    training_row = training_row[:training_row.index("</tr>")]
    resumed = re.search(r"resumed after epoch (\d+): epochs (\d+) to (\d+) were trained by cellnb run --resume", training_row)
    assert "not run" not in training_row
    assert resumed is not None, training_row
    assert int(resumed.group(1)) >= 1
    assert int(resumed.group(2)) == int(resumed.group(1)) + 1
    assert int(resumed.group(3)) == EPOCHS
    assert "the notebook left no report" in training_row
