"""Tables about the validation split of a finished run: balance, single-class splits, final
probabilities and the samples whose probability moved most.

These read only the run directory. The file-level audit (duplicates, leakage, corrupt files) is
in ``cellnb.audit``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellnb.data import SPLITS
from cellnb.rundir import Run


def class_balance(samples: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Return counts per split and class, the share of the scored class, and the accuracy of a constant guess.

    The constant-guess accuracy is the share of the majority class: what a model that always
    predicts one class scores on that split.
    """
    counts = pd.crosstab(samples["split"], samples["label"]).reindex(columns=[0, 1], fill_value=0)
    counts = counts.reindex([split for split in SPLITS if split in counts.index])
    table = pd.DataFrame({classes[0]: counts[0], classes[1]: counts[1]})
    table["total"] = table[classes[0]] + table[classes[1]]
    table[f"share of {classes[1]}"] = (table[classes[1]] / table["total"]).round(4)
    table["constant-guess accuracy"] = (table[[classes[0], classes[1]]].max(axis=1) / table["total"]).round(4)
    table.index.name = "split"
    return table


def single_class_splits(samples: pd.DataFrame, classes: list[str]) -> list[str]:
    """Return one message per split that holds only one class, or an empty list."""
    messages = []
    for split, group in samples.groupby("split", sort=False):
        present = sorted(set(group["label"]))
        if len(present) == 1:
            only = classes[present[0]]
            messages.append(
                f"{split}/ has only class {only!r} ({len(group)} images); a binary split needs both "
                f"{classes[0]!r} and {classes[1]!r}, so its accuracy and loss cannot show whether the model separates them"
            )
    return messages


def final_probabilities(run: Run) -> pd.DataFrame:
    """Return one row per validation sample: label, first and last P(scored class), and correctness at the last epoch."""
    trajectories = run.trajectories
    probabilities = trajectories.probabilities
    table = pd.DataFrame(
        {
            "sample_id": trajectories.sample_ids,
            "label": trajectories.labels,
            "label_name": [run.classes[label] for label in trajectories.labels],
            "probability_first": probabilities[0],
            "probability_last": probabilities[-1],
            "probability_min": probabilities.min(axis=0),
            "probability_max": probabilities.max(axis=0),
        }
    )
    table["correct_last"] = (table["probability_last"] > 0.5).astype(int) == table["label"]
    return table


def most_changed(run: Run, *, top_k: int = 10) -> pd.DataFrame:
    """Return the validation samples whose P(scored class) changed most between the first and last epoch."""
    table = final_probabilities(run)
    table["change"] = table["probability_last"] - table["probability_first"]
    order = np.argsort(-np.abs(table["change"].to_numpy()), kind="stable")
    return table.iloc[order[:top_k]].reset_index(drop=True)


def thumbnail_selection(run: Run, *, per_class: int) -> pd.DataFrame:
    """Pick up to ``per_class`` validation samples per class, the least confident in their label first,
    with the image path and a caption naming the final P(scored class)."""
    table = final_probabilities(run)
    table["path"] = [str(run.data_dir / sample_id) for sample_id in table["sample_id"]]
    table["confidence_in_label"] = np.where(table["label"] == 1, table["probability_last"], 1 - table["probability_last"])
    chosen = (
        table.sort_values(["label", "confidence_in_label", "sample_id"])
        .groupby("label", sort=True)
        .head(per_class)
        .reset_index(drop=True)
    )
    chosen["caption"] = [
        f"{name}\nP({run.scored_class})={probability:.2f}" + ("" if correct else " WRONG")
        for name, probability, correct in zip(chosen["label_name"], chosen["probability_last"], chosen["correct_last"])
    ]
    return chosen
