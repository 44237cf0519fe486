"""Model building: heads, backbones, preprocessing, weights from a local file, and the refusals."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from cellnb import model as cellnb_model
from cellnb.errors import ModelError


@pytest.mark.parametrize(("head", "units"), [("softmax2", 2), ("sigmoid1", 1)])
def test_build_model_heads(head, units):
    model = cellnb_model.build_model(backbone="small_cnn", head=head, image_size=32)

    outputs = model.predict(np.zeros((3, 32, 32, 3), dtype="float32"), verbose=0)

    assert outputs.shape == (3, units)
    assert model.get_layer("logits").units == units
    if head == "softmax2":
        np.testing.assert_allclose(outputs.sum(axis=1), 1.0, rtol=1e-6)


def test_softmax_with_one_unit_is_rejected():
    with pytest.raises(ModelError, match="1-unit softmax.*use 'sigmoid1'"):
        cellnb_model.build_model(head="softmax1", image_size=32)


def test_unknown_backbone_lists_valid_ones():
    with pytest.raises(ModelError, match=r"unknown backbone 'vgg19'; valid backbones are \['mobilenet_v2', 'resnet50', 'small_cnn', 'vgg16'\]"):
        cellnb_model.build_model(backbone="vgg19")


def test_unknown_head_lists_valid_ones():
    with pytest.raises(ModelError, match=r"valid heads are \['sigmoid1', 'softmax2'\]"):
        cellnb_model.build_model(head="softmax3", image_size=32)


def test_preprocessing_follows_backbone_unless_overridden():
    assert cellnb_model.resolve_preprocessing("vgg16") == "vgg16"
    assert cellnb_model.resolve_preprocessing("small_cnn") == "rescale"
    assert cellnb_model.resolve_preprocessing("vgg16", "rescale") == "rescale"
    with pytest.raises(ModelError, match="unknown preprocessing 'bgr'"):
        cellnb_model.resolve_preprocessing("vgg16", "bgr")


def test_vgg16_preprocessing_is_keras_caffe_mode():
    images = np.full((1, 2, 2, 3), 100.0, dtype="float32")
    images[..., 0] = 200.0

    encoded = np.asarray(cellnb_model.get_preprocessing("vgg16")(images.copy()))

    # keras.applications.vgg16 flips RGB to BGR and subtracts the ImageNet means (103.939, 116.779, 123.68).
    np.testing.assert_allclose(encoded[0, 0, 0], [100 - 103.939, 100 - 116.779, 200 - 123.68], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(cellnb_model.get_preprocessing("rescale")(images))[0, 0, 0], [200 / 255, 100 / 255, 100 / 255], rtol=1e-6)


def test_vgg16_loads_weights_from_a_local_file(tmp_path):
    donor = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "vgg16_notop.weights.h5"
    donor.save_weights(path)

    model = cellnb_model.build_model(backbone="vgg16", weights=str(path), image_size=32)

    loaded = model.get_layer("vgg16").get_layer("block5_conv3").get_weights()[0]
    np.testing.assert_array_equal(loaded, donor.get_layer("block5_conv3").get_weights()[0])
    assert not model.get_layer("vgg16").trainable


def test_missing_weights_file_raises_with_fix(tmp_path):
    with pytest.raises(ModelError, match=r"neither 'imagenet', None nor an existing file"):
        cellnb_model.build_model(backbone="vgg16", weights=str(tmp_path / "absent.h5"), image_size=32)


def test_imagenet_offline_says_how_to_pass_a_file(monkeypatch):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: no network")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    monkeypatch.setattr("keras.src.applications.vgg16.file_utils.get_file", offline)

    with pytest.raises(ModelError, match=r"could not load ImageNet weights for vgg16.*weights=PATH"):
        cellnb_model.build_model(backbone="vgg16", weights="imagenet", image_size=32)


def test_trainable_layers_unfreezes_the_last_layers():
    model = cellnb_model.build_model(backbone="vgg16", image_size=32, trainable_layers=4)  # 3 convolutions + the pool

    base = model.get_layer("vgg16")
    trainable = [layer.name for layer in base.layers if layer.trainable and layer.weights]

    assert trainable == ["block5_conv1", "block5_conv2", "block5_conv3"]


def test_mobilenet_v2_builds_with_its_own_preprocessing():
    model = cellnb_model.build_model(backbone="mobilenet_v2", image_size=32)

    assert model.output_shape == (None, 2)
    assert cellnb_model.resolve_preprocessing("mobilenet_v2") == "mobilenet_v2"
