"""Keras callbacks that record every validation sample's probability after every epoch.

``TrajectoryRecorder`` makes the one validation pass of each epoch itself: it predicts the
validation set in inference mode, keyed by ``sample_id``, and derives ``val_loss`` and
``val_accuracy`` from those same predictions, so ``model.fit`` needs no ``validation_data``
and the recorded probabilities cost no extra pass. Files are rewritten atomically each epoch.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cellnb import rundir
from cellnb.explain import cross_entropy

logger = logging.getLogger(__name__)

try:  # keras is imported lazily elsewhere, but a callback must subclass the real base class.
    import keras

    _Callback = keras.callbacks.Callback
except ImportError:  # pragma: no cover - keras is a hard dependency
    _Callback = object


class TrajectoryRecorder(_Callback):
    """Record P(scored class) per validation sample after each epoch, with the epoch's metrics.

    Args:
        validation_data: a ``cellnb.data.make_dataset`` dataset (batches of ``sample_id``,
            ``image``, ``label``), not shuffled.
        run_dir: the run directory; ``trajectories.npz`` and ``history.csv`` are written there.
        train_data: optionally the training set in the same form; its samples are then recorded
            too, in inference mode (dropout off), as ``train_probabilities``.
        previous: a ``rundir.Trajectories`` and history DataFrame of earlier epochs to continue.
        input_key: the batch entry the model takes: ``"image"``, or ``"features"`` when the
            model is a head trained on cached backbone features (``cellnb.features``).
        phase: when given, written into each epoch's history row as the ``phase`` column.
        scorer: a model from the fitted model's inputs to its ``logits`` layer; by default
            ``cellnb.model.logits_model`` builds it. A head that shares its layers with a full
            model needs it, because a shared layer's ``output`` belongs to the full model.

    Example:
        ``model.fit(train, epochs=20, callbacks=[TrajectoryRecorder(valid, "outputs/run1")])``
    """

    def __init__(self, validation_data, run_dir, *, train_data=None, previous=None, input_key="image", phase=None,
                 scorer=None):
        super().__init__()
        self.validation_data = validation_data
        self.train_data = train_data
        self.input_key = input_key
        self.phase = phase
        self.scorer = scorer
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._forward = None
        self.epochs: list[int] = []
        self.rows: list[dict] = []
        self._valid_rows: list[np.ndarray] = []
        self._valid_logits: list[np.ndarray] = []
        self._train_rows: list[np.ndarray] = []
        self._train_logits: list[np.ndarray] = []
        self.sample_ids = None
        self.labels = None
        self.train_sample_ids = None
        self.train_labels = None
        if previous is not None:
            self._restore(*previous)

    def _restore(self, trajectories: rundir.Trajectories, history: pd.DataFrame) -> None:
        self.epochs = [int(epoch) for epoch in trajectories.epochs]
        self.sample_ids, self.labels = trajectories.sample_ids, trajectories.labels
        self._valid_rows = list(trajectories.probabilities)
        self._valid_logits = list(trajectories.logits) if trajectories.logits is not None else []
        if trajectories.train_probabilities is not None:
            self.train_sample_ids, self.train_labels = trajectories.train_sample_ids, trajectories.train_labels
            self._train_rows = list(trajectories.train_probabilities)
            self._train_logits = list(trajectories.train_logits)
        self.rows = history.to_dict("records")

    def on_train_begin(self, logs=None):
        import tensorflow as tf

        from cellnb.model import logits_model

        scorer = self.scorer if self.scorer is not None else logits_model(self.model)
        units = scorer.output.shape[-1]

        @tf.function(reduce_retracing=True)
        def forward(images):
            logits = scorer(images, training=False)
            if units == 2:
                return logits[:, 1] - logits[:, 0]
            return logits[:, 0]

        self._forward = forward

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        started = time.perf_counter()
        sample_ids, labels, logits = self.predict_logits(self.validation_data)
        self._check_sample_ids("validation", sample_ids, labels)
        probabilities = _sigmoid(logits).astype(np.float32)

        losses = cross_entropy(probabilities, labels)
        logs["val_loss"] = float(np.mean(losses))
        logs["val_accuracy"] = float(np.mean((probabilities > 0.5).astype(int) == labels))
        self.epochs.append(epoch + 1)
        self._valid_rows.append(probabilities)
        self._valid_logits.append(logits.astype(np.float32))

        if self.train_data is not None:
            train_ids, train_labels, train_logits = self.predict_logits(self.train_data)
            if self.train_sample_ids is None:
                self.train_sample_ids, self.train_labels = train_ids, train_labels
            elif not np.array_equal(train_ids, self.train_sample_ids):
                raise RuntimeError("the training samples changed between epochs; record them from a fixed dataset")
            self._train_rows.append(_sigmoid(train_logits).astype(np.float32))
            self._train_logits.append(train_logits.astype(np.float32))

        logs["record_seconds"] = time.perf_counter() - started
        row = {"epoch": epoch + 1, **{key: _scalar(value) for key, value in logs.items()}}
        if self.phase is not None:
            row["phase"] = self.phase
        self.rows.append(row)
        self.flush()

    def predict_logits(self, dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return sample ids, labels and log-odds of class 1 for a dataset, sorted by sample id."""
        ids, labels, logits = [], [], []
        for batch in dataset:
            ids.append(batch["sample_id"].numpy().astype(str))
            labels.append(batch["label"].numpy())
            logits.append(self._forward(batch[self.input_key]).numpy().astype(np.float64))
        ids, labels, logits = np.concatenate(ids), np.concatenate(labels).astype(np.int64), np.concatenate(logits)
        order = np.argsort(ids, kind="stable")
        return ids[order], labels[order], logits[order]

    def _check_sample_ids(self, name: str, sample_ids: np.ndarray, labels: np.ndarray) -> None:
        if len(np.unique(sample_ids)) != len(sample_ids):
            raise RuntimeError(f"the {name} data yields duplicate sample ids; each sample must appear once per pass")
        if self.sample_ids is None:
            self.sample_ids, self.labels = sample_ids, labels
        elif not np.array_equal(sample_ids, self.sample_ids):
            raise RuntimeError(f"the {name} samples changed between epochs; record them from a fixed dataset")

    def trajectories(self) -> rundir.Trajectories:
        recorded_train = bool(self._train_rows)
        return rundir.Trajectories(
            epochs=np.asarray(self.epochs, dtype=np.int64),
            sample_ids=self.sample_ids,
            labels=self.labels,
            probabilities=np.stack(self._valid_rows),
            logits=np.stack(self._valid_logits) if self._valid_logits else None,
            train_sample_ids=self.train_sample_ids if recorded_train else None,
            train_labels=self.train_labels if recorded_train else None,
            train_probabilities=np.stack(self._train_rows) if recorded_train else None,
            train_logits=np.stack(self._train_logits) if recorded_train else None,
        )

    def history(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.rows)
        first = [column for column in ("epoch", "loss", "accuracy", "val_loss", "val_accuracy") if column in frame]
        return frame[first + [column for column in frame.columns if column not in first]]

    def flush(self) -> None:
        """Write trajectories.npz, then history.csv; each write is atomic."""
        rundir.write_trajectories(self.run_dir / rundir.TRAJECTORIES_FILE, self.trajectories())
        rundir.write_csv(self.run_dir / rundir.HISTORY_FILE, self.history())


