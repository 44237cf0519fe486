"""The feature cache: same results as the full path, no backbone pass on a second run, fallbacks."""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from cellnb import data, features, params, rundir, train
from cellnb.model import build_model, get_preprocessing

from conftest import write_image


def _setup(data_dir, run_dir, cache_dir, **overrides):
    values = {
        "data_dir": str(data_dir), "run_dir": str(run_dir), "cache_dir": str(cache_dir), "backbone": "vgg16",
        "image_size": 32, "epochs": 3, "batch_size": 4, "dropout": 0.5, **overrides,
    }
    return train.prepare_run(params.check_parameters("01_train", values))


def _run(data_dir, run_dir, cache_dir, **overrides):
    setup = _setup(data_dir, run_dir, cache_dir, **overrides)
    model = train.build_for_run(setup)
    history = train.train(setup, model)
    return setup, model, history


@pytest.fixture
def count_backbone_batches(monkeypatch):
    """Count the batches that pass through the backbone to compute features."""
    calls = []
    original = features.run_backbone

    def counting(extractor, samples, **options):
        result = original(extractor, samples, **options)
        calls.append(result[1])
        return result

    monkeypatch.setattr(features, "run_backbone", counting)
    return calls


def test_cached_and_uncached_runs_agree(split_tree, tmp_path):
    cached_setup, _, cached = _run(split_tree, tmp_path / "cached", tmp_path / "cache")
    full_setup, _, full = _run(split_tree, tmp_path / "full", tmp_path / "cache", feature_cache=False)

    assert cached_setup.feature_stats.computed == 18
    assert full_setup.feature_stats is None
    for column in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(cached[column], full[column], rtol=1e-4, atol=1e-6, err_msg=column)
    assert list(cached["phase"]) == ["head"] * 3
    assert list(full["phase"]) == ["head"] * 3
    cached_trajectories = rundir.read_trajectories(tmp_path / "cached" / rundir.TRAJECTORIES_FILE)
    full_trajectories = rundir.read_trajectories(tmp_path / "full" / rundir.TRAJECTORIES_FILE)
    assert list(cached_trajectories.sample_ids) == list(full_trajectories.sample_ids)
    np.testing.assert_allclose(cached_trajectories.probabilities, full_trajectories.probabilities, atol=1e-5)
    np.testing.assert_allclose(cached_trajectories.train_probabilities, full_trajectories.train_probabilities, atol=1e-5)


def test_second_run_skips_backbone(split_tree, tmp_path, count_backbone_batches):
    first, _, _ = _run(split_tree, tmp_path / "first", tmp_path / "cache", epochs=1)
    second, _, _ = _run(split_tree, tmp_path / "second", tmp_path / "cache", epochs=1)

    assert count_backbone_batches == [5]
    assert first.feature_stats.computed == 18
    assert second.feature_stats.computed == 0
    assert second.feature_stats.reused == 18
    assert second.feature_stats.backbone_batches == 0


def test_changed_file_recomputed_alone(split_tree, tmp_path, count_backbone_batches):
    _run(split_tree, tmp_path / "first", tmp_path / "cache", epochs=1)
    write_image(split_tree / "valid" / "positive" / "img_000.png", seed=999, size=24, bright=True)

    second, _, _ = _run(split_tree, tmp_path / "second", tmp_path / "cache", epochs=1)

    assert second.feature_stats.computed == 1
    assert second.feature_stats.reused == 17
    assert count_backbone_batches == [5, 1]


def test_cache_stays_outside_run_dir(split_tree, tmp_path):
    setup, _, _ = _run(split_tree, tmp_path / "run", tmp_path / "cache", epochs=1)

    assert setup.feature_stats.cache_folder.parent == tmp_path / "cache"
    assert list((tmp_path / "cache").rglob("*.npz"))
    assert [path.name for path in (tmp_path / "run").rglob("*.npz")] == [rundir.TRAJECTORIES_FILE]


