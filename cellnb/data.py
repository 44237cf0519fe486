"""Discover image samples in a data directory and feed them to Keras through tf.data.

Three layouts are understood: split folders (``train|valid|test/<class>/``), class folders with
a ``manifest.csv`` that assigns splits, and class folders alone (split here, seeded and
stratified). Every file that is skipped is listed with its reason; nothing is dropped silently.
This module does not audit duplicates or leakage (see ``cellnb.audit``).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import itertools
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from cellnb.errors import DataError, ParameterError

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
SPLIT_FOLDER_NAMES = {
    "train": ("train", "training"),
    "valid": ("valid", "val", "validation"),
    "test": ("test", "testing"),
}
MANIFEST_NAME = "manifest.csv"
MANIFEST_SPLIT_COLUMNS = ("split", "source_split")
MANIFEST_GROUP_COLUMNS = ("group", "patient_or_slide_id")
SKIPPED_COLUMNS = ["sample_id", "split", "label_name", "reason"]
IGNORED_NAMES = {"thumbs.db", "desktop.ini", "__macosx", "$recycle.bin", "icon\r"}
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


@dataclass
class Discovery:
    """The samples found under a data directory and every file left out, with the reason.

    ``samples`` has one row per readable image: ``sample_id`` (path relative to the data root,
    ``/`` separators), ``path`` (absolute), ``split``, ``label`` (class index), ``label_name``,
    ``group``, ``sha256``, ``width``, ``height``, ``mode``, ``format``, plus any further columns
    the manifest carries. ``skipped`` has ``sample_id``, ``split``, ``label_name`` and ``reason``
    for unreadable images and for ``manifest.csv`` rows whose file is not in the class folders.
    ``ignored`` lists hidden and system entries that were never samples.
    """

    data_dir: Path
    layout: str
    classes: list[str]
    samples: pd.DataFrame
    skipped: pd.DataFrame
    ignored: list[str] = field(default_factory=list)

    def counts(self) -> pd.DataFrame:
        """Return a table of image counts, one row per split and one column per class."""
        table = pd.crosstab(self.samples["split"], self.samples["label_name"])
        table = table.reindex(index=[s for s in SPLITS if s in set(self.samples["split"])], columns=self.classes)
        return table.fillna(0).astype(int)

    def split(self, name: str) -> pd.DataFrame:
        return self.samples[self.samples["split"] == name].reset_index(drop=True)


def is_ignored(name: str) -> bool:
    """Return True for hidden and system entries (``.DS_Store``, ``.ipynb_checkpoints``, ``Thumbs.db``)."""
    return name.startswith(".") or name.lower() in IGNORED_NAMES


def discover_samples(
    data_dir: str | os.PathLike,
    *,
    classes: Sequence[str] = ("negative", "positive"),
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    skip_unreadable: bool = True,
) -> Discovery:
    """Find every sample under ``data_dir``, read its header and hash, and assign it a split.

    Parameters
    ----------
    data_dir : path
        The data root, in one of the three layouts described in the module docstring.
    classes : sequence of two str
        Class folder names; index 0 is the first, index 1 (the scored class) the second, in the
        order given.
    split_fractions : (train, valid, test)
        Used only for class folders without split information.
    seed : int
        Seed of that split.
    skip_unreadable : bool
        If False, an unreadable image raises DataError, and so does a ``manifest.csv`` row whose
        file is not in the class folders. If True, both are left out and listed in
        ``Discovery.skipped``. A manifest none of whose paths names a file in the class folders
        raises DataError either way.
    """
    root = Path(data_dir).expanduser()
    classes = check_classes(classes)
    if not root.is_dir():
        raise DataError(f"data directory {str(root)!r} not found; pass the folder that contains your images")
    if not any(not is_ignored(entry.name) for entry in root.iterdir()):
        raise DataError(
            f"data directory {str(root)!r} is empty; put the images in class folders {classes}, "
            f"optionally inside split folders train/ and valid/"
        )

    layout = detect_layout(root)
    ignored: list[str] = []
    not_found = pd.DataFrame(columns=SKIPPED_COLUMNS)
    if layout == "split_folders":
        candidates = _discover_split_folders(root, classes, ignored)
    else:
        candidates = _discover_class_folders(root, classes, ignored)
        if layout == "manifest":
            candidates, not_found = _apply_manifest(root, candidates, classes)
            _check_listed_files(root, not_found, skip_unreadable=skip_unreadable)

    if candidates.empty:
        raise DataError(f"no image files found under {str(root)!r}; expected class folders named {classes}")

    candidates = _merge_manifest_columns(root, candidates) if layout == "split_folders" else candidates
    inspected = _inspect_all(candidates)
    readable = inspected["error"].isna()
    unreadable = inspected.loc[~readable, ["sample_id", "split", "label_name", "error"]].rename(columns={"error": "reason"})
    samples = inspected.loc[readable].drop(columns=["error"]).reset_index(drop=True)

    if len(unreadable) and not skip_unreadable:
        listing = "; ".join(f"{row.sample_id}: {row.reason}" for row in unreadable.head(10).itertuples())
        raise DataError(
            f"{len(unreadable)} file(s) under {str(root)!r} cannot be decoded as images ({listing}); "
            f"remove or repair them, or pass -p skip_unreadable true (skip_unreadable = True in the notebook) to train without them"
        )

    splits_given = "split" in samples and not samples["split"].eq("").all()
    if not splits_given:
        samples["split"] = assign_splits(samples, fractions=split_fractions, seed=seed)

    samples = samples.sort_values(["split", "label", "sample_id"], key=_split_order).reset_index(drop=True)
    _check_splits(samples, classes, root, check_test=splits_given)
    for row in unreadable.itertuples():
        logger.warning("skipped unreadable file %s: %s", row.sample_id, row.reason)
    if len(not_found):
        logger.warning("skipped %d row(s) of %s whose file is not in the class folders, for example %s: %s",
                       len(not_found), root / MANIFEST_NAME, not_found["sample_id"].iloc[0], not_found["reason"].iloc[0])
    skipped = unreadable
    if len(not_found):
        skipped = pd.concat([not_found, unreadable], ignore_index=True) if len(unreadable) else not_found
    return Discovery(
        data_dir=root.resolve(),
        layout=layout,
        classes=classes,
        samples=samples,
        skipped=skipped.reset_index(drop=True),
        ignored=sorted(ignored),
    )


def detect_layout(root: Path) -> str:
    """Return ``split_folders``, ``manifest`` or ``class_folders`` for the data root."""
    names = {entry.name.lower() for entry in root.iterdir() if entry.is_dir() and not is_ignored(entry.name)}
    if any(alias in names for alias in SPLIT_FOLDER_NAMES["train"]):
        return "split_folders"
    if (root / MANIFEST_NAME).is_file():
        return "manifest"
    return "class_folders"


def check_classes(classes: Sequence[str]) -> list[str]:
    """Return the two class names as strings, or raise DataError naming what is wrong with them."""
    if isinstance(classes, str) or len(classes) != 2:
        raise DataError(
            f"classes must name exactly two class folders, negative first and scored class second, "
            f"for example ['negative', 'positive']; got {classes!r}"
        )
    names = [str(name) for name in classes]
    if names[0] == names[1] or not all(names):
        raise DataError(f"classes must be two different, non-empty folder names; got {classes!r}")
    return names


def _find_split_folder(root: Path, split: str) -> Path | None:
    entries = {entry.name.lower(): entry for entry in root.iterdir() if entry.is_dir() and not is_ignored(entry.name)}
    for alias in SPLIT_FOLDER_NAMES[split]:
        if alias in entries:
            return entries[alias]
    return None


def _discover_split_folders(root: Path, classes: list[str], ignored: list[str]) -> pd.DataFrame:
    folders = {}
    for split in SPLITS:
        folder = _find_split_folder(root, split)
        if folder is None:
            if split == "test":
                continue
            names = " or ".join(f"{alias}/" for alias in SPLIT_FOLDER_NAMES[split])
            raise DataError(f"{str(root)!r} has a train/ folder but no {names}; add the {split} split or use class folders only")
        folders[split] = folder
    _check_same_classes(folders, classes, root)

    frames = []
    for split, folder in folders.items():
        frame = _list_class_files(folder, classes, ignored, root)
        frame["split"] = split
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _check_same_classes(split_folders: dict[str, Path], classes: list[str], root: Path) -> None:
    """Raise DataError when train/ has exactly the class folders but another split has different ones.

    A train/ folder that is itself wrong is reported by ``_list_class_files``, which names the
    missing or extra folder.
    """
    found = {
        split: sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not is_ignored(entry.name))
        for split, folder in split_folders.items()
    }
    if found["train"] != sorted(classes):
        return
    for split, names in found.items():
        if names != found["train"]:
            raise DataError(
                f"the splits under {str(root)!r} have different class folders: "
                f"{_relative_id(split_folders[split], root)}/ has {names} but "
                f"{_relative_id(split_folders['train'], root)}/ has {found['train']}; "
                f"give every split the same class folders {classes}"
            )


def _discover_class_folders(root: Path, classes: list[str], ignored: list[str]) -> pd.DataFrame:
    frame = _list_class_files(root, classes, ignored, root)
    frame["split"] = ""
    return frame


def _list_class_files(folder: Path, classes: list[str], ignored: list[str], root: Path) -> pd.DataFrame:
    entries = sorted(folder.iterdir(), key=lambda entry: entry.name)
    folders = {}
    for entry in entries:
        if is_ignored(entry.name):
            ignored.append(_relative_id(entry, root))
        elif entry.is_dir():
            folders[entry.name] = entry
    missing = [name for name in classes if name not in folders]
    if missing:
        raise DataError(
            f"{str(folder)!r} has no class folder {missing[0]!r}; found {sorted(folders) or 'none'}; create it or "
            f"pass the actual folder names, negative first, with `classes` (-p classes neg,pos on the command line)"
        )

    unknown = sorted(set(folders) - set(classes))
    if unknown:
        raise DataError(
            f"{_relative_id(folder, root) or '.'}/ contains folders {unknown} that are not among classes {classes}; "
            f"pass the class folder names with the `classes` parameter (negative first, scored class second), "
            f"or move the extra folders out of the data directory"
        )
    rows = []
    for label, name in enumerate(classes):
        for path in _walk_files(folders[name], ignored, root):
            rows.append({"sample_id": _relative_id(path, root), "path": str(path.resolve()), "label": label, "label_name": name})
    return pd.DataFrame(rows, columns=["sample_id", "path", "label", "label_name"])


def _check_inside_root(path: Path, root: Path) -> None:
    """Raise DataError for a file, usually a symbolic link, whose real location is outside the data root."""
    target = path.resolve()
    if not target.is_relative_to(root.resolve()):
        raise DataError(
            f"{_relative_id(path, root)} under {str(root)!r} resolves to {str(target)!r}, outside the data root, "
            f"so it was not read; copy the file into the data directory or remove the link"
        )


def _walk_files(folder: Path, ignored: list[str], root: Path) -> list[Path]:
    files = []
    for current, subfolders, names in os.walk(folder):
        current = Path(current)
        for name in sorted(subfolders):
            if is_ignored(name):
                ignored.append(_relative_id(current / name, root) + "/")
        subfolders[:] = sorted(name for name in subfolders if not is_ignored(name))
        for name in sorted(names):
            if is_ignored(name):
                ignored.append(_relative_id(current / name, root))
            else:
                files.append(current / name)
    return files


def _relative_id(path: Path, root: Path) -> str:
    relative = Path(os.path.relpath(path, root))
    return "" if str(relative) == "." else PurePosixPath(*relative.parts).as_posix()


def read_manifest(root: Path, *, required: Sequence[str] = ("path",), unique: bool = True) -> pd.DataFrame:
    """Read ``manifest.csv`` and normalise its split and group column names to ``split`` and ``group``.

    Raises DataError when a ``required`` column is missing, or when a path is absolute or leaves
    the data root with ``..``. Such paths are rejected before any file is opened. With
    ``unique``, a path listed twice raises DataError too; without it, the rows are returned as
    they are and ``repeated_paths_message`` describes them.
    """
    manifest_path = root / MANIFEST_NAME
    try:
        manifest = pd.read_csv(manifest_path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{manifest_path} is not UTF-8 text ({error.reason} at byte {error.start}); "
            f"save it as a UTF-8 CSV file (in Excel: 'CSV UTF-8')"
        ) from None
    except pd.errors.ParserError as error:
        raise DataError(f"{manifest_path} is not a valid CSV file: {error}") from None
    missing = [column for column in required if column not in manifest.columns]
    if missing:
        raise DataError(
            f"{manifest_path} has no column {missing[0]!r}; its columns are {list(manifest.columns)}; "
            f"a manifest needs the columns {list(required)}"
        )
    for value in manifest["path"]:
        _check_manifest_path(value, manifest_path)
    for column in MANIFEST_SPLIT_COLUMNS:
        if column in manifest.columns and "split" not in manifest.columns:
            manifest = manifest.rename(columns={column: "split"})
    for column in MANIFEST_GROUP_COLUMNS:
        if column in manifest.columns and "group" not in manifest.columns:
            manifest = manifest.rename(columns={column: "group"})
    manifest["path"] = manifest["path"].map(lambda value: PurePosixPath(value.replace("\\", "/")).as_posix())
    if unique:
        message = repeated_paths_message(manifest, manifest_path)
        if message:
            raise DataError(message)
    return manifest


def repeated_paths_message(manifest: pd.DataFrame, manifest_path: Path) -> str | None:
    """Describe the paths that two or more rows name, which would make one image two samples, or return None."""
    repeated = manifest["path"][manifest["path"].duplicated(keep=False)]
    if repeated.empty:
        return None
    rows: dict[str, list[int]] = {}
    for position, path in repeated.items():
        rows.setdefault(path, []).append(position + 1)
    examples = "; ".join(f"{path!r} in rows {', '.join(map(str, numbers))}" for path, numbers in list(rows.items())[:5])
    return (
        f"{manifest_path} lists {len(rows)} path(s) more than once ({examples}; rows counted from 1 below the "
        f"header); keep one row per image, because a repeated row would make one image two samples"
    )


def _check_manifest_path(value: str, manifest_path: Path) -> None:
    posix = PurePosixPath(value.replace("\\", "/"))
    is_absolute = posix.is_absolute() or (len(value) > 1 and value[1] == ":")
    if is_absolute or ".." in posix.parts or value.strip() == "":
        raise DataError(
            f"{manifest_path} lists path {value!r}, which is empty, absolute or outside the data root, so it was "
            f"not read; write each path relative to the folder that contains manifest.csv, such as 'negative/img_001.png'"
        )


def _apply_manifest(root: Path, candidates: pd.DataFrame, classes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Join ``manifest.csv`` to the class-folder files.

    Returns the files with their manifest columns, and the manifest rows whose file is not among
    them as skipped entries (``SKIPPED_COLUMNS``) with the reason.
    """
    manifest = read_manifest(root, required=("path", "label"))
    if "split" in manifest.columns:
        manifest["split"] = manifest["split"].map(lambda value: _normalise_split(value, root))
    if "label" in manifest.columns:
        manifest["manifest_label"] = manifest["label"].map(lambda value: _label_index(value, classes, root))
        manifest = manifest.drop(columns=["label"])
    not_found = _manifest_rows_without_file(root, manifest, set(candidates["sample_id"]), classes)
    if len(not_found) and len(not_found) == manifest["path"].nunique():
        raise DataError(
            f"none of the {len(not_found)} path(s) in {root / MANIFEST_NAME} names a file in the class folders "
            f"{classes} (for example {_first_paths(not_found)}); write each path relative to the folder that "
            f"contains manifest.csv, such as '{classes[0]}/img_001.png'"
        )
    merged = candidates.drop(columns=["split"]).merge(manifest, how="left", left_on="sample_id", right_on="path", suffixes=("", "_manifest"))
    listed = merged["path_manifest"].notna()
    for sample_id in merged.loc[listed, "sample_id"]:
        _check_inside_root(root / sample_id, root)
    merged = merged.drop(columns=["path_manifest"])

    unlisted = merged["split"].isna() if "split" in merged.columns else pd.Series(False, index=merged.index)
    if unlisted.any():
        # A file that is not an image (notes.txt) is skipped as unreadable later, as without a manifest.
        not_images = unlisted & ~merged["sample_id"].map(lambda sample_id: _is_identified_image(root / sample_id))
        merged.loc[not_images, "split"] = ""
        unlisted &= ~not_images
    if "split" in merged.columns and unlisted.any():
        examples = ", ".join(merged.loc[unlisted, "sample_id"].head(3))
        also_not_found = (
            f"; {len(not_found)} of its row(s) name files that are not in the class folders (for example "
            f"{_first_paths(not_found)}), so check its paths too"
            if len(not_found) else ""
        )
        raise DataError(
            f"{unlisted.sum()} image(s) are not listed in {root / MANIFEST_NAME} (for example {examples}); "
            f"add them with their split, or remove them from the class folders{also_not_found}"
        )
    if "manifest_label" in merged.columns:
        disagree = merged["manifest_label"].notna() & (merged["manifest_label"] != merged["label"])
        if disagree.any():
            examples = ", ".join(merged.loc[disagree, "sample_id"].head(3))
            raise DataError(
                f"{disagree.sum()} image(s) sit in one class folder but carry the other label in "
                f"{root / MANIFEST_NAME} (for example {examples}); fix the folder or the manifest"
            )
        merged = merged.drop(columns=["manifest_label"])
    if "split" not in merged.columns:
        merged["split"] = ""
    return merged, not_found


