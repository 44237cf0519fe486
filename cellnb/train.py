"""Train a model on a data directory and write the run directory, in the steps notebook 01 shows.

``prepare_run`` finds the samples and writes ``config.json`` and ``samples.csv``;
``build_for_run`` builds and compiles the model; ``train`` fits it with the trajectory
recorder and saves ``model.keras``. Inspection and explanation only read what these write.
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

import cellnb
from cellnb import data, rundir
from cellnb.audit import check_setup
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

    @property
    def classes(self) -> list[str]:
        return self.discovery.classes


def prepare_run(params: dict) -> RunSetup:
    """Resolve the data directory (generating the built-in cells if none is given), find the samples
    and write ``config.json`` and ``samples.csv`` into the run directory."""
    run_dir = Path(params["run_dir"]).expanduser().resolve()
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
    """Return the tf.data pipelines of a run: ``fit`` (shuffled, model inputs), ``valid`` and ``train`` (fixed order, with ids)."""
    params = setup.params
    options = dict(image_size=params["image_size"], batch_size=params["batch_size"],
                   preprocess=get_preprocessing(setup.preprocessing))
    train_samples = setup.discovery.split("train")
    fit = data.make_dataset(train_samples, shuffle=True, seed=params["seed"], **options)
    return {
        "fit": data.model_inputs(fit, head=params["head"]),
        "valid": data.make_dataset(setup.discovery.split("valid"), **options),
        "train": data.make_dataset(train_samples, **options) if params["record_train"] else None,
    }


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
    """Fit the model up to ``epochs`` epochs, recording trajectories, and save ``model.keras``.

    ``echo`` receives one progress line per epoch (the notebook passes ``print``). To continue
    an interrupted run, pass the number of finished epochs as ``initial_epoch`` and their
    ``(Trajectories, history DataFrame)`` as ``previous``. ``callbacks`` run after the recorder,
    so they see its ``val_loss``. Returns the history table, which is also in ``history.csv``.
    """
    import keras

    from cellnb.recorder import ProgressFile, TrajectoryRecorder

    params = setup.params
    datasets = make_datasets(setup)
    recorder = TrajectoryRecorder(datasets["valid"], setup.run_dir, train_data=datasets["train"], previous=previous)
    all_callbacks = [
        recorder,
        ProgressFile(setup.run_dir, epochs=params["epochs"], initial_epoch=initial_epoch, echo=echo),
        keras.callbacks.TensorBoard(log_dir=str(setup.run_dir / "tensorboard"), write_graph=False),
        *callbacks,
    ]
    model.fit(datasets["fit"], epochs=params["epochs"], initial_epoch=initial_epoch, callbacks=all_callbacks,
              shuffle=False, verbose=verbose)
    save_model(model, setup.run_dir / rundir.MODEL_FILE)
    return recorder.history()


def save_model(model, path: Path) -> None:
    """Save a Keras model atomically: into a temporary ``.keras`` file beside it, then rename."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".keras", dir=path.parent)
    os.close(handle)
    try:
        model.save(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


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
    ]
    return "\n".join(lines)



def describe_skipped(setup: RunSetup) -> str:
    """Return a Markdown sentence on skipped and ignored files, for the notebook."""
    skipped, ignored = setup.discovery.skipped, setup.discovery.ignored
    lines = [
        f"{len(skipped)} file(s) could not be decoded and were left out (listed below)."
        if len(skipped) else "No file was skipped: every file in the class folders decoded as an image."
    ]
    if ignored:
        shown = ", ".join(f"`{name}`" for name in ignored[:20])
        more = f" and {len(ignored) - 20} more" if len(ignored) > 20 else ""
        lines.append(f"Ignored hidden or system entries: {shown}{more}.")
    return "\n\n".join(lines)