class ProgressFile(_Callback):
    """Write ``progress.json`` (epoch, total epochs, latest metrics) and log one line per epoch.

    A person can watch that file while papermill runs the notebook headlessly; ``cellnb run``
    reads it to print per-epoch progress in the terminal.
    """

    def __init__(self, run_dir, *, epochs: int, initial_epoch: int = 0, echo=None):
        super().__init__()
        self.path = Path(run_dir) / rundir.PROGRESS_FILE
        self.total = epochs
        self.initial_epoch = initial_epoch
        self.echo = echo
        self.started = time.time()
        self.stop_requested = False

    def on_train_begin(self, logs=None):
        self._write(self.initial_epoch, {}, "training")

    def on_epoch_end(self, epoch, logs=None):
        logs = {key: _scalar(value) for key, value in (logs or {}).items()}
        self._write(epoch + 1, logs, "training")
        line = format_progress(epoch + 1, self.total, logs)
        logger.info(line)
        if self.echo is not None:
            self.echo(line)
        if (self.path.parent / rundir.STOP_FILE).exists():
            # `cellnb run` writes this file on Ctrl-C, because the kernel runs in its own process
            # group and never receives the terminal's interrupt.
            logger.warning("stop requested: training stops after epoch %d", epoch + 1)
            self.stop_requested = True
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        current = json_or_empty(self.path)
        epoch = current.get("epoch", self.initial_epoch)
        # A stop requested during the last epoch still leaves a finished run.
        state = "stopped" if self.stop_requested and epoch < self.total else "finished"
        self._write(epoch, current.get("metrics", {}), state)

    def _write(self, epoch: int, logs: dict, state: str) -> None:
        rundir.write_json(
            self.path,
            {"state": state, "epoch": epoch, "epochs": self.total, "metrics": logs,
             "elapsed_seconds": round(time.time() - self.started, 1), "updated": time.strftime("%Y-%m-%dT%H:%M:%S")},
        )


class FullModelCallback(_Callback):
    """Run a callback against a full model while only its head is fitted on cached features.

    Keras hands each callback the model being fitted, but a checkpoint must save the full
    model (backbone and head). A ``stop_training`` that the callback sets on the full model is
    passed on to the fitted head, so early stopping still stops the fit.
    """

    def __init__(self, callback, full_model):
        super().__init__()
        self.callback = callback
        self.full_model = full_model

    def set_model(self, model):
        super().set_model(model)
        self.full_model.stop_training = False
        self.callback.set_model(self.full_model)

    def set_params(self, params):
        super().set_params(params)
        self.callback.set_params(params)

    def _forward(self, hook: str, *args) -> None:
        getattr(self.callback, hook)(*args)
        if getattr(self.full_model, "stop_training", False):
            self.model.stop_training = True

    def on_train_begin(self, logs=None):
        self._forward("on_train_begin", logs)

    def on_train_end(self, logs=None):
        self._forward("on_train_end", logs)

    def on_epoch_begin(self, epoch, logs=None):
        self._forward("on_epoch_begin", epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._forward("on_epoch_end", epoch, logs)

    def on_train_batch_begin(self, batch, logs=None):
        self._forward("on_train_batch_begin", batch, logs)

    def on_train_batch_end(self, batch, logs=None):
        self._forward("on_train_batch_end", batch, logs)


def format_progress(epoch: int, total: int, logs: dict) -> str:
    """Format one epoch's metrics as ``epoch 3/30  loss 0.412  accuracy 0.812  val_loss ...``."""
    parts = [f"epoch {epoch}/{total}"]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        if key in logs:
            parts.append(f"{key} {logs[key]:.4f}")
    return "  ".join(parts)


def json_or_empty(path: Path) -> dict:
    import json

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -logits))


def _scalar(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value
