"""Data discovery in the three layouts, hidden and unreadable files, class order, image modes, tf.data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cellnb import data
from cellnb.errors import DataError

from conftest import write_image, write_split_tree


def test_split_folders_counts_and_ids(split_tree):
    discovery = data.discover_samples(split_tree)

    assert discovery.layout == "split_folders"
    assert discovery.counts().to_dict() == {"negative": {"train": 6, "valid": 3, "test": 2}, "positive": {"train": 6, "valid": 3, "test": 2}}
    assert "train/negative/img_000.png" in set(discovery.samples["sample_id"])
    positives = discovery.samples[discovery.samples["label_name"] == "positive"]
    assert set(positives["label"]) == {1}


def test_split_folders_accept_val_alias_and_no_test(tmp_path):
    root = write_split_tree(tmp_path / "d", {"train": (2, 2), "val": (2, 2)})

    discovery = data.discover_samples(root)

    assert sorted(set(discovery.samples["split"])) == ["train", "valid"]
    assert (discovery.samples["split"] == "valid").sum() == 4


def test_classes_order_given_is_kept(split_tree):
    discovery = data.discover_samples(split_tree, classes=["positive", "negative"])

    scored = discovery.samples[discovery.samples["label"] == 1]
    assert set(scored["label_name"]) == {"negative"}
    assert discovery.classes == ["positive", "negative"]


def test_hidden_files_are_never_samples(split_tree):
    (split_tree / "train" / "negative" / ".DS_Store").write_bytes(b"\x00\x01")
    (split_tree / "train" / "positive" / "Thumbs.db").write_bytes(b"\x00")
    write_image(split_tree / "valid" / ".ipynb_checkpoints" / "copy.png")
    write_image(split_tree / "valid" / "negative" / ".ipynb_checkpoints" / "copy.png")

    discovery = data.discover_samples(split_tree)

    assert len(discovery.samples) == 22
    assert discovery.skipped.empty
    assert "train/negative/.DS_Store" in discovery.ignored
    assert "train/positive/Thumbs.db" in discovery.ignored
    assert "valid/.ipynb_checkpoints" in discovery.ignored
    assert "valid/negative/.ipynb_checkpoints/" in discovery.ignored


def test_unreadable_files_are_listed_with_reasons(split_tree):
    (split_tree / "train" / "negative" / "empty.png").write_bytes(b"")
    (split_tree / "train" / "negative" / "notes.txt").write_text("not an image")
    good = (split_tree / "train" / "positive" / "img_000.png").read_bytes()
    (split_tree / "train" / "positive" / "truncated.png").write_bytes(good[: len(good) // 2])

    discovery = data.discover_samples(split_tree)

    reasons = dict(zip(discovery.skipped["sample_id"], discovery.skipped["reason"]))
    assert len(discovery.samples) == 22
    assert reasons["train/negative/empty.png"] == "empty file (0 bytes)"
    assert reasons["train/negative/notes.txt"] == "not an image that Pillow can identify"
    assert reasons["train/positive/truncated.png"].startswith("cannot be decoded")


def test_unreadable_files_raise_when_not_skipped(split_tree):
    (split_tree / "train" / "negative" / "empty.jpg").write_bytes(b"")

    with pytest.raises(DataError, match=r"train/negative/empty.jpg: empty file.*skip_unreadable true"):
        data.discover_samples(split_tree, skip_unreadable=False)


def test_manifest_layout_like_pcam(tmp_path):
    root = tmp_path / "pcam"
    rows = []
    for label, name in enumerate(["negative", "positive"]):
        for index in range(9):
            path = f"{name}/patch{index:04d}.jpg"
            write_image(root / path, seed=index + 10 * label, fmt="JPEG", bright=label == 1)
            split = ["train"] * 5 + ["valid"] * 2 + ["test"] * 2
            rows.append({"path": path, "label": name, "source_split": split[index], "patient_or_slide_id": ""})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)

    discovery = data.discover_samples(root)

    assert discovery.layout == "manifest"
    assert discovery.counts().to_dict() == {"negative": {"train": 5, "valid": 2, "test": 2}, "positive": {"train": 5, "valid": 2, "test": 2}}
    assert set(discovery.samples["format"]) == {"JPEG"}


def test_manifest_label_disagreeing_with_folder_raises(tmp_path):
    root = tmp_path / "m"
    for name in ("negative", "positive"):
        for index in range(3):
            write_image(root / name / f"{index}.png", seed=index)
    rows = [{"path": f"{name}/{index}.png", "label": "positive", "split": "train" if index else "valid"}
            for name in ("negative", "positive") for index in range(3)]
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)

    with pytest.raises(DataError, match="carry the other label"):
        data.discover_samples(root)


def _manifest_tree(root, extra_rows=()):
    """Write three images per class and split (train, valid) and a manifest listing them plus ``extra_rows``."""
    rows = []
    for label, name in enumerate(("negative", "positive")):
        for index in range(6):
            path = f"{name}/{index}.png"
            write_image(root / path, seed=index + 10 * label, bright=label == 1)
            rows.append({"path": path, "label": name, "split": "train" if index < 3 else "valid"})
    pd.DataFrame([*rows, *extra_rows]).to_csv(root / "manifest.csv", index=False)
    return root


def test_manifest_rows_without_file_are_skipped(tmp_path):
    root = _manifest_tree(tmp_path / "m", [
        {"path": "positive/deleted.png", "label": "positive", "split": "valid"},
        {"path": "negative/typo.pgn", "label": "0", "split": "train"},
        {"path": "loose.png", "label": "negative", "split": "train"},
        {"path": "negative/.hidden.png", "label": "negative", "split": "train"},
    ])
    write_image(root / "loose.png")
    write_image(root / "negative" / ".hidden.png")

    discovery = data.discover_samples(root)

    skipped = discovery.skipped.set_index("sample_id")
    assert len(discovery.samples) == 12
    assert sorted(skipped.index) == ["loose.png", "negative/.hidden.png", "negative/typo.pgn", "positive/deleted.png"]
    assert skipped.loc["positive/deleted.png", "reason"] == "listed in manifest.csv but not found"
    assert skipped.loc["positive/deleted.png", "split"] == "valid"
    assert skipped.loc["positive/deleted.png", "label_name"] == "positive"
    assert skipped.loc["negative/typo.pgn", "reason"] == "listed in manifest.csv but not found"
    assert skipped.loc["negative/typo.pgn", "label_name"] == "negative"
    assert skipped.loc["loose.png", "reason"] == "listed in manifest.csv but outside the class folders ['negative', 'positive']"
    assert skipped.loc["negative/.hidden.png", "reason"].startswith("listed in manifest.csv but a hidden or system entry")


def test_manifest_rows_without_file_raise_when_not_skipped(tmp_path):
    root = _manifest_tree(tmp_path / "m", [{"path": "positive/deleted.png", "label": "positive", "split": "valid"}])

    with pytest.raises(DataError, match=r"1 row\(s\) of .*manifest.csv name files that are not in the class folders "
                                        r"\(positive/deleted.png: listed in manifest.csv but not found\); restore the files "
                                        r"or remove their rows from manifest.csv, or pass -p skip_unreadable true"):
        data.discover_samples(root, skip_unreadable=False)


def test_manifest_layout_skips_unlisted_non_image(tmp_path):
    root = _manifest_tree(tmp_path / "m")
    (root / "positive" / "notes.txt").write_text("scanner settings\n")

    discovery = data.discover_samples(root)

    assert len(discovery.samples) == 12
    assert list(discovery.skipped["sample_id"]) == ["positive/notes.txt"]
    assert "not an image" in discovery.skipped["reason"].iloc[0]
    write_image(root / "positive" / "unlisted.png")
    with pytest.raises(DataError, match=r"1 image\(s\) are not listed in .*manifest.csv \(for example positive/unlisted.png\)"):
        data.discover_samples(root)


def test_manifest_repeated_path_raises(tmp_path):
    # The extra rows 13 and 14 repeat rows 1 and 4 (negative/0.png and negative/3.png).
    # Row 14 is written with a backslash, which names the same file.
    root = _manifest_tree(tmp_path / "m", [
        {"path": "negative/0.png", "label": "negative", "split": "valid"},
        {"path": "negative\\3.png", "label": "negative", "split": "valid"},
    ])

    with pytest.raises(DataError, match=r"manifest.csv lists 2 path\(s\) more than once \('negative/0.png' in rows 1, 13; "
                                        r"'negative/3.png' in rows 4, 14; rows counted from 1 below the header\); "
                                        r"keep one row per image"):
        data.discover_samples(root)


def test_manifest_naming_no_existing_file_raises(tmp_path):
    root = tmp_path / "m"
    rows = []
    for label, name in enumerate(("negative", "positive")):
        for index in range(3):
            write_image(root / name / f"{index}.png", seed=index + 10 * label)
            rows.append({"path": f"images/{name}/{index}.png", "label": name})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)

    with pytest.raises(DataError, match=r"none of the 6 path\(s\) in .*manifest.csv names a file in the class folders "
                                        r"\['negative', 'positive'\] \(for example images/negative/0.png, .* and 1 more\); "
                                        r"write each path relative to the folder that contains manifest.csv"):
        data.discover_samples(root)


def test_manifest_unlisted_error_names_rows_not_found(tmp_path):
    root = _manifest_tree(tmp_path / "m", [{"path": "positive/deleted.png", "label": "positive", "split": "valid"}])
    write_image(root / "positive" / "new.png", seed=99)

    with pytest.raises(DataError, match=r"1 image\(s\) are not listed .*positive/new.png.*; 1 of its row\(s\) name files "
                                        r"that are not in the class folders \(for example positive/deleted.png\)"):
        data.discover_samples(root)


def test_class_folders_split_is_seeded_and_stratified(tmp_path):
    root = tmp_path / "c"
    for label, name in enumerate(("negative", "positive")):
        for index in range(20):
            write_image(root / name / f"{index:02d}.png", seed=index + 100 * label)

    first = data.discover_samples(root, seed=3)
    second = data.discover_samples(root, seed=3)
    other = data.discover_samples(root, seed=4)

    assert first.layout == "class_folders"
    assert list(first.samples["split"]) == list(second.samples["split"])
    assert list(first.samples.sort_values("sample_id")["split"]) != list(other.samples.sort_values("sample_id")["split"])
    assert first.counts().to_dict() == {"negative": {"train": 14, "valid": 3, "test": 3}, "positive": {"train": 14, "valid": 3, "test": 3}}


def test_class_folders_split_keeps_groups_together(tmp_path):
    root = tmp_path / "g"
    rows = []
    for label, name in enumerate(("negative", "positive")):
        for index in range(24):
            path = f"{name}/{index:02d}.png"
            write_image(root / path, seed=index + 100 * label)
            rows.append({"path": path, "label": name, "group": f"{name}-slide{index // 3}"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)

    discovery = data.discover_samples(root, split_fractions=(0.5, 0.25, 0.25))

    splits_per_group = discovery.samples.groupby("group")["split"].nunique()
    assert splits_per_group.max() == 1
    assert set(discovery.samples["split"]) == {"train", "valid", "test"}


def test_unknown_class_folder_raises(split_tree):
    write_image(split_tree / "train" / "other" / "x.png")

    with pytest.raises(DataError, match=r"train/ contains folders \['other'\] that are not among classes"):
        data.discover_samples(split_tree)


def test_missing_class_folder_raises(tmp_path):
    root = write_split_tree(tmp_path / "d", {"train": (2, 2), "valid": (2, 2)})

    with pytest.raises(DataError, match=r"has no class folder 'tumour'"):
        data.discover_samples(root, classes=["negative", "tumour"])


def test_missing_directory_raises(tmp_path):
    with pytest.raises(DataError, match="not found; pass the folder that contains your images"):
        data.discover_samples(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("mode", "expected_mean"),
    [("L", None), ("P", None), ("RGBA", None), ("CMYK", None)],
)
def test_load_image_converts_modes_to_rgb(tmp_path, mode, expected_mean):
    path = write_image(tmp_path / f"x_{mode}.{'jpg' if mode == 'CMYK' else 'png'}", mode=mode, fmt="JPEG" if mode == "CMYK" else "PNG", size=40)

    pixels = data.load_image(path, 16)

    assert pixels.shape == (16, 16, 3)
    assert pixels.dtype == np.uint8


def test_load_image_scales_sixteen_bit_instead_of_clipping(tmp_path):
    values = np.full((8, 8), 32768, dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)

    pixels = data.load_image(path, 8)

    assert Image.open(path).mode.startswith("I")
    assert int(pixels[0, 0, 0]) == 128


def test_load_image_composites_alpha_on_white(tmp_path):
    path = tmp_path / "transparent.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(path)

    pixels = data.load_image(path, 4)

    assert pixels.min() == 255


def test_make_dataset_keys_every_sample_by_id(split_tree):
    discovery = data.discover_samples(split_tree)
    valid = discovery.split("train")

    dataset = data.make_dataset(valid, image_size=16, batch_size=5, shuffle=True, seed=1)
    seen = {}
    for batch in dataset:
        for sample_id, label, image in zip(batch["sample_id"].numpy(), batch["label"].numpy(), batch["image"].numpy()):
            seen[sample_id.decode()] = (int(label), image.shape)

    assert sorted(seen) == sorted(valid["sample_id"])
    assert all(seen[row.sample_id][0] == row.label for row in valid.itertuples())
    assert {shape for _, shape in seen.values()} == {(16, 16, 3)}


def _batches(dataset):
    return [{name: values.numpy() for name, values in batch.items()} for batch in dataset]


@pytest.mark.parametrize("shuffle", [False, True])
def test_decoded_images_match_files(split_tree, shuffle):
    samples = data.discover_samples(split_tree).split("train")
    options = dict(image_size=16, batch_size=5, shuffle=shuffle, seed=4, preprocess=lambda images: images / 127.5 - 1)
    decoded = data.decode_images(samples, image_size=16)

    from_files = data.make_dataset(samples, **options)
    from_memory = data.make_dataset(samples, images=decoded, **options)

    assert decoded.shape == (12, 16, 16, 3)
    assert decoded.dtype == np.uint8
    # Two passes each, so the second epoch's shuffled order is compared too.
    for _ in range(2):
        expected, got = _batches(from_files), _batches(from_memory)
        assert len(expected) == len(got) == 3
        for left, right in zip(expected, got):
            assert list(left["sample_id"]) == list(right["sample_id"])
            assert list(left["label"]) == list(right["label"])
            np.testing.assert_array_equal(left["image"], right["image"])


def test_decoded_images_must_match_the_rows(split_tree):
    samples = data.discover_samples(split_tree).split("train")
    decoded = data.decode_images(samples.head(5), image_size=16)

    with pytest.raises(ValueError, match=r"shape \(5, 16, 16, 3\).*\(12, 16, 16, 3\)"):
        data.make_dataset(samples, image_size=16, batch_size=4, images=decoded)


def test_decoded_megabytes_counts_uint8_rgb():
    assert data.decoded_megabytes(20000, 64) == pytest.approx(245.76)
    assert data.decoded_megabytes(1000, 96) == pytest.approx(27.648)


def test_too_few_images_per_class_raises(tmp_path):
    root = write_split_tree(tmp_path / "d", {"train": (3, 3), "valid": (1, 3)})

    with pytest.raises(DataError, match=r"valid split has 1 readable image\(s\) of class 'negative'"):
        data.discover_samples(root)


def test_manifest_not_utf8_raises(tmp_path):
    root = tmp_path / "m"
    for name in ("negative", "positive"):
        write_image(root / name / "0.png")
    (root / "manifest.csv").write_bytes("path,label,split\nnegative/0.png,negative,train\n".encode("utf-16"))

    with pytest.raises(DataError, match=r"is not UTF-8 text .*save it as a UTF-8 CSV file"):
        data.discover_samples(root)
