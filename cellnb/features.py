"""Compute a frozen backbone's features once per image and keep them in an on-disk cache.

While the backbone is frozen and no random augmentation is applied, the backbone maps an image
to the same features in every epoch, so the head can be trained on stored features instead.
This module splits a cellnb model at its ``pool`` layer into a feature extractor and a head,
computes the features of images not yet in the cache, and builds tf.data pipelines of
features. ``cache_unavailable_reason`` returns why a run cannot use the cache; this module does
not choose between the paths.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cellnb import data

logger = logging.getLogger(__name__)

FEATURE_LAYER = "pool"
# Bump when the stored arrays or the decoding of images change meaning, so old entries are not reused.
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """Return ``$XDG_CACHE_HOME/cellnb/features``, or ``~/.cache/cellnb/features`` without it."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cellnb" / "features"


def cache_unavailable_reason(params: dict) -> str | None:
    """Return why a run with these parameters must run the backbone every epoch, or None if it need not.

    cellnb applies no random augmentation, so only a backbone that changes during training
    rules the cache out.
    """
    if not params.get("feature_cache", True):
        return "the feature_cache parameter is off"
    if params["backbone"] == "small_cnn":
        return "the small_cnn backbone is trained from scratch, so its features change every step"
    if params["trainable_layers"] != 0:
        return (
            f"trainable_layers is {params['trainable_layers']}, so backbone layers are trained "
            f"and their features change every step"
        )
    return None


@dataclass
class FeatureStats:
    """Counts of one feature lookup: images passed through the backbone and images read from the cache."""

    computed: int
    reused: int
    backbone_batches: int
    cache_folder: Path


def split_model(model):
    """Split a cellnb model at its ``pool`` layer into ``(extractor, head, head_logits)``.

    The head is a new functional model over the same layer objects as ``model``, so training
    the head trains ``model`` and ``model`` needs no reassembly afterwards. ``head_logits``
    maps the same features to the ``logits`` layer's output, for the recorder.
    """
    import keras

    pool = model.get_layer(FEATURE_LAYER)
    extractor = keras.Model(model.inputs, pool.output, name="feature_extractor")

    position = model.layers.index(pool)
    features = keras.Input(shape=tuple(pool.output.shape[1:]), name="features")
    outputs, logits = features, None
    for layer in model.layers[position + 1:]:
        outputs = layer(outputs)
        if layer.name == "logits":
            logits = outputs
    head = keras.Model(features, outputs, name="head")
    head_logits = keras.Model(features, logits, name="head_logits")
    return extractor, head, head_logits


def model_key(extractor, *, backbone: str, image_size: int, preprocessing: str) -> str:
    """Return the cache key of a feature extractor: a hash of its weight values and its input recipe.

    Hashing the weight values themselves covers ImageNet weights, a local weights file and
    seeded random weights alike, at the cost of reading every weight once (about 60 MB for VGG16).
    """
    import keras
    import tensorflow as tf

    weights_digest = hashlib.sha256()
    for weight in extractor.weights:
        weights_digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    description = {
        "format": CACHE_FORMAT,
        "backbone": backbone,
        "weights_sha256": weights_digest.hexdigest(),
        "image_size": image_size,
        "preprocessing": preprocessing,
        "feature_shape": list(extractor.output.shape[1:]),
        "tensorflow": tf.__version__,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]


