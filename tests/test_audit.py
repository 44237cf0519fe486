"""The data audit: file faults, class order, balance, duplicates, leakage, statistics, setup checks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from cellnb import audit, audit_plots, data, params
from cellnb.errors import DataError, ModelError, ParameterError

from conftest import PCAM_DIR, PROJECT_ROOT


def smooth_image(seed: int, size: int = 48) -> Image.Image:
    """Return an RGB image of smooth random blobs; unlike pixel noise, its perceptual hash is stable."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse, mode="RGB").resize((size, size), Image.Resampling.BICUBIC)


def save(image: Image.Image, path: Path, fmt: str = "PNG", **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **options)
    return path


def make_tree(root: Path, counts: dict, *, classes=("negative", "positive"), seed: int = 0) -> Path:
    """Write ``root/<split>/<class>/img_<n>.png`` with ``counts = {split: (n_class_0, n_class_1)}``, all images distinct."""
    for split, per_class in counts.items():
        for name, count in zip(classes, per_class):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                seed += 1
                save(smooth_image(seed), root / split / name / f"img_{index:03d}.png")
    return root


@pytest.fixture
def tree(tmp_path) -> Path:
    return make_tree(tmp_path / "data", {"train": (4, 4), "valid": (3, 3)})


def status_of(report, sample_id: str) -> str:
    return report.files.set_index("sample_id").loc[sample_id, "status"]


# --- files -----------------------------------------------------------------------------------


def test_clean_tree_counts(tree):
    report = audit.audit_data(tree)

    counts = report.file_counts.set_index("split")
    assert counts.loc["total", "listed"] == 14
    assert counts.loc["total", "readable"] == 14
    assert counts.loc["total", "loader"] == 14
    assert counts.loc["total", "keras"] == 14
    assert counts.loc["train", "readable"] == 8
    assert counts.loc["valid", "readable"] == 6
    assert report.loader_error is None
    assert report.warnings == []