def _manifest_rows_without_file(root: Path, manifest: pd.DataFrame, present: set[str], classes: list[str]) -> pd.DataFrame:
    """Return the manifest rows whose path is not among the class-folder files ``present``, with the reason."""
    absent = manifest[~manifest["path"].isin(present)].drop_duplicates("path")
    rows = []
    for record in absent.to_dict("records"):
        label = record.get("manifest_label")
        rows.append({
            "sample_id": record["path"],
            "split": record.get("split", ""),
            "label_name": classes[label] if label is not None else "",
            "reason": _not_found_reason(root, record["path"], classes),
        })
    return pd.DataFrame(rows, columns=SKIPPED_COLUMNS)


def _not_found_reason(root: Path, sample_id: str, classes: list[str]) -> str:
    """Return why a path listed in the manifest is not a sample. The path is only looked up, never opened."""
    path = root / sample_id
    if not path.exists():
        return f"listed in {MANIFEST_NAME} but not found"
    if any(is_ignored(part) for part in PurePosixPath(sample_id).parts):
        return f"listed in {MANIFEST_NAME} but a hidden or system entry, which is never a sample"
    if path.is_dir():
        return f"listed in {MANIFEST_NAME} but a folder, not an image file"
    return f"listed in {MANIFEST_NAME} but outside the class folders {classes}"


