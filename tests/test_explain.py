"""Tests of cellnb.explain on small arrays built here, and of notebook 03 run by papermill on a fake run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.image  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra.numpy import arrays  # noqa: E402
from scipy.special import expit  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from cellnb import explain  # noqa: E402
from cellnb.rundir import SAMPLE_COLUMNS, Trajectories, load_run, write_csv, write_json, write_trajectories  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "03_explain_loss.ipynb"
FAKE_EPOCHS = 10


# --- fake run directory ----------------------------------------------------------------------


def _simulated_logits(rng, labels, mislabeled, ambiguous):
    """Logits of class 1 per epoch: most samples saturate on the right side, mislabeled ones
    look like the other class and grow more confident every epoch, ambiguous ones oscillate."""
    sign = 2 * labels - 1
    steps = np.arange(1, FAKE_EPOCHS + 1)[:, None]
    scale = rng.uniform(2.5, 6.0, size=labels.size)
    logits = sign * scale * (1 - np.exp(-steps / 2.0)) + rng.normal(0, 0.3, size=(FAKE_EPOCHS, labels.size))
    logits[:, mislabeled] = -sign[mislabeled] * (rng.uniform(1.5, 2.5, mislabeled.size) + 0.5 * steps)
    logits[:, ambiguous] = sign[ambiguous] * (0.2 + 1.5 * np.sin(1.3 * steps))
    return logits


def _write_thumbnail(path: Path, label: int, rng) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.clip(np.full((12, 12, 3), 0.2 + 0.6 * label) + rng.uniform(0, 0.2, (12, 12, 3)), 0, 1)
    matplotlib.image.imsave(path, image)


def build_fake_run(root: Path) -> Path:
    """Write a run directory with simulated trajectories, history, samples, config and thumbnails.

    40 validation and 60 training samples over 10 epochs; in each split 4 samples are mislabeled
    and 2 are ambiguous. history.csv is computed from the stored float32 probabilities with
    explain.cross_entropy, as the trainer does.
    """
    rng = np.random.default_rng(7)
    data_dir = root / "data"
    samples, splits = [], {}
    for split, size in (("valid", 40), ("train", 60)):
        labels = np.tile([0, 1], size // 2)
        sample_ids = np.array([f"{split}/{['negative', 'positive'][y]}/img_{i:03d}.png" for i, y in enumerate(labels)])
        chosen = rng.choice(size, 6, replace=False)
        splits[split] = (sample_ids, labels, _simulated_logits(rng, labels, chosen[:4], chosen[4:]))
        for sample_id, label in zip(sample_ids, labels):
            _write_thumbnail(data_dir / sample_id, int(label), rng)
            samples.append({"sample_id": sample_id, "split": split, "label": int(label),
                            "label_name": ["negative", "positive"][label], "group": "", "sha256": "0" * 64,
                            "width": 12, "height": 12, "mode": "RGB"})

    valid_ids, valid_labels, valid_logits = splits["valid"]
    train_ids, train_labels, train_logits = splits["train"]
    trajectories = Trajectories(
        epochs=np.arange(1, FAKE_EPOCHS + 1), sample_ids=valid_ids, labels=valid_labels,
        probabilities=expit(valid_logits).astype(np.float32), logits=valid_logits.astype(np.float32),
        train_sample_ids=train_ids, train_labels=train_labels,
        train_probabilities=expit(train_logits).astype(np.float32), train_logits=train_logits.astype(np.float32),
    )
    stored = trajectories.to_arrays()
    history = pd.DataFrame(
        {
            "epoch": stored["epochs"],
            "loss": explain.cross_entropy(stored["train_probabilities"], train_labels).mean(axis=1),
            "accuracy": (explain.predicted_labels(stored["train_probabilities"]) == train_labels).mean(axis=1),
            "val_loss": explain.cross_entropy(stored["probabilities"], valid_labels).mean(axis=1),
            "val_accuracy": (explain.predicted_labels(stored["probabilities"]) == valid_labels).mean(axis=1),
        }
    )

    run_dir = root / "run"
    run_dir.mkdir(parents=True)
    write_trajectories(run_dir / "trajectories.npz", trajectories)
    write_csv(run_dir / "history.csv", history)
    write_csv(run_dir / "samples.csv", pd.DataFrame(samples, columns=SAMPLE_COLUMNS))
    write_json(run_dir / "config.json", {"classes": ["negative", "positive"], "data_dir": str(data_dir),
                                         "epochs": FAKE_EPOCHS})
    return run_dir


@pytest.fixture
def fake_run_dir(tmp_path) -> Path:
    return build_fake_run(tmp_path)


def make_trajectories(probabilities, labels, *, logits=None) -> Trajectories:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    return Trajectories(
        epochs=np.arange(1, probabilities.shape[0] + 1),
        sample_ids=np.array([f"valid/s{i}.png" for i in range(probabilities.shape[1])]),
        labels=np.asarray(labels),
        probabilities=probabilities,
        logits=logits,
    )


def make_history(val_losses) -> pd.DataFrame:
    return pd.DataFrame({"epoch": np.arange(1, len(val_losses) + 1), "val_loss": val_losses})


# --- cross-entropy ---------------------------------------------------------------------------


def test_cross_entropy_hand_values():
    losses = explain.cross_entropy([0.9, 0.9, 0.2], [1, 0, 0])

    assert losses.dtype == np.float64
    np.testing.assert_allclose(losses, [-math.log(0.9), -math.log(0.1), -math.log(0.8)], rtol=1e-12)


def test_cross_entropy_clips_like_keras():
    losses = explain.cross_entropy([0.0, 1.0, 0.0, 1.0], [1, 1, 0, 0])

    clipped_wrong = -math.log(1e-7)
    clipped_right = -math.log(1 - 1e-7)
    np.testing.assert_allclose(losses, [clipped_wrong, clipped_right, clipped_right, clipped_wrong], rtol=1e-12)


def test_cross_entropy_two_dimensional_rows():
    probabilities = np.array([[0.3, 0.6, 0.99], [0.7, 0.1, 0.5]])
    labels = np.array([1, 0, 1])

    losses = explain.cross_entropy(probabilities, labels)

    assert losses.shape == (2, 3)
    np.testing.assert_array_equal(losses[1], explain.cross_entropy(probabilities[1], labels))


def test_cross_entropy_rejects_logits():
    with pytest.raises(ValueError, match=r"outside \[0, 1\].*not logits"):
        explain.cross_entropy([0.5, 2.3], [0, 1])


def test_cross_entropy_rejects_unknown_label():
    with pytest.raises(ValueError, match=r"labels contains \['2'\]"):
        explain.cross_entropy([0.5, 0.3], [0, 2])


def test_cross_entropy_rejects_label_count_mismatch():
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        explain.cross_entropy([0.5, 0.3, 0.1], [0, 1])


@pytest.mark.slow
def test_cross_entropy_matches_keras_categorical():
    keras = pytest.importorskip("keras")
    rng = np.random.default_rng(0)
    probabilities = np.concatenate([rng.uniform(0, 1, 200), [0.0, 1.0, 1e-9, 1 - 1e-9]]).astype(np.float32)
    labels = rng.integers(0, 2, probabilities.size)
    labels[-4:] = [1, 0, 0, 1]

    softmax = np.stack([1 - probabilities, probabilities], axis=1).astype(np.float32)
    one_hot = np.eye(2, dtype=np.float32)[labels]
    expected = np.asarray(keras.losses.categorical_crossentropy(one_hot, softmax))

    np.testing.assert_allclose(explain.cross_entropy(probabilities, labels), expected, rtol=1e-5, atol=1e-6)


# --- epochs ----------------------------------------------------------------------------------


def test_resolve_epochs_defaults():
    history = make_history([0.9, 0.5, 0.4, 0.6, 0.8])

    assert explain.resolve_epochs(history) == (3, 5)


def test_resolve_epochs_zero_means_default():
    history = make_history([0.9, 0.5, 0.4, 0.6, 0.8])

    assert explain.resolve_epochs(history, 0, 0) == (3, 5)


def test_resolve_epochs_explicit_values():
    history = make_history([0.9, 0.5, 0.4, 0.6, 0.8])

    assert explain.resolve_epochs(history, 1, 4) == (1, 4)


def test_resolve_epochs_minimum_up_to_epoch_to():
    history = make_history([0.9, 0.5, 0.7, 0.3, 0.8])

    assert explain.resolve_epochs(history, epoch_to=3) == (2, 3)


def test_resolve_epochs_falling_loss():
    history = make_history([0.9, 0.5, 0.4, 0.3])

    assert explain.resolve_epochs(history) == (1, 4)


def test_resolve_epochs_rejects_unrecorded_epoch():
    history = make_history([0.9, 0.5, 0.4, 0.6, 0.8])

    with pytest.raises(ValueError, match=r"epoch_to=9 is not a recorded epoch; choose one of 1\.\.5"):
        explain.resolve_epochs(history, epoch_to=9)


def test_resolve_epochs_rejects_reversed_order():
    history = make_history([0.9, 0.5, 0.4, 0.6, 0.8])

    with pytest.raises(ValueError, match="epoch_from=4 must be earlier than epoch_to=2"):
        explain.resolve_epochs(history, 4, 2)


def test_resolve_epochs_rejects_single_epoch():
    with pytest.raises(ValueError, match="at least two epochs"):
        explain.resolve_epochs(make_history([0.5]))


def test_probabilities_at_epoch_selects_row():
    trajectories = make_trajectories([[0.1, 0.2], [0.3, 0.4]], [0, 1])

    np.testing.assert_array_equal(explain.probabilities_at_epoch(trajectories, 2), [0.3, 0.4])


# --- decomposition ---------------------------------------------------------------------------


# One sample per category, label given, probability of class 1 at epochs 1 and 2.
CATEGORY_CASES = [
    ("wrong_more_confident", 1, 0.30, 0.10),
    ("wrong_less_confident", 0, 0.90, 0.60),
    ("right_less_confident", 1, 0.95, 0.70),
    ("right_more_confident", 0, 0.20, 0.05),
    ("flipped_to_wrong", 0, 0.40, 0.55),
    ("flipped_to_right", 1, 0.45, 0.51),
    ("right_more_confident", 1, 0.80, 0.80),
    ("wrong_less_confident", 1, 0.20, 0.20),
]


def test_decompose_categories_hand_cases():
    labels = [case[1] for case in CATEGORY_CASES]
    probabilities = [[case[2] for case in CATEGORY_CASES], [case[3] for case in CATEGORY_CASES]]
    trajectories = make_trajectories(probabilities, labels)

    decomposition = explain.decompose_loss_change(trajectories, 1, 2).set_index("sample_id")

    for index, (category, *_rest) in enumerate(CATEGORY_CASES):
        assert decomposition.loc[f"valid/s{index}.png", "category"] == category, index


def test_decompose_probability_of_one_half_counts_as_class_zero():
    trajectories = make_trajectories([[0.45, 0.55], [0.50, 0.50]], [1, 1])

    decomposition = explain.decompose_loss_change(trajectories, 1, 2).set_index("sample_id")

    assert decomposition.loc["valid/s0.png", "category"] == "wrong_less_confident"
    assert decomposition.loc["valid/s1.png", "category"] == "flipped_to_wrong"


def test_decompose_contribution_values():
    trajectories = make_trajectories([[0.8, 0.3], [0.6, 0.1]], [1, 0])

    decomposition = explain.decompose_loss_change(trajectories, 1, 2).set_index("sample_id")

    assert decomposition.loc["valid/s0.png", "contribution"] == pytest.approx((math.log(0.8) - math.log(0.6)) / 2)
    assert decomposition.loc["valid/s1.png", "contribution"] == pytest.approx((math.log(0.7) - math.log(0.9)) / 2)


def test_decompose_columns_and_order():
    trajectories = make_trajectories([[0.8, 0.3, 0.5], [0.6, 0.1, 0.9]], [1, 0, 0])

    decomposition = explain.decompose_loss_change(trajectories, 1, 2)

    assert list(decomposition.columns) == explain.DECOMPOSITION_COLUMNS
    assert decomposition["contribution"].is_monotonic_decreasing
    assert decomposition["epoch_from"].tolist() == [1, 1, 1]
    assert decomposition["epoch_to"].tolist() == [2, 2, 2]


@settings(max_examples=60, deadline=None)
@given(
    probabilities=arrays(np.float32, (3, 12), elements=st.floats(0, 1, width=32)),
    labels=arrays(np.int64, 12, elements=st.integers(0, 1)),
)
def test_decompose_sums_to_mean_change(probabilities, labels):
    trajectories = make_trajectories(probabilities, labels)

    decomposition = explain.decompose_loss_change(trajectories, 1, 3)

    losses = explain.cross_entropy(probabilities, labels)
    assert decomposition["contribution"].sum() == pytest.approx(losses[2].mean() - losses[0].mean(), abs=1e-9)
    assert set(decomposition["category"]) <= set(explain.CATEGORIES)
    rising = decomposition[decomposition["contribution"] > 0]
    assert set(rising["category"]) <= {"wrong_more_confident", "right_less_confident", "flipped_to_wrong"}


def test_decompose_rejects_reversed_epochs():
    trajectories = make_trajectories([[0.8], [0.6]], [1])

    with pytest.raises(ValueError, match="epoch_from=2 must be earlier than epoch_to=1"):
        explain.decompose_loss_change(trajectories, 2, 1)


def test_decompose_rejects_unrecorded_epoch():
    trajectories = make_trajectories([[0.8], [0.6]], [1])

    with pytest.raises(ValueError, match=r"epoch_to=3 is not a recorded epoch; choose one of 1\.\.2"):
        explain.decompose_loss_change(trajectories, 1, 3)


def test_summarize_categories_counts_and_shares():
    labels = [case[1] for case in CATEGORY_CASES]
    probabilities = [[case[2] for case in CATEGORY_CASES], [case[3] for case in CATEGORY_CASES]]
    decomposition = explain.decompose_loss_change(make_trajectories(probabilities, labels), 1, 2)

    summary = explain.summarize_categories(decomposition).set_index("category")

    assert list(summary.index) == list(explain.CATEGORIES)
    assert summary["count"].sum() == len(CATEGORY_CASES)
    assert summary.loc["right_more_confident", "count"] == 2
    assert summary["total_contribution"].sum() == pytest.approx(decomposition["contribution"].sum())
    assert summary["share_of_rise"].sum() == pytest.approx(1.0)


def test_summarize_categories_no_rise():
    decomposition = explain.decompose_loss_change(make_trajectories([[0.6, 0.4], [0.9, 0.1]], [1, 0]), 1, 2)

    summary = explain.summarize_categories(decomposition)

    assert summary["share_of_rise"].isna().all()
    assert summary.set_index("category").loc["right_more_confident", "count"] == 2


def test_top_contributors_shares():
    trajectories = make_trajectories([[0.8, 0.3, 0.5, 0.9], [0.2, 0.1, 0.5, 0.95]], [1, 0, 0, 1])
    decomposition = explain.decompose_loss_change(trajectories, 1, 2)

    top = explain.top_contributors(decomposition, k=2)

    assert top["sample_id"].tolist() == ["valid/s0.png", "valid/s2.png"]
    change = decomposition["contribution"].sum()
    assert top["share_of_rise"].iloc[0] == pytest.approx(top["contribution"].iloc[0] / change)
    assert top["cumulative_share"].iloc[1] == pytest.approx(top["contribution"].sum() / change)


def test_sample_trajectories_long_format():
    trajectories = make_trajectories([[0.8, 0.3], [0.6, 0.1], [0.2, 0.4]], [1, 0])

    table = explain.sample_trajectories(trajectories, ["valid/s1.png"])

    assert table["epoch"].tolist() == [1, 2, 3]
    np.testing.assert_allclose(table["probability"], [0.3, 0.1, 0.4])
    np.testing.assert_allclose(table["loss"], -np.log([0.7, 0.9, 0.6]))


def test_sample_trajectories_rejects_unknown_id():
    trajectories = make_trajectories([[0.8], [0.6]], [1])

    with pytest.raises(ValueError, match="not validation samples.*valid/missing.png"):
        explain.sample_trajectories(trajectories, ["valid/missing.png"])


# --- accuracy side ---------------------------------------------------------------------------


def test_accuracy_resolution_is_reciprocal():
    assert explain.accuracy_resolution(200) == 0.005


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_accuracy_resolution_rejects_invalid(value):
    with pytest.raises(ValueError, match=r"n=.* is invalid; pass an integer >= 1"):
        explain.accuracy_resolution(value)


def test_threshold_crossings_endpoints_and_steps():
    # Sample 0 goes right -> wrong -> right -> wrong; sample 1 wrong -> right; sample 2 stays right.
    probabilities = [[0.7, 0.2, 0.9], [0.3, 0.2, 0.9], [0.6, 0.6, 0.8], [0.4, 0.7, 0.95]]
    trajectories = make_trajectories(probabilities, [1, 1, 1])

    crossings = explain.threshold_crossings(trajectories, 1, 4).set_index("direction")

    assert crossings.loc["to_wrong", "samples_at_endpoints"] == 1
    assert crossings.loc["to_right", "samples_at_endpoints"] == 1
    assert crossings.loc["to_wrong", "crossings_between_epochs"] == 2
    assert crossings.loc["to_right", "crossings_between_epochs"] == 2


def test_roc_auc_per_epoch_matches_sklearn():
    rng = np.random.default_rng(1)
    probabilities = rng.uniform(0, 1, (3, 30))
    labels = rng.integers(0, 2, 30)

    table = explain.roc_auc_per_epoch(make_trajectories(probabilities, labels))

    for row, epoch_probabilities in zip(table.itertuples(), probabilities):
        assert row.roc_auc == pytest.approx(roc_auc_score(labels, epoch_probabilities))
        assert row.note == ""


def test_roc_auc_single_class_nan():
    table = explain.roc_auc_per_epoch(make_trajectories([[0.2, 0.9, 0.4]], [1, 1, 1]))

    assert math.isnan(table["roc_auc"].iloc[0])
    assert table["note"].iloc[0] == "only label 1 among 3 samples; ROC AUC needs both classes"


def test_threshold_table_at_half():
    probabilities = [0.9, 0.6, 0.4, 0.2, 0.7, 0.1]
    labels = [1, 1, 1, 0, 0, 0]

    row = explain.threshold_table(probabilities, labels).set_index("rule").loc["0.5"]

    assert row["sensitivity"] == pytest.approx(2 / 3)
    assert row["specificity"] == pytest.approx(2 / 3)
    assert row["balanced_accuracy"] == pytest.approx(2 / 3)
    assert row["accuracy"] == pytest.approx(4 / 6)


def test_threshold_table_youden_maximizes_j():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 80)
    probabilities = np.clip(0.3 * labels + rng.uniform(0, 0.7, 80), 0, 1)

    row = explain.threshold_table(probabilities, labels).set_index("rule").loc["youden"]

    best_j = max(
        (probabilities[labels == 1] >= t).mean() - (probabilities[labels == 0] >= t).mean() for t in probabilities
    )
    assert row["sensitivity"] + row["specificity"] - 1 == pytest.approx(best_j)
    assert row["threshold"] in probabilities


def test_threshold_table_single_class_youden_nan():
    table = explain.threshold_table([0.2, 0.7], [0, 0]).set_index("rule")

    assert math.isnan(table.loc["0.5", "sensitivity"])
    assert table.loc["0.5", "specificity"] == 0.5
    assert table.loc["youden"].isna().all()


# --- calibration -----------------------------------------------------------------------------


def straightforward_calibration_errors(probabilities, labels, bins):
    """ECE and MCE with a loop over bins, written independently of cellnb."""
    total, weighted, largest = len(probabilities), 0.0, 0.0
    predicted = [1 if p >= 0.5 else 0 for p in probabilities]
    confidence = [p if c == 1 else 1 - p for p, c in zip(probabilities, predicted)]
    for m in range(bins):
        lower, upper = m / bins, (m + 1) / bins
        members = [i for i, c in enumerate(confidence) if lower < c <= upper or (m == 0 and c == 0)]
        if not members:
            continue
        accuracy = sum(predicted[i] == labels[i] for i in members) / len(members)
        mean_confidence = sum(confidence[i] for i in members) / len(members)
        weighted += len(members) / total * abs(accuracy - mean_confidence)
        largest = max(largest, abs(accuracy - mean_confidence))
    return weighted, largest


@pytest.mark.parametrize("seed, bins", [(0, 10), (1, 15), (2, 5), (3, 1)])
def test_calibration_errors_match_loop(seed, bins):
    rng = np.random.default_rng(seed)
    probabilities = rng.uniform(0, 1, 300)
    labels = rng.integers(0, 2, 300)

    expected_ece, expected_mce = straightforward_calibration_errors(list(probabilities), list(labels), bins)

    assert explain.expected_calibration_error(probabilities, labels, bins=bins) == pytest.approx(expected_ece, abs=1e-12)
    assert explain.maximum_calibration_error(probabilities, labels, bins=bins) == pytest.approx(expected_mce, abs=1e-12)


def test_reliability_table_bins_right_closed():
    # Confidences 0.6 (p=0.6), 0.6 (p=0.4), 0.55 and 1.0.
    table = explain.reliability_table([0.6, 0.4, 0.55, 1.0], [1, 1, 1, 1], bins=10)

    assert table["count"].tolist() == [0, 0, 0, 0, 0, 3, 0, 0, 0, 1]
    assert table.loc[5, "mean_confidence"] == pytest.approx((0.6 + 0.6 + 0.55) / 3)
    assert table.loc[5, "accuracy"] == pytest.approx(2 / 3)
    assert table.loc[5, "gap"] == pytest.approx((0.6 + 0.6 + 0.55) / 3 - 2 / 3)
    assert table.loc[:4, "gap"].isna().all()


def test_reliability_table_rejects_zero_bins():
    with pytest.raises(ValueError, match="bins=0 is invalid"):
        explain.reliability_table([0.5], [1], bins=0)


def test_reliability_per_epoch_stacks_epochs():
    trajectories = make_trajectories([[0.8, 0.3], [0.6, 0.1], [0.9, 0.2]], [1, 0])

    table = explain.reliability_per_epoch(trajectories, [1, 3], bins=4)

    assert table["epoch"].tolist() == [1] * 4 + [3] * 4
    assert table.groupby("epoch")["count"].sum().tolist() == [2, 2]


def grid_search_temperature(logits, labels):
    """Temperature of lowest mean NLL on a fine log grid, written independently of cellnb."""
    best_temperature, best_loss = None, math.inf
    for temperature in np.exp(np.linspace(math.log(0.05), math.log(20), 4001)):
        p = 1 / (1 + np.exp(-logits / temperature))
        p_true = np.clip(np.where(labels == 1, p, 1 - p), 1e-7, 1 - 1e-7)
        loss = -np.log(p_true).mean()
        if loss < best_loss:
            best_temperature, best_loss = temperature, loss
    return best_temperature, best_loss


@pytest.mark.parametrize("seed, overconfidence", [(0, 3.0), (1, 0.5), (2, 1.0), (3, 6.0)])
def test_fit_temperature_matches_grid_search(seed, overconfidence):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    true_logits = (2 * labels - 1) * rng.uniform(0, 3, 200) + rng.normal(0, 1.5, 200)
    logits = overconfidence * true_logits

    temperature = explain.fit_temperature(logits, labels)

    grid_temperature, grid_loss = grid_search_temperature(logits, labels)
    fitted_loss = explain.cross_entropy(expit(logits / temperature), labels).mean()
    assert fitted_loss <= grid_loss + 1e-9
    assert math.log(temperature) == pytest.approx(math.log(grid_temperature), abs=0.01)


@pytest.mark.parametrize("seed", range(6))
def test_scaling_keeps_predictions_lowers_loss(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 50)
    logits = rng.normal(0, 1 + 10 * (seed % 3), 50)

    temperature = explain.fit_temperature(logits, labels)

    assert temperature > 0
    scaled = expit(logits / temperature)
    np.testing.assert_array_equal(explain.predicted_labels(scaled), explain.predicted_labels(expit(logits)))
    assert explain.cross_entropy(scaled, labels).mean() <= explain.cross_entropy(expit(logits), labels).mean()


def test_fit_temperature_constant_logits_returns_one():
    assert explain.fit_temperature(np.zeros(10), np.tile([0, 1], 5)) == 1.0


def test_fit_temperature_rejects_nan():
    with pytest.raises(ValueError, match="1 NaN or infinite values"):
        explain.fit_temperature([0.3, math.nan], [0, 1])


def test_calibration_per_epoch_matches_history(fake_run_dir):
    run = load_run(fake_run_dir)

    calibration = explain.calibration_per_epoch(run.trajectories, bins=10)

    assert list(calibration.columns) == ["epoch", "val_loss", "accuracy", "ece", "mce", "temperature",
                                         "loss_after_scaling", "ece_after_scaling", "roc_auc"]
    np.testing.assert_allclose(calibration["val_loss"], run.history["val_loss"], rtol=1e-12)
    np.testing.assert_allclose(calibration["accuracy"], run.history["val_accuracy"], rtol=1e-12)
    assert (calibration["loss_after_scaling"] <= calibration["val_loss"] + 1e-6).all()
    assert calibration["temperature"].iloc[-1] > 1


def test_calibration_per_epoch_without_logits():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 40)
    probabilities = expit(3 * (2 * labels - 1) + rng.normal(0, 3, (2, 40)))

    calibration = explain.calibration_per_epoch(make_trajectories(probabilities, labels))

    recovered = explain.logits_from_probabilities(probabilities[1])
    assert calibration["temperature"].iloc[1] == pytest.approx(explain.fit_temperature(recovered, labels))


# --- training dynamics -----------------------------------------------------------------------


def test_training_dynamics_hand_values():
    # Sample a (label 1): right, wrong, right, wrong. Sample b (label 0): always right.
    probabilities = np.array([[0.8, 0.1], [0.3, 0.2], [0.9, 0.1], [0.4, 0.3]])
    labels = np.array([1, 0])

    dynamics = explain.training_dynamics(probabilities, labels, ["a", "b"]).set_index("sample_id")

    assert dynamics.loc["a", "confidence"] == pytest.approx(0.6)
    assert dynamics.loc["a", "variability"] == pytest.approx(math.sqrt((0.04 + 0.09 + 0.09 + 0.04) / 4))
    assert dynamics.loc["a", "correctness"] == 0.5
    assert dynamics.loc["a", "forgetting_events"] == 2
    assert dynamics.loc["a", "margin"] == pytest.approx(2 * 0.6 - 1)
    assert dynamics.loc["a", "margin_kind"] == "probability"
    assert dynamics.loc["a", "region"] == "ambiguous"
    assert dynamics.loc["b", "confidence"] == pytest.approx(0.825)
    assert dynamics.loc["b", "forgetting_events"] == 0
    assert dynamics.loc["b", "region"] == "easy"


def test_training_dynamics_logit_margin():
    logits = np.array([[2.0, -1.0], [4.0, 3.0]])

    dynamics = explain.training_dynamics(expit(logits), [1, 0], ["a", "b"], logits=logits).set_index("sample_id")

    assert dynamics.loc["a", "margin"] == pytest.approx(3.0)
    assert dynamics.loc["b", "margin"] == pytest.approx(-1.0)
    assert dynamics.loc["b", "margin_kind"] == "logit"


def test_training_dynamics_hard_to_learn_region():
    probabilities = np.array([[0.9], [0.85], [0.95]])

    dynamics = explain.training_dynamics(probabilities, [0], ["x"])

    assert dynamics["region"].iloc[0] == "hard_to_learn"
    assert dynamics["correctness"].iloc[0] == 0.0


def test_training_dynamics_per_split_includes_train(fake_run_dir):
    run = load_run(fake_run_dir)

    dynamics = explain.training_dynamics_per_split(run.trajectories)

    assert sorted(dynamics) == ["train", "valid"]
    assert len(dynamics["train"]) == 60
    assert set(dynamics["valid"]["region"]) <= set(explain.REGIONS)


# --- likely label errors ---------------------------------------------------------------------

# Hand calculation: t0 = mean(0.9, 0.8, 0.2, 0.5) = 0.6 and t1 = mean(0.9, 0.7, 0.3) = 0.6333.
# Sample 2 (label 0) has P(1) = 0.8 >= t1 only, sample 5 (label 1) has P(0) = 0.7 >= t0 only:
# both are off-diagonal. Sample 6 reaches neither threshold and is not counted.
HAND_PROBABILITIES = [0.1, 0.2, 0.8, 0.9, 0.7, 0.3, 0.5]
HAND_LABELS = [0, 0, 0, 1, 1, 1, 0]


def test_confident_joint_hand_calculation():
    thresholds, joint = explain.confident_joint(HAND_PROBABILITIES, HAND_LABELS)

    np.testing.assert_allclose(thresholds, [0.6, (0.9 + 0.7 + 0.3) / 3])
    np.testing.assert_array_equal(joint, [[2, 1], [1, 2]])


def test_rank_label_issues_hand_calculation():
    ids = [f"s{i}" for i in range(7)]

    ranked = explain.rank_label_issues(HAND_PROBABILITIES, HAND_LABELS, ids)

    assert ranked["sample_id"].tolist() == ["s2", "s5", "s6", "s4", "s1", "s0", "s3"]
    assert ranked.set_index("sample_id")["is_label_issue"].to_dict() == {
        "s0": False, "s1": False, "s2": True, "s3": False, "s4": False, "s5": True, "s6": False,
    }
    assert ranked.set_index("sample_id").loc["s6", "confident_label"] == -1
    np.testing.assert_allclose(ranked["label_issue_score"], [0.8, 0.7, 0.5, 0.3, 0.2, 0.1, 0.1])


def test_rank_label_issues_tie_keeps_given_label():
    # t0 = mean(0.5, 0.4) = 0.45 and t1 = mean(0.5, 0.4) = 0.45, so samples a (label 0) and
    # c (label 1) reach both thresholds with 0.5 for each class.
    ranked = explain.rank_label_issues([0.5, 0.6, 0.5, 0.4], [0, 0, 1, 1], ["a", "b", "c", "d"])

    flags = ranked.set_index("sample_id")["is_label_issue"]
    assert not flags["a"]
    assert not flags["c"]
    assert flags["b"]
    assert flags["d"]


def test_rank_label_issues_rejects_single_class():
    with pytest.raises(ValueError, match="0 of class 1; confident learning needs samples of both classes"):
        explain.rank_label_issues([0.2, 0.3], [0, 0], ["a", "b"])


def test_probabilities_for_label_issues_choices(fake_run_dir):
    run = load_run(fake_run_dir)
    best = int(run.history.loc[run.history["val_loss"].idxmin(), "epoch"])

    valid, _, valid_ids = explain.probabilities_for_label_issues(run.trajectories, run.history, split="valid")
    train, train_labels, _ = explain.probabilities_for_label_issues(run.trajectories, run.history, split="train")

    np.testing.assert_allclose(valid, run.trajectories.probabilities[best - 1])
    np.testing.assert_allclose(train, run.trajectories.train_probabilities[:best].astype(np.float64).mean(axis=0))
    assert len(valid_ids) == 40
    assert len(train_labels) == 60


def test_probabilities_for_label_issues_rejects_unknown_split(fake_run_dir):
    run = load_run(fake_run_dir)

    with pytest.raises(ValueError, match=r"split='test' is invalid; choose one of \['valid', 'train'\]"):
        explain.probabilities_for_label_issues(run.trajectories, run.history, split="test")


def test_probabilities_for_label_issues_needs_train_arrays():
    trajectories = make_trajectories([[0.2, 0.8], [0.1, 0.9]], [0, 1])

    with pytest.raises(ValueError, match="recorded no training probabilities"):
        explain.probabilities_for_label_issues(trajectories, make_history([0.5, 0.4]), split="train")


def test_label_issues_flag_fake_mislabels(fake_run_dir):
    run = load_run(fake_run_dir)

    issues = explain.label_issues_per_split(run.trajectories, run.history)

    flagged = issues["valid"][issues["valid"]["is_label_issue"]]
    assert len(flagged) == 4
    assert (flagged["self_confidence"] < 0.5).all()


# --- written explanation and files -----------------------------------------------------------


def test_explain_in_words_rise(fake_run_dir):
    run = load_run(fake_run_dir)
    epoch_from, epoch_to = explain.resolve_epochs(run.history)
    decomposition = explain.decompose_loss_change(run.trajectories, epoch_from, epoch_to)
    calibration = explain.calibration_per_epoch(run.trajectories)
    issues = explain.label_issues_per_split(run.trajectories, run.history)["valid"]

    text = explain.explain_in_words(decomposition, calibration, top_k=4, scored_class="positive", label_issues=issues)

    loss_from = run.history.set_index("epoch").loc[epoch_from, "val_loss"]
    loss_to = run.history.set_index("epoch").loc[epoch_to, "val_loss"]
    assert f"rose by {loss_to - loss_from:.4f}, from {loss_from:.4f} at epoch {epoch_from}" in text
    assert f"to {loss_to:.4f} at epoch {epoch_to}" in text
    assert "The 4 samples with the largest contributions" in text
    assert "1/40 = 0.0250" in text
    temperature = calibration.set_index("epoch").loc[epoch_to, "temperature"]
    assert f"T = {temperature:.3g}" in text
    assert f"Stop training at epoch {epoch_from}" in text
    assert "Check the labels of the 4 images" in text
    assert "`positive`" in text


def test_explain_in_words_no_rise():
    trajectories = make_trajectories([[0.6, 0.4, 0.7], [0.9, 0.1, 0.8]], [1, 0, 1])
    decomposition = explain.decompose_loss_change(trajectories, 1, 2)
    calibration = explain.calibration_per_epoch(trajectories)

    text = explain.explain_in_words(decomposition, calibration)

    assert "did not rise from epoch 1 to epoch 2" in text
    assert "What to do next" not in text
    assert "largest contributions" not in text


def test_explain_in_words_rejects_missing_calibration_epoch():
    trajectories = make_trajectories([[0.6, 0.4], [0.3, 0.1]], [1, 0])
    decomposition = explain.decompose_loss_change(trajectories, 1, 2)
    calibration = explain.calibration_per_epoch(trajectories).iloc[:1]

    with pytest.raises(ValueError, match="calibration has no row for epoch_to=2"):
        explain.explain_in_words(decomposition, calibration)


def test_write_explanation_files_columns(fake_run_dir):
    run = load_run(fake_run_dir)
    decomposition = explain.decompose_loss_change(run.trajectories, 2, 10)
    calibration = explain.calibration_per_epoch(run.trajectories)

    paths = explain.write_explanation_files(fake_run_dir, decomposition, calibration)

    contributions = pd.read_csv(fake_run_dir / "loss_contributions.csv")
    written_calibration = pd.read_csv(fake_run_dir / "calibration.csv")
    assert paths == [fake_run_dir / "loss_contributions.csv", fake_run_dir / "calibration.csv"]
    assert list(contributions.columns[:7]) == explain.LOSS_CONTRIBUTION_COLUMNS
    assert list(written_calibration.columns[:6]) == explain.CALIBRATION_COLUMNS
    assert contributions["contribution"].sum() == pytest.approx(
        run.history["val_loss"].iloc[9] - run.history["val_loss"].iloc[1], abs=1e-9)
    np.testing.assert_allclose(written_calibration["temperature"], calibration["temperature"], rtol=1e-12)
    assert not list(fake_run_dir.glob("*.tmp"))


def test_write_explanation_files_rejects_missing_dir(tmp_path):
    decomposition = explain.decompose_loss_change(make_trajectories([[0.6], [0.3]], [1]), 1, 2)

    with pytest.raises(ValueError, match="is not a directory"):
        explain.write_explanation_files(tmp_path / "absent", decomposition, pd.DataFrame())


# --- notebook 03 -----------------------------------------------------------------------------


def test_notebook_is_stored_clean():
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code_cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]

    assert notebook["nbformat"] == 4
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    assert code_cells[0]["metadata"] == {"tags": ["parameters"]}
    assert all(cell["outputs"] == [] for cell in code_cells)
    assert all(cell["execution_count"] is None for cell in code_cells)


def test_notebook_parameters_cell():
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    parameters = next(cell for cell in notebook["cells"] if cell["cell_type"] == "code")
    namespace: dict = {}

    exec("".join(parameters["source"]), namespace)

    values = {name: value for name, value in namespace.items() if not name.startswith("__")}
    assert values == {"run_dir": "../outputs/demo", "epoch_from": 0, "epoch_to": 0, "calibration_bins": 10, "top_k": 10}


@pytest.mark.slow
def test_notebook_runs_on_fake_run(fake_run_dir, tmp_path):
    papermill = pytest.importorskip("papermill")
    output = tmp_path / "03_explain_loss.ipynb"

    papermill.execute_notebook(str(NOTEBOOK), str(output), parameters={"run_dir": str(fake_run_dir)},
                               kernel_name="python3", cwd=str(REPO), progress_bar=False)

    executed = json.loads(output.read_text(encoding="utf-8"))
    outputs = [item for cell in executed["cells"] if cell["cell_type"] == "code" for item in cell["outputs"]]
    assert [item for item in outputs if item["output_type"] == "error"] == []
    assert sum("image/png" in item.get("data", {}) for item in outputs) >= 10
    assert any("text/markdown" in item.get("data", {}) for item in outputs)
    assert (fake_run_dir / "loss_contributions.csv").is_file()
    assert (fake_run_dir / "calibration.csv").is_file()