def test_model_keras_predicts_recorded_probabilities(split_tree, tmp_path):
    setup, _, _ = _run(split_tree, tmp_path / "run", tmp_path / "cache", epochs=2)

    saved = keras.models.load_model(tmp_path / "run" / rundir.MODEL_FILE)
    trajectories = rundir.read_trajectories(tmp_path / "run" / rundir.TRAJECTORIES_FILE)
    valid = setup.discovery.split("valid").set_index("sample_id")
    images = np.stack([data.load_image(valid.loc[sample_id, "path"], 32) for sample_id in trajectories.sample_ids])
    predicted = saved.predict(get_preprocessing("vgg16")(images.astype("float32")), verbose=0)[:, 1]

    assert saved.input_shape == (None, 32, 32, 3)
    np.testing.assert_allclose(predicted, trajectories.probabilities[-1], atol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"trainable_layers": 2}, "trainable_layers is 2"),
        ({"backbone": "small_cnn"}, "small_cnn backbone is trained from scratch"),
    ],
)
def test_fallback_says_why(split_tree, tmp_path, caplog, count_backbone_batches, overrides, reason):
    caplog.set_level(logging.INFO, logger="cellnb.train")

    setup, _, history = _run(split_tree, tmp_path / "run", tmp_path / "cache", epochs=1, **overrides)

    assert setup.feature_stats is None
    assert count_backbone_batches == []
    assert not (tmp_path / "cache").exists()
    assert reason in caplog.text
    assert "without the feature cache" in caplog.text
    assert "feature cache: off, the backbone runs on every image in every epoch, because" in train.describe_setup(setup)
    assert reason in train.describe_setup(setup)
    assert list(history["phase"]) == [train.first_phase(setup.params)]


def test_describe_setup_names_cache_folder(split_tree, tmp_path):
    setup = _setup(split_tree, tmp_path / "run", tmp_path / "cache")

    description = train.describe_setup(setup)

    assert "feature cache: on" in description
    assert str(tmp_path / "cache") in description


def test_model_key_depends_on_weights_and_size():
    def key(seed, image_size=32, preprocessing="vgg16"):
        keras.utils.set_random_seed(seed)
        model = build_model(backbone="vgg16", image_size=image_size, seed=seed)
        extractor, _, _ = features.split_model(model)
        return features.model_key(extractor, backbone="vgg16", image_size=image_size, preprocessing=preprocessing)

    assert key(0) == key(0)
    assert key(0) != key(1)
    assert key(0) != key(0, image_size=48)
    assert key(0) != key(0, preprocessing="rescale")


def test_unreadable_cache_shard_is_ignored(tmp_path, caplog):
    cache = features.FeatureCache(tmp_path, "key")
    cache.save(["a" * 64], np.ones((1, 3), dtype=np.float32))
    (cache.folder / "broken.npz").write_bytes(b"not a zip file")

    with caplog.at_level(logging.WARNING, logger="cellnb.features"):
        entries = cache.load()

    assert list(entries) == ["a" * 64]
    np.testing.assert_array_equal(entries["a" * 64], np.ones(3, dtype=np.float32))
    assert "broken.npz" in caplog.text


def test_feature_dataset_shuffles_like_image_dataset(split_tree):
    discovery = data.discover_samples(split_tree)
    samples = discovery.split("train")
    vectors = {sha: np.zeros(2, dtype=np.float32) for sha in samples["sha256"]}
    images = data.make_dataset(samples, image_size=16, batch_size=4, shuffle=True, seed=3)
    cached = features.make_feature_dataset(samples, vectors, batch_size=4, shuffle=True, seed=3)

    for _ in range(2):  # two epochs: the reshuffled order must match too
        image_order = np.concatenate([batch["sample_id"].numpy() for batch in images])
        feature_order = np.concatenate([batch["sample_id"].numpy() for batch in cached])
        assert list(image_order) == list(feature_order)


def test_every_training_dataset_runs_without_autotune(split_tree):
    # tf.data's autotuning thread can stall an iterator's destruction for seconds (see
    # data.without_autotune), and Keras destroys one iterator per epoch.
    samples = data.discover_samples(split_tree).split("train")
    vectors = {sha: np.zeros(2, dtype=np.float32) for sha in samples["sha256"]}
    decoded = data.decode_images(samples, image_size=16)
    datasets = {
        "from files": data.make_dataset(samples, image_size=16, batch_size=4, shuffle=True),
        "from memory": data.make_dataset(samples, image_size=16, batch_size=4, images=decoded),
        "features": features.make_feature_dataset(samples, vectors, batch_size=4, shuffle=True),
    }
    datasets["model inputs"] = data.model_inputs(datasets["from files"], head="softmax2")
    datasets["feature inputs"] = features.feature_inputs(datasets["features"], head="sigmoid1")

    autotune = {name: dataset.options().autotune.enabled for name, dataset in datasets.items()}

    assert autotune == dict.fromkeys(datasets, False)
    assert tf.data.Dataset.range(3).options().autotune.enabled is None  # the default, for contrast