def _check_listed_files(root: Path, not_found: pd.DataFrame, *, skip_unreadable: bool) -> None:
    """Raise DataError for manifest rows whose file is not in the class folders, unless they may be skipped."""
    if not_found.empty or skip_unreadable:
        return
    raise DataError(
        f"{len(not_found)} row(s) of {root / MANIFEST_NAME} name files that are not in the class folders "
        f"({_first_paths(not_found, with_reason=True)}); restore the files or remove their rows from manifest.csv, "
        f"or pass -p skip_unreadable true (skip_unreadable = True in the notebook) to train without them"
    )


def _first_paths(skipped: pd.DataFrame, *, count: int = 5, with_reason: bool = False) -> str:
    listed = [f"{row.sample_id}: {row.reason}" if with_reason else row.sample_id for row in skipped.head(count).itertuples()]
    more = f" and {len(skipped) - count} more" if len(skipped) > count else ""
    return ("; " if with_reason else ", ").join(listed) + more


def _merge_manifest_columns(root: Path, candidates: pd.DataFrame) -> pd.DataFrame:
    """Carry a split-folder layout's optional manifest columns (group, true label, ...) into the table."""
    if not (root / MANIFEST_NAME).is_file():
        return candidates
    manifest = read_manifest(root)
    extra = [column for column in manifest.columns if column not in {"split", "label", "label_name", "sample_id"}]
    merged = candidates.merge(manifest[extra], how="left", left_on="sample_id", right_on="path", suffixes=("", "_manifest"))
    return merged.drop(columns=["path_manifest"])


