"""Continue an interrupted training run from its last finished epoch, and load saved models safely.

``EpochCheckpoint`` saves the model with its optimizer state after every epoch, next to the
recorder's ``history.csv`` and ``trajectories.npz``. ``resume_training`` finds the last epoch
that all three agree on, cuts the other files back to it and fits the remaining epochs. It does
not rerun notebook 01: ``cellnb run --resume`` runs notebooks 02 and 03 afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cellnb import rundir
from cellnb.errors import ModelError, RunDirectoryError

logger = logging.getLogger(__name__)

CHECKPOINT_FOLDER = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^epoch_(\d+)\.keras$")

try:  # a callback must subclass the real Keras base class
    import keras

    _Callback = keras.callbacks.Callback
except ImportError:  # pragma: no cover - keras is a hard dependency
    _Callback = object


def checkpoint_path(run_dir: str | os.PathLike, epoch: int) -> Path:
    """Return ``RUN_DIR/checkpoints/epoch_NNNN.keras``, the checkpoint after ``epoch`` (1-based)."""
    return Path(run_dir) / CHECKPOINT_FOLDER / f"epoch_{epoch:04d}.keras"


def checkpoint_epochs(run_dir: str | os.PathLike) -> list[int]:
    """Return the epochs that have a checkpoint in the run directory, in increasing order."""
    folder = Path(run_dir) / CHECKPOINT_FOLDER
    if not folder.is_dir():
        return []
    matches = (CHECKPOINT_PATTERN.match(path.name) for path in folder.iterdir())
    return sorted(int(match.group(1)) for match in matches if match)


class EpochCheckpoint(_Callback):
    """Save the model and its optimizer state after each epoch as ``checkpoints/epoch_NNNN.keras``.

    The epoch is part of the file name, and each file is written beside its final name and then
    renamed, so a killed process leaves only complete checkpoints. The ``keep`` most recent ones
    are kept: the last epoch may be newer than ``history.csv`` if the kill fell between the
    writes, and resuming then needs the one before it.

    Keras 3 (checked with the version TensorFlow 2.21 installs) does not restore the state of
    seed generators, which draw dropout's random masks, when it loads a ``.keras`` file. So those
    states go to ``epoch_NNNN.seeds.json``, written before the model file, and
    ``load_checkpoint`` puts them back.

    Example:
        ``train.train(setup, model, callbacks=[EpochCheckpoint(setup.run_dir)])``
    """

    def __init__(self, run_dir: str | os.PathLike, *, keep: int = 2):
        super().__init__()
        if keep < 1:
            raise ValueError(f"keep must be at least 1; got {keep}")
        self.run_dir = Path(run_dir)
        self.keep = keep

    def on_epoch_end(self, epoch, logs=None):
        target = checkpoint_path(self.run_dir, epoch + 1)
        target.parent.mkdir(parents=True, exist_ok=True)
        rundir.write_json(_seeds_path(target), {"seed_generator_states": _seed_states(self.model)})
        rundir.save_model(self.model, target)
        for old in checkpoint_epochs(self.run_dir)[: -self.keep]:
            checkpoint_path(self.run_dir, old).unlink(missing_ok=True)
            _seeds_path(checkpoint_path(self.run_dir, old)).unlink(missing_ok=True)


def _seeds_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name.replace(".keras", ".seeds.json"))


def _seed_variables(model) -> list:
    return [variable for variable in model.variables if variable.path.endswith("seed_generator_state")]


def _seed_states(model) -> list[list[int]]:
    return [[int(value) for value in variable.numpy()] for variable in _seed_variables(model)]


def load_checkpoint(path: str | os.PathLike):
    """Load a checkpoint written by ``EpochCheckpoint`` safely, with its seed generator states."""
    path = Path(path)
    model = load_model(path)
    seeds = _seeds_path(path)
    if not seeds.is_file():
        logger.warning("%s not found; dropout masks after resuming will differ from an uninterrupted run", seeds)
        return model
    states = json.loads(seeds.read_text(encoding="utf-8"))["seed_generator_states"]
    variables = _seed_variables(model)
    if len(states) != len(variables):
        raise RunDirectoryError(
            f"{seeds} contains {len(states)} seed generator states but the model in {path} has {len(variables)}; "
            f"the checkpoint files do not belong together, start the run again with --overwrite"
        )
    for variable, state in zip(variables, states):
        variable.assign(np.asarray(state, dtype=variable.dtype))
    return model


def load_model(path: str | os.PathLike):
    """Load a ``.keras`` model with Keras' safe mode on, so no stored Python code is executed.

    Raises ModelError when the file is missing, is not a Keras model, or needs unsafe
    deserialization, such as a ``Lambda`` layer with stored bytecode. The message gives Keras' reason.
    """
    import keras

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {str(path)!r} not found")
    try:
        return keras.saving.load_model(path, safe_mode=True)
    except ValueError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "safe_mode" in str(error) or "unsafe" in str(error).lower():
            raise ModelError(
                f"model file {str(path)!r} was rejected because loading it would run stored Python code: {reason}. "
                f"Load it with keras.saving.load_model(path, safe_mode=False) only if you trust its source"
            ) from error
        raise ModelError(f"model file {str(path)!r} cannot be loaded: {reason}") from error


@dataclass
class ResumePoint:
    """The last epoch that ``history.csv``, ``trajectories.npz`` and a checkpoint all contain."""

    epoch: int
    history: pd.DataFrame
    trajectories: rundir.Trajectories | None
    checkpoint: Path | None


def find_resume_point(run_dir: str | os.PathLike) -> ResumePoint:
    """Return the last finished epoch that history, trajectories and a checkpoint agree on, with the files cut to it.

    Epoch 0 means that no epoch can be resumed. Nothing is written here.
    """
    run_dir = Path(run_dir)
    history = _read_history(run_dir)
    trajectories = _read_trajectories(run_dir)
    logged = _leading_epochs([int(epoch) for epoch in history["epoch"]]) if history is not None else 0
    recorded = _leading_epochs([int(epoch) for epoch in trajectories.epochs]) if trajectories is not None else 0
    candidates = [epoch for epoch in checkpoint_epochs(run_dir) if epoch <= min(logged, recorded)]
    if not candidates:
        return ResumePoint(0, pd.DataFrame(), None, None)

    epoch = candidates[-1]
    return ResumePoint(
        epoch=epoch,
        history=history.iloc[:epoch].reset_index(drop=True),
        trajectories=_cut_trajectories(trajectories, epoch),
        checkpoint=checkpoint_path(run_dir, epoch),
    )


def _read_history(run_dir: Path) -> pd.DataFrame | None:
    path = run_dir / rundir.HISTORY_FILE
    if not path.is_file():
        return None
    try:
        history = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise RunDirectoryError(f"{path} cannot be read ({error}); the run cannot be resumed, start it again with --overwrite") from None
    if "epoch" not in history.columns:
        raise RunDirectoryError(f"{path} has no 'epoch' column; it was not written by cellnb")
    return history


def _read_trajectories(run_dir: Path) -> rundir.Trajectories | None:
    path = run_dir / rundir.TRAJECTORIES_FILE
    if not path.is_file():
        return None
    try:
        return rundir.read_trajectories(path)
    except (OSError, ValueError) as error:
        raise RunDirectoryError(f"{path} cannot be read ({error}); the run cannot be resumed, start it again with --overwrite") from None


def _leading_epochs(epochs: list[int]) -> int:
    """Return n such that ``epochs`` starts with 1, 2, ..., n."""
    count = 0
    for expected, epoch in enumerate(epochs, start=1):
        if epoch != expected:
            break
        count = expected
    return count


def _cut_trajectories(trajectories: rundir.Trajectories, epoch: int) -> rundir.Trajectories:
    def first(array):
        return None if array is None else np.asarray(array)[:epoch]

    return rundir.Trajectories(
        epochs=first(trajectories.epochs),
        sample_ids=trajectories.sample_ids,
        labels=trajectories.labels,
        probabilities=first(trajectories.probabilities),
        logits=first(trajectories.logits),
        train_sample_ids=trajectories.train_sample_ids,
        train_labels=trajectories.train_labels,
        train_probabilities=first(trajectories.train_probabilities),
        train_logits=first(trajectories.train_logits),
    )


def resume_training(run_dir: str | os.PathLike, *, echo: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Continue the training of an interrupted run directory up to its configured number of epochs.

    Reads the parameters from ``config.json`` and finds the resume point. Checks that the data
    still yields the same samples, then cuts ``history.csv`` and ``trajectories.npz`` back to
    that epoch. Reloads its checkpoint (weights and optimizer state) and fits the remaining
    epochs with the same per-epoch shuffle order as an uninterrupted run. Without any
    checkpoint it trains from the first epoch. Returns the full history.

    NOTE: a run whose fine-tuning phase had started is recompiled by ``train.train`` when it
    resumes, so its optimizer state restarts and the epochs after the resume point can differ.
    """
    import keras
    import tensorflow as tf

    from cellnb import data, params, train

    run_dir = Path(run_dir).expanduser().resolve()
    config = read_config(run_dir)
    values = {**config, "run_dir": str(run_dir)}
    if config.get("synthetic_data"):
        values["data_dir"] = ""
    checked = params.check_parameters("01_train", values)

    point = find_resume_point(run_dir)
    if not (run_dir / rundir.SAMPLES_FILE).is_file():
        raise RunDirectoryError(f"{run_dir / rundir.SAMPLES_FILE} not found; the run cannot be resumed, start it again with --overwrite")
    originals = {name: (run_dir / name).read_bytes() for name in (rundir.CONFIG_FILE, rundir.SAMPLES_FILE)}
    old_samples = pd.read_csv(run_dir / rundir.SAMPLES_FILE, dtype={"sample_id": str}, keep_default_na=False)
    setup = train.prepare_run(checked, resuming=True)
    try:
        _check_same_samples(old_samples, train.samples_table(setup.discovery), run_dir)
    except RunDirectoryError:
        for name, content in originals.items():
            rundir.atomic_write_bytes(run_dir / name, content)
        raise

    if point.epoch == 0:
        # Killed before the first checkpoint: start over, seeded exactly as a fresh run.
        (run_dir / rundir.TRAJECTORIES_FILE).unlink(missing_ok=True)
        (run_dir / rundir.HISTORY_FILE).unlink(missing_ok=True)
        if echo is not None:
            echo("no finished epoch with a checkpoint; training from the first epoch")
        return train.train(setup, train.build_for_run(setup), echo=echo, callbacks=[EpochCheckpoint(run_dir)])

    rundir.write_trajectories(run_dir / rundir.TRAJECTORIES_FILE, point.trajectories)
    rundir.write_csv(run_dir / rundir.HISTORY_FILE, point.history)
    logger.info("resuming %s after epoch %d of %d", run_dir, point.epoch, checked["epochs"])
    if echo is not None:
        echo(f"resuming after epoch {point.epoch} of {checked['epochs']} from {point.checkpoint}")

    keras.utils.set_random_seed(checked["seed"])
    tf.config.experimental.enable_op_determinism()
    model = load_checkpoint(point.checkpoint)
    if point.epoch >= checked["epochs"]:
        rundir.save_model(model, run_dir / rundir.MODEL_FILE)
        return point.history
    with data.shuffle_from_epoch(point.epoch):
        return train.train(setup, model, echo=echo, initial_epoch=point.epoch, previous=(point.trajectories, point.history),
                           callbacks=[EpochCheckpoint(run_dir)])


def read_config(run_dir: Path) -> dict:
    """Return a run directory's config.json, or raise RunDirectoryError saying why it cannot be resumed."""
    path = run_dir / rundir.CONFIG_FILE
    if not path.is_file():
        raise RunDirectoryError(
            f"{path} not found; --resume needs a run directory written by `cellnb run` or notebook 01_train.ipynb"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise RunDirectoryError(f"{path} is not valid JSON ({error}); the run cannot be resumed") from None


def _check_same_samples(old: pd.DataFrame, new: pd.DataFrame, run_dir: Path) -> None:
    columns = ["sample_id", "split", "label", "sha256"]
    before = old[columns].astype(str).sort_values("sample_id").reset_index(drop=True)
    after = new[columns].astype(str).sort_values("sample_id").reset_index(drop=True)
    if not before.equals(after):
        raise RunDirectoryError(
            f"the data of {str(run_dir)!r} changed since the run started (files, splits, labels or contents differ "
            f"from samples.csv), so its epochs cannot be continued; start the run again with --overwrite"
        )
