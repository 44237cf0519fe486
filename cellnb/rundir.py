"""Read and write the files of a run directory, the public format of a cellnb run.

Writers replace each file atomically (write to a temporary file, then rename), so a run that is
killed leaves every file either in its previous or in its new state, never half written.
Readers check that the files agree with each other.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cellnb.errors import RunDirectoryError

CONFIG_FILE = "config.json"
SAMPLES_FILE = "samples.csv"
HISTORY_FILE = "history.csv"
TRAJECTORIES_FILE = "trajectories.npz"
MODEL_FILE = "model.keras"
PROGRESS_FILE = "progress.json"
STOP_FILE = "stop_requested"
SAMPLE_COLUMNS = ["sample_id", "split", "label", "label_name", "group", "sha256", "width", "height", "mode"]


@dataclass
class Trajectories:
    """Per-sample probabilities of the scored class (index 1) after each epoch.

    ``probabilities[e, i]`` is the probability of class 1 for ``sample_ids[i]`` after epoch
    ``epochs[e]``; ``logits[e, i]`` is the matching log-odds, so that
    ``probabilities == sigmoid(logits)`` up to float32 rounding. ``train_*`` hold the same for
    training samples when the run recorded them, else they are None.
    """

    epochs: np.ndarray
    sample_ids: np.ndarray
    labels: np.ndarray
    probabilities: np.ndarray
    logits: np.ndarray | None = None
    train_sample_ids: np.ndarray | None = None
    train_labels: np.ndarray | None = None
    train_probabilities: np.ndarray | None = None
    train_logits: np.ndarray | None = None

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {
            "epochs": np.asarray(self.epochs, dtype=np.int64),
            "sample_ids": np.asarray(self.sample_ids, dtype=str),
            "labels": np.asarray(self.labels, dtype=np.int64),
            "probabilities": np.asarray(self.probabilities, dtype=np.float32),
        }
        optional = {
            "logits": np.float32,
            "train_sample_ids": str,
            "train_labels": np.int64,
            "train_probabilities": np.float32,
            "train_logits": np.float32,
        }
        for name, dtype in optional.items():
            value = getattr(self, name)
            if value is not None:
                arrays[name] = np.asarray(value, dtype=dtype)
        return arrays


@dataclass
class Run:
    """Everything a finished or interrupted run directory holds, loaded into memory."""

    run_dir: Path
    config: dict
    samples: pd.DataFrame
    history: pd.DataFrame
    trajectories: Trajectories

    @property
    def classes(self) -> list[str]:
        return list(self.config.get("classes", ["negative", "positive"]))

    @property
    def scored_class(self) -> str:
        return self.classes[1]

    @property
    def data_dir(self) -> Path:
        return Path(self.config["data_dir"])


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: dict) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, default=str) + "\n").encode("utf-8"))


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    atomic_write_bytes(path, frame.to_csv(index=False, lineterminator="\n").encode("utf-8"))


def write_trajectories(path: Path, trajectories: Trajectories) -> None:
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.npz", dir=path.parent)
    os.close(handle)
    try:
        np.savez(temporary, **trajectories.to_arrays())
        with open(temporary, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_model(model, path: Path) -> None:
    """Save a Keras model atomically: into a temporary ``.keras`` file beside it, then rename."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".keras", dir=path.parent)
    os.close(handle)
    try:
        model.save(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_trajectories(path: Path) -> Trajectories:
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    missing = {"epochs", "sample_ids", "labels", "probabilities"} - set(arrays)
    if missing:
        raise RunDirectoryError(f"{path} lacks the arrays {sorted(missing)}; it was not written by cellnb")
    return Trajectories(**{name: arrays.get(name) for name in Trajectories.__dataclass_fields__})


def load_run(run_dir: str | os.PathLike) -> Run:
    """Load a run directory and check that history and trajectories cover the same epochs.

    Raises RunDirectoryError naming the first missing file, so a notebook pointed at the wrong
    folder reports which file it looked for.
    """
    run_dir = Path(run_dir)
    for name in (CONFIG_FILE, SAMPLES_FILE, HISTORY_FILE, TRAJECTORIES_FILE):
        if not (run_dir / name).is_file():
            raise RunDirectoryError(
                f"{run_dir / name} not found; run_dir must be a folder written by the training notebook "
                f"01_train.ipynb or by `cellnb run`"
            )

    config = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    samples = pd.read_csv(run_dir / SAMPLES_FILE, dtype={"sample_id": str, "group": str}, keep_default_na=False)
    history = pd.read_csv(run_dir / HISTORY_FILE)
    trajectories = read_trajectories(run_dir / TRAJECTORIES_FILE)

    recorded = [int(epoch) for epoch in trajectories.epochs]
    logged = [int(epoch) for epoch in history["epoch"]]
    if recorded != logged:
        raise RunDirectoryError(
            f"{run_dir}: history.csv has epochs {logged} but trajectories.npz has {recorded}; "
            f"the run was interrupted between the two writes, rerun with --resume to repair it"
        )
    return Run(run_dir=run_dir, config=config, samples=samples, history=history, trajectories=trajectories)
