"""Tests of the synthetic cell image generator, on tiny sets of small images."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cellnb.synth import (
    AMBIGUOUS_DIFFICULTY,
    DEFAULT_COUNTS,
    MANIFEST_COLUMNS,
    PROTOTYPICAL_DIFFICULTY,
    generate_synthetic_cells,
)

TINY_COUNTS = {"train": (8, 8), "valid": (4, 4), "test": (3, 3)}
TINY_SIZE = 32


def _generate_tiny(out_dir, **options):
    arguments = {"seed": 0, "counts": TINY_COUNTS, "image_size": TINY_SIZE}
    arguments.update(options)
    return generate_synthetic_cells(out_dir, **arguments)


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def _luminance(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64).mean(axis=2)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("synthetic")
    manifest = _generate_tiny(out_dir, mislabel_rate=0.25, ambiguous_rate=0.25)
    return out_dir, manifest


def test_default_counts_are_balanced_per_split():
    assert set(DEFAULT_COUNTS) == {"train", "valid", "test"}
    for split, (negatives, positives) in DEFAULT_COUNTS.items():
        assert negatives == positives, split


def test_same_seed_gives_identical_bytes(tmp_path):
    _generate_tiny(tmp_path / "first")
    _generate_tiny(tmp_path / "second")

    first = _file_bytes(tmp_path / "first")
    second = _file_bytes(tmp_path / "second")
    assert len(first) == sum(map(sum, TINY_COUNTS.values())) + 1
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], name


def test_png_has_no_timestamp_or_text(tiny_set):
    out_dir, manifest = tiny_set
    data = (out_dir / manifest["path"].iloc[0]).read_bytes()

    for chunk in (b"tIME", b"tEXt", b"iTXt", b"zTXt"):
        assert chunk not in data


def test_other_seed_gives_other_images(tmp_path):
    first = _generate_tiny(tmp_path / "seed0", seed=0)
    _generate_tiny(tmp_path / "seed1", seed=1)

    changed = [
        path
        for path in first["path"]
        if (tmp_path / "seed0" / path).read_bytes() != (tmp_path / "seed1" / path).read_bytes()
    ]
    assert len(changed) == len(first)


def test_changing_one_split_keeps_others(tmp_path):
    _generate_tiny(tmp_path / "before")
    _generate_tiny(tmp_path / "after", counts={**TINY_COUNTS, "valid": (6, 2)})

    before = _file_bytes(tmp_path / "before")
    after = _file_bytes(tmp_path / "after")
    for name in before:
        if name.startswith(("train", "test")):
            assert before[name] == after[name], name


def test_folder_counts_match_counts(tiny_set):
    out_dir, _ = tiny_set

    for split, (negatives, positives) in TINY_COUNTS.items():
        assert len(list((out_dir / split / "negative").glob("*.png"))) == negatives
        assert len(list((out_dir / split / "positive").glob("*.png"))) == positives


def test_file_names_follow_split_and_folder(tiny_set):
    _, manifest = tiny_set

    first = manifest.iloc[0]
    assert first["path"] == "train/negative/train_negative_0000.png"
    for row in manifest.itertuples():
        folder_split, folder_label, name = row.path.split("/")
        assert folder_split == row.split
        assert folder_label == row.label
        assert name.startswith(f"{row.split}_{row.label}_")


def test_manifest_columns_in_order(tiny_set):
    out_dir, manifest = tiny_set

    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert MANIFEST_COLUMNS == ["path", "split", "label", "true_label", "mislabeled", "difficulty", "group"]
    assert len(manifest) == sum(map(sum, TINY_COUNTS.values()))


def test_manifest_csv_matches_returned_frame(tiny_set):
    out_dir, manifest = tiny_set

    from_disk = pd.read_csv(out_dir / "manifest.csv")
    pd.testing.assert_frame_equal(from_disk, manifest, check_dtype=False)


def test_mislabeled_flag_matches_labels(tiny_set):
    _, manifest = tiny_set

    expected = (manifest["label"] != manifest["true_label"]).astype(int)
    assert manifest["mislabeled"].tolist() == expected.tolist()
    assert set(manifest["mislabeled"]) <= {0, 1}


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 0.49])
def test_flipped_count_per_split_and_class(tmp_path, rate):
    manifest = _generate_tiny(tmp_path, mislabel_rate=rate)

    for (split, label), rows in manifest.groupby(["split", "label"]):
        n_images = TINY_COUNTS[split][0 if label == "negative" else 1]
        assert len(rows) == n_images
        assert rows["mislabeled"].sum() == round(rate * n_images), (split, label)


def test_mislabel_rate_per_split(tmp_path):
    manifest = _generate_tiny(tmp_path, mislabel_rate={"train": 0.25, "valid": 0.5 - 1e-9})

    flipped = manifest.groupby("split")["mislabeled"].sum().to_dict()
    for split, (negatives, positives) in TINY_COUNTS.items():
        rate = {"train": 0.25, "valid": 0.5 - 1e-9}.get(split, 0.0)
        assert flipped[split] == round(rate * negatives) + round(rate * positives), split


def test_default_mislabel_rates_flip_fewer_training_images(tmp_path):
    manifest = generate_synthetic_cells(tmp_path / "d", image_size=16)

    flipped = manifest.groupby(["split", "label"])["mislabeled"].sum().to_dict()
    assert flipped[("train", "negative")] == round(0.02 * 154) == 3
    assert flipped[("valid", "positive")] == round(0.1 * 26) == 3
    assert flipped[("test", "negative")] == round(0.1 * 77) == 8


def test_mislabeled_images_are_prototypes_of_true_class(tmp_path):
    manifest = _generate_tiny(tmp_path, mislabel_rate=0.25, ambiguous_rate=0.5)

    mislabeled = manifest[manifest["mislabeled"] == 1]
    assert len(mislabeled) > 0
    assert mislabeled["difficulty"].max() <= PROTOTYPICAL_DIFFICULTY[1]
    for (split, label), rows in manifest.groupby(["split", "label"]):
        n_images = TINY_COUNTS[split][0 if label == "negative" else 1]
        ambiguous = rows["difficulty"] >= AMBIGUOUS_DIFFICULTY[0]
        assert ambiguous.sum() == min(round(0.5 * n_images), n_images - rows["mislabeled"].sum()), (split, label)


def test_flips_happen_in_every_split(tiny_set):
    _, manifest = tiny_set

    for split in TINY_COUNTS:
        assert manifest.loc[manifest["split"] == split, "mislabeled"].sum() > 0, split


def test_ambiguous_count_and_difficulty(tiny_set):
    _, manifest = tiny_set

    assert manifest["difficulty"].between(0, 1).all()
    for (split, label), rows in manifest.groupby(["split", "label"]):
        n_images = len(rows)
        ambiguous = rows["difficulty"] >= 0.5
        assert ambiguous.sum() == round(0.25 * n_images), (split, label)
        assert (rows.loc[~ambiguous, "difficulty"] <= 0.2).all(), (split, label)
        assert (rows.loc[ambiguous, "difficulty"] <= 0.9).all(), (split, label)


def test_images_are_rgb_of_requested_size(tmp_path):
    manifest = _generate_tiny(tmp_path, counts={"valid": (2, 2)}, image_size=40)

    for path in manifest["path"]:
        with Image.open(tmp_path / path) as image:
            assert image.format == "PNG"
            assert image.mode == "RGB"
            assert image.size == (40, 40)


def test_images_look_stained(tiny_set):
    out_dir, manifest = tiny_set

    pixels = np.stack([np.asarray(Image.open(out_dir / path)) for path in manifest["path"]])
    red, green, blue = (pixels[..., channel].astype(float).mean() for channel in range(3))
    # Eosin and haematoxylin both absorb green most, so stained tissue is pink to purple.
    assert red > green
    assert blue > green
    assert pixels.std() > 10


def test_positives_have_more_and_darker_nuclei(tmp_path):
    manifest = _generate_tiny(tmp_path, counts={"train": (10, 10)}, image_size=48, mislabel_rate=0, ambiguous_rate=0)

    dark_share = {"negative": [], "positive": []}
    darkest_mean = {"negative": [], "positive": []}
    for row in manifest.itertuples():
        luminance = _luminance(tmp_path / row.path)
        dark_share[row.true_label].append((luminance < 150).mean())
        darkest_mean[row.true_label].append(np.sort(luminance, axis=None)[: luminance.size // 50].mean())

    # Nuclear-area proxy: every prototypical positive has more dark pixels than any negative.
    assert min(dark_share["positive"]) > max(dark_share["negative"])
    # Hyperchromasia: the darkest 2% of pixels are clearly darker in positives.
    assert np.mean(darkest_mean["negative"]) - np.mean(darkest_mean["positive"]) > 30


def test_difficulty_moves_positives_toward_negatives(tmp_path):
    prototypical = _generate_tiny(tmp_path / "easy", counts={"train": (0, 8)}, mislabel_rate=0, ambiguous_rate=0)
    ambiguous = _generate_tiny(tmp_path / "hard", counts={"train": (0, 8)}, mislabel_rate=0, ambiguous_rate=1)

    def mean_dark_share(root, manifest):
        return np.mean([(_luminance(root / path) < 150).mean() for path in manifest["path"]])

    assert mean_dark_share(tmp_path / "hard", ambiguous) < mean_dark_share(tmp_path / "easy", prototypical)


def test_groups_stay_within_split(tiny_set):
    _, manifest = tiny_set

    slides_per_split = manifest.groupby("group")["split"].nunique()
    assert (slides_per_split == 1).all()
    for row in manifest.itertuples():
        assert row.group.startswith(f"{row.split}-slide")


def test_slides_hold_several_images(tmp_path):
    manifest = _generate_tiny(tmp_path, counts={"train": (40, 40)}, image_size=16)

    images_per_slide = manifest.groupby("group").size()
    assert len(images_per_slide) > 1
    assert images_per_slide.min() >= 2
    classes_per_slide = manifest.groupby("group")["label"].nunique()
    assert (classes_per_slide == 2).all()


def test_custom_class_names_name_folders(tmp_path):
    manifest = _generate_tiny(tmp_path, counts={"test": (2, 2)}, classes=("benign", "malignant"))

    assert set(manifest["label"]) == {"benign", "malignant"}
    assert len(list((tmp_path / "test" / "malignant").glob("*.png"))) == 2


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"counts": {"train": (-1, 4)}}, "(-1, 4)"),
        ({"counts": {"train": (2.5, 4)}}, "(2.5, 4)"),
        ({"counts": {"train": (4,)}}, "(4,)"),
        ({"counts": {"validation": (4, 4)}}, "'validation'"),
        ({"counts": {}}, "counts={}"),
        ({"counts": {"train": (0, 0)}}, "no images"),
        ({"mislabel_rate": 0.5}, "mislabel_rate=0.5"),
        ({"mislabel_rate": -0.1}, "mislabel_rate=-0.1"),
        ({"ambiguous_rate": 1.5}, "ambiguous_rate=1.5"),
        ({"ambiguous_rate": float("nan")}, "ambiguous_rate=nan"),
        ({"image_size": 8}, "image_size=8"),
        ({"image_size": 32.0}, "image_size=32.0"),
        ({"seed": -3}, "seed=-3"),
        ({"classes": ("negative",)}, "('negative',)"),
        ({"classes": ("negative", "negative")}, "repeats"),
        ({"classes": ("negative", "pos/itive")}, "'pos/itive'"),
    ],
)
def test_invalid_argument_raises(tmp_path, options, fragment):
    with pytest.raises(ValueError) as raised:
        _generate_tiny(tmp_path / "out", **options)

    assert fragment in str(raised.value)
    assert not (tmp_path / "out").exists()


def test_non_empty_out_dir_raises(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")

    with pytest.raises(ValueError, match="not empty"):
        _generate_tiny(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_empty_existing_out_dir_is_used(tmp_path):
    manifest = _generate_tiny(tmp_path, counts={"valid": (1, 1)})

    assert (tmp_path / "manifest.csv").is_file()
    assert len(manifest) == 2
