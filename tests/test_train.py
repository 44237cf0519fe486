"""Training phases: the head on cached features, then fine-tuning, with continuous history and trajectories."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from cellnb import params, rundir, train
from cellnb.errors import ModelError


def _setup(data_dir, run_dir, cache_dir, resuming=False, **overrides):
    values = {
        "data_dir": str(data_dir), "run_dir": str(run_dir), "cache_dir": str(cache_dir), "backbone": "vgg16",
        "image_size": 32, "epochs": 2, "batch_size": 4, **overrides,
    }
    return train.prepare_run(params.check_parameters("01_train", values), resuming=resuming)


def _backbone(model):
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def test_two_phases_continue_history_and_trajectories(split_tree, tmp_path):
    setup = _setup(split_tree, tmp_path / "run", tmp_path / "cache", fine_tune_epochs=2, fine_tune_layers=4)
    model = train.build_for_run(setup)

    history = train.train(setup, model)

    assert list(history["epoch"]) == [1, 2, 3, 4]
    assert list(history["phase"]) == ["head", "head", "fine_tune", "fine_tune"]
    assert history[["loss", "val_loss"]].notna().all().all()
    saved = rundir.load_run(tmp_path / "run")
    assert list(saved.history["phase"]) == ["head", "head", "fine_tune", "fine_tune"]
    assert list(saved.trajectories.epochs) == [1, 2, 3, 4]
    assert saved.trajectories.probabilities.shape == (4, 6)
    assert saved.trajectories.train_probabilities.shape == (4, 12)
    assert setup.feature_stats.computed == 18


def test_fine_tuning_unfreezes_last_layers_only(split_tree, tmp_path):
    setup = _setup(split_tree, tmp_path / "run", tmp_path / "cache", epochs=1, fine_tune_epochs=1, fine_tune_layers=4)
    model = train.build_for_run(setup)
    before = [weight.numpy().copy() for weight in _backbone(model).weights]

    train.train(setup, model)

    backbone = _backbone(model)
    trainable = [layer.name for layer in backbone.layers if layer.trainable]
    assert trainable == ["block5_conv1", "block5_conv2", "block5_conv3", "block5_pool"]
    for old, new in zip(before, backbone.weights):
        changed = not np.array_equal(old, new.numpy())
        assert changed == new.path.startswith("block5_"), new.path
    assert model.optimizer.learning_rate.numpy() == pytest.approx(1e-5)


def test_fine_tuning_small_cnn_rejected(split_tree, tmp_path):
    setup = _setup(split_tree, tmp_path / "run", tmp_path / "cache", backbone="small_cnn", image_size=16, fine_tune_epochs=1)
    model = train.build_for_run(setup)

    with pytest.raises(ModelError, match="fine_tune_epochs applies to a pretrained backbone"):
        train.train(setup, model)


def test_resume_into_fine_tuning_phase(split_tree, tmp_path):
    first = _setup(split_tree, tmp_path / "run", tmp_path / "cache")
    model = train.build_for_run(first)
    history = train.train(first, model)
    previous = (rundir.read_trajectories(tmp_path / "run" / rundir.TRAJECTORIES_FILE), history)

    resumed = _setup(split_tree, tmp_path / "run", tmp_path / "cache", resuming=True, fine_tune_epochs=1)
    continued = train.train(resumed, model, initial_epoch=2, previous=previous)

    assert list(continued["epoch"]) == [1, 2, 3]
    assert list(continued["phase"]) == ["head", "head", "fine_tune"]
    assert resumed.feature_stats is None
    saved = rundir.read_trajectories(tmp_path / "run" / rundir.TRAJECTORIES_FILE)
    np.testing.assert_array_equal(saved.probabilities[:2], previous[0].probabilities)


def test_callbacks_see_full_model_on_cached_path(split_tree, tmp_path):
    setup = _setup(split_tree, tmp_path / "run", tmp_path / "cache", epochs=3)
    model = train.build_for_run(setup)
    seen = []

    class Spy(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append((epoch, self.model.name, logs["val_loss"]))

    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=0, min_delta=10.0)
    history = train.train(setup, model, callbacks=[Spy(), stopper])

    assert setup.feature_stats is not None
    assert [name for _, name, _ in seen] == [model.name] * len(seen)
    assert len(history) == 2  # min_delta 10 counts no epoch as an improvement, so epoch 2 stops the fit
    assert seen[0][2] == pytest.approx(history["val_loss"].iloc[0])


def test_head_only_phase_keeps_backbone_weights(split_tree, tmp_path):
    setup = _setup(split_tree, tmp_path / "run", tmp_path / "cache")
    model = train.build_for_run(setup)
    before = [weight.numpy().copy() for weight in _backbone(model).weights]
    head_before = model.get_layer("logits").kernel.numpy().copy()

    train.train(setup, model)

    for old, new in zip(before, _backbone(model).weights):
        np.testing.assert_array_equal(old, new.numpy())
    assert not np.array_equal(head_before, model.get_layer("logits").kernel.numpy())
    assert int(model.optimizer.iterations.numpy()) == 6  # 2 epochs of 3 batches: the full model's optimizer stepped


def _count_decodes(monkeypatch):
    from cellnb import data

    decoded = []
    original = data.load_image

    def counting(path, image_size):
        decoded.append(str(path))
        return original(path, image_size)

    monkeypatch.setattr(data, "load_image", counting)
    return decoded


@pytest.mark.parametrize("memory_mb, decodes", [(128, 18), (0, 3 * 30)])
def test_images_in_memory_decoded_once(split_tree, tmp_path, monkeypatch, memory_mb, decodes):
    """18 training and validation images; 3 epochs reading 12 + 6 + 12 (recorded training) each when streamed."""
    reference = _setup(split_tree, tmp_path / "reference", tmp_path / "cache", backbone="small_cnn", image_size=16,
                       epochs=3, image_memory_mb=0)
    expected = train.train(reference, train.build_for_run(reference))
    setup = _setup(split_tree, tmp_path / "run", tmp_path / "cache", backbone="small_cnn", image_size=16, epochs=3,
                   image_memory_mb=memory_mb)
    model = train.build_for_run(setup)

    decoded = _count_decodes(monkeypatch)
    history = train.train(setup, model)

    assert len(decoded) == decodes
    columns = ["loss", "accuracy", "val_loss", "val_accuracy"]
    np.testing.assert_allclose(history[columns].to_numpy(), expected[columns].to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(rundir.load_run(tmp_path / "run").trajectories.probabilities,
                               rundir.load_run(tmp_path / "reference").trajectories.probabilities, rtol=1e-6)


def test_image_memory_limit_respected(split_tree, tmp_path):
    small = _setup(split_tree, tmp_path / "small", tmp_path / "cache", backbone="small_cnn", image_size=64)
    assert train.images_in_memory(small.params, 18)
    assert "(0.2 MB) are decoded once and kept in memory (`image_memory_mb` is 128)" in train.describe_setup(small)

    large = dict(small.params, image_memory_mb=1)
    assert not train.images_in_memory(large, 500)  # 500 x 64 x 64 x 3 bytes = 6.1 MB
    assert train.images_in_memory(large, 80)  # 0.98 MB
    assert "exceed `image_memory_mb` (1)" in train.describe_image_memory(dict(large, image_size=1024), small.discovery)
    assert "is 0" in train.describe_image_memory(dict(small.params, image_memory_mb=0), small.discovery)

    frozen = _setup(split_tree, tmp_path / "frozen", tmp_path / "cache")
    assert "decoded once, for its backbone features" in train.describe_setup(frozen)