def _normalise_split(value: str, root: Path) -> str:
    lowered = str(value).strip().lower()
    for split, aliases in SPLIT_FOLDER_NAMES.items():
        if lowered in aliases:
            return split
    if lowered == "":
        return ""
    raise DataError(f"{root / MANIFEST_NAME} has split {value!r}; valid splits are train, valid (or val, validation) and test")


def _label_index(value: str, classes: list[str], root: Path) -> int:
    text = str(value).strip()
    if text in classes:
        return classes.index(text)
    if text in {"0", "1"}:
        return int(text)
    raise DataError(f"{root / MANIFEST_NAME} has label {value!r}; valid labels are {classes} or 0 and 1")


def inspect_image(path: str | os.PathLike) -> dict:
    """Hash a file and decode it fully; return its ``sha256``, size, mode and format, or the error."""
    info = {"sha256": "", "width": 0, "height": 0, "mode": "", "format": "", "error": None}
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        info["error"] = f"cannot be read: {error.strerror or error}"
        return info
    info["sha256"] = hashlib.sha256(data).hexdigest()
    if not data:
        info["error"] = "empty file (0 bytes)"
        return info
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            info.update(width=image.width, height=image.height, mode=image.mode, format=image.format or "")
    except UnidentifiedImageError:
        info["error"] = "not an image that Pillow can identify"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        info["error"] = f"cannot be decoded: {error}"
    return info


