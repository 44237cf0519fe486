"""Explain, sample by sample, why the validation loss of a run rises between two epochs.

Every function takes arrays or tables loaded from a run directory (see ``cellnb.rundir``) and
returns numbers: per-sample cross-entropy and its decomposition, accuracy-side counts, calibration,
training dynamics, likely label errors and a written summary. Drawing is left to ``cellnb.plots``.
Probabilities are those of the scored class, index 1 of ``classes``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import expit, logit
from sklearn.metrics import roc_auc_score, roc_curve

from cellnb.errors import ParameterError
from cellnb.rundir import Trajectories, write_csv

logger = logging.getLogger(__name__)

EPSILON = 1e-7
"""Clip bound of Keras' cross-entropy (``keras.config.epsilon()``, 1e-7 by default in Keras 3)."""

THRESHOLD = 0.5
"""A sample is predicted as the scored class when its probability is above this value.

This is Keras 3's rule: binary_accuracy tests ``y_pred > 0.5``, and categorical accuracy takes
the argmax, which returns index 0 on a tie, so a probability of exactly 0.5 counts as class 0
and the accuracies here equal ``val_accuracy`` in history.csv."""

CATEGORIES = (
    "wrong_more_confident",
    "right_less_confident",
    "flipped_to_wrong",
    "flipped_to_right",
    "right_more_confident",
    "wrong_less_confident",
)
"""Categories of ``decompose_loss_change``, those that raise the loss first."""

REGIONS = ("easy", "ambiguous", "hard_to_learn")
"""Regions of the data map in ``training_dynamics``."""

AMBIGUOUS_VARIABILITY = 0.2
EASY_CONFIDENCE = 0.5
# NOTE: these two cutoffs are this module's choice, not values taken from Swayamdipta et al.
# (2020). A sample is ambiguous when the standard deviation over epochs of its probability of
# the given label is at least 0.2. Otherwise it is easy when the mean of that probability is at
# least 0.5, and hard to learn when it is below.

TEMPERATURE_BOUNDS = (1e-2, 1e2)
"""Search interval of ``fit_temperature``. A result on a bound is logged as a warning."""

SPLITS = ("valid", "train")
"""Splits that ``probabilities_for_label_issues`` accepts."""

DECOMPOSITION_COLUMNS = ["sample_id", "label", "epoch_from", "epoch_to", "probability_from", "probability_to",
                         "loss_from", "loss_to", "contribution", "category"]
LOSS_CONTRIBUTIONS_FILE = "loss_contributions.csv"
CALIBRATION_FILE = "calibration.csv"
LOSS_CONTRIBUTION_COLUMNS = ["sample_id", "epoch_from", "epoch_to", "loss_from", "loss_to", "contribution", "category"]
CALIBRATION_COLUMNS = ["epoch", "ece", "mce", "temperature", "loss_after_scaling", "roc_auc"]


# --- input validation ------------------------------------------------------------------------


def _as_probabilities(values, *, name: str = "probabilities", ndim: Sequence[int] = (1, 2)) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim not in ndim:
        raise ParameterError(f"{name} has shape {array.shape}; expected {' or '.join(f'{d}-D' for d in ndim)} array")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ParameterError(f"{name} has dtype {array.dtype}; expected real numbers in [0, 1]")
    array = array.astype(np.float64)
    invalid = ~np.isfinite(array) | (array < 0.0) | (array > 1.0)
    if invalid.any():
        example = array[invalid][0]
        raise ParameterError(
            f"{name} has {int(invalid.sum())} values that are NaN, infinite or outside [0, 1] (e.g. {example}); "
            f"pass probabilities of the scored class, not logits or percentages"
        )
    return array


def _as_logits(values, *, name: str = "logits", ndim: Sequence[int] = (1,)) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim not in ndim or not np.issubdtype(array.dtype, np.number):
        raise ParameterError(f"{name} has shape {array.shape} and dtype {array.dtype}; expected a {ndim[0]}-D numeric array")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ParameterError(f"{name} has {int((~np.isfinite(array)).sum())} NaN or infinite values; pass finite logits")
    return array


def _as_labels(values, size: int, *, name: str = "labels") -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or array.shape[0] != size:
        raise ParameterError(f"{name} has shape {array.shape}; expected one label per sample, shape ({size},)")
    if array.size and not np.isin(array, (0, 1)).all():
        unexpected = sorted({str(value) for value in np.unique(array) if value not in (0, 1)})[:5]
        raise ParameterError(f"{name} contains {unexpected}; labels must be 0 (classes[0]) or 1 (classes[1])")
    return array.astype(np.int64)


def _as_sample_ids(values, size: int, *, name: str = "sample_ids") -> np.ndarray:
    array = np.asarray(values, dtype=str)
    if array.ndim != 1 or array.shape[0] != size:
        raise ParameterError(f"{name} has shape {array.shape}; expected one id per sample, shape ({size},)")
    return array


