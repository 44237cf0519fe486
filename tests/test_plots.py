"""Tests of cellnb.plots: each figure is checked for the axes, lines and points its inputs call for."""

from __future__ import annotations

import logging

import matplotlib

matplotlib.use("Agg")

import matplotlib.image  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from cellnb import explain, plots  # noqa: E402
from cellnb.rundir import Trajectories  # noqa: E402

CLASSES = ["benign", "malignant"]


@pytest.fixture
def trajectories() -> Trajectories:
    rng = np.random.default_rng(3)
    labels = np.tile([0, 1], 15)
    steps = np.arange(1, 9)[:, None]
    logits = (2 * labels - 1) * steps * rng.uniform(0.2, 0.8, 30) + rng.normal(0, 0.8, (8, 30))
    logits[:, :3] *= -1
    return Trajectories(
        epochs=np.arange(1, 9),
        sample_ids=np.array([f"valid/{['benign', 'malignant'][y]}/img_{i:02d}.png" for i, y in enumerate(labels)]),
        labels=labels,
        probabilities=1 / (1 + np.exp(-logits)),
        logits=logits,
    )


@pytest.fixture
def history() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "epoch": [1, 2, 3, 4, 5],
            "loss": [0.7, 0.5, 0.4, 0.3, 0.2],
            "accuracy": [0.6, 0.7, 0.8, 0.85, 0.9],
            "val_loss": [0.65, 0.5, 0.45, 0.55, 0.7],
            "val_accuracy": [0.6, 0.7, 0.75, 0.75, 0.75],
        }
    )


def line_widths(axis) -> list[float]:
    return [line.get_linewidth() for line in axis.lines]


def test_figures_stay_out_of_pyplot(history, trajectories):
    plots.plot_history(history)
    plots.plot_trajectories(trajectories, classes=CLASSES)

    assert plt.get_fignums() == []


def test_plot_history_curves_and_marker(history):
    figure = plots.plot_history(history)

    assert isinstance(figure, Figure)
    assert len(figure.axes) == 2
    for axis, metric in zip(figure.axes, ("loss", "accuracy")):
        assert len(axis.lines) == 3
        np.testing.assert_array_equal(axis.lines[0].get_ydata(), history[metric])
        np.testing.assert_array_equal(axis.lines[1].get_ydata(), history[f"val_{metric}"])
        assert list(axis.lines[2].get_xdata()) == [3, 3]


def test_plot_history_rejects_missing_column(history):
    with pytest.raises(ValueError, match=r"lacks the columns \['val_accuracy'\]"):
        plots.plot_history(history.drop(columns="val_accuracy"))


def test_plot_trajectories_one_line_per_sample(trajectories):
    figure = plots.plot_trajectories(trajectories, classes=CLASSES)

    axis = figure.axes[0]
    assert len(axis.lines) == 30 + 1
    assert list(axis.lines[-1].get_ydata()) == [0.5, 0.5]
    assert axis.get_ylabel() == "P(malignant)"


def test_plot_trajectories_highlights_last_epoch_errors(trajectories):
    misclassified = explain.predicted_labels(trajectories.probabilities[-1]) != trajectories.labels

    figure = plots.plot_trajectories(trajectories, classes=CLASSES)

    widths = line_widths(figure.axes[0])[:-1]
    assert sum(width == 2.0 for width in widths) == int(misclassified.sum())
    assert [width == 2.0 for width in widths] == list(misclassified)


def test_plot_trajectories_colors_by_class(trajectories):
    figure = plots.plot_trajectories(trajectories, classes=CLASSES)

    colors = [line.get_color() for line in figure.axes[0].lines[:-1]]
    assert colors == [plots.CLASS_COLORS[label] for label in trajectories.labels]


