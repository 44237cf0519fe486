"""Build a binary classifier: a backbone (pretrained or small, trained from scratch) plus a head.

The head ends in a Dense layer named ``logits`` followed by an Activation layer, so the recorder
can read log-odds for temperature scaling. Input preprocessing is applied in the input pipeline,
not inside the model; ``get_preprocessing`` returns the function for a backbone or an override.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cellnb.errors import ModelError

logger = logging.getLogger(__name__)

HEADS = {
    "softmax2": {"units": 2, "activation": "softmax"},
    "sigmoid1": {"units": 1, "activation": "sigmoid"},
}
PREPROCESSING = {
    "vgg16": "caffe: RGB to BGR, then ImageNet channel means subtracted, no scaling (keras.applications.vgg16.preprocess_input)",
    "mobilenet_v2": "tf: scaled to [-1, 1] (keras.applications.mobilenet_v2.preprocess_input)",
    "resnet50": "caffe: RGB to BGR, then ImageNet channel means subtracted (keras.applications.resnet50.preprocess_input)",
    "rescale": "scaled to [0, 1] by 1/255, as in many tutorials",
    "none": "raw RGB values in [0, 255]",
}


@dataclass(frozen=True)
class Backbone:
    """A feature extractor choice: how to build it and which preprocessing its weights expect."""

    name: str
    preprocessing: str
    pretrained: bool
    min_image_size: int
    description: str


BACKBONES = {
    "small_cnn": Backbone("small_cnn", "rescale", False, 16, "three convolution blocks and a dense layer, trained from scratch; fast on a CPU"),
    "vgg16": Backbone("vgg16", "vgg16", True, 32, "keras.applications.VGG16, 13 convolution layers"),
    "mobilenet_v2": Backbone("mobilenet_v2", "mobilenet_v2", True, 32, "keras.applications.MobileNetV2, light"),
    "resnet50": Backbone("resnet50", "resnet50", True, 32, "keras.applications.ResNet50"),
}


def get_backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise ModelError(f"unknown backbone {name!r}; valid backbones are {sorted(BACKBONES)}")
    return BACKBONES[name]


def resolve_preprocessing(backbone: str, preprocessing: str = "auto") -> str:
    """Return the preprocessing name in effect: the backbone's own for ``auto``, else the override."""
    if preprocessing in (None, "", "auto"):
        return get_backbone(backbone).preprocessing
    if preprocessing not in PREPROCESSING:
        raise ModelError(f"unknown preprocessing {preprocessing!r}; valid choices are {['auto', *PREPROCESSING]}")
    return preprocessing


def get_preprocessing(name: str):
    """Return a function mapping float32 RGB batches in 0-255 to the named encoding."""
    import keras

    functions = {
        "vgg16": keras.applications.vgg16.preprocess_input,
        "mobilenet_v2": keras.applications.mobilenet_v2.preprocess_input,
        "resnet50": keras.applications.resnet50.preprocess_input,
        "rescale": lambda images: images / 255.0,
        "none": lambda images: images,
    }
    if name not in functions:
        raise ModelError(f"unknown preprocessing {name!r}; valid choices are {sorted(functions)}")
    return functions[name]


def build_model(
    *,
    backbone: str = "small_cnn",
    weights: str | os.PathLike | None = None,
    head: str = "softmax2",
    image_size: int = 96,
    trainable_layers: int = 0,
    dropout: float = 0.2,
    seed: int = 0,
):
    """Build an uncompiled Keras model ``backbone -> pooling -> dropout -> head``.

    Parameters
    ----------
    backbone : str
        One of ``BACKBONES``. ``small_cnn`` is trained from scratch and ignores ``weights``.
    weights : "imagenet", None or a path
        Pretrained weights of a ``keras.applications`` backbone: ``"imagenet"`` downloads them
        once into ``~/.keras/models``; a path loads a local weights file of the backbone without
        its top (``include_top=False``); None starts from random weights.
    head : str
        ``softmax2`` (2 units, softmax) or ``sigmoid1`` (1 unit, sigmoid).
    trainable_layers : int
        How many of the backbone's last layers are trained; 0 freezes a pretrained backbone
        entirely, -1 trains all of it.
    """
    import keras

    spec = get_backbone(backbone)
    head_spec = _check_head(head)
    if not isinstance(image_size, int) or image_size < spec.min_image_size:
        raise ModelError(f"image_size {image_size!r} is too small for {backbone}; use an integer of at least {spec.min_image_size}")

    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    if spec.name == "small_cnn":
        features = _small_cnn(inputs, seed)
    else:
        base = _pretrained_backbone(spec, weights, image_size)
        _set_trainable(base, trainable_layers)
        features = base(inputs, training=False if trainable_layers == 0 else None)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(features) if len(features.shape) == 4 else features
    if dropout > 0:
        x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(x)
    logits = keras.layers.Dense(
        head_spec["units"], kernel_initializer=keras.initializers.GlorotUniform(seed=seed), name="logits"
    )(x)
    outputs = keras.layers.Activation(head_spec["activation"], name="probabilities")(logits)
    return keras.Model(inputs, outputs, name=f"{backbone}_{head}")