def _is_identified_image(path: Path) -> bool:
    """Return whether Pillow identifies the file as an image from its header alone.

    A file that fails here is the one ``inspect_image`` reports as "not an image that Pillow can
    identify"; a damaged or unreadable image file still counts as an image.
    """
    try:
        with Image.open(path):
            return True
    except UnidentifiedImageError:
        return False
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return True


def _inspect_all(candidates: pd.DataFrame) -> pd.DataFrame:
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        infos = list(pool.map(inspect_image, candidates["path"]))
    table = pd.DataFrame(infos, index=candidates.index)
    inspected = pd.concat([candidates, table], axis=1)
    if "group" not in inspected.columns:
        inspected["group"] = ""
    inspected["group"] = inspected["group"].fillna("").astype(str)
    return inspected


def assign_splits(samples: pd.DataFrame, *, fractions: Sequence[float], seed: int) -> pd.Series:
    """Assign train, valid and test to samples without a split, stratified by class and seeded.

    Where groups (patients or slides) are known, whole groups go to one split, so no group is
    on both sides; the fractions are then met as closely as whole groups allow.
    """
    fractions = np.asarray(fractions, dtype=float)
    if fractions.shape != (3,) or (fractions < 0).any() or not np.isclose(fractions.sum(), 1.0) or fractions[:2].min() <= 0:
        raise DataError(
            f"split_fractions must be three non-negative numbers (train, valid, test) that sum to 1, "
            f"with train and valid above 0; got {list(fractions)}"
        )
    rng = np.random.default_rng(seed)
    result = pd.Series("", index=samples.index, dtype=object)
    has_groups = samples["group"].astype(str).ne("").any()
    for label in sorted(samples["label"].unique()):
        members = samples[samples["label"] == label]
        if has_groups:
            units = members.groupby(members["group"].where(members["group"] != "", members["sample_id"])).groups
            keys = sorted(units)
        else:
            units = {sample_id: [index] for sample_id, index in zip(members["sample_id"], members.index)}
            keys = sorted(units)
        order = rng.permutation(len(keys))
        total = len(members)
        targets = np.cumsum(fractions) * total
        taken = 0
        for position in order:
            indices = list(units[keys[position]])
            split = SPLITS[int(np.searchsorted(targets, taken, side="right"))] if taken < total else "test"
            result.loc[indices] = split
            taken += len(indices)
    # NOTE: a group that contains both classes is placed once per class, so it can end up on two
    # sides. The split audit reports such group leakage.
    return result