def test_unreadable_files_and_reasons(tree):
    (tree / "valid" / "negative" / "empty.png").write_bytes(b"")
    (tree / "valid" / "negative" / "notes.png").write_text("not pixels")
    whole = save(smooth_image(99, size=64), tree / "train" / "positive" / "whole.png").read_bytes()
    (tree / "train" / "positive" / "whole.png").unlink()
    (tree / "train" / "positive" / "truncated.png").write_bytes(whole[: len(whole) // 2])

    report = audit.audit_data(tree)

    unreadable = report.files[report.files["status"] == "unreadable"].set_index("sample_id")
    assert len(unreadable) == 3
    assert unreadable.loc["valid/negative/empty.png", "reason"] == "empty file (0 bytes)"
    assert unreadable.loc["valid/negative/notes.png", "reason"] == "not an image that Pillow can identify"
    assert unreadable.loc["train/positive/truncated.png", "reason"].startswith("cannot be decoded")
    counts = report.file_counts.set_index("split")
    assert counts.loc["total", "unreadable"] == 3
    assert counts.loc["total", "loader"] == 14
    assert counts.loc["total", "keras"] == 17
    assert any("3 file(s) in class folders cannot be decoded" in warning for warning in report.warnings)


def test_extension_mismatch(tree):
    save(smooth_image(50), tree / "train" / "negative" / "really_png.jpg", fmt="PNG")
    save(smooth_image(51), tree / "train" / "negative" / "real.jpg", fmt="JPEG")

    report = audit.audit_data(tree)

    files = report.files.set_index("sample_id")
    assert files.loc["train/negative/really_png.jpg", "extension_matches"] == False  # noqa: E712 (a cell may be None)
    assert files.loc["train/negative/really_png.jpg", "format"] == "PNG"
    assert files.loc["train/negative/real.jpg", "extension_matches"] == True  # noqa: E712
    assert int(report.files["extension_matches"].eq(False).sum()) == 1
    assert len(report.problem_files()) == 1


def test_converted_modes(tree):
    folder = tree / "train" / "negative"
    base = smooth_image(60)
    save(base.convert("L"), folder / "grey.png")
    save(base.convert("P"), folder / "palette.png")
    save(base.convert("RGBA"), folder / "alpha.png")
    save(base.convert("CMYK"), folder / "cmyk.jpg", fmt="JPEG")
    sixteen = np.asarray(base.convert("L"), dtype=np.uint16) * 257
    save(Image.fromarray(sixteen), folder / "sixteen.png")

    report = audit.audit_data(tree)

    files = report.files.set_index("sample_id")
    converted = report.files[report.files["conversion"].fillna("none").ne("none")]
    assert len(converted) == 5
    assert files.loc["train/negative/grey.png", "conversion"] == data.describe_conversion("L")
    assert files.loc["train/negative/palette.png", "conversion"] == data.describe_conversion("P")
    assert files.loc["train/negative/alpha.png", "conversion"] == data.describe_conversion("RGBA")
    assert files.loc["train/negative/cmyk.jpg", "conversion"] == data.describe_conversion("CMYK")
    assert files.loc["train/negative/sixteen.png", "mode"] in data.SIXTEEN_BIT_MODES
    assert files.loc["train/negative/img_000.png", "conversion"] == "none"


def test_hidden_files_ignored_keras_counts(tree):
    folder = tree / "train" / "negative"
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "._img_000.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    save(smooth_image(70), folder / ".ipynb_checkpoints" / "img_000-checkpoint.png")

    report = audit.audit_data(tree)

    ignored = report.files[report.files["status"] == "ignored"].set_index("sample_id")
    assert len(ignored) == 4
    assert ignored.loc["train/negative/.ipynb_checkpoints/img_000-checkpoint.png", "reason"] == (
        "inside hidden or system folder .ipynb_checkpoints/")
    assert ignored.loc["train/negative/Thumbs.db", "reason"] == "hidden or system file"
    counts = report.file_counts.set_index("split")
    assert counts.loc["total", "listed"] == 18
    assert counts.loc["total", "loader"] == 14
    # Keras skips only hidden class folders, so it takes the AppleDouble file and the checkpoint copy.
    assert counts.loc["total", "keras"] == 16


def test_tif_skipped_by_keras(tree):
    save(smooth_image(80), tree / "valid" / "positive" / "scan.tif", fmt="TIFF")

    report = audit.audit_data(tree)

    counts = report.file_counts.set_index("split")
    assert counts.loc["valid", "readable"] == 7
    assert counts.loc["valid", "loader"] == 7
    assert counts.loc["valid", "keras"] == 6
    assert any("would skip 1 readable image(s) with extensions ['.tif']" in warning for warning in report.warnings)


def test_files_outside_class_folders(tree):
    (tree / "README.txt").write_text("about")
    save(smooth_image(81), tree / "train" / "stray.png")

    report = audit.audit_data(tree)

    assert status_of(report, "README.txt") == "outside_class_folders"
    assert status_of(report, "train/stray.png") == "outside_class_folders"
    counts = report.file_counts.set_index("split")
    assert counts.loc["total", "outside_class_folders"] == 2
    assert counts.loc["total", "listed"] == 16


def test_symlinked_class_folder_followed(tmp_path):
    elsewhere = make_tree(tmp_path / "elsewhere", {"valid": (0, 3)}, seed=40)
    root = make_tree(tmp_path / "data", {"train": (3, 3), "valid": (3, 0)})
    (root / "valid" / "positive").rmdir()
    (root / "valid" / "positive").symlink_to(elsewhere / "valid" / "positive", target_is_directory=True)
    (root / "train" / "negative" / "loop").symlink_to(root / "train", target_is_directory=True)

    report = audit.audit_data(root)

    counts = report.file_counts.set_index("split")
    assert counts.loc["valid", "readable"] == 6
    assert counts.loc["valid", "loader"] == 6
    assert counts.loc["total", "listed"] == 12


def test_keras_extensions_match_installed_keras():
    from keras.src.utils.image_dataset_utils import ALLOWLIST_FORMATS

    assert audit.KERAS_IMAGE_EXTENSIONS == tuple(ALLOWLIST_FORMATS)


# --- classes and balance ---------------------------------------------------------------------


def test_class_indices_and_scored_class(tree):
    report = audit.audit_data(tree)

    folders = report.class_folders.set_index(["split", "class_folder"])
    assert folders.loc[("valid", "positive"), "class_index"] == 1
    assert bool(folders.loc[("valid", "positive"), "scored"])
    assert folders.loc[("train", "negative"), "images"] == 4
    assert report.scored_class == "positive"
    assert "index 1 = 'positive' (the scored class)" in "\n".join(report.summary_lines())


def test_inverted_scored_class_warns(tree):
    report = audit.audit_data(tree, classes=["positive", "negative"])

    assert report.scored_class == "negative"
    assert any("the scored class (index 1, whose probability is recorded) is 'negative'" in warning
               for warning in report.warnings)


def test_keras_order_differs_for_capitalised_names(tmp_path):
    root = make_tree(tmp_path / "data", {"train": (3, 3), "valid": (2, 2)}, classes=("normal", "Tumor"))

    report = audit.audit_data(root, classes=["normal", "Tumor"])

    folders = report.class_folders.set_index(["split", "class_folder"])
    assert folders.loc[("train", "Tumor"), "class_index"] == 1
    assert folders.loc[("train", "Tumor"), "keras_index"] == 0
    assert any("order ['Tumor', 'normal']" in warning for warning in report.warnings)


def test_disagreeing_splits_raise(tmp_path):
    root = make_tree(tmp_path / "data", {"train": (3, 3)})
    make_tree(root, {"valid": (2, 2)}, classes=("negative", "tumor"), seed=50)

    with pytest.raises(DataError, match=r"disagree on their class folders \(train/ has \['negative', 'positive'\]; "
                                        r"valid/ has \['negative', 'tumor'\]\)"):
        audit.audit_data(root)


def test_classes_not_found_raise(tree):
    with pytest.raises(DataError, match=r"no class folder 'normal'.*--classes negative,positive"):
        audit.audit_data(tree, classes=["normal", "tumor"])


def test_one_class_split_reported(tmp_path):
    root = make_tree(tmp_path / "data", {"train": (4, 4), "valid": (3, 0)})

    report = audit.audit_data(root)

    balance = report.balance.set_index("split")
    assert balance.loc["valid", "class_0"] == 3
    assert balance.loc["valid", "class_1"] == 0
    assert balance.loc["valid", "constant_guess_accuracy"] == 1.0
    assert balance.loc["train", "share_of_scored_class"] == 0.5
    assert balance.loc["valid", "share_difference_vs_train"] == -0.5
    assert any("valid/ has only class 'negative' (3 images)" in warning for warning in report.warnings)
    assert "valid split has 0 readable image(s) of class 'positive'" in report.loader_error


def test_split_of_unreadable_files_only(tmp_path):
    root = make_tree(tmp_path / "data", {"train": (3, 3)})
    for name in ("negative", "positive"):
        (root / "valid" / name).mkdir(parents=True)
        (root / "valid" / name / "broken.png").write_bytes(b"")

    report = audit.audit_data(root)

    assert report.balance.set_index("split").loc["valid", "total"] == 0
    assert "valid/ has no readable images" in report.warnings
    assert report.shift.empty
    assert report.file_counts.set_index("split").loc["valid", "unreadable"] == 2
    assert "shift" not in "\n".join(report.summary_lines())


def test_prevalence_difference_warns(tmp_path):
    root = make_tree(tmp_path / "data", {"train": (5, 5), "valid": (2, 6)})

    report = audit.audit_data(root)

    assert report.balance.set_index("split").loc["valid", "share_of_scored_class"] == 0.75
    assert any("valid/ has 75% 'positive' against 50% in train" in warning for warning in report.warnings)


def test_class_folders_split_matches_loader(tmp_path):
    root = tmp_path / "data"
    for label, name in enumerate(("negative", "positive")):
        for index in range(10):
            save(smooth_image(100 * label + index), root / name / f"img_{index:02d}.png")

    report = audit.audit_data(root, split_fractions=(0.6, 0.2, 0.2), seed=3)

    discovery = data.discover_samples(root, split_fractions=(0.6, 0.2, 0.2), seed=3)
    expected = dict(zip(discovery.samples["sample_id"], discovery.samples["split"]))
    assert dict(zip(report.samples["sample_id"], report.samples["split"])) == expected
    assert report.layout == "class_folders"


# --- duplicates and leakage ------------------------------------------------------------------


def test_exact_duplicates_within_and_across_splits(tree):
    source = tree / "train" / "negative" / "img_000.png"
    # Same pixels, other bytes: re-encoded with another compression level.
    Image.open(source).save(tree / "valid" / "negative" / "copy.png", compress_level=1)
    shutil.copy(tree / "train" / "positive" / "img_001.png", tree / "train" / "positive" / "again.png")

    report = audit.audit_data(tree)

    duplicates = report.exact_duplicates
    groups = duplicates.drop_duplicates("duplicate_group")
    assert len(groups) == 2
    assert int(groups["spans_splits"].sum()) == 1
    assert len(duplicates) == 4
    copy = duplicates.set_index("sample_id").loc["valid/negative/copy.png"]
    assert not copy["same_bytes"]
    assert report.leaked_sample_ids("valid") == ["valid/negative/copy.png"]
    assert len(report.label_conflicts) == 0
    assert len(report.near_duplicates) == 0


def test_label_conflict_found(tree):
    shutil.copy(tree / "train" / "negative" / "img_002.png", tree / "valid" / "positive" / "relabelled.png")

    report = audit.audit_data(tree)

    assert len(report.label_conflicts) == 1
    conflict = report.label_conflicts.iloc[0]
    assert conflict["sample_ids"] == "train/negative/img_002.png, valid/positive/relabelled.png"
    assert conflict["labels"] == "negative, positive"
    pairs = report.duplicate_pairs()
    assert list(pairs["kind"]) == ["exact"]
    assert list(pairs["label_name_b"]) == ["positive"]


def test_near_duplicate_found_and_unrelated_not(tree):
    original = Image.open(tree / "train" / "positive" / "img_000.png")
    save(original.resize((36, 36), Image.Resampling.BILINEAR), tree / "valid" / "positive" / "resized.jpg", fmt="JPEG", quality=70)

    report = audit.audit_data(tree)

    near = report.near_duplicates
    assert len(near) == 1
    assert near.iloc[0]["sample_a"] == "train/positive/img_000.png"
    assert near.iloc[0]["sample_b"] == "valid/positive/resized.jpg"
    assert near.iloc[0]["distance"] <= audit.DEFAULT_NEAR_THRESHOLD
    assert report.leaked_sample_ids("valid") == ["valid/positive/resized.jpg"]
    unrelated = audit.hash_distance(audit.perceptual_hash(smooth_image(1)), audit.perceptual_hash(smooth_image(2)))
    assert unrelated > audit.DEFAULT_NEAR_THRESHOLD


def test_perceptual_hash_matches_imagehash():
    imagehash = pytest.importorskip("imagehash", reason="imagehash is not installed; the comparison needs it")

    for seed in range(5):
        image = smooth_image(seed)
        assert audit.perceptual_hash(image) == str(imagehash.phash(image))


def test_group_leakage_from_pattern(tmp_path):
    root = tmp_path / "data"
    names = {
        "train": {"negative": ["P01_a", "P02_a"], "positive": ["P01_b", "P02_b"]},
        "valid": {"negative": ["P01_c", "P03_a"], "positive": ["P03_b", "P04_a"]},
    }
    seed = 0
    for split, per_class in names.items():
        for name, stems in per_class.items():
            for stem in stems:
                seed += 1
                save(smooth_image(seed), root / split / name / f"{stem}.png")

    report = audit.audit_data(root, group_pattern=r"^(P\d+)_")

    assert report.group_source == "pattern"
    leakage = report.group_leakage.set_index("split").loc["valid"]
    assert leakage["groups"] == 3
    assert leakage["shared_groups"] == 1
    assert leakage["images_in_shared_groups"] == 1
    assert leakage["share_in_shared_groups"] == 0.25
    assert report.leaked_sample_ids("valid") == ["valid/negative/P01_c.png"]
    assert report.leaked.set_index("sample_id").loc["valid/negative/P01_c.png", "reasons"] == "group P01 also in train"


def test_group_leakage_from_manifest(tree):
    rows = [{"path": f"{split}/{name}/img_{index:03d}.png", "group": f"slide{index % 2}"}
            for split, counts in (("train", 4), ("valid", 3)) for name in ("negative", "positive") for index in range(counts)]
    pd.DataFrame(rows).to_csv(tree / "manifest.csv", index=False)

    report = audit.audit_data(tree)

    assert report.group_source == "manifest"
    leakage = report.group_leakage.set_index("split").loc["valid"]
    assert leakage["shared_groups"] == 2
    assert leakage["share_in_shared_groups"] == 1.0
    assert len(report.leaked_sample_ids("valid")) == 6


def manifest_tree(root: Path, extra_row: dict) -> Path:
    """Write six images per class (three train, three valid) and a manifest listing them, then ``extra_row``."""
    rows = []
    for label, name in enumerate(("negative", "positive")):
        for index in range(6):
            save(smooth_image(index + 10 * label), root / name / f"{index}.png")
            rows.append({"path": f"{name}/{index}.png", "label": name, "split": "train" if index < 3 else "valid"})
    rows.append(extra_row)
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def test_manifest_paths_not_found_warn(tmp_path):
    root = manifest_tree(tmp_path / "m", {"path": "positive/deleted.png", "label": "positive", "split": "valid"})

    report = audit.audit_data(root)

    assert report.loader_error is None
    assert ("1 path(s) in manifest.csv name no file in the class folders (for example positive/deleted.png); "
            "restore the files or remove their rows from manifest.csv") in report.warnings
    assert int(report.files["loader"].sum()) == 12


def test_manifest_repeated_paths_warn(tmp_path):
    # Row 13 repeats row 7, the first positive image.
    root = manifest_tree(tmp_path / "m", {"path": "positive/0.png", "label": "positive", "split": "valid"})

    report = audit.audit_data(root)

    repeated = [warning for warning in report.warnings if "more than once" in warning]
    assert len(repeated) == 1
    assert "lists 1 path(s) more than once ('positive/0.png' in rows 7, 13;" in repeated[0]
    assert report.loader_error is not None
    assert "more than once" in report.loader_error
    assert len(report.samples) == 12
    assert report.samples.set_index("sample_id").loc["positive/0.png", "split"] == "train"


def test_group_pattern_errors(tree):
    with pytest.raises(ParameterError, match="has no capture group"):
        audit.audit_data(tree, group_pattern=r"P\d+")
    with pytest.raises(ParameterError, match="not a valid regular expression"):
        audit.audit_data(tree, group_pattern=r"(P\d+")


def test_unmatched_group_pattern_warns(tree):
    report = audit.audit_data(tree, group_pattern=r"^(P\d+)_")

    assert report.group_leakage.empty
    assert any("14 of 14 file names do not match group_pattern" in warning for warning in report.warnings)


def test_metrics_without_leaked():
    table = audit.compute_metrics_without_leaked(
        ["a", "b", "c", "d"], [1, 0, 1, 0], [0.9, 0.2, 0.4, 0.7], ["c", "d", "not-in-run"])

    assert table.loc["all", "images"] == 4
    assert table.loc["all", "accuracy"] == 0.5
    assert table.loc["without leaked", "images"] == 2
    assert table.loc["without leaked", "accuracy"] == 1.0
    assert table.loc["without leaked", "cross_entropy"] == pytest.approx(-(np.log(0.9) + np.log(0.8)) / 2)
    assert table.loc["leaked only", "accuracy"] == 0.0
    assert table.loc["leaked only", "roc_auc"] == 0.0


def test_metrics_without_leaked_rejects_shapes():
    with pytest.raises(ParameterError, match="one value per validation sample"):
        audit.compute_metrics_without_leaked(["a", "b"], [1, 0], [[0.5, 0.5]], [])


# --- statistics, report and plots ------------------------------------------------------------


def test_image_statistics_and_shift(tmp_path):
    root = tmp_path / "data"
    for split, level in (("train", 60), ("valid", 180)):
        for label, name in enumerate(("negative", "positive")):
            for index in range(8):
                pixels = np.full((20, 30, 3), level + 2 * index + label, dtype=np.uint8)
                save(Image.fromarray(pixels), root / split / name / f"img_{index}.png")

    report = audit.audit_data(root, image_size=32)

    statistics = report.image_statistics.set_index(["split", "label"])
    assert statistics.loc[("train", 0), "width_median"] == 30
    assert statistics.loc[("train", 0), "height_max"] == 20
    assert statistics.loc[("train", 0), "mean_intensity"] == pytest.approx(67.0)
    assert statistics.loc[("train", 0), "near_blank"] == 8
    shift = report.shift.set_index(["split", "label"]).loc[("valid", "0")]
    assert shift["difference_r"] == pytest.approx(120.0)
    assert shift["ks_statistic"] == 1.0
    assert any("mean intensity of class 0 differs between valid and train" in warning for warning in report.warnings)


def test_json_report_and_write(tree, tmp_path):
    report = audit.audit_data(tree)

    path = audit.write_split_audit(tmp_path / "run", report)

    written = json.loads(path.read_text())
    assert path.name == "split_audit.json"
    assert written["classes"] == ["negative", "positive"]
    assert written["scored_class"] == "positive"
    assert written["parameters"]["near_threshold"] == audit.DEFAULT_NEAR_THRESHOLD
    assert written["balance"][1] == {
        "split": "valid", "class_0": 3, "class_1": 3, "total": 6, "share_of_scored_class": 0.5,
        "constant_guess_accuracy": 0.5, "share_difference_vs_train": 0.0,
    }
    assert written["input_fingerprint"] is None
    assert list(written) == list(report.to_json())


def test_plots_return_figures(tree):
    shutil.copy(tree / "train" / "negative" / "img_000.png", tree / "valid" / "positive" / "copy.png")
    report = audit.audit_data(tree)

    figures = [
        audit_plots.plot_class_balance(report.balance, report.classes),
        audit_plots.plot_duplicate_pairs(report.duplicate_pairs()),
        audit_plots.plot_intensity_histograms(report.samples, report.classes),
        audit_plots.plot_class_thumbnails(report.thumbnails(per_class=2)),
    ]

    assert all(isinstance(figure, Figure) for figure in figures)
    assert len(figures[1].axes) == 2
    assert len(figures[3].axes) == 8
    assert len(report.thumbnails(per_class=2)) == 8


def test_plot_rejects_wrong_table(tree):
    report = audit.audit_data(tree)

    with pytest.raises(ParameterError, match="lacks the columns"):
        audit_plots.plot_duplicate_pairs(report.balance)


def test_near_threshold_default_matches_parameter():
    assert params.declared("02_inspect_validation")["near_threshold"].default == audit.DEFAULT_NEAR_THRESHOLD


# --- what the model is fed and the model setup -----------------------------------------------


def test_input_fingerprint_vgg16(tree):
    report = audit.audit_data(tree, run_config={"backbone": "vgg16", "weights": "imagenet", "preprocessing_in_effect": "rescale",
                                                "image_size": 32, "batch_size": 4})

    fingerprint = report.input_fingerprint.set_index("split")
    assert fingerprint.loc["train", "images"] == 8
    assert fingerprint.loc["valid", "images"] == 6
    assert fingerprint.loc["train", "channel_order"] == "RGB"
    assert fingerprint.loc["train", "min"] >= 0.0
    assert fingerprint.loc["train", "max"] <= 1.0
    assert report.preprocessing["fits_weights"] is False
    assert any("vgg16 with weights 'imagenet' expects inputs encoded as 'vgg16'" in warning for warning in report.warnings)


def test_fingerprint_caffe_is_bgr(tree):
    report = audit.audit_data(tree)

    fingerprint = audit.fingerprint_inputs(report.samples, preprocessing="vgg16", image_size=32, batch_size=4, batches=1)

    assert list(fingerprint["images"]) == [4, 4]
    assert set(fingerprint["channel_order"]) == {"BGR"}
    assert (fingerprint["min"] < 0).all()


def test_check_preprocessing_random_weights_fine():
    assert audit.check_preprocessing(backbone="vgg16", weights=None, preprocessing="rescale") == []
    assert audit.check_preprocessing(backbone="vgg16", weights="imagenet", preprocessing="vgg16") == []
    assert audit.check_preprocessing(backbone="small_cnn", weights=None, preprocessing="none") == []


def _tiny_model(units: int, activation: str, *, dropout: bool = False, batch_norm: bool = False):
    import keras

    inputs = keras.Input(shape=(4,))
    x = inputs
    if batch_norm:
        x = keras.layers.BatchNormalization(name="norm")(x)
    if dropout:
        x = keras.layers.Dropout(0.3, name="drop")(x)
    outputs = keras.layers.Dense(units, activation=activation, name="out")(x)
    return keras.Model(inputs, outputs)


def test_setup_one_unit_softmax_is_error():
    check = audit.check_setup(_tiny_model(1, "softmax"), loss="binary_crossentropy", label_format="binary")

    assert not check.ok
    assert any("a 1-unit softmax always outputs 1.0" in error for error in check.errors)
    with pytest.raises(ModelError, match="use sigmoid on 1 unit or softmax on 2 units"):
        check.raise_for_errors()


def test_setup_categorical_over_one_unit_is_error():
    check = audit.check_setup(_tiny_model(1, "sigmoid"), loss="categorical_crossentropy", label_format="binary")

    assert check.errors == ["categorical_crossentropy over one unit has nothing to compare; use binary_crossentropy with a sigmoid unit"]


def test_setup_one_hot_into_one_unit_is_error():
    check = audit.check_setup(_tiny_model(1, "sigmoid"), loss="binary_crossentropy", label_format="one_hot")

    assert check.errors == ["one-hot labels (two columns) do not fit one output unit; pass 0/1 labels of shape (batch, 1)"]


def test_setup_logits_need_from_logits():
    import keras

    model = _tiny_model(2, None)

    assert any("from_logits=True" in error for error in audit.check_setup(model, loss="sparse_categorical_crossentropy",
                                                                          label_format="sparse").errors)
    fixed = audit.check_setup(model, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), label_format="sparse")
    assert fixed.errors == []
    assert fixed.from_logits


def test_setup_cellnb_model_passes_and_lists_dropout():
    from cellnb.model import build_model, compile_model

    model = build_model(backbone="small_cnn", head="softmax2", image_size=16, dropout=0.2)
    compile_model(model, head="softmax2", learning_rate=1e-3)

    check = audit.check_setup(model, loss=model.loss, label_format="sparse", raise_on_error=True)

    assert check.errors == []
    assert check.output_units == 2
    assert check.output_activation == "softmax"
    assert list(check.training_behaviour["layer"]) == ["dropout"]
    assert "can sit above the validation loss" in "\n".join(check.summary_lines())


def test_setup_frozen_batch_norm_does_not_differ():
    model = _tiny_model(1, "sigmoid", dropout=True, batch_norm=True)
    model.get_layer("norm").trainable = False

    check = audit.check_setup(model, loss="binary_crossentropy", label_format="binary")

    behaviour = check.training_behaviour.set_index("layer")
    assert list(behaviour.index) == ["norm", "drop"]
    assert not behaviour.loc["norm", "differs"]
    assert behaviour.loc["drop", "differs"]


def test_setup_rejects_unknown_label_format():
    with pytest.raises(ParameterError, match=r"valid formats are \['binary', 'one_hot', 'sparse'\]"):
        audit.check_setup(_tiny_model(1, "sigmoid"), loss="binary_crossentropy", label_format="onehot")


# --- command line and real data --------------------------------------------------------------


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellnb.cli", "audit", *arguments], capture_output=True, text=True,
                          cwd=PROJECT_ROOT, timeout=120)


