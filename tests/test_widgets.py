"""Tests of cellnb.widgets: the widgets are created without a browser, moved, and their figures compared."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402

from cellnb import explain, rundir, widgets  # noqa: E402
from cellnb.errors import ParameterError  # noqa: E402

from conftest import write_image  # noqa: E402

CLASSES = ["benign", "malignant"]


def write_run(root, *, epochs: int = 5, per_class: int = 6):
    """Write a run directory with rundir's writers, and one image per validation sample."""
    rng = np.random.default_rng(7)
    labels = np.repeat([0, 1], per_class)
    sample_ids = np.array([f"valid/{CLASSES[label]}/img_{index:02d}.png" for index, label in enumerate(labels)])
    steps = np.arange(1, epochs + 1)[:, None]
    logits = (2 * labels - 1) * steps * rng.uniform(0.3, 0.9, labels.size) + rng.normal(0, 0.5, (epochs, labels.size))
    logits[:, :2] = -np.abs(logits[:, :2]) * steps / 2 - 0.5 * (1 - 2 * labels[:2])
    probabilities = 1 / (1 + np.exp(-logits))

    run_dir, data_dir = root / "run", root / "data"
    run_dir.mkdir(parents=True)
    for index, sample_id in enumerate(sample_ids):
        write_image(data_dir / sample_id, seed=index, size=16, bright=labels[index] == 1)
    trajectories = rundir.Trajectories(epochs=np.arange(1, epochs + 1), sample_ids=sample_ids, labels=labels,
                                       probabilities=probabilities.astype(np.float32), logits=logits.astype(np.float32))
    rundir.write_trajectories(run_dir / rundir.TRAJECTORIES_FILE, trajectories)
    # The logged validation loss is lowest at epoch 2 and then rises, the case the views explain.
    val_loss = [0.6, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9, 1.0][:epochs]
    history = pd.DataFrame({"epoch": np.arange(1, epochs + 1), "loss": 0.5, "accuracy": 0.8, "val_loss": val_loss,
                            "val_accuracy": 0.75})
    rundir.write_csv(run_dir / rundir.HISTORY_FILE, history)
    samples = pd.DataFrame({"sample_id": sample_ids, "split": "valid", "label": labels,
                            "label_name": [CLASSES[label] for label in labels], "group": "", "sha256": "",
                            "width": 16, "height": 16, "mode": "RGB"})
    rundir.write_csv(run_dir / rundir.SAMPLES_FILE, samples)
    rundir.write_json(run_dir / rundir.CONFIG_FILE, {"classes": CLASSES, "data_dir": str(data_dir)})
    return run_dir


@pytest.fixture
def run(tmp_path):
    return rundir.load_run(write_run(tmp_path))


def scatter_offsets(figure) -> np.ndarray:
    axis = figure.axes[0]
    points = [collection.get_offsets() for collection in axis.collections if isinstance(collection, PathCollection)]
    return np.concatenate(points)


def test_epoch_slider_redraws_the_figure(run):
    explorer = widgets.EpochExplorer(run)
    before_png, before_points = explorer.image.value, scatter_offsets(explorer.figure)

    explorer.slider.value = 2

    assert explorer.image.value != before_png
    assert bytes(explorer.image.value).startswith(b"\x89PNG")
    after_points = scatter_offsets(explorer.figure)
    assert set(after_points[:, 0]) == {2}
    assert set(before_points[:, 0]) == {5}
    expected = sorted(run.trajectories.probabilities[1].astype(float))
    np.testing.assert_allclose(sorted(after_points[:, 1]), expected, rtol=1e-6)
    assert explorer.figure.axes[1].get_title() == "Loss per sample at epoch 2"
    assert explorer.figure.axes[2].get_title() == "reliability at epoch 2"


def test_epoch_view_numbers_come_from_explain(run):
    sample_ids = list(run.trajectories.sample_ids[:4])

    view, reliability = widgets.epoch_view(run, sample_ids, 3, bins=5)

    probabilities = explain.probabilities_at_epoch(run.trajectories, 3)[:4]
    np.testing.assert_allclose(view["probability"], probabilities)
    np.testing.assert_allclose(view["loss"], explain.cross_entropy(probabilities, run.trajectories.labels[:4]))
    pd.testing.assert_frame_equal(reliability, explain.reliability_table(probabilities, run.trajectories.labels[:4], bins=5))


def test_class_filter_keeps_one_class(run):
    explorer = widgets.EpochExplorer(run)

    explorer.filters.class_filter.value = "malignant"

    assert len(explorer.selected_sample_ids()) == 6
    assert all(sample_id.startswith("valid/malignant/") for sample_id in explorer.selected_sample_ids())
    assert len(scatter_offsets(explorer.figure)) == 6
    assert explorer.figure.axes[0].get_title() == "Trajectories up to epoch 5 (6 samples)"