def _split_order(column: pd.Series) -> pd.Series:
    if column.name == "split":
        return column.map({name: position for position, name in enumerate(SPLITS)})
    return column


def _check_splits(samples: pd.DataFrame, classes: list[str], root: Path, *, check_test: bool) -> None:
    """Require two readable images per class in train and valid, and in a test split that the data provides."""
    for split in SPLITS:
        subset = samples[samples["split"] == split]
        if split == "test" and (subset.empty or not check_test):
            continue
        if subset.empty:
            raise DataError(f"no readable images in the {split} split under {str(root)!r}; every run needs train and valid images")
        for label, name in enumerate(classes):
            count = int((subset["label"] == label).sum())
            if count < 2:
                raise DataError(
                    f"the {split} split has {count} readable image(s) of class {name!r}; "
                    f"a binary split needs at least 2 images of each of {classes}"
                )


def load_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """Decode any image mode to RGB uint8 of shape (image_size, image_size, 3).

    16-bit and float images are scaled to 0-255 by their type's range, not clipped. An alpha
    channel is composited onto white, because microscopy backgrounds are bright. EXIF
    orientation is applied.
    """
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        image = _to_rgb(image)
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            top = 1.0
        elif image.mode.startswith("I;16") or values.max(initial=0) > 255:
            top = 65535.0
        else:
            top = 255.0
        scaled = np.clip(values / top * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def describe_conversion(mode: str) -> str:
    """Say in words what ``load_image`` does to an image of this Pillow mode."""
    if mode == "RGB":
        return "none"
    if mode in SIXTEEN_BIT_MODES:
        return f"{mode}: scaled from its type's range to 0-255 and copied to three channels"
    if mode in ("RGBA", "LA", "PA"):
        return f"{mode}: alpha composited onto white, then RGB"
    if mode in ("L", "1"):
        return f"{mode}: grey level copied to three channels"
    if mode == "P":
        return "P: palette expanded to RGB"
    if mode == "CMYK":
        return "CMYK: converted to RGB by Pillow"
    return f"{mode}: converted to RGB by Pillow"


def make_dataset(
    samples: pd.DataFrame,
    *,
    image_size: int,
    batch_size: int,
    preprocess=None,
    shuffle: bool = False,
    seed: int = 0,
    images=None,
):
    """Build a batched ``tf.data.Dataset`` of ``{"sample_id", "image", "label"}`` dictionaries.

    Images are decoded from disk every pass, so memory stays bounded by the batch, not the data
    set, unless ``images`` holds them already decoded: an array (or tensor) from
    ``decode_images`` over the same rows, which the dataset then reads instead of the files.
    Both give the same batches. ``preprocess`` maps a float32 batch of RGB values in 0-255 to
    what the model expects. Each batch carries its sample ids, so consumers key results by
    ``sample_id`` and never rely on iteration order.

    With ``shuffle``, pass ``k`` over the dataset is ordered by ``shuffle_order(n, seed, epoch)``
    with ``epoch = first_epoch() + k``, so the order of an epoch depends only on the seed and
    the epoch number. A resumed run builds its dataset inside ``shuffle_from_epoch(E)`` and
    sees the same batches as an uninterrupted run.
    """
    import tensorflow as tf

    _check_positive_int("image_size", image_size)
    _check_positive_int("batch_size", batch_size)
    frame = samples.reset_index(drop=True)
    columns = {
        "sample_id": frame["sample_id"].astype(str).to_numpy(),
        "label": frame["label"].astype(np.int32).to_numpy(),
    }
    if images is None:
        columns["path"] = frame["path"].astype(str).to_numpy()
    else:
        _check_decoded(images, len(frame), image_size)
        columns["image"] = images
    if shuffle:
        dataset = _shuffled_rows(columns, seed=seed, first=_SHUFFLE_FIRST_EPOCH.get())
    else:
        dataset = tf.data.Dataset.from_tensor_slices(columns)

    if images is None:
        dataset = dataset.map(_image_loader(image_size), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(batch_size)

    def finish(batch):
        pixels = tf.cast(batch["image"], tf.float32)
        if preprocess is not None:
            pixels = preprocess(pixels)
        return {"sample_id": batch["sample_id"], "image": pixels, "label": batch["label"]}

    return without_autotune(dataset.map(finish, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE))


def without_autotune(dataset):
    """Return ``dataset`` with tf.data's autotuning turned off.

    With autotuning on, destroying an iterator sometimes waits for seconds with every core idle.
    On 2 cores, a 25 s VGG16 pass over 1,000 images took 41 s in about two runs out of three,
    idle for its last 16 s, and took 25 s in five runs of five with autotuning off. Keras' fit
    makes a new iterator every epoch, so every epoch could stall. Without autotuning,
    ``num_parallel_calls=AUTOTUNE`` stays at the number of CPU cores (at most 16).
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def _image_loader(image_size: int):
    """Return a tf.data map function that replaces an element's ``path`` with its decoded ``image``."""
    import tensorflow as tf

    def decode(path):
        return load_image(path.decode("utf-8"), image_size)

    def load(element):
        image = tf.numpy_function(decode, [element["path"]], tf.uint8, stateful=False)
        image.set_shape((image_size, image_size, 3))
        return {"sample_id": element["sample_id"], "image": image, "label": element["label"]}

    return load


def decoded_megabytes(count: int, image_size: int) -> float:
    """Return the size in MB (10^6 bytes) of ``count`` decoded RGB uint8 images of ``image_size`` pixels square."""
    return count * image_size * image_size * 3 / 1e6


def decode_images(samples: pd.DataFrame, *, image_size: int) -> np.ndarray:
    """Decode every sample's file with ``load_image``; return a uint8 array of shape (n, size, size, 3) in row order.

    The result contains the whole set in memory, so check its size with ``decoded_megabytes`` first.
    """
    _check_positive_int("image_size", image_size)
    paths = samples["path"].astype(str).tolist()
    decoded = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)
    # Pillow releases the GIL while it decodes, so threads use every core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for row, image in enumerate(pool.map(lambda path: load_image(path, image_size), paths)):
            decoded[row] = image
    return decoded


def _check_decoded(images, count: int, image_size: int) -> None:
    expected = (count, image_size, image_size, 3)
    if tuple(images.shape) != expected or images.dtype != np.uint8:
        raise ValueError(
            f"decoded images have shape {tuple(images.shape)} and type {images.dtype}, but these samples need "
            f"uint8 images of shape {expected}; decode them with decode_images over the same rows and image_size"
        )


_SHUFFLE_FIRST_EPOCH: contextvars.ContextVar[int] = contextvars.ContextVar("shuffle_first_epoch", default=0)


@contextlib.contextmanager
def shuffle_from_epoch(epoch: int):
    """Make shuffled datasets built inside this block start at ``epoch`` (0-based) instead of 0."""
    token = _SHUFFLE_FIRST_EPOCH.set(int(epoch))
    try:
        yield
    finally:
        _SHUFFLE_FIRST_EPOCH.reset(token)


def shuffle_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """Return the sample order of one epoch: a permutation of ``range(count)`` fixed by seed and epoch."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(count)


def _shuffled_rows(columns: dict, *, seed: int, first: int):
    import tensorflow as tf

    count = len(columns["label"])
    epochs = itertools.count(first)
    table = {name: tf.constant(values) for name, values in columns.items()}

    def order():
        # tf.data calls this once per pass, and Keras' fit makes one pass per epoch. The whole
        # order is yielded at once, because a Python call per sample would slow every epoch.
        yield shuffle_order(count, seed, next(epochs))

    positions = tf.data.Dataset.from_generator(order, output_signature=tf.TensorSpec((count,), tf.int64)).unbatch()
    positions = positions.apply(tf.data.experimental.assert_cardinality(count))
    return positions.map(lambda index: {name: tf.gather(values, index) for name, values in table.items()})


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ParameterError(f"{name} must be a positive integer; got {value!r} ({type(value).__name__})")


def model_inputs(dataset, *, head: str):
    """Map a ``make_dataset`` dataset to ``(image, label)`` pairs in the label format the head needs.

    ``softmax2`` takes integer class indices (sparse categorical cross-entropy); ``sigmoid1``
    takes float labels of shape (batch, 1) (binary cross-entropy).
    """
    import tensorflow as tf

    if head == "sigmoid1":
        return dataset.map(lambda batch: (batch["image"], tf.cast(tf.expand_dims(batch["label"], -1), tf.float32)))
    return dataset.map(lambda batch: (batch["image"], batch["label"]))
