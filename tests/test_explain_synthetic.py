"""The explanation against the synthetic set's known truth: which validation images are mislabeled."""

from __future__ import annotations

import pandas as pd
import pytest

from cellnb import explain, params, rundir, train
from cellnb.synth import generate_synthetic_cells


@pytest.mark.parametrize("seed", [0, 1])
def test_mislabeled_images_drive_the_rise_and_rank_as_label_errors(tmp_path, seed):
    data_dir = tmp_path / "data"
    generate_synthetic_cells(data_dir, seed=seed, counts={"train": (40, 40), "valid": (10, 10)}, image_size=48,
                             mislabel_rate={"train": 0.05, "valid": 0.2})
    values = {"run_dir": str(tmp_path / "run"), "data_dir": str(data_dir), "epochs": 15, "image_size": 48,
              "batch_size": 16, "seed": seed}
    setup = train.prepare_run(params.check_parameters("01_train", values))
    train.train(setup, train.build_for_run(setup))

    run = rundir.load_run(tmp_path / "run")
    epoch_from, epoch_to = explain.resolve_epochs(run.history)
    decomposition = explain.decompose_loss_change(run.trajectories, epoch_from, epoch_to)
    manifest = pd.read_csv(data_dir / "manifest.csv")
    mislabeled = set(manifest.loc[(manifest["split"] == "valid") & (manifest["mislabeled"] == 1), "path"])
    k = len(mislabeled)
    top_contributors = set(decomposition.nlargest(2 * k, "contribution")["sample_id"])
    candidates = set(explain.label_issues_per_split(run.trajectories, run.history)["valid"].head(2 * k)["sample_id"])

    assert k == 4
    assert epoch_to > epoch_from
    assert len(mislabeled & top_contributors) >= 0.9 * k
    assert len(mislabeled & candidates) >= 0.9 * k
