"""The trajectory recorder: probabilities keyed by sample id, loss agreement, crash safety."""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import pytest

from cellnb import data, rundir
from cellnb.explain import cross_entropy
from cellnb.model import build_model, compile_model, get_preprocessing
from cellnb.recorder import TrajectoryRecorder


def _datasets(root, head="softmax2"):
    discovery = data.discover_samples(root)
    options = dict(image_size=16, batch_size=4, preprocess=get_preprocessing("rescale"))
    fit = data.model_inputs(data.make_dataset(discovery.split("train"), shuffle=True, **options), head=head)
    valid = data.make_dataset(discovery.split("valid"), **options)
    train = data.make_dataset(discovery.split("train"), **options)
    return discovery, fit, valid, train


def _model(head="softmax2"):
    keras.utils.set_random_seed(0)
    model = build_model(backbone="small_cnn", head=head, image_size=16, dropout=0.0)
    compile_model(model, head=head, learning_rate=3e-3)
    return model


@pytest.mark.parametrize("head", ["softmax2", "sigmoid1"])
def test_recorded_probabilities_match_predict_by_sample_id(split_tree, tmp_path, head):
    discovery, fit, valid, train = _datasets(split_tree, head)
    model = _model(head)
    recorder = TrajectoryRecorder(valid, tmp_path / "run", train_data=train)

    model.fit(fit, epochs=3, callbacks=[recorder], verbose=0)

    trajectories = rundir.read_trajectories(tmp_path / "run" / "trajectories.npz")
    assert list(trajectories.epochs) == [1, 2, 3]
    assert trajectories.probabilities.shape == (3, 6)
    assert trajectories.probabilities.dtype == np.float32
    valid_samples = discovery.split("valid").set_index("sample_id")
    for position, sample_id in enumerate(trajectories.sample_ids):
        image = data.load_image(valid_samples.loc[sample_id, "path"], 16)[None].astype("float32") / 255.0
        predicted = model.predict(image, verbose=0)[0]
        scored = predicted[1] if head == "softmax2" else predicted[0]
        assert trajectories.probabilities[-1, position] == pytest.approx(scored, abs=1e-5)
        assert trajectories.labels[position] == valid_samples.loc[sample_id, "label"]
    assert trajectories.train_probabilities.shape == (3, 12)


def test_recomputed_loss_equals_val_loss_and_keras_evaluate(split_tree, tmp_path):
    _, fit, valid, _ = _datasets(split_tree)
    model = _model()
    recorder = TrajectoryRecorder(valid, tmp_path / "run")

    model.fit(fit, epochs=4, callbacks=[recorder], verbose=0)

    history = pd.read_csv(tmp_path / "run" / "history.csv")
    trajectories = rundir.read_trajectories(tmp_path / "run" / "trajectories.npz")
    recomputed = cross_entropy(trajectories.probabilities, trajectories.labels).mean(axis=1)
    np.testing.assert_allclose(recomputed, history["val_loss"], rtol=1e-4)
    keras_loss, keras_accuracy = model.evaluate(data.model_inputs(valid, head="softmax2"), verbose=0)
    assert history["val_loss"].iloc[-1] == pytest.approx(keras_loss, rel=1e-4)
    assert history["val_accuracy"].iloc[-1] == pytest.approx(keras_accuracy, abs=1e-9)
    assert list(history.columns[:5]) == ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]


class _Crash(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == 3:
            raise RuntimeError("simulated crash after epoch 3 was recorded")


def test_files_stay_intact_after_a_crash(split_tree, tmp_path):
    _, fit, valid, _ = _datasets(split_tree)
    model = _model()
    run_dir = tmp_path / "run"
    rundir.write_json(run_dir / "config.json", {"classes": ["negative", "positive"], "data_dir": str(split_tree)})
    rundir.write_csv(run_dir / "samples.csv", pd.DataFrame(columns=rundir.SAMPLE_COLUMNS))

    with pytest.raises(RuntimeError, match="simulated crash"):
        model.fit(fit, epochs=6, callbacks=[TrajectoryRecorder(valid, run_dir), _Crash()], verbose=0)

    run = rundir.load_run(run_dir)
    assert list(run.history["epoch"]) == [1, 2, 3]
    assert run.trajectories.probabilities.shape == (3, 6)
    assert not list(run_dir.glob(".*tmp*"))


def test_tensorboard_sees_the_recorded_validation_metrics(split_tree, tmp_path):
    _, fit, valid, _ = _datasets(split_tree)
    model = _model()
    seen = {}

    class Spy(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.update(logs)

    board = keras.callbacks.TensorBoard(log_dir=str(tmp_path / "tb"), write_graph=False)
    model.fit(fit, epochs=1, callbacks=[TrajectoryRecorder(valid, tmp_path / "run"), Spy(), board], verbose=0)

    assert {"val_loss", "val_accuracy", "loss"} <= set(seen)
    assert list((tmp_path / "tb" / "validation").glob("events.out.tfevents.*"))