def _check_head(head: str) -> dict:
    if head == "softmax1":
        raise ModelError(
            "head 'softmax1' is a 1-unit softmax, which always outputs 1.0 and cannot learn; "
            "use 'sigmoid1' for one unit or 'softmax2' for two"
        )
    if head not in HEADS:
        raise ModelError(f"unknown head {head!r}; valid heads are {sorted(HEADS)}")
    return HEADS[head]


def _small_cnn(inputs, seed: int):
    """Three convolution blocks, then flatten and a dense layer: enough capacity to memorize a
    few hundred images, which is what makes the overfitting of a small study visible."""
    import keras

    x = inputs
    for block, filters in enumerate((32, 64, 128), start=1):
        x = keras.layers.Conv2D(
            filters, 3, padding="same", activation="relu",
            kernel_initializer=keras.initializers.HeUniform(seed=seed + block), name=f"block{block}_conv",
        )(x)
        x = keras.layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    return keras.layers.Dense(
        64, activation="relu", kernel_initializer=keras.initializers.HeUniform(seed=seed + 4), name="features"
    )(x)


def _pretrained_backbone(spec: Backbone, weights, image_size: int):
    import keras

    constructors = {
        "vgg16": keras.applications.VGG16,
        "mobilenet_v2": keras.applications.MobileNetV2,
        "resnet50": keras.applications.ResNet50,
    }
    source = _check_weights(weights, spec)
    try:
        return constructors[spec.name](include_top=False, weights=source, input_shape=(image_size, image_size, 3))
    except Exception as error:
        if source == "imagenet":
            raise ModelError(
                f"could not load ImageNet weights for {spec.name}: {error}. Without internet access, download "
                f"the {spec.name} 'notop' weights file on a connected machine and pass its path as weights=PATH "
                f"(or copy it into ~/.keras/models/), or use weights=None to start from random weights"
            ) from error
        if isinstance(source, str):
            raise ModelError(
                f"weights file {source!r} does not fit {spec.name} without its top at image_size {image_size}: {error}; "
                f"pass a file saved from the {spec.name} backbone built with include_top=False"
            ) from error
        raise


def _check_weights(weights, spec: Backbone):
    if weights in (None, "", "none", "None"):
        return None
    if weights == "imagenet":
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelError(
            f"weights {str(weights)!r} is neither 'imagenet', None nor an existing file; "
            f"pass the path of a {spec.name} weights file (.h5 or .weights.h5)"
        )
    return str(path)


def _set_trainable(base, trainable_layers: int) -> None:
    if trainable_layers == -1:
        base.trainable = True
        return
    if trainable_layers < 0:
        raise ModelError(f"trainable_layers {trainable_layers} is invalid; use 0 (frozen), a positive count, or -1 (all)")
    base.trainable = trainable_layers > 0
    if trainable_layers > 0:
        for layer in base.layers[:-trainable_layers]:
            layer.trainable = False


def compile_model(model, *, head: str, learning_rate: float, optimizer: str = "adam") -> None:
    """Compile with the loss that fits the head: sparse categorical or binary cross-entropy."""
    import keras

    optimizers = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD, "rmsprop": keras.optimizers.RMSprop}
    if optimizer not in optimizers:
        raise ModelError(f"unknown optimizer {optimizer!r}; valid optimizers are {sorted(optimizers)}")
    loss = "sparse_categorical_crossentropy" if head == "softmax2" else "binary_crossentropy"
    model.compile(optimizer=optimizers[optimizer](learning_rate=learning_rate), loss=loss, metrics=["accuracy"])


def logits_model(model):
    """Return a model that maps the same inputs to the ``logits`` layer's output."""
    import keras

    return keras.Model(model.inputs, model.get_layer("logits").output)