def _as_count(value, name: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ParameterError(f"{name}={value!r} is invalid; pass an integer >= {minimum}")
    return int(value)


def _validate_trajectories(trajectories: Trajectories) -> Trajectories:
    probabilities = _as_probabilities(trajectories.probabilities, name="trajectories.probabilities", ndim=(2,))
    epoch_count, sample_count = probabilities.shape
    if sample_count == 0 or epoch_count == 0:
        raise ParameterError(f"trajectories.probabilities has shape {probabilities.shape}; the run recorded no predictions")
    epochs = np.asarray(trajectories.epochs)
    if epochs.shape != (epoch_count,):
        raise ParameterError(
            f"trajectories.epochs has shape {epochs.shape} but probabilities has {epoch_count} rows; "
            f"trajectories.npz is inconsistent, rewrite it with cellnb.rundir.write_trajectories"
        )
    _as_labels(trajectories.labels, sample_count, name="trajectories.labels")
    _as_sample_ids(trajectories.sample_ids, sample_count, name="trajectories.sample_ids")
    if trajectories.logits is not None and np.shape(trajectories.logits) != probabilities.shape:
        raise ParameterError(
            f"trajectories.logits has shape {np.shape(trajectories.logits)}; expected {probabilities.shape} like probabilities"
        )
    return trajectories


def _describe_epochs(epochs: Sequence[int]) -> str:
    epochs = [int(epoch) for epoch in epochs]
    if epochs == list(range(epochs[0], epochs[0] + len(epochs))):
        return f"{epochs[0]}..{epochs[-1]}"
    return str(epochs)


def _epoch_index(trajectories: Trajectories, epoch, name: str) -> int:
    recorded = [int(value) for value in trajectories.epochs]
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or int(epoch) not in recorded:
        raise ParameterError(f"{name}={epoch!r} is not a recorded epoch; choose one of {_describe_epochs(recorded)}")
    return recorded.index(int(epoch))


def _epoch_pair(trajectories: Trajectories, epoch_from, epoch_to) -> tuple[int, int]:
    """Validate the trajectories and return the array indices of two epochs, the first strictly earlier."""
    _validate_trajectories(trajectories)
    index_from = _epoch_index(trajectories, epoch_from, "epoch_from")
    index_to = _epoch_index(trajectories, epoch_to, "epoch_to")
    if index_from >= index_to:
        raise ParameterError(f"epoch_from={epoch_from} must be earlier than epoch_to={epoch_to}")
    return index_from, index_to


def _require_columns(table: pd.DataFrame, columns: Iterable[str], name: str, producer: str) -> None:
    if not isinstance(table, pd.DataFrame):
        raise ParameterError(f"{name} is a {type(table).__name__}; expected the DataFrame returned by {producer}")
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ParameterError(f"{name} lacks the columns {missing}; pass the table returned by {producer}")


# --- cross-entropy and epochs ----------------------------------------------------------------


def _cross_entropy(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    probability_of_label = np.where(labels == 1, probabilities, 1.0 - probabilities)
    return -np.log(np.clip(probability_of_label, EPSILON, 1.0 - EPSILON))


def cross_entropy(probabilities, labels) -> np.ndarray:
    """Compute the per-sample cross-entropy the way Keras does for probability outputs.

    The probability of the true class (``p`` for label 1, ``1 - p`` for label 0) is clipped to
    ``[1e-7, 1 - 1e-7]`` and its negative log is returned, as in Keras 3's categorical
    cross-entropy on a 2-unit softmax. The result is float64, while Keras computes in float32,
    so the mean agrees with ``val_loss`` to float32 rounding.

    Parameters
    ----------
    probabilities : array of shape [N] or [E, N]
        Probability of class 1 for each sample (and epoch).
    labels : array of shape [N]
        0 or 1 per sample.

    Returns
    -------
    ndarray of float64, same shape as ``probabilities``

    Examples
    --------
    >>> cross_entropy([0.9, 0.9], [1, 0]).round(4)
    array([0.1054, 2.3026])
    """
    probabilities = _as_probabilities(probabilities)
    labels = _as_labels(labels, probabilities.shape[-1])
    return _cross_entropy(probabilities, labels)


def predicted_labels(probabilities) -> np.ndarray:
    """Return the predicted class (1 where the probability of class 1 is above 0.5, else 0)."""
    return (_as_probabilities(probabilities) > THRESHOLD).astype(np.int64)


def logits_from_probabilities(probabilities) -> np.ndarray:
    """Return the log-odds of class 1, with probabilities clipped to ``[1e-7, 1 - 1e-7]`` first.

    Used for runs that recorded no logits. The clip caps the result at about +-16.1, so a
    saturated float32 probability of 1.0 maps to 16.1 whatever logit the model produced.
    """
    probabilities = _as_probabilities(probabilities)
    return logit(np.clip(probabilities, EPSILON, 1.0 - EPSILON))


def probabilities_at_epoch(trajectories: Trajectories, epoch: int) -> np.ndarray:
    """Return the validation probabilities of class 1 after ``epoch`` (1-based), as float64 [N]."""
    _validate_trajectories(trajectories)
    return np.asarray(trajectories.probabilities[_epoch_index(trajectories, epoch, "epoch")], dtype=np.float64)


def _validate_history(history: pd.DataFrame) -> list[int]:
    _require_columns(history, ["epoch", "val_loss"], "history", "cellnb.rundir.load_run(run_dir).history")
    if len(history) == 0:
        raise ParameterError("history has no rows; the run finished no epoch")
    if history["val_loss"].isna().all():
        raise ParameterError("history.val_loss is NaN at every epoch; the run has no validation loss to explain")
    return [int(epoch) for epoch in history["epoch"]]


def epoch_of_minimum_val_loss(history: pd.DataFrame) -> int:
    """Return the epoch with the lowest ``val_loss``, the earliest on ties, skipping NaN."""
    _validate_history(history)
    return int(history.loc[history["val_loss"].idxmin(), "epoch"])


def resolve_epochs(history: pd.DataFrame, epoch_from: int | None = None, epoch_to: int | None = None) -> tuple[int, int]:
    """Choose the two epochs to compare, filling in defaults.

    ``epoch_to`` defaults to the last epoch. ``epoch_from`` defaults to the epoch with the lowest
    ``val_loss`` up to ``epoch_to``. When that is ``epoch_to`` itself, the loss never rose, so
    ``epoch_from`` becomes the first epoch and the comparison describes the fall. ``None`` and
    ``0`` both select the default, because epochs are 1-based and the notebooks use 0 for it.

    Raises
    ------
    ParameterError (a ValueError)
        When an epoch is not in ``history`` or ``epoch_from >= epoch_to``.
    """
    epochs = _validate_history(history)
    if len(epochs) < 2:
        raise ParameterError(f"history has only epoch {epochs}; comparing two epochs needs a run of at least two epochs")

    if epoch_to is None or (not isinstance(epoch_to, bool) and epoch_to == 0):
        epoch_to = epochs[-1]
    elif isinstance(epoch_to, bool) or not isinstance(epoch_to, (int, np.integer)) or int(epoch_to) not in epochs:
        raise ParameterError(f"epoch_to={epoch_to!r} is not a recorded epoch; choose one of {_describe_epochs(epochs)}")

    if epoch_from is None or (not isinstance(epoch_from, bool) and epoch_from == 0):
        earlier = history[history["epoch"] <= epoch_to]
        epoch_from = epoch_of_minimum_val_loss(earlier)
        if epoch_from == epoch_to:
            logger.info("val_loss is lowest at epoch_to=%s; comparing from the first epoch %s", epoch_to, epochs[0])
            epoch_from = epochs[0]
    elif isinstance(epoch_from, bool) or not isinstance(epoch_from, (int, np.integer)) or int(epoch_from) not in epochs:
        raise ParameterError(f"epoch_from={epoch_from!r} is not a recorded epoch; choose one of {_describe_epochs(epochs)}")

    if epoch_from >= epoch_to:
        raise ParameterError(
            f"epoch_from={epoch_from} must be earlier than epoch_to={epoch_to}; "
            f"recorded epochs are {_describe_epochs(epochs)}"
        )
    return int(epoch_from), int(epoch_to)


# --- exact decomposition of the loss change ------------------------------------------------------


def _categorize(probability_from: np.ndarray, probability_to: np.ndarray, labels: np.ndarray) -> np.ndarray:
    correct_from = (probability_from > THRESHOLD).astype(np.int64) == labels
    correct_to = (probability_to > THRESHOLD).astype(np.int64) == labels
    confidence_from = np.where(labels == 1, probability_from, 1.0 - probability_from)
    confidence_to = np.where(labels == 1, probability_to, 1.0 - probability_to)
    label_confidence_fell = confidence_to < confidence_from

    conditions = [
        ~correct_from & ~correct_to & label_confidence_fell,
        correct_from & correct_to & label_confidence_fell,
        correct_from & ~correct_to,
        ~correct_from & correct_to,
        correct_from & correct_to & ~label_confidence_fell,
        ~correct_from & ~correct_to & ~label_confidence_fell,
    ]
    return np.select(conditions, CATEGORIES, default="")


def decompose_loss_change(trajectories: Trajectories, epoch_from: int, epoch_to: int) -> pd.DataFrame:
    """Split the change of the mean validation cross-entropy into one term per sample.

    ``contribution = (loss_to - loss_from) / N``, so the contributions sum to
    ``mean(loss_to) - mean(loss_from)`` up to float64 rounding. ``category`` is defined from the
    probabilities and the 0.5 threshold, and each sample gets exactly one:

    - ``flipped_to_wrong`` / ``flipped_to_right``: on the other side of 0.5 at ``epoch_to``.
    - ``wrong_more_confident``: wrong at both epochs, and the probability of the true class fell,
      so the model grew more confident in the wrong class.
    - ``wrong_less_confident``: wrong at both epochs, and the probability of the true class rose
      or stayed the same.
    - ``right_less_confident``: right at both epochs, and the probability of the true class fell.
    - ``right_more_confident``: right at both epochs, and it rose or stayed the same.

    Only ``wrong_more_confident``, ``right_less_confident`` and ``flipped_to_wrong`` can have a
    positive contribution. A change inside the clip region of ``cross_entropy`` contributes 0.

    Returns
    -------
    DataFrame
        One row per validation sample, sorted by ``contribution`` (largest first), with columns
        ``sample_id, label, epoch_from, epoch_to, probability_from, probability_to, loss_from,
        loss_to, contribution, category``.
    """
    index_from, index_to = _epoch_pair(trajectories, epoch_from, epoch_to)

    probabilities = np.asarray(trajectories.probabilities, dtype=np.float64)
    labels = np.asarray(trajectories.labels, dtype=np.int64)
    probability_from = probabilities[index_from]
    probability_to = probabilities[index_to]
    loss_from = _cross_entropy(probability_from, labels)
    loss_to = _cross_entropy(probability_to, labels)

    decomposition = pd.DataFrame(
        {
            "sample_id": np.asarray(trajectories.sample_ids, dtype=str),
            "label": labels,
            "epoch_from": int(epoch_from),
            "epoch_to": int(epoch_to),
            "probability_from": probability_from,
            "probability_to": probability_to,
            "loss_from": loss_from,
            "loss_to": loss_to,
            "contribution": (loss_to - loss_from) / labels.size,
            "category": _categorize(probability_from, probability_to, labels),
        }
    )
    return decomposition.sort_values("contribution", ascending=False, kind="stable").reset_index(drop=True)


def summarize_categories(decomposition: pd.DataFrame) -> pd.DataFrame:
    """Count the samples of each category and add up their contributions.

    ``share_of_rise`` is a category's total contribution divided by the change of the mean loss,
    so the shares add up to 1, and a negative share means the category lowered the loss. When
    the loss did not rise (change <= 0), ``share_of_rise`` is NaN: there is no rise to share.

    Returns
    -------
    DataFrame
        One row per category in ``CATEGORIES`` order, empty ones included, with columns
        ``category, count, total_contribution, share_of_rise, mean_loss_from, mean_loss_to``.
    """
    _require_columns(decomposition, DECOMPOSITION_COLUMNS, "decomposition", "decompose_loss_change")
    change = float(decomposition["contribution"].sum())

    grouped = decomposition.groupby("category")
    summary = pd.DataFrame(
        {
            "count": grouped.size(),
            "total_contribution": grouped["contribution"].sum(),
            "mean_loss_from": grouped["loss_from"].mean(),
            "mean_loss_to": grouped["loss_to"].mean(),
        }
    ).reindex(list(CATEGORIES))
    summary["count"] = summary["count"].fillna(0).astype(np.int64)
    summary["total_contribution"] = summary["total_contribution"].fillna(0.0)
    summary["share_of_rise"] = summary["total_contribution"] / change if change > 0 else np.nan

    summary = summary.rename_axis("category").reset_index()
    return summary[["category", "count", "total_contribution", "share_of_rise", "mean_loss_from", "mean_loss_to"]]


def top_contributors(decomposition: pd.DataFrame, *, k: int = 10) -> pd.DataFrame:
    """Return the ``k`` samples that raise the mean loss most, with their share of the rise.

    ``share_of_rise`` and ``cumulative_share`` are NaN when the loss did not rise.
    """
    _require_columns(decomposition, DECOMPOSITION_COLUMNS, "decomposition", "decompose_loss_change")
    k = _as_count(k, "k")
    change = float(decomposition["contribution"].sum())

    ranked = decomposition.sort_values("contribution", ascending=False, kind="stable").head(k)
    top = ranked[["sample_id", "label", "probability_from", "probability_to", "loss_from", "loss_to", "contribution",
                  "category"]].reset_index(drop=True)
    top["share_of_rise"] = top["contribution"] / change if change > 0 else np.nan
    top["cumulative_share"] = top["share_of_rise"].cumsum()
    return top


def sample_trajectories(trajectories: Trajectories, sample_ids: Iterable[str]) -> pd.DataFrame:
    """Return probability and cross-entropy at every epoch for the given validation samples.

    Returns
    -------
    DataFrame
        Long format, one row per sample and epoch, in the order of ``sample_ids``, with columns
        ``sample_id, label, epoch, probability, loss``.
    """
    _validate_trajectories(trajectories)
    known = {sample_id: index for index, sample_id in enumerate(np.asarray(trajectories.sample_ids, dtype=str))}
    requested = [str(sample_id) for sample_id in sample_ids]
    missing = [sample_id for sample_id in requested if sample_id not in known]
    if missing:
        raise ParameterError(f"{len(missing)} sample_ids are not validation samples of this run, e.g. {missing[:3]}")

    columns = [known[sample_id] for sample_id in requested]
    probabilities = np.asarray(trajectories.probabilities, dtype=np.float64)[:, columns]
    labels = np.asarray(trajectories.labels, dtype=np.int64)[columns]
    losses = _cross_entropy(probabilities, labels)

    epochs = np.asarray(trajectories.epochs, dtype=np.int64)
    return pd.DataFrame(
        {
            "sample_id": np.repeat(requested, epochs.size),
            "label": np.repeat(labels, epochs.size),
            "epoch": np.tile(epochs, len(requested)),
            "probability": probabilities.T.ravel(),
            "loss": losses.T.ravel(),
        }
    )


# --- accuracy side ---------------------------------------------------------------------------


def accuracy_resolution(n: int) -> float:
    """Return 1 / n, the smallest change of accuracy that n samples can show (one sample crossing 0.5)."""
    return 1.0 / _as_count(n, "n")


def threshold_crossings(trajectories: Trajectories, epoch_from: int, epoch_to: int) -> pd.DataFrame:
    """Count the validation samples that crossed the 0.5 threshold between two epochs.

    Returns
    -------
    DataFrame
        Two rows, ``direction`` = ``to_wrong`` (right at the earlier epoch, wrong at the later) and
        ``to_right``. ``samples_at_endpoints`` compares ``epoch_from`` with ``epoch_to`` only.
        ``crossings_between_epochs`` counts every crossing between consecutive recorded epochs
        from ``epoch_from`` to ``epoch_to``, so a sample that goes back and forth counts each time.
    """
    index_from, index_to = _epoch_pair(trajectories, epoch_from, epoch_to)

    labels = np.asarray(trajectories.labels, dtype=np.int64)
    correct = predicted_labels(trajectories.probabilities[index_from:index_to + 1]) == labels
    steps_to_wrong = int(np.sum(correct[:-1] & ~correct[1:]))
    steps_to_right = int(np.sum(~correct[:-1] & correct[1:]))
    endpoints_to_wrong = int(np.sum(correct[0] & ~correct[-1]))
    endpoints_to_right = int(np.sum(~correct[0] & correct[-1]))

    return pd.DataFrame(
        {
            "direction": ["to_wrong", "to_right"],
            "samples_at_endpoints": [endpoints_to_wrong, endpoints_to_right],
            "crossings_between_epochs": [steps_to_wrong, steps_to_right],
        }
    )


def _roc_auc_with_reason(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, str]:
    present = np.unique(labels)
    if present.size < 2:
        return math.nan, f"only label {int(present[0])} among {labels.size} samples; ROC AUC needs both classes"
    return float(roc_auc_score(labels, probabilities)), ""


def roc_auc_per_epoch(trajectories: Trajectories) -> pd.DataFrame:
    """Compute the validation ROC AUC at each epoch with ``sklearn.metrics.roc_auc_score``.

    Returns
    -------
    DataFrame
        Columns ``epoch, roc_auc, note``. When the split has a single class, ``roc_auc`` is NaN
        and ``note`` gives the reason; otherwise ``note`` is empty.
    """
    _validate_trajectories(trajectories)
    labels = np.asarray(trajectories.labels, dtype=np.int64)
    rows = []
    for epoch, probabilities in zip(trajectories.epochs, np.asarray(trajectories.probabilities, dtype=np.float64)):
        value, note = _roc_auc_with_reason(probabilities, labels)
        rows.append({"epoch": int(epoch), "roc_auc": value, "note": note})
    if rows[0]["note"]:
        logger.warning("ROC AUC is undefined: %s", rows[0]["note"])
    return pd.DataFrame(rows)


def _rates_at(probabilities: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    predicted = probabilities >= threshold
    positives = labels == 1
    sensitivity = predicted[positives].mean() if positives.any() else math.nan
    specificity = (~predicted[~positives]).mean() if (~positives).any() else math.nan
    return {
        "threshold": threshold,
        "sensitivity": float(sensitivity),
        "specificity": float(specificity),
        "balanced_accuracy": float((sensitivity + specificity) / 2),
        "accuracy": float((predicted == positives).mean()),
    }


def threshold_table(probabilities, labels) -> pd.DataFrame:
    """Compare the 0.5 threshold with the Youden-optimal threshold at one epoch.

    The Youden threshold maximizes ``sensitivity + specificity - 1`` over the finite thresholds
    of ``sklearn.metrics.roc_curve`` (the highest one on ties). A sample counts as the scored
    class when its probability is at least the threshold, as in ``roc_curve``.
    Sensitivity is the recall of class 1, specificity the recall of class 0.

    Returns
    -------
    DataFrame
        Rows ``rule`` = ``0.5`` and ``youden``, with columns ``rule, threshold, sensitivity,
        specificity, balanced_accuracy, accuracy``. With a single class in ``labels``, the
        Youden threshold and the rate of the missing class are NaN.
    """
    probabilities = _as_probabilities(probabilities, ndim=(1,))
    labels = _as_labels(labels, probabilities.size)
    if probabilities.size == 0:
        raise ParameterError("probabilities is empty; pass the probabilities of one epoch")

    rows = [{"rule": "0.5", **_rates_at(probabilities, labels, THRESHOLD)}]
    if np.unique(labels).size < 2:
        logger.warning("threshold_table: only label %s present; the Youden threshold is undefined", labels[0])
        undefined = dict.fromkeys(["threshold", "sensitivity", "specificity", "balanced_accuracy", "accuracy"], math.nan)
        rows.append({"rule": "youden", **undefined})
    else:
        # NOTE: the Youden threshold is chosen on the same validation samples it is scored on, so
        # its sensitivity and specificity are optimistic estimates for new images.
        false_positive_rate, true_positive_rate, thresholds = roc_curve(labels, probabilities)
        finite = np.isfinite(thresholds)
        youden = np.where(finite, true_positive_rate - false_positive_rate, -np.inf)
        best = float(thresholds[int(np.argmax(youden))])
        rows.append({"rule": "youden", **_rates_at(probabilities, labels, best)})
    return pd.DataFrame(rows)[["rule", "threshold", "sensitivity", "specificity", "balanced_accuracy", "accuracy"]]


# --- calibration -----------------------------------------------------------------------------


def _reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int) -> pd.DataFrame:
    predicted = (probabilities > THRESHOLD).astype(np.int64)
    confidence = np.where(predicted == 1, probabilities, 1.0 - probabilities)
    correct = (predicted == labels).astype(np.float64)

    edges = np.arange(bins + 1) / bins
    # Bins are right-closed, (lower, upper], and a confidence of 0 joins the first bin.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    confidence_sum = np.bincount(index, weights=confidence, minlength=bins)
    correct_sum = np.bincount(index, weights=correct, minlength=bins)

    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.where(count > 0, confidence_sum / count, np.nan)
        accuracy = np.where(count > 0, correct_sum / count, np.nan)
    return pd.DataFrame(
        {
            "bin": np.arange(bins),
            "bin_lower": edges[:-1],
            "bin_upper": edges[1:],
            "count": count.astype(np.int64),
            "mean_confidence": mean_confidence,
            "accuracy": accuracy,
            "gap": mean_confidence - accuracy,
        }
    )


def _validated_pair(probabilities, labels) -> tuple[np.ndarray, np.ndarray]:
    probabilities = _as_probabilities(probabilities, ndim=(1,))
    labels = _as_labels(labels, probabilities.size)
    if probabilities.size == 0:
        raise ParameterError("probabilities is empty; pass the probabilities of one epoch")
    return probabilities, labels


def _ece(table: pd.DataFrame) -> float:
    filled = table[table["count"] > 0]
    return float(np.sum(filled["count"] / filled["count"].sum() * filled["gap"].abs()))


def _mce(table: pd.DataFrame) -> float:
    return float(table.loc[table["count"] > 0, "gap"].abs().max())


def reliability_table(probabilities, labels, *, bins: int = 10) -> pd.DataFrame:
    """Bin samples by the confidence of their predicted class and compare it with accuracy.

    As in the reliability diagrams of Guo et al. (2017), "On Calibration of Modern Neural
    Networks", the confidence is the probability of the predicted class, ``max(p, 1 - p)``, and
    the bins are of equal width on [0, 1]. Bins here are right-closed, (lower, upper]. With two
    classes the confidence is at least 0.5, so the bins below 0.5 stay empty, except that a
    sample at exactly p = 0.5 falls into the bin that ends at 0.5.

    Returns
    -------
    DataFrame
        One row per bin, empty bins included, with columns ``bin, bin_lower, bin_upper, count,
        mean_confidence, accuracy, gap``. ``gap = mean_confidence - accuracy``, positive where
        the model is overconfident, NaN in empty bins.
    """
    probabilities, labels = _validated_pair(probabilities, labels)
    return _reliability(probabilities, labels, _as_count(bins, "bins"))


def expected_calibration_error(probabilities, labels, *, bins: int = 10) -> float:
    """Compute the ECE: the mean of ``|mean_confidence - accuracy|`` over bins, weighted by bin size.

    Bins are those of ``reliability_table``.
    """
    return _ece(reliability_table(probabilities, labels, bins=bins))


def maximum_calibration_error(probabilities, labels, *, bins: int = 10) -> float:
    """Compute the MCE: the largest ``|mean_confidence - accuracy|`` over the non-empty bins."""
    return _mce(reliability_table(probabilities, labels, bins=bins))


def reliability_per_epoch(trajectories: Trajectories, epochs: Iterable[int], *, bins: int = 10) -> pd.DataFrame:
    """Stack ``reliability_table`` for several epochs, with an ``epoch`` column first."""
    _validate_trajectories(trajectories)
    bins = _as_count(bins, "bins")
    labels = np.asarray(trajectories.labels, dtype=np.int64)
    tables = []
    for epoch in epochs:
        index = _epoch_index(trajectories, epoch, "epoch")
        table = _reliability(np.asarray(trajectories.probabilities[index], dtype=np.float64), labels, bins)
        table.insert(0, "epoch", int(epoch))
        tables.append(table)
    if not tables:
        raise ParameterError("epochs is empty; pass at least one recorded epoch")
    return pd.concat(tables, ignore_index=True)


def _scaled_loss(log_temperature: float, logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(_cross_entropy(expit(logits / math.exp(log_temperature)), labels)))


def fit_temperature(logits, labels) -> float:
    """Fit the temperature T > 0 that minimizes the validation loss of ``sigmoid(logits / T)``.

    The loss is ``cross_entropy``, the clipped negative log-likelihood that Keras reports, so it
    equals the textbook NLL wherever no probability reaches the clip bounds. The search runs
    over ``log T`` in ``TEMPERATURE_BOUNDS`` with scipy's bounded scalar minimizer. T = 1 is
    returned unless the fitted T gives a strictly lower loss, so scaling never raises the loss
    on the samples it was fitted on. A positive T keeps the sign of every logit, so the
    predicted classes and the accuracy do not change.

    Parameters
    ----------
    logits : array of shape [N]
        Log-odds of class 1 (``logits_from_probabilities`` recovers them when not recorded).
    labels : array of shape [N]
    """
    logits = _as_logits(logits)
    labels = _as_labels(labels, logits.size)
    if logits.size == 0:
        raise ParameterError("logits is empty; pass the logits of one epoch")

    lower, upper = math.log(TEMPERATURE_BOUNDS[0]), math.log(TEMPERATURE_BOUNDS[1])
    result = minimize_scalar(_scaled_loss, bounds=(lower, upper), method="bounded", args=(logits, labels),
                             options={"xatol": 1e-6})
    if _scaled_loss(result.x, logits, labels) >= _scaled_loss(0.0, logits, labels):
        return 1.0

    temperature = math.exp(result.x)
    if min(result.x - lower, upper - result.x) < 1e-3:
        logger.warning("fitted temperature %.4g is at the search bound %s; the loss may fall further outside it",
                       temperature, TEMPERATURE_BOUNDS)
    return temperature


def calibration_per_epoch(trajectories: Trajectories, *, bins: int = 10) -> pd.DataFrame:
    """Measure calibration at every epoch, before and after temperature scaling.

    ``val_loss`` and ``accuracy`` are recomputed from the recorded probabilities.
    ``temperature`` is fitted per epoch on that epoch's validation logits (recovered from the
    probabilities when the run recorded none), and ``loss_after_scaling`` and
    ``ece_after_scaling`` are computed from ``sigmoid(logits / temperature)`` in float64. So at
    T = 1, ``loss_after_scaling`` can differ from ``val_loss`` by the float32 rounding of the
    recorded probabilities.

    Returns
    -------
    DataFrame
        One row per epoch with columns ``epoch, val_loss, accuracy, ece, mce, temperature,
        loss_after_scaling, ece_after_scaling, roc_auc``.
    """
    _validate_trajectories(trajectories)
    bins = _as_count(bins, "bins")
    labels = np.asarray(trajectories.labels, dtype=np.int64)
    probabilities = np.asarray(trajectories.probabilities, dtype=np.float64)
    if trajectories.logits is not None:
        all_logits = _as_logits(trajectories.logits, name="trajectories.logits", ndim=(2,))
    else:
        logger.info("the run recorded no logits; recovering them from the probabilities")
        all_logits = logits_from_probabilities(probabilities)

    # NOTE: each temperature is fitted and evaluated on the same validation samples, so
    # loss_after_scaling is the best that temperature scaling can reach, not an estimate for new
    # images. Fit T on a separate held-out split before using it.
    rows = []
    for epoch, epoch_probabilities, epoch_logits in zip(trajectories.epochs, probabilities, all_logits):
        table = _reliability(epoch_probabilities, labels, bins)
        temperature = fit_temperature(epoch_logits, labels)
        scaled = expit(epoch_logits / temperature)
        rows.append(
            {
                "epoch": int(epoch),
                "val_loss": float(np.mean(_cross_entropy(epoch_probabilities, labels))),
                "accuracy": float(np.mean((epoch_probabilities > THRESHOLD) == (labels == 1))),
                "ece": _ece(table),
                "mce": _mce(table),
                "temperature": temperature,
                "loss_after_scaling": float(np.mean(_cross_entropy(scaled, labels))),
                "ece_after_scaling": _ece(_reliability(scaled, labels, bins)),
                "roc_auc": _roc_auc_with_reason(epoch_probabilities, labels)[0],
            }
        )
    return pd.DataFrame(rows)


# --- training dynamics -----------------------------------------------------------------------


def training_dynamics(
    probabilities,
    labels,
    sample_ids,
    *,
    logits=None,
    ambiguous_variability: float = AMBIGUOUS_VARIABILITY,
    easy_confidence: float = EASY_CONFIDENCE,
) -> pd.DataFrame:
    """Summarize each sample's trajectory over epochs for a data map.

    Follows Dataset Cartography (Swayamdipta et al. 2020), example forgetting (Toneva et al.
    2019) and the area under the margin (AUM, Pleiss et al. 2020), computed on the recorded
    epochs of one split.

    - ``confidence``: mean over epochs of the probability of the given label.
    - ``variability``: standard deviation over epochs of that probability (population, ddof=0).
    - ``correctness``: fraction of epochs at which the sample is on the right side of 0.5.
    - ``forgetting_events``: number of consecutive epoch pairs where the sample goes from right to
      wrong. A sample that is never right has 0 events, like one that is always right, so read
      it together with ``correctness``.
    - ``margin``: mean over epochs of the margin of the given label. AUM takes the logit of the
      given label minus the largest other logit. For one log-odds ``z`` of class 1 that is
      ``(2 * label - 1) * z``, which is used when ``logits`` is given (``margin_kind = "logit"``).
      Otherwise the margin is ``p(label) - p(other) = 2 p(label) - 1`` (``"probability"``).
    - ``region``: ``ambiguous`` when ``variability >= ambiguous_variability``, else ``easy`` when
      ``confidence >= easy_confidence``, else ``hard_to_learn``.

    Parameters
    ----------
    probabilities : array [E, N]
        Probability of class 1 per epoch and sample.
    labels : array [N]
    sample_ids : array [N]
    logits : array [E, N], optional
    """
    probabilities = _as_probabilities(probabilities, ndim=(2,))
    labels = _as_labels(labels, probabilities.shape[1])
    sample_ids = _as_sample_ids(sample_ids, probabilities.shape[1])
    if probabilities.shape[0] == 0:
        raise ParameterError("probabilities has no epochs; pass an array of shape [epochs, samples]")
    if logits is not None:
        logits = _as_logits(logits, ndim=(2,))
        if logits.shape != probabilities.shape:
            raise ParameterError(f"logits has shape {logits.shape}; expected {probabilities.shape} like probabilities")

    probability_of_label = np.where(labels == 1, probabilities, 1.0 - probabilities)
    correct = (probabilities > THRESHOLD).astype(np.int64) == labels
    confidence = probability_of_label.mean(axis=0)
    variability = probability_of_label.std(axis=0)

    if logits is not None:
        margin = ((2 * labels - 1) * logits).mean(axis=0)
        margin_kind = "logit"
    else:
        margin = (2.0 * probability_of_label - 1.0).mean(axis=0)
        margin_kind = "probability"

    region = np.where(
        variability >= ambiguous_variability,
        "ambiguous",
        np.where(confidence >= easy_confidence, "easy", "hard_to_learn"),
    )
    return pd.DataFrame(
        {
            "sample_id": sample_ids,
            "label": labels,
            "confidence": confidence,
            "variability": variability,
            "correctness": correct.mean(axis=0),
            "forgetting_events": np.sum(correct[:-1] & ~correct[1:], axis=0).astype(np.int64),
            "margin": margin,
            "margin_kind": margin_kind,
            "region": region,
        }
    )


def training_dynamics_per_split(trajectories: Trajectories, **options) -> dict[str, pd.DataFrame]:
    """Run ``training_dynamics`` on the validation samples, and on the training samples if recorded.

    Returns a dict with key ``"valid"`` and, when ``trajectories.train_probabilities`` exists,
    ``"train"``. Logits are used when recorded. ``options`` go to ``training_dynamics``.
    """
    _validate_trajectories(trajectories)
    dynamics = {
        "valid": training_dynamics(trajectories.probabilities, trajectories.labels, trajectories.sample_ids,
                                   logits=trajectories.logits, **options)
    }
    if trajectories.train_probabilities is not None:
        dynamics["train"] = training_dynamics(
            trajectories.train_probabilities, trajectories.train_labels, trajectories.train_sample_ids,
            logits=trajectories.train_logits, **options,
        )
    return dynamics


# --- likely label errors (confident learning) ------------------------------------------------


def _confident_labels(class_probabilities: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    above = class_probabilities >= thresholds
    candidates = np.where(above, class_probabilities, -np.inf)
    best = np.argmax(candidates, axis=1)

    # A tie between the two classes keeps the given label, so a 50/50 sample is never flagged.
    tied = above.all(axis=1) & (class_probabilities[:, 0] == class_probabilities[:, 1])
    best = np.where(tied, labels, best)
    return np.where(above.any(axis=1), best, -1)


def _class_probabilities(probabilities_of_class1: np.ndarray) -> np.ndarray:
    return np.stack([1.0 - probabilities_of_class1, probabilities_of_class1], axis=1)


def confident_joint(probabilities_of_class1, labels) -> tuple[np.ndarray, np.ndarray]:
    """Compute the per-class thresholds and the confident joint of confident learning.

    Follows Northcutt et al. (2021), "Confident Learning: Estimating Uncertainty in Dataset
    Labels". The threshold of class j is the mean predicted probability of j over the samples
    labelled j. A sample labelled i is counted in ``joint[i, j]``, where j is the class with the
    highest probability among those whose probability reaches their threshold. A sample with
    no class above threshold is not counted. The joint is not calibrated to the label counts.

    Returns
    -------
    thresholds : ndarray [2]
    joint : ndarray [2, 2] of int, rows = given label, columns = confident label
    """
    probabilities = _as_probabilities(probabilities_of_class1, name="probabilities_of_class1", ndim=(1,))
    labels = _as_labels(labels, probabilities.size)
    return _confident_joint(probabilities, labels)[:2]


def _confident_joint(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    counts = np.bincount(labels, minlength=2)
    if (counts == 0).any():
        raise ParameterError(
            f"labels has {counts[0]} samples of class 0 and {counts[1]} of class 1; "
            f"confident learning needs samples of both classes"
        )
    class_probabilities = _class_probabilities(probabilities)
    thresholds = np.array([class_probabilities[labels == j, j].mean() for j in (0, 1)])
    confident = _confident_labels(class_probabilities, labels, thresholds)

    joint = np.zeros((2, 2), dtype=np.int64)
    counted = confident >= 0
    np.add.at(joint, (labels[counted], confident[counted]), 1)
    return thresholds, joint, confident


def rank_label_issues(probabilities_of_class1, labels, sample_ids) -> pd.DataFrame:
    """Flag and rank samples whose given label is likely wrong, by confident learning.

    ``is_label_issue`` marks the samples in the off-diagonal of the confident joint (see
    ``confident_joint``). ``label_issue_score = 1 - self_confidence``, where
    ``self_confidence`` is the probability of the given label, so the most likely errors come
    first. The probabilities must be out-of-sample for the ranking to mean anything (see
    ``probabilities_for_label_issues``).

    Returns
    -------
    DataFrame
        One row per sample, sorted by ``label_issue_score`` (highest first), with columns
        ``sample_id, label, probability, self_confidence, confident_label, label_issue_score,
        is_label_issue``. ``confident_label`` is -1 for a sample with no class above threshold.
    """
    probabilities = _as_probabilities(probabilities_of_class1, name="probabilities_of_class1", ndim=(1,))
    labels = _as_labels(labels, probabilities.size)
    sample_ids = _as_sample_ids(sample_ids, probabilities.size)
    _, _, confident = _confident_joint(probabilities, labels)

    self_confidence = np.where(labels == 1, probabilities, 1.0 - probabilities)
    ranked = pd.DataFrame(
        {
            "sample_id": sample_ids,
            "label": labels,
            "probability": probabilities,
            "self_confidence": self_confidence,
            "confident_label": confident,
            "label_issue_score": 1.0 - self_confidence,
            "is_label_issue": (confident >= 0) & (confident != labels),
        }
    )
    return ranked.sort_values("label_issue_score", ascending=False, kind="stable").reset_index(drop=True)


def probabilities_for_label_issues(
    trajectories: Trajectories, history: pd.DataFrame, *, split: str = "valid"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Choose the probabilities to rank label issues on, for one split.

    For ``valid`` these are the probabilities at the epoch of minimum ``val_loss``, which are
    out-of-sample. For ``train`` they are the mean over epochs 1 to that epoch.

    Returns
    -------
    (probabilities of class 1 [N], labels [N], sample_ids [N])
    """
    _validate_trajectories(trajectories)
    if split not in SPLITS:
        raise ParameterError(f"split={split!r} is invalid; choose one of {list(SPLITS)}")
    best_epoch = epoch_of_minimum_val_loss(history)
    best_index = _epoch_index(trajectories, best_epoch, "epoch of minimum val_loss")

    if split == "valid":
        probabilities = np.asarray(trajectories.probabilities[best_index], dtype=np.float64)
        return probabilities, np.asarray(trajectories.labels), np.asarray(trajectories.sample_ids, dtype=str)

    if trajectories.train_probabilities is None:
        raise ParameterError("split='train' is unavailable: the run recorded no training probabilities; use split='valid'")
    train_probabilities = _as_probabilities(trajectories.train_probabilities, name="trajectories.train_probabilities",
                                            ndim=(2,))
    # NOTE: training probabilities are in-sample, and a model that memorized noisy labels gives
    # them high self-confidence. Averaging over the epochs up to the minimum of val_loss, before
    # the model overfits, is a heuristic. Confident learning expects out-of-sample probabilities,
    # such as out-of-fold predictions from cross-validation.
    probabilities = train_probabilities[: best_index + 1].mean(axis=0)
    return probabilities, np.asarray(trajectories.train_labels), np.asarray(trajectories.train_sample_ids, dtype=str)


def label_issues_per_split(trajectories: Trajectories, history: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Run ``rank_label_issues`` on the validation samples, and on the training samples if recorded.

    The probabilities come from ``probabilities_for_label_issues``. Returns a dict with key
    ``"valid"`` and, when ``trajectories.train_probabilities`` exists, ``"train"``.
    """
    _validate_trajectories(trajectories)
    splits = ["valid"] if trajectories.train_probabilities is None else ["valid", "train"]
    return {
        split: rank_label_issues(*probabilities_for_label_issues(trajectories, history, split=split))
        for split in splits
    }


# --- written explanation ---------------------------------------------------------------------


def _share_text(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%"


def _category_sentence(decomposition: pd.DataFrame, change: float) -> str:
    summary = summarize_categories(decomposition)
    nonzero = summary[summary["total_contribution"] != 0].sort_values("total_contribution", ascending=False)
    parts = [f"`{row.category}` ({row.count} sample{'' if row.count == 1 else 's'}) {_share_text(row.total_contribution, change)}"
             for row in nonzero.itertuples()]
    return "Share of the rise by category: " + ", ".join(parts) + "."


def _accuracy_paragraph(decomposition: pd.DataFrame) -> str:
    n = len(decomposition)
    epoch_from, epoch_to = int(decomposition["epoch_from"].iloc[0]), int(decomposition["epoch_to"].iloc[0])
    labels = decomposition["label"].to_numpy()
    accuracy_from = float(np.mean((decomposition["probability_from"].to_numpy() > THRESHOLD) == (labels == 1)))
    accuracy_to = float(np.mean((decomposition["probability_to"].to_numpy() > THRESHOLD) == (labels == 1)))
    to_wrong = int((decomposition["category"] == "flipped_to_wrong").sum())
    to_right = int((decomposition["category"] == "flipped_to_right").sum())
    return (
        f"Accuracy went from {accuracy_from:.3f} at epoch {epoch_from} to {accuracy_to:.3f} at epoch {epoch_to}: "
        f"{to_wrong} samples crossed the {THRESHOLD} threshold from right to wrong and {to_right} from wrong to right. "
        f"With {n} validation samples, one sample moves accuracy by 1/{n} = {accuracy_resolution(n):.4f}, and "
        f"accuracy changes only when a sample crosses the threshold, while cross-entropy also grows with the "
        f"confidence of predictions that stay wrong."
    )


def _temperature_paragraph(calibration_row: pd.Series, loss_from: float, loss_to: float) -> str:
    epoch = int(calibration_row["epoch"])
    temperature = float(calibration_row["temperature"])
    scaled = float(calibration_row["loss_after_scaling"])
    if temperature > 1:
        reading = "above 1, so the model is overconfident there"
    elif temperature < 1:
        reading = "below 1, so the model is underconfident there"
    else:
        reading = "1, so scaling does not lower the loss there"
    text = (
        f"Temperature scaling at epoch {epoch} gives T = {temperature:.3g} ({reading}) and a loss of {scaled:.4f} "
        f"instead of {loss_to:.4f}. T is fitted on the validation samples themselves, so this is the best that "
        f"scaling can do, not an estimate for new images."
    )
    rise = loss_to - loss_from
    if rise > 0:
        removed = loss_to - scaled
        if removed <= 0:
            text += " It removes none of the rise."
        elif removed > rise:
            text += (f" It removes more than the whole rise ({_share_text(removed, rise)}): the scaled loss at epoch "
                     f"{epoch} is below the unscaled loss at the earlier epoch.")
        else:
            text += f" It removes {_share_text(removed, rise)} of the rise."
    return text


def _next_steps(epoch_from: int, n: int, flagged: pd.DataFrame | None, temperature: float) -> str:
    steps = [
        f"- Stop training at epoch {epoch_from}, the epoch with the lower validation loss, for example with "
        f"`keras.callbacks.EarlyStopping(monitor=\"val_loss\", restore_best_weights=True)`.",
    ]
    if temperature != 1:
        steps.append("- Calibrate the probabilities with a temperature fitted on a held-out split that is not used to "
                     "report results.")
    if flagged is not None and len(flagged) > 0:
        listed = ", ".join(f"`{sample_id}`" for sample_id in flagged["sample_id"].head(5))
        more = f" and {len(flagged) - 5} more" if len(flagged) > 5 else ""
        steps.append(f"- Check the labels of the {len(flagged)} images flagged as likely label errors ({listed}{more}) "
                     f"and relabel those that are wrong.")
    elif flagged is not None:
        steps.append("- Confident learning flags no image as a likely label error, so relabelling is not indicated.")
    steps.append(f"- Add more data: with {n} validation samples, accuracy moves in steps of "
                 f"{100 * accuracy_resolution(n):.2g} percentage points, and a few confidently wrong images dominate "
                 f"the mean loss.")
    return "What to do next:\n\n" + "\n".join(steps)


def explain_in_words(
    decomposition: pd.DataFrame,
    calibration: pd.DataFrame,
    *,
    top_k: int = 10,
    scored_class: str = "positive",
    label_issues: pd.DataFrame | None = None,
) -> str:
    """Write a Markdown explanation of the loss change, every number taken from the tables given.

    Parameters
    ----------
    decomposition : DataFrame from ``decompose_loss_change``
    calibration : DataFrame from ``calibration_per_epoch``; its row for ``epoch_to`` is used
    top_k : number of top contributors to describe
    scored_class : name of class 1, mentioned in the text
    label_issues : DataFrame from ``rank_label_issues``, optional; its flagged samples are listed
    """
    _require_columns(decomposition, DECOMPOSITION_COLUMNS, "decomposition", "decompose_loss_change")
    _require_columns(calibration, ["epoch", "temperature", "loss_after_scaling"], "calibration", "calibration_per_epoch")
    if label_issues is not None:
        _require_columns(label_issues, ["sample_id", "is_label_issue"], "label_issues", "rank_label_issues")
    top_k = _as_count(top_k, "top_k")
    if len(decomposition) == 0:
        raise ParameterError("decomposition has no rows; pass the table returned by decompose_loss_change")

    n = len(decomposition)
    epoch_from, epoch_to = int(decomposition["epoch_from"].iloc[0]), int(decomposition["epoch_to"].iloc[0])
    loss_from, loss_to = float(decomposition["loss_from"].mean()), float(decomposition["loss_to"].mean())
    change = float(decomposition["contribution"].sum())
    rows = calibration[calibration["epoch"] == epoch_to]
    if rows.empty:
        raise ParameterError(f"calibration has no row for epoch_to={epoch_to}; pass calibration_per_epoch(trajectories)")
    calibration_row = rows.iloc[0]
    flagged = label_issues[label_issues["is_label_issue"]] if label_issues is not None else None

    scope = (f"mean cross-entropy of the {n} validation samples, recomputed from `trajectories.npz`; "
             f"probabilities are those of the scored class `{scored_class}`")
    paragraphs = []
    if change > 0:
        paragraphs.append(f"**Validation loss rose by {change:.4f}, from {loss_from:.4f} at epoch {epoch_from} to "
                          f"{loss_to:.4f} at epoch {epoch_to}** ({scope}).")
        top = top_contributors(decomposition, k=top_k)
        top_share = float(top["contribution"].sum())
        already_wrong = int(np.sum((top["probability_from"] > THRESHOLD) != (top["label"] == 1)))
        beyond = ", more than the whole rise because other samples lowered the loss" if top_share > change else ""
        paragraphs.append(
            f"The {len(top)} samples with the largest contributions carry {top_share:.4f} of the rise "
            f"({_share_text(top_share, change)}{beyond}), and {already_wrong} of them were already misclassified at "
            f"epoch {epoch_from}. {_category_sentence(decomposition, change)}"
        )
    else:
        paragraphs.append(f"**Validation loss did not rise from epoch {epoch_from} to epoch {epoch_to}**: it went from "
                          f"{loss_from:.4f} to {loss_to:.4f} (change {change:+.4f}; {scope}), so there is no rise to "
                          f"explain between these epochs. To explain a rise seen in the curves, set epoch_from and "
                          f"epoch_to to the epochs around it.")
    paragraphs.append(_accuracy_paragraph(decomposition))
    paragraphs.append(_temperature_paragraph(calibration_row, loss_from, loss_to))
    if change > 0:
        paragraphs.append(_next_steps(epoch_from, n, flagged, float(calibration_row["temperature"])))
    return "\n\n".join(paragraphs)


# --- files -----------------------------------------------------------------------------------


def write_explanation_files(run_dir: str | os.PathLike, decomposition: pd.DataFrame,
                            calibration: pd.DataFrame) -> list[Path]:
    """Write ``loss_contributions.csv`` and ``calibration.csv`` into the run directory, atomically.

    ``loss_contributions.csv`` has ``sample_id, epoch_from, epoch_to, loss_from, loss_to,
    contribution, category``, then ``label, probability_from, probability_to``.
    ``calibration.csv`` has ``epoch, ece, mce, temperature, loss_after_scaling, roc_auc``, then
    the remaining columns of ``calibration``. Returns the two paths.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ParameterError(f"run_dir {run_dir} is not a directory; pass the folder given to load_run")
    _require_columns(decomposition, DECOMPOSITION_COLUMNS, "decomposition", "decompose_loss_change")
    _require_columns(calibration, CALIBRATION_COLUMNS, "calibration", "calibration_per_epoch")

    contributions = decomposition[LOSS_CONTRIBUTION_COLUMNS + ["label", "probability_from", "probability_to"]]
    extra = [column for column in calibration.columns if column not in CALIBRATION_COLUMNS]
    paths = [run_dir / LOSS_CONTRIBUTIONS_FILE, run_dir / CALIBRATION_FILE]
    write_csv(paths[0], contributions)
    write_csv(paths[1], calibration[CALIBRATION_COLUMNS + extra])
    return paths
