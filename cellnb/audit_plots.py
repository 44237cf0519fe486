"""Draw the tables of ``cellnb.audit`` as matplotlib figures.

Each function takes a table from an ``AuditReport`` and returns a ``matplotlib.figure.Figure``
built without pyplot. Functions that show images decode them with ``cellnb.data.load_image``,
so every image mode is drawn as the model gets it. No function computes a statistic.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import PurePosixPath

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cellnb.data import SPLITS, load_image
from cellnb.errors import ParameterError

logger = logging.getLogger(__name__)

SPLIT_COLORS = {"train": "tab:blue", "valid": "tab:orange", "test": "tab:green"}


def _check_columns(table: pd.DataFrame, columns: Iterable[str], name: str, producer: str) -> None:
    if not isinstance(table, pd.DataFrame):
        raise ParameterError(f"{name} is a {type(table).__name__}; expected the DataFrame {producer}")
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ParameterError(f"{name} lacks the columns {missing}; pass {producer}")


def _check_classes(classes: Sequence[str]) -> list[str]:
    classes = list(classes)
    if len(classes) != 2:
        raise ParameterError(f"classes={classes!r} is invalid; pass the two class names, the scored class second")
    return classes


def _show_image(axis, path: str, size: int) -> None:
    try:
        axis.imshow(load_image(path, size))
    except (OSError, ValueError) as error:
        logger.warning("cannot show image %s: %s", path, error)
        axis.text(0.5, 0.5, "cannot read", ha="center", va="center", color="red", fontsize=8)
    axis.set_xticks([])
    axis.set_yticks([])


def _empty_figure(message: str) -> Figure:
    figure = Figure(figsize=(5, 1.5), layout="constrained")
    axis = figure.subplots()
    axis.text(0.5, 0.5, message, ha="center", va="center")
    axis.set_axis_off()
    return figure


def plot_class_balance(balance: pd.DataFrame, classes: Sequence[str]) -> Figure:
    """Draw image counts per split and class as grouped bars, with the share of the scored class above each split.

    Takes ``AuditReport.balance``.
    """
    classes = _check_classes(classes)
    _check_columns(balance, ["split", "class_0", "class_1", "share_of_scored_class"], "balance", "AuditReport.balance")

    figure = Figure(figsize=(6, 3.5), layout="constrained")
    axis = figure.subplots()
    positions = np.arange(len(balance))
    width = 0.38
    axis.bar(positions - width / 2, balance["class_0"], width, label=f"{classes[0]} (index 0)", color="tab:blue")
    axis.bar(positions + width / 2, balance["class_1"], width, label=f"{classes[1]} (index 1, scored)", color="tab:red")
    for position, row in zip(positions, balance.itertuples()):
        top = max(row.class_0, row.class_1)
        share = "no images" if row.total == 0 else f"{row.share_of_scored_class:.0%} {classes[1]}"
        axis.text(position, top, share, ha="center", va="bottom", fontsize=8)
    axis.set_xticks(positions, balance["split"])
    axis.set_ylabel("images")
    axis.margins(y=0.15)
    axis.legend(fontsize=8)
    axis.set_title("Images per split and class")
    return figure


def plot_duplicate_pairs(pairs: pd.DataFrame, *, max_pairs: int = 8, image_size: int = 128) -> Figure:
    """Show duplicate pairs side by side, one row per pair, with split, label and hash distance.

    Takes ``AuditReport.duplicate_pairs()``; only the first ``max_pairs`` rows are drawn. A pair
    whose labels differ has a red title.
    """
    _check_columns(pairs, ["kind", "path_a", "path_b", "sample_a", "sample_b", "split_a", "split_b",
                           "label_name_a", "label_name_b", "distance"], "pairs", "AuditReport.duplicate_pairs()")
    if pairs.empty:
        return _empty_figure("no duplicate pairs to show")
    drawn_pairs = pairs.head(max_pairs)

    figure = Figure(figsize=(5, 2.4 * len(drawn_pairs)), layout="constrained")
    axes = figure.subplots(len(drawn_pairs), 2, squeeze=False)
    for (left, right), row in zip(axes, drawn_pairs.itertuples()):
        color = "black" if row.label_name_a == row.label_name_b else "red"
        for axis, path, sample_id, split, label in (
            (left, row.path_a, row.sample_a, row.split_a, row.label_name_a),
            (right, row.path_b, row.sample_b, row.split_b, row.label_name_b),
        ):
            _show_image(axis, path, image_size)
            axis.set_title(f"{split}/{label}\n{PurePosixPath(sample_id).name}", fontsize=8, color=color)
        left.set_ylabel(f"{row.kind}, distance {row.distance}", fontsize=8)
    figure.suptitle(f"{len(drawn_pairs)} of {len(pairs)} duplicate pairs (red: the labels differ)")
    return figure


def plot_intensity_histograms(samples: pd.DataFrame, classes: Sequence[str], *, bins: int = 30) -> Figure:
    """Draw, per class, the distribution of per-image mean intensity in each split (densities, shared bins).

    Takes ``AuditReport.samples``. Shifted histograms between train and valid within one class
    mean the splits differ in staining, scanner or exposure, not only in prevalence.
    """
    classes = _check_classes(classes)
    _check_columns(samples, ["split", "label", "mean_intensity"], "samples", "AuditReport.samples")

    figure = Figure(figsize=(10, 3.5), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    edges = np.linspace(0, 255, bins + 1)
    for label, axis in enumerate(axes):
        for split in SPLITS:
            values = samples.loc[(samples["split"] == split) & (samples["label"] == label), "mean_intensity"]
            if len(values):
                axis.hist(values, bins=edges, density=True, histtype="step", linewidth=1.5,
                          color=SPLIT_COLORS[split], label=f"{split} ({len(values)})")
        axis.set_title(f"{classes[label]} (index {label})")
        axis.set_xlabel("mean intensity per image (0-255)")
        axis.legend(fontsize=8)
    axes[0].set_ylabel("density")
    return figure


def plot_class_thumbnails(thumbnails: pd.DataFrame, *, image_size: int = 96, size: float = 1.6) -> Figure:
    """Show thumbnails in rows, one row per split and class, with each image's caption.

    Takes ``AuditReport.thumbnails(per_class=...)``.
    """
    _check_columns(thumbnails, ["path", "split", "label_name", "caption"], "thumbnails",
                   "AuditReport.thumbnails(per_class=...)")
    if thumbnails.empty:
        return _empty_figure("no images to show")
    groups = [members for _, members in thumbnails.groupby(["split", "label_name"], sort=False)]
    columns = max(len(members) for members in groups)

    figure = Figure(figsize=(size * columns, (size + 0.5) * len(groups)), layout="constrained")
    axes = figure.subplots(len(groups), columns, squeeze=False)
    for row_axes, members in zip(axes, groups):
        for axis, row in zip(row_axes, members.itertuples()):
            _show_image(axis, row.path, image_size)
            axis.set_title(row.caption, fontsize=6)
        for unused in row_axes[len(members):]:
            unused.set_axis_off()
    return figure
