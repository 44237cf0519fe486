"""Draw the tables of ``cellnb.explain`` and the run history as matplotlib figures.

Each function takes computed tables or arrays and returns a ``matplotlib.figure.Figure``. The
figures are created without pyplot, so they keep no global state. A notebook shows one by
returning it as the last expression of a cell (with ``%matplotlib inline``) or with
``IPython.display.display(fig)``. No function computes a statistic: it only selects and draws.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from cellnb.errors import ParameterError
from cellnb.explain import AMBIGUOUS_VARIABILITY, CATEGORIES, EASY_CONFIDENCE, THRESHOLD, predicted_labels
from cellnb.rundir import Trajectories

logger = logging.getLogger(__name__)

CLASS_COLORS = ("tab:blue", "tab:red")
"""Line colors of class 0 and class 1 (the scored class)."""

CATEGORY_COLORS = {
    "wrong_more_confident": "tab:red",
    "right_less_confident": "tab:orange",
    "flipped_to_wrong": "tab:purple",
    "flipped_to_right": "tab:cyan",
    "right_more_confident": "tab:green",
    "wrong_less_confident": "tab:olive",
}


def _check_columns(table: pd.DataFrame, columns: Iterable[str], name: str, producer: str) -> None:
    if not isinstance(table, pd.DataFrame):
        raise ParameterError(f"{name} is a {type(table).__name__}; expected the DataFrame returned by {producer}")
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ParameterError(f"{name} lacks the columns {missing}; pass the table returned by {producer}")


def _check_classes(classes: Sequence[str]) -> list[str]:
    classes = list(classes)
    if len(classes) != 2:
        raise ParameterError(f"classes={classes!r} is invalid; pass the two class names, the scored class second")
    return classes


def _short_name(sample_id: str) -> str:
    return Path(str(sample_id)).name


def _grid(figure: Figure, count: int, columns: int) -> list:
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False).ravel())
    for unused in axes[count:]:
        unused.remove()
    return list(axes[:count])


def plot_history(history: pd.DataFrame) -> Figure:
    """Draw loss and accuracy per epoch for both splits, with the epoch of lowest ``val_loss`` marked.

    Each of the two axes has the training curve, the validation curve and a dashed vertical
    line at the epoch of lowest ``val_loss``.
    """
    _check_columns(history, ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"], "history",
                   "cellnb.rundir.load_run(run_dir).history")
    best_epoch = int(history.loc[history["val_loss"].idxmin(), "epoch"])

    figure = Figure(figsize=(11, 4), layout="constrained")
    loss_axis, accuracy_axis = figure.subplots(1, 2)
    for axis, metric, name in ((loss_axis, "loss", "cross-entropy loss"), (accuracy_axis, "accuracy", "accuracy")):
        axis.plot(history["epoch"], history[metric], marker="o", markersize=3, label=f"train {metric}")
        axis.plot(history["epoch"], history[f"val_{metric}"], marker="o", markersize=3, label=f"validation {metric}")
        axis.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"lowest val_loss (epoch {best_epoch})")
        axis.set_xlabel("epoch")
        axis.set_ylabel(name)
        axis.legend()
    loss_axis.set_title("Loss")
    accuracy_axis.set_title("Accuracy")
    return figure


def plot_trajectories(
    trajectories: Trajectories,
    *,
    classes: Sequence[str],
    sample_ids: Iterable[str] | None = None,
    highlight: Iterable[str] | None = None,
) -> Figure:
    """Draw the probability of the scored class per epoch, one line per validation sample.

    Lines are colored by true class. Highlighted samples are drawn thick and opaque, the rest
    thin and faint. By default the samples misclassified at the last epoch are highlighted;
    ``highlight`` replaces them with the given sample ids. The dashed line is the 0.5 threshold.
    """
    classes = _check_classes(classes)
    all_ids = np.asarray(trajectories.sample_ids, dtype=str)
    if sample_ids is None:
        columns = np.arange(all_ids.size)
    else:
        position = {sample_id: index for index, sample_id in enumerate(all_ids)}
        requested = [str(sample_id) for sample_id in sample_ids]
        missing = [sample_id for sample_id in requested if sample_id not in position]
        if missing:
            raise ParameterError(f"{len(missing)} sample_ids are not validation samples of this run, e.g. {missing[:3]}")
        columns = np.array([position[sample_id] for sample_id in requested], dtype=np.int64)

    probabilities = np.asarray(trajectories.probabilities)[:, columns]
    labels = np.asarray(trajectories.labels)[columns]
    ids = all_ids[columns]
    if highlight is None:
        highlighted = predicted_labels(probabilities[-1]) != labels
        reason = f"misclassified at epoch {int(trajectories.epochs[-1])}"
    else:
        highlighted = np.isin(ids, [str(sample_id) for sample_id in highlight])
        reason = "highlighted"

    figure = Figure(figsize=(9, 5), layout="constrained")
    axis = figure.subplots()
    epochs = np.asarray(trajectories.epochs)
    for index in range(ids.size):
        strong = bool(highlighted[index])
        axis.plot(epochs, probabilities[:, index], color=CLASS_COLORS[int(labels[index])],
                  linewidth=2.0 if strong else 0.8, alpha=1.0 if strong else 0.25, zorder=3 if strong else 2)
    axis.axhline(THRESHOLD, color="black", linestyle="--", linewidth=1)

    handles = [Line2D([], [], color=CLASS_COLORS[index], label=f"true class: {name}") for index, name in enumerate(classes)]
    handles.append(Line2D([], [], color="black", linestyle="--", label=f"threshold {THRESHOLD}"))
    axis.legend(handles=handles, loc="center right")
    axis.set_xlabel("epoch")
    axis.set_ylabel(f"P({classes[1]})")
    axis.set_ylim(-0.02, 1.02)
    axis.set_title(f"Validation probability trajectories: {ids.size} samples, {int(highlighted.sum())} {reason} (bold)")
    return figure


def plot_loss_change(decomposition: pd.DataFrame, *, top_k: int = 10) -> Figure:
    """Draw each sample's cross-entropy at the two epochs, and the largest contributions.

    Left: ``loss_to`` against ``loss_from`` on log axes, one scatter per category present, with
    the diagonal (no change) dashed and the ``top_k`` contributors annotated. Points above the
    diagonal raised the loss. Of the ``top_k`` largest contributions, those above zero are
    annotated with the file name. Right: the ``top_k`` contributions as horizontal bars.
    """
    _check_columns(decomposition, ["sample_id", "epoch_from", "epoch_to", "loss_from", "loss_to", "contribution",
                                   "category"], "decomposition", "cellnb.explain.decompose_loss_change")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ParameterError(f"top_k={top_k!r} is invalid; pass an integer >= 1")
    epoch_from, epoch_to = int(decomposition["epoch_from"].iloc[0]), int(decomposition["epoch_to"].iloc[0])
    top = decomposition.sort_values("contribution", ascending=False, kind="stable").head(top_k)

    figure = Figure(figsize=(13, 5.5), layout="constrained")
    scatter_axis, bar_axis = figure.subplots(1, 2, width_ratios=(1.2, 1))
    for category in CATEGORIES:
        members = decomposition[decomposition["category"] == category]
        if len(members):
            scatter_axis.scatter(members["loss_from"], members["loss_to"], s=14, color=CATEGORY_COLORS[category],
                                 label=f"{category} ({len(members)})")
    low = float(min(decomposition["loss_from"].min(), decomposition["loss_to"].min()))
    high = float(max(decomposition["loss_from"].max(), decomposition["loss_to"].max()))
    scatter_axis.plot([low, high], [low, high], color="black", linestyle="--", linewidth=1)
    for row in top[top["contribution"] > 0].itertuples():
        scatter_axis.annotate(_short_name(row.sample_id), (row.loss_from, row.loss_to), fontsize=7,
                              xytext=(3, 3), textcoords="offset points")
    scatter_axis.set_xscale("log")
    scatter_axis.set_yscale("log")
    scatter_axis.set_xlabel(f"cross-entropy at epoch {epoch_from}")
    scatter_axis.set_ylabel(f"cross-entropy at epoch {epoch_to}")
    scatter_axis.set_title("Per-sample cross-entropy (above the diagonal: loss rose)")
    scatter_axis.legend(fontsize=8)

    positions = np.arange(len(top))
    bar_axis.barh(positions, top["contribution"], color=[CATEGORY_COLORS[c] for c in top["category"]])
    bar_axis.set_yticks(positions, [_short_name(sample_id) for sample_id in top["sample_id"]], fontsize=8)
    bar_axis.invert_yaxis()
    bar_axis.axvline(0, color="black", linewidth=0.8)
    bar_axis.set_xlabel(f"contribution to the change of mean loss, epoch {epoch_from} to {epoch_to}")
    bar_axis.set_title(f"Top {len(top)} contributors")
    return figure


def plot_reliability_diagram(reliability_table: pd.DataFrame, *, columns: int = 3) -> Figure:
    """Draw reliability diagrams, one axis per epoch when the table has an ``epoch`` column.

    Per non-empty bin, a solid bar shows the accuracy and a hatched outline spans the gap
    between accuracy and mean confidence. The dashed diagonal is perfect calibration, so a
    hatched outline above a solid bar means overconfidence, one inside it underconfidence.
    """
    _check_columns(reliability_table, ["bin_lower", "bin_upper", "count", "mean_confidence", "accuracy", "gap"],
                   "reliability_table", "cellnb.explain.reliability_table or reliability_per_epoch")
    if "epoch" in reliability_table.columns:
        groups = list(reliability_table.groupby("epoch", sort=False))
    else:
        groups = [(None, reliability_table)]

    figure = Figure(figsize=(4 * min(columns, len(groups)), 4 * math.ceil(len(groups) / columns)), layout="constrained")
    for axis, (epoch, table) in zip(_grid(figure, len(groups), columns), groups):
        _draw_reliability(axis, table, "reliability" if epoch is None else f"epoch {epoch}")
    return figure


def _draw_reliability(axis, table: pd.DataFrame, title: str) -> None:
    filled = table[table["count"] > 0]
    centers = (filled["bin_lower"] + filled["bin_upper"]) / 2
    widths = filled["bin_upper"] - filled["bin_lower"]
    axis.bar(centers, filled["accuracy"], width=widths, color="tab:blue", edgecolor="black", label="accuracy")
    axis.bar(centers, filled["gap"], bottom=filled["accuracy"], width=widths, fill=False, edgecolor="tab:red",
             hatch="//", label="gap to mean confidence")
    axis.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1)
    lowest = float(filled["bin_lower"].min()) if len(filled) else 0.5
    axis.set_xlim(min(lowest, 0.5), 1.0)
    axis.set_ylim(0, 1)
    axis.set_xlabel("confidence of the predicted class")
    axis.set_ylabel("accuracy")
    axis.set_title(title)
    axis.legend(loc="upper left", fontsize=8)


def plot_temperature(calibration: pd.DataFrame) -> Figure:
    """Draw the fitted temperature per epoch, and the validation loss before and after scaling.

    Left: the temperature, with T = 1 (no change) dashed; T > 1 means overconfident.
    Right: ``val_loss`` and ``loss_after_scaling``.
    """
    _check_columns(calibration, ["epoch", "val_loss", "temperature", "loss_after_scaling"], "calibration",
                   "cellnb.explain.calibration_per_epoch")
    figure = Figure(figsize=(11, 4), layout="constrained")
    temperature_axis, loss_axis = figure.subplots(1, 2)

    temperature_axis.plot(calibration["epoch"], calibration["temperature"], marker="o", markersize=3)
    temperature_axis.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    temperature_axis.set_xlabel("epoch")
    temperature_axis.set_ylabel("temperature T")
    temperature_axis.set_title("Fitted temperature (T > 1: overconfident)")

    loss_axis.plot(calibration["epoch"], calibration["val_loss"], marker="o", markersize=3, label="val_loss")
    loss_axis.plot(calibration["epoch"], calibration["loss_after_scaling"], marker="o", markersize=3,
                   label="after temperature scaling")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("validation cross-entropy")
    loss_axis.set_title("Validation loss before and after scaling")
    loss_axis.legend()
    return figure


def plot_roc_auc(roc_auc: pd.DataFrame) -> Figure:
    """Draw the validation ROC AUC per epoch; NaN epochs leave gaps, and the reason is shown if all are NaN."""
    _check_columns(roc_auc, ["epoch", "roc_auc"], "roc_auc", "cellnb.explain.roc_auc_per_epoch")
    figure = Figure(figsize=(6, 4), layout="constrained")
    axis = figure.subplots()
    axis.plot(roc_auc["epoch"], roc_auc["roc_auc"], marker="o", markersize=3)
    if roc_auc["roc_auc"].isna().all() and "note" in roc_auc.columns:
        axis.text(0.5, 0.5, f"ROC AUC undefined:\n{roc_auc['note'].iloc[0]}", transform=axis.transAxes,
                  ha="center", va="center", wrap=True)
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("epoch")
    axis.set_ylabel("ROC AUC")
    axis.set_title("Validation ROC AUC")
    return figure


def plot_cartography(
    dynamics: pd.DataFrame,
    *,
    title: str = "",
    ambiguous_variability: float = AMBIGUOUS_VARIABILITY,
    easy_confidence: float = EASY_CONFIDENCE,
) -> Figure:
    """Draw a data map: variability against confidence, one point per sample, colored by correctness.

    The region borders are drawn at the given thresholds, which should be those passed to
    ``training_dynamics``. Each region is labelled with its sample count from ``region``.
    """
    _check_columns(dynamics, ["confidence", "variability", "correctness", "region"], "dynamics",
                   "cellnb.explain.training_dynamics")
    counts = dynamics["region"].value_counts()

    figure = Figure(figsize=(7, 5.5), layout="constrained")
    axis = figure.subplots()
    points = axis.scatter(dynamics["variability"], dynamics["confidence"], c=dynamics["correctness"], cmap="RdYlGn",
                          vmin=0, vmax=1, s=14, edgecolors="none")
    figure.colorbar(points, ax=axis, label="correctness (fraction of epochs right)")

    axis.axvline(ambiguous_variability, color="grey", linestyle="--", linewidth=1)
    axis.plot([0, ambiguous_variability], [easy_confidence, easy_confidence], color="grey", linestyle="--", linewidth=1)
    label_style = {"fontsize": 10, "fontweight": "bold", "color": "dimgrey",
                   "bbox": {"facecolor": "white", "alpha": 0.7, "edgecolor": "none"}}
    left_edge = ambiguous_variability - 0.01
    axis.text(left_edge, 0.98, f"easy ({counts.get('easy', 0)})", ha="right", va="top", **label_style)
    axis.text(left_edge, 0.02, f"hard to learn ({counts.get('hard_to_learn', 0)})", ha="right", va="bottom",
              **label_style)
    axis.text(0.49, 0.98, f"ambiguous ({counts.get('ambiguous', 0)})", ha="right", va="top", **label_style)

    axis.set_xlim(0, 0.5)
    axis.set_ylim(0, 1)
    axis.set_xlabel("variability (std over epochs of the probability of the given label)")
    axis.set_ylabel("confidence (mean over epochs of the probability of the given label)")
    axis.set_title(title or f"Data map, {len(dynamics)} samples")
    return figure


def plot_sample_trajectories(
    sample_table: pd.DataFrame,
    *,
    classes: Sequence[str],
    epoch_from: int | None = None,
    epoch_to: int | None = None,
    columns: int = 5,
) -> Figure:
    """Draw one small panel per sample: probability of the scored class and cross-entropy per epoch.

    Takes the long table of ``cellnb.explain.sample_trajectories``. The probability (solid,
    colored by true class, left axis) and the cross-entropy (grey, dashed, right twin axis) are
    drawn per epoch, with the 0.5 threshold dotted and ``epoch_from``/``epoch_to`` shaded.
    """
    classes = _check_classes(classes)
    _check_columns(sample_table, ["sample_id", "label", "epoch", "probability", "loss"], "sample_table",
                   "cellnb.explain.sample_trajectories")
    sample_ids = list(pd.unique(sample_table["sample_id"]))
    if not sample_ids:
        raise ParameterError("sample_table has no rows; pass at least one sample id to sample_trajectories")

    rows = math.ceil(len(sample_ids) / max(1, min(columns, len(sample_ids))))
    figure = Figure(figsize=(3.2 * min(columns, len(sample_ids)), 2.6 * rows), layout="constrained")
    for axis, sample_id in zip(_grid(figure, len(sample_ids), columns), sample_ids):
        rows_of_sample = sample_table[sample_table["sample_id"] == sample_id]
        label = int(rows_of_sample["label"].iloc[0])
        axis.plot(rows_of_sample["epoch"], rows_of_sample["probability"], color=CLASS_COLORS[label])
        axis.axhline(THRESHOLD, color="black", linestyle=":", linewidth=1)
        if epoch_from is not None and epoch_to is not None:
            axis.axvspan(epoch_from, epoch_to, color="grey", alpha=0.12)
        axis.set_ylim(-0.02, 1.02)
        axis.set_ylabel(f"P({classes[1]})", fontsize=8)
        axis.set_title(f"{_short_name(sample_id)}\ntrue: {classes[label]}", fontsize=8)
        axis.tick_params(labelsize=7)

        loss_axis = axis.twinx()
        loss_axis.plot(rows_of_sample["epoch"], rows_of_sample["loss"], color="grey", linestyle="--")
        loss_axis.set_ylim(bottom=0)
        loss_axis.set_ylabel("cross-entropy", fontsize=8, color="grey")
        loss_axis.tick_params(labelsize=7, labelcolor="grey")
    return figure


def plot_thumbnails(paths: Sequence[str | os.PathLike], titles: Sequence[str], *, columns: int = 5,
                    size: float = 2.2) -> Figure:
    """Show images in a grid, one axis per path, with a title each.

    A path that cannot be read gets an axis with "cannot read" and a logged warning, so a
    missing image is visible rather than skipped.
    """
    paths, titles = list(paths), list(titles)
    if len(paths) != len(titles):
        raise ParameterError(f"paths has {len(paths)} entries but titles has {len(titles)}; pass one title per image")

    figure = Figure(figsize=(size * max(1, min(columns, len(paths))), size * max(1, math.ceil(len(paths) / columns)) + 0.4),
                    layout="constrained")
    if not paths:
        axis = figure.subplots()
        axis.text(0.5, 0.5, "no images to show", ha="center", va="center")
        axis.set_axis_off()
        return figure

    for axis, path, title in zip(_grid(figure, len(paths), columns), paths, titles):
        _draw_image(axis, path, title)
    return figure


def plot_label_issues(label_issues: pd.DataFrame, *, data_dir: str | os.PathLike, classes: Sequence[str],
                      top_k: int = 10, title: str = "") -> Figure:
    """Show the images of the first ``top_k`` flagged rows of ``cellnb.explain.rank_label_issues``.

    An image is read from ``data_dir / sample_id``. Each title gives the file name, the given
    label and the probability of the scored class.
    """
    classes = _check_classes(classes)
    _check_columns(label_issues, ["sample_id", "label", "probability", "is_label_issue"], "label_issues",
                   "cellnb.explain.rank_label_issues")
    flagged = label_issues[label_issues["is_label_issue"]].head(top_k)
    paths = [Path(data_dir) / sample_id for sample_id in flagged["sample_id"]]
    titles = [
        f"{_short_name(sample_id)}\nlabelled {classes[int(label)]}, P({classes[1]}) = {probability:.2f}"
        for sample_id, label, probability in zip(flagged["sample_id"], flagged["label"], flagged["probability"])
    ]
    figure = plot_thumbnails(paths, titles)
    figure.suptitle(title or f"{len(flagged)} likely label errors")
    return figure


# --- views of one epoch and of one sample, drawn by cellnb.widgets and for static reports -------

EPOCH_VIEW_COLUMNS = ["sample_id", "label", "probability", "loss"]


def plot_epoch_view(
    trajectories: Trajectories,
    epoch_view: pd.DataFrame,
    reliability: pd.DataFrame,
    *,
    classes: Sequence[str],
    epoch: int,
) -> Figure:
    """Draw one epoch in three panels: trajectories up to it, the per-sample loss histogram, the reliability diagram.

    ``epoch_view`` has one row per sample to draw, with ``sample_id, label, probability, loss``
    at ``epoch`` (``cellnb.widgets.epoch_view`` builds it from ``cellnb.explain``), and
    ``reliability`` is ``cellnb.explain.reliability_table`` of the same samples. The trajectory
    panel draws each sample solid up to ``epoch`` and faint after it, with a dot at ``epoch``.
    """
    return plot_epoch_views(trajectories, {epoch: (epoch_view, reliability)}, classes=classes)


def plot_epoch_views(
    trajectories: Trajectories,
    views: dict[int, tuple[pd.DataFrame, pd.DataFrame]],
    *,
    classes: Sequence[str],
) -> Figure:
    """Draw ``plot_epoch_view`` for several epochs, one row each, for a static report.

    ``views`` maps an epoch to its ``(epoch_view, reliability)`` pair.
    """
    classes = _check_classes(classes)
    if not views:
        raise ParameterError("views is empty; pass at least one epoch with its (epoch_view, reliability) tables")
    for epoch, (epoch_view, reliability) in views.items():
        _check_columns(epoch_view, EPOCH_VIEW_COLUMNS, f"epoch_view of epoch {epoch}", "cellnb.widgets.epoch_view")
        _check_columns(reliability, ["bin_lower", "bin_upper", "count", "mean_confidence", "accuracy", "gap"],
                       f"reliability of epoch {epoch}", "cellnb.explain.reliability_table")

    figure = Figure(figsize=(15, 4.2 * len(views)), layout="constrained")
    axes = figure.subplots(len(views), 3, squeeze=False, width_ratios=(1.5, 1, 1))
    for row, (epoch, (epoch_view, reliability)) in zip(axes, views.items()):
        _draw_trajectories_until(row[0], trajectories, epoch_view, classes, int(epoch))
        _draw_loss_histogram(row[1], epoch_view, classes, int(epoch))
        if len(epoch_view):
            _draw_reliability(row[2], reliability, f"reliability at epoch {epoch}")
        else:
            _draw_no_samples(row[2])
    return figure


def _draw_trajectories_until(axis, trajectories: Trajectories, epoch_view: pd.DataFrame, classes: list[str],
                             epoch: int) -> None:
    epochs = np.asarray(trajectories.epochs)
    position = {sample_id: index for index, sample_id in enumerate(np.asarray(trajectories.sample_ids, dtype=str))}
    columns = [position[str(sample_id)] for sample_id in epoch_view["sample_id"]]
    probabilities = np.asarray(trajectories.probabilities)[:, columns]
    labels = epoch_view["label"].to_numpy()
    until = epochs <= epoch

    for index in range(len(columns)):
        color = CLASS_COLORS[int(labels[index])]
        axis.plot(epochs[until], probabilities[until, index], color=color, linewidth=1.0, alpha=0.6)
        axis.plot(epochs[epochs >= epoch], probabilities[epochs >= epoch, index], color=color, linewidth=0.6,
                  alpha=0.12)
    for label in (0, 1):
        chosen = epoch_view[epoch_view["label"] == label]
        axis.scatter(np.full(len(chosen), epoch), chosen["probability"], s=16, color=CLASS_COLORS[label], zorder=4,
                     edgecolors="black", linewidths=0.4, label=f"true class: {classes[label]} ({len(chosen)})")
    axis.axhline(THRESHOLD, color="black", linestyle="--", linewidth=1)
    axis.axvline(epoch, color="grey", linewidth=1)
    axis.set_xlim(epochs.min() - 0.2, epochs.max() + 0.2)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel("epoch")
    axis.set_ylabel(f"P({classes[1]})")
    axis.set_title(f"Trajectories up to epoch {epoch} ({len(epoch_view)} samples)")
    axis.legend(loc="center left", fontsize=8)


def _draw_loss_histogram(axis, epoch_view: pd.DataFrame, classes: list[str], epoch: int) -> None:
    if not len(epoch_view):
        _draw_no_samples(axis)
        return
    losses = epoch_view["loss"].to_numpy(dtype=float)
    edges = np.linspace(0.0, max(float(losses.max()), 1.0), 21)
    stacks = [losses[epoch_view["label"].to_numpy() == label] for label in (0, 1)]
    axis.hist(stacks, bins=edges, stacked=True, color=list(CLASS_COLORS),
              label=[f"true class: {name}" for name in classes])
    axis.axvline(float(losses.mean()), color="black", linestyle="--", linewidth=1, label=f"mean {losses.mean():.3f}")
    axis.set_xlabel(f"per-sample cross-entropy at epoch {epoch}")
    axis.set_ylabel("samples")
    axis.set_title(f"Loss per sample at epoch {epoch}")
    axis.legend(fontsize=8)


def _draw_no_samples(axis) -> None:
    axis.text(0.5, 0.5, "no samples match the filter", ha="center", va="center")
    axis.set_axis_off()


def plot_sample_details(
    sample_table: pd.DataFrame,
    image_paths: Sequence[str | os.PathLike],
    *,
    classes: Sequence[str],
    titles: Sequence[str] | None = None,
    epoch_from: int | None = None,
    epoch_to: int | None = None,
) -> Figure:
    """Draw one row per sample: its image, its probability of the scored class and its cross-entropy per epoch.

    Takes the long table of ``cellnb.explain.sample_trajectories`` and one image path per
    sample, in the order the samples first appear in the table. ``epoch_from``/``epoch_to``
    shade the compared span. An image that cannot be read is shown as "cannot read".
    """
    classes = _check_classes(classes)
    _check_columns(sample_table, ["sample_id", "label", "epoch", "probability", "loss"], "sample_table",
                   "cellnb.explain.sample_trajectories")
    sample_ids = list(pd.unique(sample_table["sample_id"]))
    image_paths = list(image_paths)
    if not sample_ids:
        raise ParameterError("sample_table has no rows; pass at least one sample id to sample_trajectories")
    if len(image_paths) != len(sample_ids):
        raise ParameterError(f"image_paths has {len(image_paths)} entries for {len(sample_ids)} samples; pass one per sample")
    titles = list(titles) if titles is not None else [_short_name(sample_id) for sample_id in sample_ids]

    figure = Figure(figsize=(12, 3.0 * len(sample_ids)), layout="constrained")
    axes = figure.subplots(len(sample_ids), 3, squeeze=False, width_ratios=(0.7, 1, 1))
    for row, sample_id, path, title in zip(axes, sample_ids, image_paths, titles):
        rows_of_sample = sample_table[sample_table["sample_id"] == sample_id]
        label = int(rows_of_sample["label"].iloc[0])
        _draw_image(row[0], path, f"{title}\ntrue: {classes[label]}")

        row[1].plot(rows_of_sample["epoch"], rows_of_sample["probability"], color=CLASS_COLORS[label], marker="o",
                    markersize=3)
        row[1].axhline(THRESHOLD, color="black", linestyle=":", linewidth=1)
        row[1].set_ylim(-0.02, 1.02)
        row[1].set_ylabel(f"P({classes[1]})")
        row[1].set_title("probability of the scored class", fontsize=9)

        row[2].plot(rows_of_sample["epoch"], rows_of_sample["loss"], color="grey", marker="o", markersize=3)
        row[2].set_ylim(bottom=0)
        row[2].set_ylabel("cross-entropy")
        row[2].set_title("loss of this sample", fontsize=9)
        for axis in row[1:]:
            axis.set_xlabel("epoch")
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            if epoch_from is not None and epoch_to is not None:
                axis.axvspan(epoch_from, epoch_to, color="grey", alpha=0.12)
    return figure


def _draw_image(axis, path, title: str) -> None:
    try:
        image = matplotlib.image.imread(path)
    except (OSError, ValueError) as error:
        logger.warning("cannot show image %s: %s", path, error)
        axis.text(0.5, 0.5, f"cannot read\n{_short_name(path)}", ha="center", va="center", fontsize=8, color="red")
    else:
        axis.imshow(image, cmap="gray" if image.ndim == 2 else None)
    axis.set_title(title, fontsize=8)
    axis.set_axis_off()