def test_plot_trajectories_subset_and_highlight(trajectories):
    chosen = list(trajectories.sample_ids[:4])

    figure = plots.plot_trajectories(trajectories, classes=CLASSES, sample_ids=chosen, highlight=chosen[1:2])

    axis = figure.axes[0]
    assert len(axis.lines) == 4 + 1
    assert line_widths(axis)[:-1] == [0.8, 2.0, 0.8, 0.8]
    np.testing.assert_array_equal(axis.lines[2].get_ydata(), trajectories.probabilities[:, 2])


def test_plot_trajectories_rejects_unknown_sample(trajectories):
    with pytest.raises(ValueError, match="not validation samples.*valid/none.png"):
        plots.plot_trajectories(trajectories, classes=CLASSES, sample_ids=["valid/none.png"])


def test_plot_trajectories_rejects_three_classes(trajectories):
    with pytest.raises(ValueError, match="pass the two class names"):
        plots.plot_trajectories(trajectories, classes=["a", "b", "c"])


def test_plot_loss_change_points_bars_and_labels(trajectories):
    decomposition = explain.decompose_loss_change(trajectories, 3, 8)

    figure = plots.plot_loss_change(decomposition, top_k=5)

    scatter_axis, bar_axis = figure.axes
    collections = [item for item in scatter_axis.collections if isinstance(item, PathCollection)]
    assert len(collections) == decomposition["category"].nunique()
    assert sum(len(item.get_offsets()) for item in collections) == 30
    assert len(scatter_axis.lines) == 1
    rising_in_top = int((decomposition["contribution"].head(5) > 0).sum())
    assert len(scatter_axis.texts) == rising_in_top
    bars = [patch for patch in bar_axis.patches if isinstance(patch, Rectangle)]
    assert len(bars) == 5
    np.testing.assert_allclose([bar.get_width() for bar in bars], decomposition["contribution"].head(5))


def test_plot_loss_change_rejects_zero_top_k(trajectories):
    decomposition = explain.decompose_loss_change(trajectories, 3, 8)

    with pytest.raises(ValueError, match="top_k=0 is invalid"):
        plots.plot_loss_change(decomposition, top_k=0)


def test_plot_reliability_diagram_single_table(trajectories):
    table = explain.reliability_table(trajectories.probabilities[-1], trajectories.labels, bins=10)

    figure = plots.plot_reliability_diagram(table)

    filled = int((table["count"] > 0).sum())
    assert len(figure.axes) == 1
    assert len(figure.axes[0].patches) == 2 * filled
    heights = [patch.get_height() for patch in figure.axes[0].patches[:filled]]
    np.testing.assert_allclose(heights, table.loc[table["count"] > 0, "accuracy"])


def test_plot_reliability_diagram_one_axis_per_epoch(trajectories):
    table = explain.reliability_per_epoch(trajectories, [2, 5, 8], bins=5)

    figure = plots.plot_reliability_diagram(table, columns=2)

    assert len(figure.axes) == 3
    assert [axis.get_title() for axis in figure.axes] == ["epoch 2", "epoch 5", "epoch 8"]


def test_plot_temperature_curves(trajectories):
    calibration = explain.calibration_per_epoch(trajectories)

    figure = plots.plot_temperature(calibration)

    temperature_axis, loss_axis = figure.axes
    assert len(temperature_axis.lines) == 2
    np.testing.assert_allclose(temperature_axis.lines[0].get_ydata(), calibration["temperature"])
    assert len(loss_axis.lines) == 2
    np.testing.assert_allclose(loss_axis.lines[1].get_ydata(), calibration["loss_after_scaling"])


def test_plot_roc_auc_values(trajectories):
    table = explain.roc_auc_per_epoch(trajectories)

    figure = plots.plot_roc_auc(table)

    np.testing.assert_allclose(figure.axes[0].lines[0].get_ydata(), table["roc_auc"])
    assert len(figure.axes[0].texts) == 0


def test_plot_roc_auc_single_class_shows_reason():
    table = pd.DataFrame({"epoch": [1, 2], "roc_auc": [np.nan, np.nan], "note": ["only label 1 among 5 samples"] * 2})

    figure = plots.plot_roc_auc(table)

    assert "only label 1 among 5 samples" in figure.axes[0].texts[0].get_text()