def test_cli_audit_writes_json(tree, tmp_path):
    shutil.copy(tree / "train" / "negative" / "img_000.png", tree / "valid" / "negative" / "copy.png")
    target = tmp_path / "audit.json"

    result = run_cli(str(tree), "--json", str(target), "--near-threshold", "6")

    assert result.returncode == 0, result.stderr
    assert "index 1 = 'positive' (the scored class)" in result.stdout
    written = json.loads(target.read_text())
    assert written["parameters"]["near_threshold"] == 6
    assert written["leaked_samples"] == [{"sample_id": "valid/negative/copy.png", "split": "valid",
                                          "reasons": "same pixels as train/negative/img_000.png"}]
    assert sum(row["readable"] for row in written["file_counts"] if row["split"] != "total") == 15


def test_cli_audit_bad_directory_has_no_traceback(tmp_path):
    result = run_cli(str(tmp_path / "missing"))

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "not found" in result.stderr


def test_cli_audit_disagreeing_splits_exit_2(tmp_path):
    root = make_tree(tmp_path / "data", {"train": (2, 2)})
    make_tree(root, {"valid": (2, 2)}, classes=("benign", "malignant"), seed=30)

    result = run_cli(str(root))

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "disagree on their class folders" in result.stderr


@pytest.mark.skipif(not PCAM_DIR.is_dir(), reason=f"{PCAM_DIR} is absent; the PatchCamelyon sample exists only beside the project checkout in CI")
def test_pcam_audit_matches_source_facts():
    started = time.perf_counter()
    report = audit.audit_data(PCAM_DIR)
    seconds = time.perf_counter() - started

    assert len(report.samples) == 1200
    balance = report.balance.set_index("split")
    assert list(balance["class_0"]) == [400, 100, 100]
    assert list(balance["class_1"]) == [400, 100, 100]
    assert set(report.samples["format"]) == {"JPEG"}
    assert set(report.samples["mode"]) == {"RGB"}
    assert set(zip(report.samples["width"], report.samples["height"])) == {(96, 96)}
    assert report.exact_duplicates.empty
    assert report.label_conflicts.empty
    assert report.group_source == "unknown"
    assert report.group_leakage.empty
    assert report.loader_error is None
    # This PCam sample has 6 near-blank background patches (pixel standard deviation below 10), all negatives.
    near_blank = report.image_statistics.groupby("label")["near_blank"].sum()
    assert near_blank[0] == 6
    assert near_blank[1] == 0
    counts = report.file_counts.set_index("split")
    assert counts.loc["total", "loader"] == 1200
    assert counts.loc["total", "keras"] == 1200
    print(f"PCam audit: {seconds:.1f} s, {len(report.near_duplicates)} near-duplicate pair(s) across splits at "
          f"distance <= {report.near_threshold}, {int(report.near_duplicates['near_blank'].sum())} involving near-blank images, "
          f"{int(report.image_statistics['near_blank'].sum())} near-blank images")