class FeatureCache:
    """Features of one extractor, stored as shards of ``sha256`` and ``features`` arrays.

    Entries are keyed by the sha256 of each image file's bytes, so a changed file gets a new
    entry and identical files share one. Each shard is written atomically and never modified.
    """

    def __init__(self, cache_dir: str | os.PathLike, key: str):
        self.folder = Path(cache_dir).expanduser() / key

    def load(self) -> dict[str, np.ndarray]:
        """Read every shard into a mapping from file sha256 to feature vector."""
        entries: dict[str, np.ndarray] = {}
        for shard in sorted(self.folder.glob("*.npz")):
            try:
                with np.load(shard, allow_pickle=False) as stored:
                    entries.update(zip(stored["sha256"].astype(str), stored["features"]))
            except (OSError, ValueError, KeyError) as error:
                logger.warning("ignoring unreadable feature cache shard %s: %s", shard, error)
        return entries

    def save(self, hashes: list[str], features: np.ndarray) -> None:
        """Write one new shard with these entries."""
        if not hashes:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256("".join(hashes).encode()).hexdigest()[:32]
        handle, temporary = tempfile.mkstemp(prefix=".shard.", suffix=".npz", dir=self.folder)
        try:
            with os.fdopen(handle, "wb") as stream:
                np.savez(stream, sha256=np.asarray(hashes, dtype=str), features=features.astype(np.float32))
            os.replace(temporary, self.folder / f"{name}.npz")
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def load_features(
    extractor,
    samples: pd.DataFrame,
    *,
    cache_dir: str | os.PathLike,
    backbone: str,
    image_size: int,
    preprocessing: str,
    batch_size: int,
) -> tuple[dict[str, np.ndarray], FeatureStats]:
    """Return the feature vector of every sample, by file sha256, computing only those not cached.

    ``samples`` needs the ``path`` and ``sha256`` columns of ``cellnb.data.Discovery.samples``.
    """
    from cellnb.model import get_preprocessing

    key = model_key(extractor, backbone=backbone, image_size=image_size, preprocessing=preprocessing)
    cache = FeatureCache(cache_dir, key)
    stored = cache.load()

    unique = samples.drop_duplicates("sha256")
    missing = unique[~unique["sha256"].isin(stored.keys())].reset_index(drop=True)
    batches = 0
    if len(missing):
        computed, batches = run_backbone(
            extractor, missing, image_size=image_size, batch_size=batch_size, preprocess=get_preprocessing(preprocessing)
        )
        cache.save(list(missing["sha256"]), computed)
        stored.update(zip(missing["sha256"], computed))

    stats = FeatureStats(computed=len(missing), reused=len(unique) - len(missing), backbone_batches=batches, cache_folder=cache.folder)
    logger.info(
        "backbone features: %d image(s) computed in %d batch(es), %d read from the cache in %s",
        stats.computed, stats.backbone_batches, stats.reused, cache.folder,
    )
    return {sha: stored[sha] for sha in unique["sha256"]}, stats


def run_backbone(extractor, samples: pd.DataFrame, *, image_size: int, batch_size: int, preprocess) -> tuple[np.ndarray, int]:
    """Pass the images through the extractor in inference mode; return features in row order and the batch count."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def forward(images):
        return extractor(images, training=False)

    dataset = data.make_dataset(samples, image_size=image_size, batch_size=batch_size, preprocess=preprocess)
    outputs, batches = [], 0
    for batch in dataset:
        outputs.append(forward(batch["image"]).numpy())
        batches += 1
    return np.concatenate(outputs).astype(np.float32), batches


def make_feature_dataset(samples: pd.DataFrame, features: dict[str, np.ndarray], *, batch_size: int, shuffle: bool = False, seed: int = 0):
    """Build a batched dataset of ``{"sample_id", "features", "label"}`` in the row order of ``samples``.

    With the same ``seed``, each epoch's shuffled order equals that of ``cellnb.data.make_dataset``
    over the same rows, because both draw it from the same row shuffler, which also honours
    ``data.shuffle_from_epoch`` when a run resumes.
    """
    import tensorflow as tf

    frame = samples.reset_index(drop=True)
    columns = {
        "sample_id": frame["sample_id"].astype(str).to_numpy(),
        "features": np.stack([features[sha] for sha in frame["sha256"]]).astype(np.float32),
        "label": frame["label"].astype(np.int32).to_numpy(),
    }
    if shuffle:
        # NOTE: this reuses a private helper of cellnb.data on purpose, because an equal order is
        # what makes the cached and the uncached runs agree; keep the two in step if it changes.
        dataset = data._shuffled_rows(columns, seed=seed, first=data._SHUFFLE_FIRST_EPOCH.get())
    else:
        dataset = tf.data.Dataset.from_tensor_slices(columns)
    return data.without_autotune(dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE))


def feature_inputs(dataset, *, head: str):
    """Map a feature dataset to ``(features, label)`` pairs in the label format the head needs."""
    import tensorflow as tf

    if head == "sigmoid1":
        return dataset.map(lambda batch: (batch["features"], tf.cast(tf.expand_dims(batch["label"], -1), tf.float32)))
    return dataset.map(lambda batch: (batch["features"], batch["label"]))
