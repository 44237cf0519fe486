"""Train a model on a data directory and write the run directory, in the steps notebook 01 shows.

``prepare_run`` finds the samples and writes ``config.json`` and ``samples.csv``;
``build_for_run`` builds and compiles the model; ``train`` fits it with the trajectory
recorder and saves ``model.keras``. While the backbone is frozen, ``train`` fits the head on
cached backbone features (``cellnb.features``); an optional second phase then fine-tunes the
top backbone layers. Inspection and explanation only read what these write.
"""

from __future__ import annotations

import logging
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

import cellnb
from cellnb import data, features, rundir
from cellnb import params as parameters
from cellnb.audit import check_setup
from cellnb.errors import ModelError, RunDirectoryError
from cellnb.model import PREPROCESSING, build_model, compile_model, get_preprocessing, resolve_preprocessing

logger = logging.getLogger(__name__)

SYNTHETIC_FOLDER = "data"


@dataclass
class RunSetup:
    """A resolved run: the checked parameters, where the data is, and the samples found there."""

    params: dict
    run_dir: Path
    data_dir: Path
    synthetic: bool
    discovery: data.Discovery
    preprocessing: str
    feature_stats: features.FeatureStats | None = field(default=None, repr=False)

    @property
    def classes(self) -> list[str]:
        return self.discovery.classes


def prepare_run(params: dict, *, resuming: bool = False) -> RunSetup:
    """Resolve the data directory (generating the built-in cells if none is given), find the samples
    and write ``config.json`` and ``samples.csv`` into the run directory.

    A run directory that already contains ``history.csv`` is rejected, so running notebook 01 again
    never mixes two runs in one folder, unless ``resuming`` continues that same run.
    """
    run_dir = Path(params["run_dir"]).expanduser().resolve()
    if (run_dir / rundir.HISTORY_FILE).exists() and not resuming:
        raise RunDirectoryError(
            f"run directory {str(run_dir)!r} already contains a trained run (history.csv); set run_dir to a new "
            f"folder, delete this one, or use `cellnb run --overwrite` or `cellnb run --resume`"
        )
    run_dir.mkdir(parents=True, exist_ok=True)

    synthetic = not params["data_dir"]
    data_dir = generate_default_data(run_dir, seed=params["seed"]) if synthetic else Path(params["data_dir"]).expanduser()
    discovery = data.discover_samples(
        data_dir,
        classes=params["classes"],
        split_fractions=params["split_fractions"],
        seed=params["seed"],
        skip_unreadable=params["skip_unreadable"],
    )
    preprocessing = resolve_preprocessing(params["backbone"], params["preprocessing"])
    setup = RunSetup(params, run_dir, discovery.data_dir, synthetic, discovery, preprocessing)

    rundir.write_json(run_dir / rundir.CONFIG_FILE, run_config(setup))
    rundir.write_csv(run_dir / rundir.SAMPLES_FILE, samples_table(discovery))
    if len(discovery.skipped):
        rundir.write_csv(run_dir / "skipped_files.csv", discovery.skipped)
    return setup


def generate_default_data(run_dir: Path, *, seed: int) -> Path:
    """Write the built-in synthetic cell images into ``RUN_DIR/data`` once, and reuse them after."""
    from cellnb.synth import generate_synthetic_cells

    target = run_dir / SYNTHETIC_FOLDER
    if (target / data.MANIFEST_NAME).is_file():
        logger.info("reusing the synthetic data already in %s", target)
        return target
    logger.info("generating the built-in synthetic cell images into %s", target)
    generate_synthetic_cells(target, seed=seed)
    return target