def test_plot_cartography_points_and_regions(trajectories):
    dynamics = explain.training_dynamics(trajectories.probabilities, trajectories.labels, trajectories.sample_ids)

    figure = plots.plot_cartography(dynamics, title="valid")

    axis = figure.axes[0]
    assert len(figure.axes) == 2
    assert len(axis.collections[0].get_offsets()) == 30
    np.testing.assert_allclose(axis.collections[0].get_offsets()[:, 0], dynamics["variability"])
    counts = dynamics["region"].value_counts()
    texts = sorted(text.get_text() for text in axis.texts)
    assert texts == sorted([f"ambiguous ({counts.get('ambiguous', 0)})", f"easy ({counts.get('easy', 0)})",
                            f"hard to learn ({counts.get('hard_to_learn', 0)})"])
    assert axis.get_title() == "valid"


def test_plot_sample_trajectories_panels(trajectories):
    chosen = list(trajectories.sample_ids[:3])
    table = explain.sample_trajectories(trajectories, chosen)

    figure = plots.plot_sample_trajectories(table, classes=CLASSES, epoch_from=2, epoch_to=8, columns=2)

    assert len(figure.axes) == 2 * 3
    probability_axes = [axis for axis in figure.axes if axis.get_ylabel() == "P(malignant)"]
    assert len(probability_axes) == 3
    for axis, sample_id in zip(probability_axes, chosen):
        assert len(axis.lines) == 2
        assert axis.get_title().startswith(sample_id.rsplit("/", 1)[1])
    loss_axes = [axis for axis in figure.axes if axis.get_ylabel() == "cross-entropy"]
    np.testing.assert_allclose(loss_axes[0].lines[0].get_ydata(), table.loc[table["sample_id"] == chosen[0], "loss"])


def test_plot_thumbnails_images_and_missing(tmp_path, caplog):
    for name in ("a.png", "b.png"):
        matplotlib.image.imsave(tmp_path / name, np.random.default_rng(0).uniform(0, 1, (8, 8, 3)))
    paths = [tmp_path / "a.png", tmp_path / "missing.png", tmp_path / "b.png"]

    with caplog.at_level(logging.WARNING, logger="cellnb.plots"):
        figure = plots.plot_thumbnails(paths, ["first", "second", "third"], columns=2)

    assert len(figure.axes) == 3
    images = [[item for item in axis.get_children() if isinstance(item, AxesImage)] for axis in figure.axes]
    assert [len(found) for found in images] == [1, 0, 1]
    assert "cannot read" in figure.axes[1].texts[0].get_text()
    assert [axis.get_title() for axis in figure.axes] == ["first", "second", "third"]
    assert "missing.png" in caplog.text


def test_plot_thumbnails_rejects_title_mismatch(tmp_path):
    with pytest.raises(ValueError, match="paths has 1 entries but titles has 0"):
        plots.plot_thumbnails([tmp_path / "a.png"], [])


def test_plot_label_issues_shows_flagged_only(tmp_path):
    probabilities = np.array([0.1, 0.2, 0.8, 0.9, 0.7, 0.3, 0.5])
    labels = np.array([0, 0, 0, 1, 1, 1, 0])
    ids = [f"img_{i}.png" for i in range(7)]
    for sample_id in ids:
        matplotlib.image.imsave(tmp_path / sample_id, np.zeros((4, 4, 3)))
    issues = explain.rank_label_issues(probabilities, labels, ids)

    figure = plots.plot_label_issues(issues, data_dir=tmp_path, classes=CLASSES, top_k=5)

    assert len(figure.axes) == 2
    assert figure.axes[0].get_title() == "img_2.png\nlabelled benign, P(malignant) = 0.80"
    assert figure.get_suptitle() == "2 likely label errors"