def test_category_filter_matches_decomposition(run):
    explorer = widgets.EpochExplorer(run)
    decomposition = explain.decompose_loss_change(run.trajectories, explorer.epoch_from, explorer.epoch_to)
    category = decomposition["category"].iloc[0]

    explorer.filters.category_filter.value = category

    expected = set(decomposition.loc[decomposition["category"] == category, "sample_id"])
    assert set(explorer.selected_sample_ids()) == expected
    assert (explorer.epoch_from, explorer.epoch_to) == (2, 5)


def test_filter_without_match_draws_a_note(run):
    explorer = widgets.EpochExplorer(run)
    categories = explorer.filters.category_filter.options[1:]
    table = explorer.table

    for category in categories:
        for class_name in CLASSES:
            if table[(table["category"] == category) & (table["label_name"] == class_name)].empty:
                explorer.filters.class_filter.value = class_name
                explorer.filters.category_filter.value = category
                texts = [text.get_text() for axis in explorer.figure.axes for text in axis.texts]
                assert "no samples match the filter" in texts
                return
    pytest.skip("every class has every category in this fixture")


def test_static_figure_rows_per_epoch(run):
    explorer = widgets.EpochExplorer(run)

    figure = explorer.static_figure()

    titles = [axis.get_title() for axis in figure.axes]
    assert titles[0::3] == ["Trajectories up to epoch 1 (12 samples)", "Trajectories up to epoch 2 (12 samples)",
                            "Trajectories up to epoch 5 (12 samples)"]
    assert len(explorer.static_figure(epochs=[3]).axes) == 3
    with pytest.raises(ParameterError, match=r"epochs \[9\] are not recorded"):
        explorer.static_figure(epochs=[9])


def test_sample_table_joins_explain_numbers(run):
    table = widgets.sample_table(run).set_index("sample_id")
    decomposition = explain.decompose_loss_change(run.trajectories, 2, 5).set_index("sample_id")
    ranked = explain.rank_label_issues(*explain.probabilities_for_label_issues(run.trajectories, run.history))

    np.testing.assert_allclose(table.loc[decomposition.index, "contribution"], decomposition["contribution"])
    assert list(table.loc[decomposition.index, "category"]) == list(decomposition["category"])
    ranked = ranked.set_index("sample_id")
    np.testing.assert_allclose(table.loc[ranked.index, "label_issue_score"], ranked["label_issue_score"])
    np.testing.assert_allclose(table["probability_last"], run.trajectories.probabilities[-1].astype(float)[
        [list(run.trajectories.sample_ids).index(sample_id) for sample_id in table.index]])


@pytest.mark.parametrize("key, column", [("contribution", "contribution"), ("final probability", "probability_last"),
                                         ("label-error score", "label_issue_score")])
def test_sample_browser_sorts_descending(run, key, column):
    browser = widgets.SampleBrowser(run)

    browser.sort.value = key

    rows = browser.sorted_rows()
    assert list(rows[column]) == sorted(rows[column], reverse=True)
    assert [value for _, value in browser.select.options] == list(rows["sample_id"])
    assert browser.select.value == rows["sample_id"].iloc[0]


def test_sample_browser_puts_audit_flags_first(run):
    flagged = "valid/benign/img_03.png"
    audit = {"leaked_samples": [{"sample_id": flagged, "split": "valid", "reasons": "same pixels as train/x.png"}]}
    (run.run_dir / "split_audit.json").write_text(json.dumps(audit))

    browser = widgets.SampleBrowser(run)
    browser.sort.value = "split audit flags"

    assert browser.sorted_rows()["sample_id"].iloc[0] == flagged
    assert browser.sorted_rows()["audit_flags"].iloc[0] == "same pixels as train/x.png"
    assert "same pixels as train/x.png" in browser.table_html.value


def test_choosing_a_sample_shows_its_curves(run):
    browser = widgets.SampleBrowser(run)
    first_png = browser.image.value
    target = browser.select.options[-1][1]

    browser.select.value = target

    assert browser.image.value != first_png
    probability_axis, loss_axis = browser.figure.axes[1], browser.figure.axes[2]
    column = list(run.trajectories.sample_ids).index(target)
    expected = run.trajectories.probabilities[:, column].astype(float)
    np.testing.assert_allclose(probability_axis.lines[0].get_ydata(), expected)
    label = run.trajectories.labels[column]
    np.testing.assert_allclose(loss_axis.lines[0].get_ydata(), explain.cross_entropy(expected, [label] * 5))
    assert len(browser.figure.axes[0].images) == 1


def test_sample_browser_filter_and_static_figure(run):
    browser = widgets.SampleBrowser(run)

    browser.filters.class_filter.value = "benign"

    assert set(browser.sorted_rows()["label_name"]) == {"benign"}
    assert len(browser.select.options) == 6
    assert len(browser.static_figure(count=3).axes) == 9


def test_widgets_work_on_a_one_epoch_run(tmp_path):
    run = rundir.load_run(write_run(tmp_path, epochs=1))

    explorer = widgets.EpochExplorer(run)
    browser = widgets.SampleBrowser(run)

    assert explorer.slider.options == (1,)
    assert explorer.filters.category_filter.disabled
    assert browser.table["contribution"].isna().all()
    assert bytes(browser.image.value).startswith(b"\x89PNG")
