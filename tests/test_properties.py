"""Property-based tests: the loss decomposition adds up, and sample discovery accounts for every file."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellnb import data, explain
from cellnb.errors import DataError
from cellnb.rundir import Trajectories

from conftest import write_image


@st.composite
def trajectories(draw):
    epochs = draw(st.integers(min_value=2, max_value=5))
    samples = draw(st.integers(min_value=1, max_value=30))
    probability = st.floats(min_value=0.0, max_value=1.0, allow_nan=False, width=32)
    probabilities = np.asarray(draw(st.lists(probability, min_size=epochs * samples, max_size=epochs * samples)),
                               dtype=np.float32).reshape(epochs, samples)
    labels = np.asarray(draw(st.lists(st.integers(0, 1), min_size=samples, max_size=samples)), dtype=np.int64)
    return Trajectories(
        epochs=np.arange(1, epochs + 1),
        sample_ids=np.asarray([f"valid/s{index:03d}.png" for index in range(samples)]),
        labels=labels,
        probabilities=probabilities,
    )


@settings(max_examples=150, deadline=None)
@given(trajectories(), st.data())
def test_contributions_sum_to_mean_loss_change(recorded, choice):
    epoch_from = choice.draw(st.integers(1, len(recorded.epochs) - 1))
    epoch_to = choice.draw(st.integers(epoch_from + 1, len(recorded.epochs)))

    table = explain.decompose_loss_change(recorded, epoch_from, epoch_to)

    losses = explain.cross_entropy(recorded.probabilities, recorded.labels)
    change = losses[epoch_to - 1].mean() - losses[epoch_from - 1].mean()
    assert len(table) == len(recorded.sample_ids)
    assert np.isclose(table["contribution"].sum(), change, rtol=1e-9, atol=1e-9)
    assert np.allclose(table["contribution"], (table["loss_to"] - table["loss_from"]) / len(table))


FILE_KINDS = st.sampled_from(["image", "text", "empty", "hidden", "system", "hidden_folder"])
SPLIT_NAMES = st.sampled_from(["train", "valid", "test"])


@st.composite
def trees(draw):
    """A split-folder tree: per split and class, a list of file kinds; train and valid get two images per class."""
    layout = {}
    for split in ("train", "valid", "test"):
        if split == "test" and not draw(st.booleans()):
            continue
        for name in ("negative", "positive"):
            kinds = ["image", "image"] + draw(st.lists(FILE_KINDS, max_size=5))
            layout[(split, name)] = kinds
    return layout


def _write_tree(root: Path, layout: dict) -> dict:
    """Write the tree and return the expected sample ids and the expected skipped and ignored ids."""
    expected = {"samples": set(), "skipped": set(), "ignored": set()}
    seed = 0
    for (split, name), kinds in layout.items():
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for index, kind in enumerate(kinds):
            seed += 1
            stem = f"{split}/{name}/f{index:02d}"
            if kind == "image":
                write_image(root / f"{stem}.png", seed=seed, size=8)
                expected["samples"].add(f"{stem}.png")
            elif kind == "text":
                (root / f"{stem}.txt").write_text("not an image")
                expected["skipped"].add(f"{stem}.txt")
            elif kind == "empty":
                (root / f"{stem}.png").write_bytes(b"")
                expected["skipped"].add(f"{stem}.png")
            elif kind == "hidden":
                (folder / f".f{index:02d}.png").write_bytes(b"\x00")
                expected["ignored"].add(f"{split}/{name}/.f{index:02d}.png")
            elif kind == "system":
                (folder / "Thumbs.db").write_bytes(b"\x00")
                expected["ignored"].add(f"{split}/{name}/Thumbs.db")
            else:
                write_image(folder / ".ipynb_checkpoints" / f"f{index:02d}.png", seed=seed, size=8)
                expected["ignored"].add(f"{split}/{name}/.ipynb_checkpoints/")
    return expected


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees())
def test_discovery_accounts_for_every_file(layout):
    root = Path(tempfile.mkdtemp(prefix="cellnb-tree-"))
    try:
        expected = _write_tree(root, layout)

        discovery = data.discover_samples(root)

        sample_ids = list(discovery.samples["sample_id"])
        skipped_ids = list(discovery.skipped["sample_id"])
        assert len(sample_ids) == len(set(sample_ids))
        assert set(sample_ids) == expected["samples"]
        assert set(skipped_ids) == expected["skipped"]
        assert set(discovery.ignored) == expected["ignored"]
        assert not set(sample_ids) & set(skipped_ids)
        for sample_id in sample_ids + skipped_ids:
            assert not sample_id.startswith("/")
            assert ".." not in sample_id.split("/")
            assert (root / sample_id).is_file()
        listed = {path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file()
                  and not any(data.is_ignored(part) for part in path.relative_to(root).parts)}
        assert listed == set(sample_ids) | set(skipped_ids)
    finally:
        shutil.rmtree(root)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 3), st.integers(0, 3))
def test_discovery_rejects_too_few_images(negatives, positives):
    root = Path(tempfile.mkdtemp(prefix="cellnb-few-"))
    try:
        _write_tree(root, {("train", "negative"): ["image"] * 2, ("train", "positive"): ["image"] * 2,
                           ("valid", "negative"): ["image"] * negatives, ("valid", "positive"): ["image"] * positives})
        if min(negatives, positives) >= 2:
            assert len(data.discover_samples(root).split("valid")) == negatives + positives
        else:
            try:
                data.discover_samples(root)
            except DataError as error:
                assert "valid split" in str(error)
            else:
                raise AssertionError("a valid split with fewer than two images per class was accepted")
    finally:
        shutil.rmtree(root)