def run_config(setup: RunSetup) -> dict:
    import keras
    import tensorflow as tf

    return {
        **setup.params,
        "run_dir": str(setup.run_dir),
        "data_dir": str(setup.data_dir),
        "synthetic_data": setup.synthetic,
        "layout": setup.discovery.layout,
        "scored_class": setup.classes[1],
        "preprocessing_in_effect": setup.preprocessing,
        "preprocessing_description": PREPROCESSING[setup.preprocessing],
        "versions": {
            "cellnb": cellnb.__version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "python": platform.python_version(),
        },
        "platform": platform.platform(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def samples_table(discovery: data.Discovery) -> pd.DataFrame:
    """Return ``samples.csv``: the contract's columns first, then format and manifest extras."""
    frame = discovery.samples.drop(columns=["path"])
    extra = [column for column in frame.columns if column not in rundir.SAMPLE_COLUMNS]
    return frame[rundir.SAMPLE_COLUMNS + extra]


def build_for_run(setup: RunSetup):
    """Seed everything, then build and compile the model the parameters describe."""
    import keras
    import tensorflow as tf

    params = setup.params
    keras.utils.set_random_seed(params["seed"])
    tf.config.experimental.enable_op_determinism()
    model = build_model(
        backbone=params["backbone"],
        weights=params["weights"],
        head=params["head"],
        image_size=params["image_size"],
        trainable_layers=params["trainable_layers"],
        dropout=params["dropout"],
        seed=params["seed"],
    )
    compile_model(model, head=params["head"], learning_rate=params["learning_rate"], optimizer=params["optimizer"])
    label_format = "sparse" if params["head"] == "softmax2" else "binary"
    check_setup(model, loss=model.loss, label_format=label_format, raise_on_error=True)
    return model


def make_datasets(setup: RunSetup) -> dict:
    """Return the tf.data pipelines of a run: ``fit`` (shuffled, model inputs), ``valid`` and ``train`` (fixed order, with ids).

    When the decoded training and validation images fit in ``image_memory_mb``, they are
    decoded once here and every pipeline reads them from memory. Otherwise each pass decodes
    the files again, so memory stays bounded by the batch.
    """
    params = setup.params
    options = dict(image_size=params["image_size"], batch_size=params["batch_size"],
                   preprocess=get_preprocessing(setup.preprocessing))
    train_samples, valid_samples = setup.discovery.split("train"), setup.discovery.split("valid")
    train_images = valid_images = None
    count = len(train_samples) + len(valid_samples)
    if images_in_memory(params, count):
        import tensorflow as tf

        logger.info("keeping the %d decoded training and validation images in memory (%.1f MB)",
                    count, data.decoded_megabytes(count, params["image_size"]))
        # One tensor per split, shared by the pipelines that read it, so each image is held once.
        train_images = tf.convert_to_tensor(data.decode_images(train_samples, image_size=params["image_size"]))
        valid_images = tf.convert_to_tensor(data.decode_images(valid_samples, image_size=params["image_size"]))
    fit = data.make_dataset(train_samples, shuffle=True, seed=params["seed"], images=train_images, **options)
    return {
        "fit": data.model_inputs(fit, head=params["head"]),
        "valid": data.make_dataset(valid_samples, images=valid_images, **options),
        "train": data.make_dataset(train_samples, images=train_images, **options) if params["record_train"] else None,
    }


def images_in_memory(params: dict, count: int) -> bool:
    """Return whether ``count`` decoded images of the run's size fit in its ``image_memory_mb``."""
    limit = _image_memory_limit(params)
    return limit > 0 and data.decoded_megabytes(count, params["image_size"]) <= limit


def _image_memory_limit(params: dict) -> int:
    # A run directory written before the parameter existed resumes with its default.
    return params.get("image_memory_mb", parameters.declared("01_train")["image_memory_mb"].default)


PHASE_HEAD = "head"
PHASE_FINE_TUNE = "fine_tune"
PHASE_FULL = "full"


def train(
    setup: RunSetup,
    model,
    *,
    echo=None,
    verbose: int = 0,
    initial_epoch: int = 0,
    previous=None,
    callbacks=(),
) -> pd.DataFrame:
    """Fit the model for ``epochs`` plus ``fine_tune_epochs`` epochs, recording trajectories, and save ``model.keras``.

    The first phase trains what ``trainable_layers`` leaves trainable, on cached backbone
    features where the backbone is frozen (``phase`` ``head``). With ``fine_tune_epochs`` above
    0, a second phase (``fine_tune``) trains the last ``fine_tune_layers`` backbone layers too,
    at ``fine_tune_learning_rate``; epochs and trajectories continue across the phases.

    ``echo`` receives one progress line per epoch (the notebook passes ``print``). To continue
    an interrupted run, pass the number of finished epochs as ``initial_epoch`` and their
    ``(Trajectories, history DataFrame)`` as ``previous``. ``callbacks`` run after the recorder,
    so they see its ``val_loss``; their ``model`` is always the full model, also while the head
    alone is fitted. Returns the history table, which is also in ``history.csv``.
    """
    params = setup.params
    head_epochs = params["epochs"]
    fine_tune_epochs = params.get("fine_tune_epochs", 0)
    check_fine_tuning(params)

    if initial_epoch < head_epochs:
        previous = _train_first_phase(setup, model, echo=echo, verbose=verbose, initial_epoch=initial_epoch,
                                      previous=previous, callbacks=callbacks)
        initial_epoch = head_epochs
    if fine_tune_epochs > 0 and initial_epoch < head_epochs + fine_tune_epochs:
        unfreeze_top_layers(model, params.get("fine_tune_layers", 4))
        # NOTE: a fresh optimizer starts the phase, so a run resumed inside it loses the optimizer state.
        compile_model(model, head=params["head"], learning_rate=params.get("fine_tune_learning_rate", 1e-5),
                      optimizer=params["optimizer"])
        logger.info("fine-tuning the last %s backbone layers from epoch %d", params.get("fine_tune_layers", 4), initial_epoch + 1)
        previous = _fit_on_images(setup, model, phase=PHASE_FINE_TUNE, epochs=head_epochs + fine_tune_epochs, echo=echo,
                                  verbose=verbose, initial_epoch=initial_epoch, previous=previous, callbacks=callbacks)

    rundir.save_model(model, setup.run_dir / rundir.MODEL_FILE)
    return previous[1] if previous is not None else pd.DataFrame()


def check_fine_tuning(params: dict) -> None:
    """Raise ModelError if the fine-tuning parameters cannot apply to the chosen backbone."""
    if params.get("fine_tune_epochs", 0) == 0:
        return
    if params["backbone"] == "small_cnn":
        raise ModelError(
            "fine_tune_epochs applies to a pretrained backbone, but small_cnn is trained from scratch with all "
            "its layers already trainable; set fine_tune_epochs to 0 or choose backbone vgg16, mobilenet_v2 or resnet50"
        )
    if params.get("fine_tune_layers", 4) == 0:
        raise ModelError("fine_tune_layers is 0, so the fine-tuning phase would train nothing; use a positive count or -1 for all")


def first_phase(params: dict) -> str:
    """Return the name of the first phase: ``head``, ``fine_tune`` (backbone layers trainable) or ``full`` (small_cnn)."""
    if params["backbone"] == "small_cnn":
        return PHASE_FULL
    return PHASE_HEAD if params["trainable_layers"] == 0 else PHASE_FINE_TUNE


def _train_first_phase(setup: RunSetup, model, **options):
    reason = features.cache_unavailable_reason(setup.params)
    if reason is None:
        return _fit_on_features(setup, model, **options)
    logger.info("running the backbone on every image in every epoch, without the feature cache, because %s", reason)
    return _fit_on_images(setup, model, phase=first_phase(setup.params), epochs=setup.params["epochs"], **options)


def _fit_on_images(setup: RunSetup, model, *, phase, epochs, echo, verbose, initial_epoch, previous, callbacks):
    """Fit the full model on images up to epoch ``epochs``; return ``(Trajectories, history)``."""
    from cellnb.recorder import TrajectoryRecorder

    # Each epoch's shuffled order then depends on its absolute epoch, in either phase and after resuming.
    with data.shuffle_from_epoch(initial_epoch):
        datasets = make_datasets(setup)
    recorder = TrajectoryRecorder(datasets["valid"], setup.run_dir, train_data=datasets["train"], previous=previous,
                                  phase=phase)
    model.fit(datasets["fit"], epochs=epochs, initial_epoch=initial_epoch,
              callbacks=_callbacks(setup, recorder, initial_epoch, echo, callbacks), shuffle=False, verbose=verbose)
    return recorder.trajectories(), recorder.history()


def _fit_on_features(setup: RunSetup, model, *, echo, verbose, initial_epoch, previous, callbacks):
    """Fit the head alone on cached backbone features; the full model shares the head's layers."""
    from cellnb.recorder import FullModelCallback, TrajectoryRecorder

    params = setup.params
    extractor, head, head_logits = features.split_model(model)
    samples = setup.discovery.samples
    needed = samples[samples["split"].isin(["train", "valid"])]
    vectors, setup.feature_stats = features.load_features(
        extractor, needed, cache_dir=params.get("cache_dir") or features.default_cache_dir(),
        backbone=params["backbone"], image_size=params["image_size"], preprocessing=setup.preprocessing,
        batch_size=params["batch_size"],
    )

    options = dict(batch_size=params["batch_size"])
    train_samples = setup.discovery.split("train")
    with data.shuffle_from_epoch(initial_epoch):
        fit = features.make_feature_dataset(train_samples, vectors, shuffle=True, seed=params["seed"], **options)
    valid = features.make_feature_dataset(setup.discovery.split("valid"), vectors, **options)
    train_data = features.make_feature_dataset(train_samples, vectors, **options) if params["record_train"] else None

    # The head shares the full model's optimizer, and so its state, which a checkpoint of the full model saves.
    if model.optimizer is not None:
        head.compile(optimizer=model.optimizer, loss=model.loss, metrics=["accuracy"])
    else:
        compile_model(head, head=params["head"], learning_rate=params["learning_rate"], optimizer=params["optimizer"])
    # A step of the head alone is so small that Python's per-step overhead would dominate it. So one
    # compiled call runs a whole epoch, and per-batch callbacks run once per epoch.
    head.steps_per_execution = max(1, math.ceil(len(train_samples) / params["batch_size"]))
    recorder = TrajectoryRecorder(valid, setup.run_dir, train_data=train_data, previous=previous, input_key="features",
                                  phase=PHASE_HEAD, scorer=head_logits)
    wrapped = [FullModelCallback(callback, model) for callback in callbacks]
    head.fit(features.feature_inputs(fit, head=params["head"]), epochs=params["epochs"], initial_epoch=initial_epoch,
             callbacks=_callbacks(setup, recorder, initial_epoch, echo, wrapped), shuffle=False, verbose=verbose)
    return recorder.trajectories(), recorder.history()


def _callbacks(setup: RunSetup, recorder, initial_epoch: int, echo, extra) -> list:
    import keras

    from cellnb.recorder import ProgressFile

    total = setup.params["epochs"] + setup.params.get("fine_tune_epochs", 0)
    return [
        recorder,
        ProgressFile(setup.run_dir, epochs=total, initial_epoch=initial_epoch, echo=echo),
        keras.callbacks.TensorBoard(log_dir=str(setup.run_dir / "tensorboard"), write_graph=False),
        *extra,
    ]


def unfreeze_top_layers(model, count: int) -> None:
    """Make the last ``count`` layers of the model's backbone trainable (-1: all of them).

    ``build_model`` calls a frozen backbone with ``training=False``, so its BatchNormalization
    layers stay in inference mode after unfreezing, as the Keras transfer-learning guide advises.
    A backbone built with ``trainable_layers`` other than 0 is called with ``training=None``
    instead, and its BatchNormalization layers then update their statistics while training.
    """
    import keras

    backbones = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(backbones) != 1:
        raise ModelError(f"expected one nested backbone model to unfreeze, found {len(backbones)}; fine-tuning needs a pretrained backbone")
    backbone = backbones[0]
    backbone.trainable = True
    if count != -1:
        for layer in backbone.layers[:-count]:
            layer.trainable = False


def describe_setup(setup: RunSetup) -> str:
    """Return a Markdown summary of the data and the preprocessing in effect, for the notebook."""
    params = setup.params
    source = "the built-in synthetic cells" if setup.synthetic else f"`{setup.data_dir}`"
    lines = [
        f"- data: {source} ({setup.discovery.layout.replace('_', ' ')} layout), "
        f"{len(setup.discovery.samples)} readable images, {len(setup.discovery.skipped)} skipped",
        f"- classes: index 0 = `{setup.classes[0]}`, index 1 = `{setup.classes[1]}` (the scored class)",
        f"- model: backbone `{params['backbone']}`, weights `{params['weights']}`, head `{params['head']}`, "
        f"images resized to {params['image_size']}x{params['image_size']}",
        f"- preprocessing in effect: `{setup.preprocessing}`: {PREPROCESSING[setup.preprocessing]}",
        f"- training: {params['epochs']} epochs, batch size {params['batch_size']}, "
        f"{params['optimizer']} with learning rate {params['learning_rate']}, seed {params['seed']}",
        f"- {describe_feature_cache(params)}",
        f"- {describe_image_memory(params, setup.discovery)}",
    ]
    if params.get("fine_tune_epochs", 0) > 0:
        layers = "all backbone layers" if params["fine_tune_layers"] == -1 else f"the last {params['fine_tune_layers']} backbone layers"
        lines.append(
            f"- fine-tuning: then {params['fine_tune_epochs']} more epochs training {layers} too, "
            f"with learning rate {params['fine_tune_learning_rate']} (phase `fine_tune` in `history.csv`)"
        )
    return "\n".join(lines)


def describe_feature_cache(params: dict) -> str:
    """Return one Markdown line on whether the head trains on cached backbone features, and why not."""
    reason = features.cache_unavailable_reason(params)
    if reason is None:
        folder = params.get("cache_dir") or features.default_cache_dir()
        return (f"feature cache: on; the frozen backbone runs once per image, its features are kept in `{folder}` "
                f"and the head trains on them (phase `head` in `history.csv`)")
    return f"feature cache: off, the backbone runs on every image in every epoch, because {reason}"


def describe_image_memory(params: dict, discovery: data.Discovery) -> str:
    """Return one Markdown line on whether the decoded images are held in memory between epochs."""
    if features.cache_unavailable_reason(params) is None and params.get("fine_tune_epochs", 0) == 0:
        return "decoded images: each image is decoded once, for its backbone features, and none is kept in memory"
    count = int(discovery.samples["split"].isin(["train", "valid"]).sum())
    size = data.decoded_megabytes(count, params["image_size"])
    limit = _image_memory_limit(params)
    if images_in_memory(params, count):
        return (f"decoded images: the {count} training and validation images ({size:.1f} MB) are decoded once and "
                f"kept in memory (`image_memory_mb` is {limit})")
    if limit == 0:
        return "decoded images: decoded from disk in every pass, because `image_memory_mb` is 0"
    return (f"decoded images: decoded from disk in every pass, because the {count} training and validation images "
            f"({size:.1f} MB) exceed `image_memory_mb` ({limit})")


def describe_skipped(setup: RunSetup) -> str:
    """Return a Markdown sentence on skipped and ignored files, for the notebook."""
    skipped, ignored = setup.discovery.skipped, setup.discovery.ignored
    lines = [
        f"{len(skipped)} file(s) were left out, each listed below with the reason: a file that could not be "
        f"decoded, or a row of `{data.MANIFEST_NAME}` whose file is not in the class folders."
        if len(skipped) else "No file was skipped: every file in the class folders decoded as an image."
    ]
    if ignored:
        shown = ", ".join(f"`{name}`" for name in ignored[:20])
        more = f" and {len(ignored) - 20} more" if len(ignored) > 20 else ""
        lines.append(f"Ignored hidden or system entries: {shown}{more}.")
    return "\n\n".join(lines)
