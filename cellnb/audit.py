"""Audit a data directory and a model setup before trusting any explanation of the curves.

``audit_data`` lists every file under the data root, checks the class folders and their order,
and counts each split. It finds exact and near duplicates, label conflicts and group leakage,
measures image statistics and their shift between splits, and returns an ``AuditReport`` of
tables. ``check_setup`` checks that a Keras model's output, loss and label format fit together.
Nothing here trains, and only ``write_split_audit`` writes a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

import cellnb
from cellnb import data, rundir
from cellnb.errors import DataError, ModelError, ParameterError, RunDirectoryError

logger = logging.getLogger(__name__)

SPLIT_AUDIT_FILE = "split_audit.json"

DEFAULT_NEAR_THRESHOLD = 8
"""Largest Hamming distance, out of 64 hash bits, at which two images count as near duplicates.

Measured with ``perceptual_hash`` on the 1,200-patch PatchCamelyon sample (96x96 RGB JPEG),
using 200 of its patches. A copy resized to 64x64 and re-encoded at JPEG quality 60 moved by at
most 4 bits. A copy with red scaled by 0.85 and blue by 1.1 moved by at most 2. A copy cropped by
3 pixels per side and resized back moved by 8 to 16 (median 8). Of the 360,000 pairs of patches
from different splits, one lies within 8 bits (two near-blank background patches, 2 bits apart)
and the next at 12.
"""

HASH_BITS = 64
HASH_METHOD = (
    "DCT perceptual hash, implemented in cellnb with the same bits as imagehash.phash: the image as the "
    "model is fed (RGB, resized to image_size) is converted to greyscale and resized to 32x32 with Lanczos "
    "filtering; each of the 8x8 lowest-frequency DCT coefficients gives one bit, set when it exceeds their median"
)

# ALLOWLIST_FORMATS in keras/src/utils/image_dataset_utils.py (Keras 3.15). Keras compares the
# lower-cased file name's ending, skips only class folders whose name starts with ".", and
# walks into hidden files and folders below them.
KERAS_IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")

# The Pillow formats each extension promises. MPO is the multi-picture JPEG that cameras write.
EXTENSION_FORMATS = {
    ".jpg": {"JPEG", "MPO"},
    ".jpeg": {"JPEG", "MPO"},
    ".jpe": {"JPEG", "MPO"},
    ".jfif": {"JPEG", "MPO"},
    ".png": {"PNG"},
    ".tif": {"TIFF"},
    ".tiff": {"TIFF"},
    ".bmp": {"BMP"},
    ".gif": {"GIF"},
    ".webp": {"WEBP"},
}

# Folder names that usually mean "no disease" or "disease". One of the first at index 1, or of
# the second at index 0, suggests that the scored class is the wrong one.
NEGATIVE_LOOKING_NAMES = {
    "negative", "neg", "normal", "benign", "healthy", "0", "no", "false", "control", "non-tumor",
    "non-tumour", "nontumor", "nontumour", "non-cancer", "noncancer", "non-cancerous", "noncancerous",
    "no-tumor", "no-tumour", "no-metastasis", "absent",
}
POSITIVE_LOOKING_NAMES = {
    "positive", "pos", "tumor", "tumour", "malignant", "cancer", "cancerous", "1", "yes", "true",
    "metastasis", "metastatic", "carcinoma", "lesion", "abnormal", "present",
}

# A split's share of the scored class that differs from the training share by more than this
# is flagged. It is a rule of thumb, not a statistical test.
PREVALENCE_TOLERANCE = 0.10

# Images whose pixel standard deviation (0-255 scale) is below this are near blank: their low
# DCT coefficients are mostly noise, so their hashes can match other blank images by chance.
NEAR_BLANK_STD = 10.0

# Within one class, a two-sample Kolmogorov-Smirnov statistic on mean intensity above
# SHIFT_KS_WARNING with a p-value below SHIFT_PVALUE is flagged as a shift between splits. The
# p-value keeps small splits from being flagged by chance; both limits are rules of thumb.
SHIFT_KS_WARNING = 0.2
SHIFT_PVALUE = 0.01

LABEL_FORMATS = {
    "sparse": "integer class indices, shape (batch,)",
    "binary": "0/1 floats, shape (batch, 1)",
    "one_hot": "one column per class, shape (batch, 2)",
}

_HASH_SIZE = 8
_HASH_SOURCE_SIZE = 32
_PAIR_BLOCK = 256
_POPCOUNT = np.array([bin(value).count("1") for value in range(256)], dtype=np.uint8)


def _dct_matrix(size: int) -> np.ndarray:
    """Return the unnormalised DCT-II matrix, so that ``M @ x @ M.T`` is the 2-D DCT of ``x`` up to a constant factor.

    Without orthonormal scaling the DC row keeps its full weight, as in the usual pHash
    implementations, so the bits match theirs.
    """
    positions = np.arange(size)
    return np.cos(np.pi * (2 * positions[None, :] + 1) * positions[:, None] / (2 * size))


_DCT = _dct_matrix(_HASH_SOURCE_SIZE)


# --- the report ------------------------------------------------------------------------------


@dataclass
class AuditReport:
    """The tables of one data audit. Every count that ``summary_lines`` prints comes from them.

    ``files`` has one row per file under the data root. ``samples`` has one row per readable
    image in a class folder that belongs to a split, with its per-image statistics and hashes.
    The other tables are described in ``to_json``.
    """

    data_dir: Path
    layout: str
    classes: list[str]
    near_threshold: int
    group_pattern: str | None
    group_source: str
    image_size: int
    files: pd.DataFrame
    samples: pd.DataFrame
    file_counts: pd.DataFrame
    class_folders: pd.DataFrame
    balance: pd.DataFrame
    exact_duplicates: pd.DataFrame
    label_conflicts: pd.DataFrame
    near_duplicates: pd.DataFrame
    group_leakage: pd.DataFrame
    leaked: pd.DataFrame
    image_statistics: pd.DataFrame
    shift: pd.DataFrame
    loader_error: str | None
    warnings: list[str] = field(default_factory=list)
    input_fingerprint: pd.DataFrame | None = None
    preprocessing: dict | None = None

    @property
    def scored_class(self) -> str:
        return self.classes[1]

    def problem_files(self) -> pd.DataFrame:
        """Return the files, other than ``manifest.csv``, that are not RGB images with a matching extension, with the reason."""
        files = self.files
        problem = (
            ~files["status"].isin(["image", "manifest"])
            | files["extension_matches"].eq(False)
            | files["conversion"].fillna("none").ne("none")
        )
        columns = ["sample_id", "split", "status", "reason", "format", "mode", "extension_matches", "conversion",
                   "loader", "keras"]
        return files.loc[problem, columns].reset_index(drop=True)

    def leaked_sample_ids(self, split: str = "valid") -> list[str]:
        """Return the ids of the ``split`` images that share pixels, a near-duplicate hash or a group with training."""
        if split not in data.SPLITS:
            raise ParameterError(f"split {split!r} is invalid; valid splits are {list(data.SPLITS)}")
        return sorted(self.leaked.loc[self.leaked["split"] == split, "sample_id"])

    def duplicate_pairs(self) -> pd.DataFrame:
        """Return exact duplicates across splits and near duplicates as pairs, for ``audit_plots.plot_duplicate_pairs``."""
        return _duplicate_pairs(self)

    def thumbnails(self, *, per_class: int = 6, seed: int = 0) -> pd.DataFrame:
        """Pick up to ``per_class`` images per split and class (seeded), with a caption each."""
        if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 0:
            raise ParameterError(f"per_class={per_class!r} is invalid; pass an integer >= 0")
        return _thumbnail_table(self.samples, per_class=per_class, seed=seed)

    def summary_lines(self) -> list[str]:
        """Return the report as plain lines of text, the way ``cellnb audit`` prints it."""
        return _summary_lines(self)

    def to_json(self) -> dict:
        """Return the machine-readable report, the content of ``split_audit.json``.

        Top-level keys:

        - ``cellnb_version``, ``data_dir``, ``layout``, ``classes`` (index 0 first), ``scored_class``
        - ``parameters``: near-duplicate threshold, hash bits and method, group pattern and source, image size
        - ``file_counts``: per split, files listed, ignored, outside class folders, unreadable,
          readable, and taken by the cellnb loader and by Keras
        - ``loader_error``: why ``discover_samples`` rejects the directory, or null
        - ``problem_files``, ``class_folders``, ``balance``, ``exact_duplicates``,
          ``label_conflicts``, ``near_duplicates``, ``group_leakage``, ``leaked_samples``,
          ``image_statistics``, ``shift``: the tables of the same names, as lists of records
        - ``input_fingerprint``, ``preprocessing``: null unless a run configuration was given
        - ``warnings``: every warning, as text
        """
        return {
            "cellnb_version": cellnb.__version__,
            "data_dir": str(self.data_dir),
            "layout": self.layout,
            "classes": list(self.classes),
            "scored_class": self.scored_class,
            "parameters": {
                "near_threshold": self.near_threshold,
                "hash_bits": HASH_BITS,
                "hash_method": HASH_METHOD,
                "group_pattern": self.group_pattern,
                "group_source": self.group_source,
                "image_size": self.image_size,
            },
            "file_counts": _records(self.file_counts),
            "loader_error": self.loader_error,
            "problem_files": _records(self.problem_files()),
            "class_folders": _records(self.class_folders),
            "balance": _records(self.balance),
            "exact_duplicates": _records(self.exact_duplicates),
            "label_conflicts": _records(self.label_conflicts),
            "near_duplicates": _records(self.near_duplicates),
            "group_leakage": _records(self.group_leakage),
            "leaked_samples": _records(self.leaked),
            "image_statistics": _records(self.image_statistics),
            "shift": _records(self.shift),
            "input_fingerprint": None if self.input_fingerprint is None else _records(self.input_fingerprint),
            "preprocessing": self.preprocessing,
            "warnings": list(self.warnings),
        }


def _records(frame: pd.DataFrame) -> list[dict]:
    """Convert a table to JSON records, with NaN as null and numpy scalars as Python numbers."""
    return json.loads(frame.to_json(orient="records"))


# --- entry points ----------------------------------------------------------------------------


def audit_data(
    data_dir: str | os.PathLike,
    *,
    classes: Sequence[str] = ("negative", "positive"),
    near_threshold: int = DEFAULT_NEAR_THRESHOLD,
    group_pattern: str | None = None,
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    image_size: int = 96,
    run_config: Mapping | None = None,
) -> AuditReport:
    """Audit every file under ``data_dir`` and the splits it forms, without training anything.

    Parameters
    ----------
    data_dir : path
        The data root, in any layout ``cellnb.data.discover_samples`` understands.
    classes : sequence of two str
        Class folder names, index 0 first and the scored class (index 1) second.
    near_threshold : int
        Largest Hamming distance (of 64 hash bits) at which two images from different splits
        are reported as near duplicates; 0 finds only identical hashes.
    group_pattern : str, optional
        Regular expression searched in each file name; its first capture group is the patient
        or slide id. Without it, groups come from the manifest's group column, if any.
    split_fractions, seed : as for ``discover_samples``
        Used only for class folders without split information, to reproduce the run's split.
    image_size : int
        Images are decoded and resized as the model gets them (``cellnb.data.load_image``)
        before their statistics and hashes are computed.
    run_config : mapping, optional
        A run's ``config.json``. When given, the report also contains what the model is fed per
        split (``input_fingerprint``) and whether the preprocessing fits the backbone's weights.

    Returns
    -------
    AuditReport

    Raises
    ------
    DataError
        The folder does not exist, the splits disagree on their class folders, or the class
        folders do not match ``classes``.

    Examples
    --------
    >>> report = audit_data("data", classes=["normal", "tumor"])  # doctest: +SKIP
    >>> print("\\n".join(report.summary_lines()))  # doctest: +SKIP
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data directory {str(root)!r} not found; pass the folder that contains your images")
    classes = data.check_classes(classes)
    near_threshold = _check_threshold(near_threshold)
    pattern = _compile_group_pattern(group_pattern)
    image_size = _check_image_size(image_size)

    layout = data.detect_layout(root)
    split_dirs = _split_directories(root, layout)
    folders = _class_folder_names(split_dirs)
    _check_class_folders(folders, classes, root)
    logger.info("auditing %s (%s layout)", root, layout)

    files = _list_files(root, layout, split_dirs, classes)
    files = _examine_files(files, image_size)
    samples, split_warnings = _build_samples(files, root, layout, classes, split_fractions, seed)
    samples, group_source, group_warnings = _assign_groups(samples, pattern)
    files = _attach_splits(files, samples)
    files, loader_error = _mark_loader(files, root, classes, split_fractions, seed)
    exact_duplicates = _exact_duplicates(samples)
    near_duplicates = _near_duplicates(samples, near_threshold)

    report = AuditReport(
        data_dir=root.resolve(),
        layout=layout,
        classes=classes,
        near_threshold=near_threshold,
        group_pattern=group_pattern,
        group_source=group_source,
        image_size=image_size,
        files=files,
        samples=samples,
        file_counts=_file_counts(files),
        class_folders=_class_folder_table(folders, files, classes),
        balance=_balance(samples),
        exact_duplicates=exact_duplicates,
        label_conflicts=_label_conflicts(exact_duplicates, classes),
        near_duplicates=near_duplicates,
        group_leakage=_group_leakage(samples),
        leaked=_leaked_samples(samples, exact_duplicates, near_duplicates),
        image_statistics=_image_statistics(samples),
        shift=_shift(samples),
        loader_error=loader_error,
    )
    report.warnings = [
        *_file_warnings(files, loader_error),
        *_class_warnings(folders, classes),
        *split_warnings,
        *group_warnings,
        *_balance_warnings(report.balance, classes),
        *_duplicate_warnings(report),
        *_shift_warnings(report.shift),
    ]
    if run_config is not None:
        _add_input_fingerprint(report, run_config)
    logger.info("audit of %s: %d images, %d warnings", root, len(samples), len(report.warnings))
    return report


def audit_run(run: rundir.Run, *, near_threshold: int = DEFAULT_NEAR_THRESHOLD, group_pattern: str | None = None) -> AuditReport:
    """Audit the data directory of a run with the run's classes, split, image size and preprocessing.

    Also warns when the run's ``samples.csv`` and the data directory no longer agree (images
    added, removed or moved between splits since the run was trained).
    """
    config = run.config
    report = audit_data(
        run.data_dir,
        classes=run.classes,
        near_threshold=near_threshold,
        group_pattern=group_pattern,
        split_fractions=config.get("split_fractions", (0.7, 0.15, 0.15)),
        seed=int(config.get("seed", 0)),
        image_size=int(config.get("image_size", 96)),
        run_config=config,
    )
    report.warnings.extend(_compare_with_run(report.samples, run.samples))
    return report


def write_split_audit(run_dir: str | os.PathLike, report: AuditReport) -> Path:
    """Write ``report.to_json()`` to ``RUN_DIR/split_audit.json`` atomically and return the path."""
    path = Path(run_dir) / SPLIT_AUDIT_FILE
    rundir.write_json(path, report.to_json())
    return path


# --- input checks ----------------------------------------------------------------------------


def _check_threshold(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= HASH_BITS:
        raise ParameterError(f"near_threshold={value!r} is invalid; pass an integer from 0 to {HASH_BITS} (hash bits that may differ)")
    return int(value)


def _check_image_size(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 8:
        raise ParameterError(f"image_size={value!r} is invalid; pass the run's image size in pixels, at least 8")
    return int(value)


def _compile_group_pattern(pattern: str | None) -> re.Pattern | None:
    if pattern in (None, ""):
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ParameterError(f"group_pattern {pattern!r} is not a valid regular expression: {error}") from None
    if compiled.groups < 1:
        raise ParameterError(
            f"group_pattern {pattern!r} has no capture group; put the patient or slide id in parentheses, "
            f"for example r'^(P\\d+)_'"
        )
    return compiled


# --- folders and files -----------------------------------------------------------------------


def _split_directories(root: Path, layout: str) -> dict[str, Path]:
    """Return the folder of each split, or the data root under ``""`` when splits come from elsewhere."""
    if layout != "split_folders":
        return {"": root}
    entries = {entry.name.lower(): entry for entry in root.iterdir() if entry.is_dir() and not data.is_ignored(entry.name)}
    found = {}
    for split, aliases in data.SPLIT_FOLDER_NAMES.items():
        alias = next((alias for alias in aliases if alias in entries), None)
        if alias is not None:
            found[split] = entries[alias]
        elif split != "test":
            names = " or ".join(f"{name}/" for name in aliases)
            raise DataError(f"{str(root)!r} has a train/ folder but no {names}; add the {split} split or use class folders only")
    return found


def _class_folder_names(split_dirs: dict[str, Path]) -> dict[str, list[str]]:
    """Return the class folders (non-hidden subfolders) of each split folder, sorted by name."""
    return {
        split: sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not data.is_ignored(entry.name))
        for split, folder in split_dirs.items()
    }


def _check_class_folders(folders: dict[str, list[str]], classes: list[str], root: Path) -> None:
    distinct = {tuple(names) for names in folders.values()}
    if len(distinct) > 1:
        listing = "; ".join(f"{split}/ has {names}" for split, names in folders.items())
        raise DataError(
            f"the splits under {str(root)!r} disagree on their class folders ({listing}); every split needs "
            f"the same class folders {classes}, so rename or add folders until they match"
        )
    found = next(iter(folders.values()))
    missing = [name for name in classes if name not in found]
    if missing:
        raise DataError(
            f"no class folder {missing[0]!r} under {str(root)!r}; found {found or 'none'}; pass the actual folder "
            f"names with classes (negative first, scored class second), for example --classes {','.join(found[:2]) or 'a,b'}"
        )
    unknown = [name for name in found if name not in classes]
    if unknown:
        raise DataError(
            f"{str(root)!r} contains folders {unknown} that are not among classes {classes}; move them out of the "
            f"data directory, or pass the two class folder names with classes"
        )


def _list_files(root: Path, layout: str, split_dirs: dict[str, Path], classes: list[str]) -> pd.DataFrame:
    """List every file under the root (``find ROOT -type f``) and place it in a split and class folder."""
    split_of_folder = {folder.name: split for split, folder in split_dirs.items() if split}
    # The loader and Keras follow symbolic links to split and class folders, but not links below them.
    link_depth = 2 if layout == "split_folders" else 1
    rows = []
    for current, subfolders, names in os.walk(root, followlinks=True):
        depth = len(Path(current).relative_to(root).parts)
        subfolders[:] = sorted(name for name in subfolders if depth < link_depth or not (Path(current) / name).is_symlink())
        for name in sorted(names):
            path = Path(current) / name
            sample_id = PurePosixPath(*path.relative_to(root).parts).as_posix()
            rows.append(_place_file(sample_id, str(path.resolve()), layout, split_of_folder, classes))
    return pd.DataFrame(rows, columns=["sample_id", "path", "split", "class_folder", "status", "reason", "keras"])


def _place_file(sample_id: str, path: str, layout: str, split_of_folder: dict[str, str], classes: list[str]) -> dict:
    parts = PurePosixPath(sample_id).parts
    row = {"sample_id": sample_id, "path": path, "split": "", "class_folder": "", "status": "", "reason": "", "keras": False}
    if layout == "split_folders":
        row["split"] = split_of_folder.get(parts[0], "")
        inner = parts[1:] if row["split"] else ()
    else:
        inner = parts

    hidden = next((part for part in parts if data.is_ignored(part)), None)
    if hidden is not None:
        row["status"] = "ignored"
        row["reason"] = "hidden or system file" if hidden == parts[-1] else f"inside hidden or system folder {hidden}/"
    elif sample_id == data.MANIFEST_NAME:
        row["status"] = "manifest"
    elif len(inner) < 2 or inner[0] not in classes:
        row["status"] = "outside_class_folders"
        row["reason"] = "not inside a class folder; no loader takes it"
    else:
        row["status"] = "candidate"
        row["class_folder"] = inner[0]

    # Keras indexes the files below each non-hidden subfolder of the folder it is given.
    if len(inner) >= 2 and not inner[0].startswith("."):
        row["keras"] = parts[-1].lower().endswith(KERAS_IMAGE_EXTENSIONS)
    return row


def _examine_files(files: pd.DataFrame, image_size: int) -> pd.DataFrame:
    candidates = files["status"] == "candidate"
    paths = list(files.loc[candidates, "path"])
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        infos = list(pool.map(lambda path: _examine_file(path, image_size), paths))
    table = pd.DataFrame(infos, index=files.index[candidates]).reindex(columns=_EXAMINED_COLUMNS)

    files = files.join(table)
    for column, empty in (("format", ""), ("mode", ""), ("width", 0), ("height", 0), ("sha256", ""), ("pixel_sha256", ""),
                          ("phash", "")):
        files[column] = files[column].fillna(empty)
    files[["width", "height"]] = files[["width", "height"]].astype(int)
    files["bytes"] = [Path(path).stat().st_size if Path(path).is_file() else 0 for path in files["path"]]
    files["extension"] = [PurePosixPath(sample_id).suffix.lower() for sample_id in files["sample_id"]]

    readable = candidates & files["error"].isna()
    unreadable = candidates & ~readable
    files.loc[readable, "status"] = "image"
    files.loc[unreadable, "status"] = "unreadable"
    if unreadable.any():
        files.loc[unreadable, "reason"] = files.loc[unreadable, "error"]
    files["extension_matches"] = [
        _extension_matches(extension, fmt) if status == "image" else None
        for extension, fmt, status in zip(files["extension"], files["format"], files["status"])
    ]
    files["conversion"] = [data.describe_conversion(mode) if status == "image" else None
                           for mode, status in zip(files["mode"], files["status"])]
    return files.drop(columns=["error"])


_EXAMINED_COLUMNS = ["sha256", "width", "height", "mode", "format", "error", "pixel_sha256", "phash", "mean_r", "mean_g",
                     "mean_b", "std_r", "std_g", "std_b", "mean_intensity", "pixel_std"]


def _examine_file(path: str, image_size: int) -> dict:
    """Decode one file as the loader does and compute its pixel digest, hash and statistics."""
    info = data.inspect_image(path)
    if info["error"] is not None:
        return info
    try:
        with Image.open(path) as image:
            info["pixel_sha256"] = _pixel_digest(ImageOps.exif_transpose(image))
        pixels = data.load_image(path, image_size)
    except (OSError, SyntaxError, ValueError) as error:
        info["error"] = f"identified as {info['format']} but cannot be converted to RGB: {error}"
        return info
    info["phash"] = perceptual_hash(pixels)
    info.update(_pixel_statistics(pixels))
    return info


def _pixel_digest(image: Image.Image) -> str:
    """Hash the decoded pixels with their mode and size (and palette), so re-encoded identical images match."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    if image.mode == "P" and image.getpalette() is not None:
        digest.update(bytes(image.getpalette()))
    return digest.hexdigest()


def _pixel_statistics(pixels: np.ndarray) -> dict:
    values = pixels.astype(np.float64)
    means = values.mean(axis=(0, 1))
    stds = values.std(axis=(0, 1))
    return {
        "mean_r": means[0], "mean_g": means[1], "mean_b": means[2],
        "std_r": stds[0], "std_g": stds[1], "std_b": stds[2],
        "mean_intensity": float(values.mean()),
        "pixel_std": float(values.std()),
    }


def _extension_matches(extension: str, image_format: str) -> bool | None:
    expected = EXTENSION_FORMATS.get(extension)
    return None if expected is None else image_format in expected


# --- hashes ----------------------------------------------------------------------------------


def perceptual_hash(pixels) -> str:
    """Compute the 64-bit DCT perceptual hash of an image, as 16 hexadecimal digits.

    ``pixels`` is an RGB or greyscale uint8 array (or a PIL image). The hash follows the pHash
    definition: greyscale, resized to 32x32 with Lanczos filtering, 2-D DCT, and one bit per
    coefficient of the 8x8 lowest frequencies, set when it exceeds their median. Resized,
    re-encoded and recoloured copies keep most bits; crops of more than a few percent do not.
    """
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(np.asarray(pixels, dtype=np.uint8))
    grey = image.convert("L").resize((_HASH_SOURCE_SIZE, _HASH_SOURCE_SIZE), Image.Resampling.LANCZOS)
    coefficients = _DCT @ np.asarray(grey, dtype=np.float64) @ _DCT.T
    lowest = coefficients[:_HASH_SIZE, :_HASH_SIZE]
    bits = (lowest > np.median(lowest)).ravel()
    return np.packbits(bits).tobytes().hex()


def hash_distance(first: str, second: str) -> int:
    """Return the Hamming distance between two hashes from ``perceptual_hash``."""
    return int(_POPCOUNT[np.frombuffer(bytes.fromhex(first), np.uint8) ^ np.frombuffer(bytes.fromhex(second), np.uint8)].sum())


def _hash_matrix(hashes: Sequence[str]) -> np.ndarray:
    if len(hashes) == 0:
        return np.zeros((0, _HASH_SIZE * _HASH_SIZE // 8), dtype=np.uint8)
    return np.stack([np.frombuffer(bytes.fromhex(value), np.uint8) for value in hashes])


def _close_pairs(first: np.ndarray, second: np.ndarray, threshold: int) -> list[tuple[int, int, int]]:
    """Return ``(i, j, distance)`` for every pair of rows within ``threshold`` bits, in blocks to bound memory."""
    pairs = []
    for start in range(0, len(first), _PAIR_BLOCK):
        block = first[start:start + _PAIR_BLOCK]
        distances = _POPCOUNT[block[:, None, :] ^ second[None, :, :]].sum(axis=2)
        rows, columns = np.nonzero(distances <= threshold)
        pairs.extend((start + int(row), int(column), int(distances[row, column])) for row, column in zip(rows, columns))
    return pairs


# --- samples, splits and groups --------------------------------------------------------------


def _build_samples(files: pd.DataFrame, root: Path, layout: str, classes: list[str], split_fractions, seed: int):
    """Return the readable images with split, label and manifest group, plus warnings about the split."""
    images = files[files["status"] == "image"].copy()
    images["label"] = [classes.index(name) for name in images["class_folder"]]
    images["label_name"] = images["class_folder"]
    images["group"] = ""
    warnings = []

    manifest = data.read_manifest(root, unique=False) if (root / data.MANIFEST_NAME).is_file() else None
    if manifest is not None:
        repeated = data.repeated_paths_message(manifest, root / data.MANIFEST_NAME)
        if repeated:
            # The audit describes each image once, with its first row, and reports the repeats.
            warnings.append(repeated)
            manifest = manifest.drop_duplicates("path", keep="first")
        images, warnings = _apply_manifest(images, manifest, layout, classes)
        warnings += _manifest_paths_not_found(manifest, files)
    if layout != "split_folders" and images["split"].eq("").all():
        images["split"] = data.assign_splits(images, fractions=split_fractions, seed=seed)
        warnings.append(
            f"{str(root)!r} has no split information, so splits were assigned as cellnb does with split_fractions "
            f"{list(split_fractions)} and seed {seed}; they match a run's split only if the run used the same values"
        )

    unassigned = ~images["split"].isin(data.SPLITS)
    if unassigned.any():
        warnings.append(f"{int(unassigned.sum())} readable image(s) have no split and are left out of the split audit")
    samples = images.loc[~unassigned]
    order = samples["split"].map({name: position for position, name in enumerate(data.SPLITS)})
    samples = samples.assign(_order=order).sort_values(["_order", "label", "sample_id"]).drop(columns=["_order"])
    return samples.reset_index(drop=True), warnings


def _apply_manifest(images: pd.DataFrame, manifest: pd.DataFrame, layout: str, classes: list[str]):
    warnings = []
    listed = manifest.drop_duplicates("path").set_index("path")
    in_manifest = images["sample_id"].isin(listed.index)
    if "group" in listed.columns:
        images["group"] = images["sample_id"].map(listed["group"]).fillna("").astype(str).str.strip()

    if layout == "manifest" and "split" in listed.columns:
        splits = images["sample_id"].map(listed["split"]).fillna("")
        images["split"] = [_normalise_split(value) for value in splits]
        if (~in_manifest).any():
            warnings.append(
                f"{int((~in_manifest).sum())} image(s) are not listed in {data.MANIFEST_NAME} (for example "
                f"{', '.join(images.loc[~in_manifest, 'sample_id'].head(3))}); the cellnb loader rejects the directory until they are"
            )
    if "label" in listed.columns:
        manifest_labels = images["sample_id"].map(listed["label"]).fillna("").astype(str).str.strip()
        index_of = {name: position for position, name in enumerate(classes)} | {"0": 0, "1": 1}
        disagree = [index_of.get(text, label) != label for text, label in zip(manifest_labels, images["label"])]
        if any(disagree):
            examples = ", ".join(images.loc[disagree, "sample_id"].head(3))
            warnings.append(
                f"{sum(disagree)} image(s) sit in one class folder but carry the other label in {data.MANIFEST_NAME} "
                f"(for example {examples}); fix the folder or the manifest"
            )
    return images, warnings


def _manifest_paths_not_found(manifest: pd.DataFrame, files: pd.DataFrame) -> list[str]:
    """Warn about manifest paths that name no file inside a class folder (missing, hidden or elsewhere)."""
    in_class_folders = set(files.loc[files["class_folder"] != "", "sample_id"])
    absent = [path for path in manifest["path"].drop_duplicates() if path not in in_class_folders]
    if not absent:
        return []
    more = f" and {len(absent) - 3} more" if len(absent) > 3 else ""
    return [
        f"{len(absent)} path(s) in {data.MANIFEST_NAME} name no file in the class folders (for example "
        f"{', '.join(absent[:3])}{more}); restore the files or remove their rows from {data.MANIFEST_NAME}"
    ]


def _normalise_split(value: str) -> str:
    lowered = str(value).strip().lower()
    for split, aliases in data.SPLIT_FOLDER_NAMES.items():
        if lowered in aliases:
            return split
    return ""


def _assign_groups(samples: pd.DataFrame, pattern: re.Pattern | None):
    """Set ``group`` from the file-name pattern when one is given; return the source of the groups."""
    warnings = []
    if pattern is not None:
        groups = []
        for sample_id in samples["sample_id"]:
            match = pattern.search(PurePosixPath(sample_id).name)
            groups.append((match.group(1) or "") if match else "")
        samples = samples.assign(group=groups)
        unmatched = samples["group"].eq("")
        if unmatched.any():
            warnings.append(
                f"{int(unmatched.sum())} of {len(samples)} file names do not match group_pattern {pattern.pattern!r} "
                f"(for example {samples.loc[unmatched, 'sample_id'].iloc[0]}); they are left out of the group leakage check"
            )
        return samples, "pattern", warnings
    if samples["group"].ne("").any():
        return samples, "manifest", warnings
    return samples, "unknown", warnings


def _attach_splits(files: pd.DataFrame, samples: pd.DataFrame) -> pd.DataFrame:
    """Copy the split of manifest and assigned-split layouts from the samples back to the file table."""
    split_of = samples.set_index("sample_id")["split"]
    known = files["sample_id"].isin(split_of.index)
    files.loc[known, "split"] = files.loc[known, "sample_id"].map(split_of)
    return files


def _mark_loader(files: pd.DataFrame, root: Path, classes: list[str], split_fractions, seed: int):
    """Mark the files that ``cellnb.data.discover_samples`` takes, or return its error when it rejects the directory."""
    try:
        discovery = data.discover_samples(root, classes=classes, split_fractions=split_fractions, seed=seed)
    except DataError as error:
        files["loader"] = False
        return files, str(error)
    files["loader"] = files["sample_id"].isin(set(discovery.samples["sample_id"]))
    return files, None


def _compare_with_run(samples: pd.DataFrame, run_samples: pd.DataFrame) -> list[str]:
    audited = set(zip(samples["sample_id"], samples["split"]))
    recorded = set(zip(run_samples["sample_id"].astype(str), run_samples["split"].astype(str)))
    if audited == recorded:
        return []
    return [
        f"the data directory no longer matches the run's samples.csv: {len(audited - recorded)} image(s) are new or "
        f"in another split, {len(recorded - audited)} of the run's images are missing or moved; the audit describes "
        f"the folder as it is now"
    ]


# --- counts, classes and balance -------------------------------------------------------------


def _file_counts(files: pd.DataFrame) -> pd.DataFrame:
    """Return per split how many files a plain listing, the cellnb loader and Keras would each take."""
    rows = []
    for split in [*data.SPLITS, ""]:
        subset = files[files["split"] == split]
        if split == "" and subset.empty:
            continue
        rows.append(_count_row(split or "(no split)", subset))
    rows.append(_count_row("total", files))
    return pd.DataFrame(rows)


def _count_row(name: str, files: pd.DataFrame) -> dict:
    status = files["status"]
    return {
        "split": name,
        "listed": len(files),
        "ignored": int(status.eq("ignored").sum()),
        "outside_class_folders": int(status.isin(["outside_class_folders", "manifest"]).sum()),
        "unreadable": int(status.eq("unreadable").sum()),
        "readable": int(status.eq("image").sum()),
        "loader": int(files["loader"].sum()),
        "keras": int(files["keras"].sum()),
    }


def _class_folder_table(folders: dict[str, list[str]], files: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    rows = []
    for split, names in folders.items():
        keras_order = sorted(name for name in names if not name.startswith("."))
        for name in names:
            in_folder = files[files["class_folder"] == name]
            if split:
                in_folder = in_folder[in_folder["split"] == split]
            rows.append({
                "split": split or "(all)",
                "class_folder": name,
                "class_index": classes.index(name),
                "scored": classes.index(name) == 1,
                "keras_index": keras_order.index(name),
                "images": int(in_folder["status"].eq("image").sum()),
                "unreadable": int(in_folder["status"].eq("unreadable").sum()),
            })
    return pd.DataFrame(rows)


def _balance(samples: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for split in data.SPLITS:
        subset = samples[samples["split"] == split]
        if subset.empty and split == "test":
            continue
        counts = [int((subset["label"] == label).sum()) for label in (0, 1)]
        total = sum(counts)
        rows.append({
            "split": split,
            "class_0": counts[0],
            "class_1": counts[1],
            "total": total,
            "share_of_scored_class": counts[1] / total if total else float("nan"),
            "constant_guess_accuracy": max(counts) / total if total else float("nan"),
        })
    table = pd.DataFrame(rows)
    train_share = table.loc[table["split"] == "train", "share_of_scored_class"].iloc[0]
    table["share_difference_vs_train"] = table["share_of_scored_class"] - train_share
    return table


# --- duplicates and leakage ------------------------------------------------------------------


def _exact_duplicates(samples: pd.DataFrame) -> pd.DataFrame:
    """Return one row per image whose decoded pixels occur more than once, numbered by duplicate group."""
    columns = ["duplicate_group", "sample_id", "split", "label", "label_name", "same_bytes", "spans_splits"]
    repeated = samples[samples.duplicated("pixel_sha256", keep=False)]
    if repeated.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for number, (_, members) in enumerate(repeated.groupby("pixel_sha256", sort=False), start=1):
        spans = members["split"].nunique() > 1
        first_bytes = members["sha256"].iloc[0]
        for member in members.itertuples():
            rows.append({
                "duplicate_group": number, "sample_id": member.sample_id, "split": member.split,
                "label": member.label, "label_name": member.label_name,
                "same_bytes": member.sha256 == first_bytes, "spans_splits": spans,
            })
    return pd.DataFrame(rows, columns=columns)


def _label_conflicts(duplicates: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Return one row per duplicate group whose copies carry both labels."""
    columns = ["duplicate_group", "sample_ids", "splits", "labels"]
    rows = []
    for number, members in duplicates.groupby("duplicate_group"):
        if members["label"].nunique() > 1:
            rows.append({
                "duplicate_group": int(number),
                "sample_ids": ", ".join(members["sample_id"]),
                "splits": ", ".join(sorted(set(members["split"]))),
                "labels": ", ".join(classes[label] for label in sorted(set(members["label"]))),
            })
    return pd.DataFrame(rows, columns=columns)


def _near_duplicates(samples: pd.DataFrame, threshold: int) -> pd.DataFrame:
    """Return pairs of images from different splits whose hashes differ by at most ``threshold`` bits.

    Pairs with identical pixels are left out: they are exact duplicates, reported separately.
    """
    columns = ["sample_a", "split_a", "label_a", "sample_b", "split_b", "label_b", "distance", "same_label", "near_blank"]
    rows = []
    present = [split for split in data.SPLITS if (samples["split"] == split).any()]
    for position, split_a in enumerate(present):
        first = samples[samples["split"] == split_a].reset_index(drop=True)
        for split_b in present[position + 1:]:
            second = samples[samples["split"] == split_b].reset_index(drop=True)
            pairs = np.array(_close_pairs(_hash_matrix(first["phash"]), _hash_matrix(second["phash"]), threshold),
                             dtype=np.int64).reshape(-1, 3)
            a, b = first.iloc[pairs[:, 0]].reset_index(drop=True), second.iloc[pairs[:, 1]].reset_index(drop=True)
            found = pd.DataFrame({
                "sample_a": a["sample_id"], "split_a": split_a, "label_a": a["label"].astype(int),
                "sample_b": b["sample_id"], "split_b": split_b, "label_b": b["label"].astype(int),
                "distance": pairs[:, 2], "same_label": a["label"].to_numpy() == b["label"].to_numpy(),
                "near_blank": np.minimum(a["pixel_std"].to_numpy(), b["pixel_std"].to_numpy()) < NEAR_BLANK_STD,
            })
            rows.append(found[a["pixel_sha256"].to_numpy() != b["pixel_sha256"].to_numpy()])
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=columns)
    return table[columns].sort_values(["distance", "sample_a", "sample_b"]).reset_index(drop=True)


def _group_leakage(samples: pd.DataFrame) -> pd.DataFrame:
    """Return, for valid and test, the share of their images whose group also appears in an earlier split."""
    columns = ["split", "compared_with", "groups", "shared_groups", "images_with_group", "images_in_shared_groups",
               "share_in_shared_groups", "example_groups"]
    grouped = samples[samples["group"] != ""]
    if grouped.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for split, other in (("valid", "train"), ("test", "train"), ("test", "valid")):
        mine = grouped[grouped["split"] == split]
        if mine.empty or not (grouped["split"] == other).any():
            continue
        shared = sorted(set(mine["group"]) & set(grouped.loc[grouped["split"] == other, "group"]))
        leaking = int(mine["group"].isin(shared).sum())
        rows.append({
            "split": split, "compared_with": other, "groups": int(mine["group"].nunique()),
            "shared_groups": len(shared), "images_with_group": len(mine), "images_in_shared_groups": leaking,
            "share_in_shared_groups": leaking / len(mine), "example_groups": ", ".join(shared[:5]),
        })
    return pd.DataFrame(rows, columns=columns)


def _leaked_samples(samples: pd.DataFrame, duplicates: pd.DataFrame, near: pd.DataFrame) -> pd.DataFrame:
    """Return the valid and test images that share pixels, a near-duplicate hash or a group with a training image.

    Near-duplicate pairs that involve a near-blank image are left out: blank backgrounds match
    each other by chance, so such a pair is no evidence of a copy.
    """
    reasons: dict[tuple[str, str], list[str]] = {}

    def note(sample_id: str, split: str, reason: str) -> None:
        reasons.setdefault((sample_id, split), []).append(reason)

    for _, members in duplicates.groupby("duplicate_group"):
        training = members.loc[members["split"] == "train", "sample_id"].tolist()
        for member in members[members["split"] != "train"].itertuples():
            if training:
                note(member.sample_id, member.split, f"same pixels as {training[0]}")
    for pair in near[(near["split_a"] == "train") & ~near["near_blank"].astype(bool)].itertuples():
        note(pair.sample_b, pair.split_b, f"near duplicate of {pair.sample_a} (distance {pair.distance})")

    training_groups = set(samples.loc[(samples["split"] == "train") & (samples["group"] != ""), "group"])
    for sample in samples[(samples["split"] != "train") & samples["group"].isin(training_groups)].itertuples():
        note(sample.sample_id, sample.split, f"group {sample.group} also in train")

    rows = [{"sample_id": sample_id, "split": split, "reasons": "; ".join(found)} for (sample_id, split), found in reasons.items()]
    table = pd.DataFrame(rows, columns=["sample_id", "split", "reasons"])
    return table.sort_values(["split", "sample_id"]).reset_index(drop=True)


def _duplicate_pairs(report: AuditReport) -> pd.DataFrame:
    rows = []
    for _, members in report.exact_duplicates.groupby("duplicate_group"):
        first = members.iloc[0]
        for other in members.iloc[1:].itertuples():
            if other.split != first["split"] or other.label != first["label"]:
                rows.append({"kind": "exact", "sample_a": first["sample_id"], "split_a": first["split"],
                             "label_a": int(first["label"]), "sample_b": other.sample_id, "split_b": other.split,
                             "label_b": int(other.label), "distance": 0})
    for pair in report.near_duplicates.itertuples():
        rows.append({"kind": "near", "sample_a": pair.sample_a, "split_a": pair.split_a, "label_a": pair.label_a,
                     "sample_b": pair.sample_b, "split_b": pair.split_b, "label_b": pair.label_b,
                     "distance": pair.distance})
    table = pd.DataFrame(rows, columns=["kind", "sample_a", "split_a", "label_a", "sample_b", "split_b", "label_b", "distance"])
    table["path_a"] = [str(report.data_dir / sample_id) for sample_id in table["sample_a"]]
    table["path_b"] = [str(report.data_dir / sample_id) for sample_id in table["sample_b"]]
    table["label_name_a"] = [report.classes[label] for label in table["label_a"]]
    table["label_name_b"] = [report.classes[label] for label in table["label_b"]]
    return table


def compute_metrics_without_leaked(sample_ids, labels, probabilities, leaked_sample_ids) -> pd.DataFrame:
    """Compare validation metrics on all images, without the leaked ones, and on the leaked ones alone.

    Parameters
    ----------
    sample_ids, labels : arrays of shape [N]
        The run's validation samples (``run.trajectories.sample_ids`` and ``.labels``).
    probabilities : array of shape [N]
        Probability of the scored class per sample, usually the last epoch's
        (``run.trajectories.probabilities[-1]``).
    leaked_sample_ids : iterable of str
        From ``AuditReport.leaked_sample_ids("valid")``. Ids that are not among ``sample_ids``
        are ignored.

    Returns
    -------
    DataFrame
        Rows ``all``, ``without leaked`` and ``leaked only``. Columns ``images``, ``accuracy``,
        ``cross_entropy`` (the mean, as Keras computes ``val_loss``) and ``roc_auc``, which is NaN
        where a subset has one class or no images.
    """
    from sklearn.metrics import roc_auc_score

    from cellnb.explain import cross_entropy, predicted_labels

    sample_ids = np.asarray(sample_ids, dtype=str)
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if not (sample_ids.shape == labels.shape == probabilities.shape) or sample_ids.ndim != 1:
        raise ParameterError(
            f"sample_ids, labels and probabilities have shapes {sample_ids.shape}, {labels.shape} and "
            f"{probabilities.shape}; pass one value per validation sample, for one epoch"
        )
    losses = cross_entropy(probabilities, labels)
    correct = predicted_labels(probabilities) == labels
    leaked = np.isin(sample_ids, list(leaked_sample_ids))

    rows = []
    for name, chosen in (("all", np.ones_like(leaked)), ("without leaked", ~leaked), ("leaked only", leaked)):
        count = int(chosen.sum())
        both_classes = count > 0 and np.unique(labels[chosen]).size == 2
        rows.append({
            "subset": name,
            "images": count,
            "accuracy": float(correct[chosen].mean()) if count else float("nan"),
            "cross_entropy": float(losses[chosen].mean()) if count else float("nan"),
            "roc_auc": float(roc_auc_score(labels[chosen], probabilities[chosen])) if both_classes else float("nan"),
        })
    return pd.DataFrame(rows).set_index("subset")


# --- image statistics and shift --------------------------------------------------------------


_STATISTICS_COLUMNS = [
    "split", "label", "label_name", "images", "width_min", "width_median", "width_max", "height_min", "height_median",
    "height_max", "modes", "mean_intensity", "mean_intensity_std", "mean_r", "mean_g", "mean_b", "pixel_std", "near_blank",
]
_SHIFT_COLUMNS = [
    "split", "compared_with", "label", "images", "train_images", "difference_r", "standardized_difference_r",
    "difference_g", "standardized_difference_g", "difference_b", "standardized_difference_b", "ks_statistic", "ks_pvalue",
]


def _image_statistics(samples: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (split, label), members in samples.groupby(["split", "label"], sort=False):
        rows.append({
            "split": split, "label": int(label), "label_name": members["label_name"].iloc[0], "images": len(members),
            "width_min": int(members["width"].min()), "width_median": float(members["width"].median()),
            "width_max": int(members["width"].max()),
            "height_min": int(members["height"].min()), "height_median": float(members["height"].median()),
            "height_max": int(members["height"].max()),
            "modes": ", ".join(f"{mode} {count}" for mode, count in members["mode"].value_counts().items()),
            "mean_intensity": members["mean_intensity"].mean(), "mean_intensity_std": members["mean_intensity"].std(ddof=0),
            "mean_r": members["mean_r"].mean(), "mean_g": members["mean_g"].mean(), "mean_b": members["mean_b"].mean(),
            "pixel_std": members["pixel_std"].mean(),
            "near_blank": int((members["pixel_std"] < NEAR_BLANK_STD).sum()),
        })
    return pd.DataFrame(rows, columns=_STATISTICS_COLUMNS)


def _shift(samples: pd.DataFrame) -> pd.DataFrame:
    """Compare each split with train, per class and overall: channel mean differences and a KS statistic."""
    from scipy.stats import ks_2samp

    rows = []
    for split in ("valid", "test"):
        for label in (0, 1, None):
            same_class = samples if label is None else samples[samples["label"] == label]
            train = same_class[same_class["split"] == "train"]
            other = same_class[same_class["split"] == split]
            if train.empty or other.empty:
                continue
            row = {"split": split, "compared_with": "train", "label": "all" if label is None else str(label),
                   "images": len(other), "train_images": len(train)}
            for channel in ("r", "g", "b"):
                column = f"mean_{channel}"
                difference = other[column].mean() - train[column].mean()
                pooled = np.sqrt((other[column].var(ddof=0) + train[column].var(ddof=0)) / 2)
                row[f"difference_{channel}"] = difference
                row[f"standardized_difference_{channel}"] = difference / pooled if pooled > 0 else float("nan")
            result = ks_2samp(other["mean_intensity"], train["mean_intensity"])
            row["ks_statistic"] = float(result.statistic)
            row["ks_pvalue"] = float(result.pvalue)
            rows.append(row)
    return pd.DataFrame(rows, columns=_SHIFT_COLUMNS)


def _thumbnail_table(samples: pd.DataFrame, *, per_class: int, seed: int) -> pd.DataFrame:
    chosen = [
        members.sample(min(per_class, len(members)), random_state=seed).sort_values("sample_id")
        for _, members in samples.groupby(["split", "label"], sort=False)
    ]
    table = pd.concat(chosen, ignore_index=True) if chosen else samples.head(0).copy()
    table["caption"] = [
        f"{split}/{name}\n{PurePosixPath(sample_id).name}\n{width}x{height} {mode}"
        for split, name, sample_id, width, height, mode in zip(
            table["split"], table["label_name"], table["sample_id"], table["width"], table["height"], table["mode"])
    ]
    return table[["sample_id", "path", "split", "label", "label_name", "caption"]]


# --- warnings --------------------------------------------------------------------------------


def _file_warnings(files: pd.DataFrame, loader_error: str | None) -> list[str]:
    warnings = []
    unreadable = files[files["status"] == "unreadable"]
    if len(unreadable):
        warnings.append(
            f"{len(unreadable)} file(s) in class folders cannot be decoded (for example {unreadable['sample_id'].iloc[0]}: "
            f"{unreadable['reason'].iloc[0]}); the loader skips them, or stops with skip_unreadable false"
        )

    mismatched = files[files["extension_matches"].eq(False)]
    if len(mismatched):
        example = mismatched.iloc[0]
        warnings.append(
            f"{len(mismatched)} image(s) have an extension that does not match their content "
            f"(for example {example['sample_id']} is {example['format']}); tools that decode by extension will fail on them"
        )

    converted = files[files["conversion"].fillna("none").ne("none")]
    if len(converted):
        modes = ", ".join(f"{mode} {count}" for mode, count in converted["mode"].value_counts().items())
        warnings.append(f"{len(converted)} image(s) are not RGB and are converted before the model sees them ({modes})")

    keras_only = files[files["keras"] & ~files["status"].eq("image")]
    if len(keras_only):
        warnings.append(
            f"Keras image_dataset_from_directory would also take {len(keras_only)} file(s) that are hidden or "
            f"unreadable (for example {keras_only['sample_id'].iloc[0]})"
        )
    skipped_by_keras = files[files["status"].eq("image") & ~files["keras"]]
    if len(skipped_by_keras):
        extensions = sorted(set(skipped_by_keras["extension"]) - {""}) or ["no extension"]
        warnings.append(
            f"Keras image_dataset_from_directory would skip {len(skipped_by_keras)} readable image(s) with extensions "
            f"{extensions}; it takes only {list(KERAS_IMAGE_EXTENSIONS)}"
        )

    if loader_error:
        warnings.append(f"the cellnb loader rejects this data directory: {loader_error}")
    return warnings


def _normalise_name(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


def _class_warnings(folders: dict[str, list[str]], classes: list[str]) -> list[str]:
    warnings = []
    if _normalise_name(classes[1]) in NEGATIVE_LOOKING_NAMES or _normalise_name(classes[0]) in POSITIVE_LOOKING_NAMES:
        warnings.append(
            f"the scored class (index 1, whose probability is recorded) is {classes[1]!r} and index 0 is "
            f"{classes[0]!r}; if {classes[0]!r} is the disease class, pass classes={[classes[1], classes[0]]}"
        )
    names = next(iter(folders.values()))
    keras_classes = sorted(name for name in names if not name.startswith("."))
    if keras_classes != classes:
        warnings.append(
            f"Keras image_dataset_from_directory sorts class folders, so without class_names it would use the order "
            f"{keras_classes}, not classes={classes}; pass class_names={classes} to keep index 1 = {classes[1]!r}"
        )
    return warnings


def _balance_warnings(balance: pd.DataFrame, classes: list[str]) -> list[str]:
    warnings = []
    for row in balance.itertuples():
        counts = (row.class_0, row.class_1)
        if row.total == 0:
            warnings.append(f"{row.split}/ has no readable images")
        elif min(counts) == 0:
            only = classes[0] if counts[0] else classes[1]
            warnings.append(
                f"{row.split}/ has only class {only!r} ({row.total} images); a binary split needs both {classes[0]!r} "
                f"and {classes[1]!r}, so its accuracy and loss cannot show whether the model separates them"
            )
        elif abs(row.share_difference_vs_train) > PREVALENCE_TOLERANCE:
            warnings.append(
                f"{row.split}/ has {row.share_of_scored_class:.0%} {classes[1]!r} against {balance['share_of_scored_class'].iloc[0]:.0%} "
                f"in train; a constant guess scores {row.constant_guess_accuracy:.0%} there"
            )
    return warnings


def _duplicate_warnings(report: AuditReport) -> list[str]:
    warnings = []
    duplicates = report.exact_duplicates
    if len(duplicates):
        groups = duplicates.drop_duplicates("duplicate_group")
        warnings.append(
            f"{len(groups)} group(s) of images with identical pixels ({len(duplicates)} images), "
            f"{int(groups['spans_splits'].sum())} of them across splits"
        )
    if len(report.label_conflicts):
        warnings.append(f"{len(report.label_conflicts)} image(s) appear under both labels, so one of the copies is mislabelled")
    if len(report.near_duplicates):
        blank = int(report.near_duplicates["near_blank"].sum())
        warnings.append(
            f"{len(report.near_duplicates)} near-duplicate pair(s) across splits at hash distance <= {report.near_threshold}"
            + (f", {blank} of them involving near-blank images whose hashes are unreliable" if blank else "")
        )
    for row in report.group_leakage.itertuples():
        if row.shared_groups:
            warnings.append(
                f"{row.images_in_shared_groups} of {row.images_with_group} {row.split} images ({row.share_in_shared_groups:.0%}) "
                f"belong to {row.shared_groups} patient or slide group(s) also in {row.compared_with} (for example {row.example_groups})"
            )
    return warnings


def _shift_warnings(shift: pd.DataFrame) -> list[str]:
    warnings = []
    for row in shift.itertuples():
        if row.label != "all" and row.ks_statistic > SHIFT_KS_WARNING and row.ks_pvalue < SHIFT_PVALUE:
            warnings.append(
                f"mean intensity of class {row.label} differs between {row.split} and train "
                f"(KS statistic {row.ks_statistic:.2f}, p = {row.ks_pvalue:.2g})"
            )
    return warnings


# --- summary ---------------------------------------------------------------------------------


def _summary_lines(report: AuditReport) -> list[str]:
    classes = report.classes
    total = report.file_counts[report.file_counts["split"] == "total"].iloc[0]
    lines = [
        f"data: {report.data_dir} ({report.layout.replace('_', ' ')} layout)",
        f"classes: index 0 = {classes[0]!r}, index 1 = {classes[1]!r} (the scored class)",
        f"files: {total['listed']} listed, {total['readable']} readable images, {total['unreadable']} unreadable, "
        f"{total['ignored']} hidden or system, {total['outside_class_folders']} outside class folders",
        f"taken: cellnb loader {total['loader']}, Keras image_dataset_from_directory {total['keras']}",
    ]

    for row in report.balance.itertuples():
        lines.append(
            f"{row.split}: {row.class_0} {classes[0]}, {row.class_1} {classes[1]}; share of {classes[1]} "
            f"{row.share_of_scored_class:.2f}, constant-guess accuracy {row.constant_guess_accuracy:.2f}"
        )

    groups = report.exact_duplicates.drop_duplicates("duplicate_group")
    lines.append(
        f"exact duplicates (same decoded pixels): {len(groups)} group(s), {int(groups['spans_splits'].sum())} across splits; "
        f"label conflicts: {len(report.label_conflicts)}"
    )
    lines.append(f"near duplicates across splits (hash distance <= {report.near_threshold} of {HASH_BITS}): "
                 f"{len(report.near_duplicates)} pair(s)")

    if report.group_source == "unknown":
        lines.append("groups: unknown (no group ids in a manifest and no group_pattern), so group leakage is not checked")
    else:
        leakage = ", ".join(
            f"{row.split} vs {row.compared_with} {row.share_in_shared_groups:.0%}" for row in report.group_leakage.itertuples()
        )
        lines.append(f"groups from the {report.group_source}: share of images in groups also seen earlier: {leakage or 'none'}")
    lines.append(f"leaked validation images (pixels, near duplicate or group shared with train): {len(report.leaked_sample_ids('valid'))}")

    for row in report.shift[report.shift["label"] == "all"].itertuples():
        lines.append(
            f"shift {row.split} vs train: KS statistic on mean intensity {row.ks_statistic:.2f}; channel mean differences "
            f"R {row.difference_r:+.1f}, G {row.difference_g:+.1f}, B {row.difference_b:+.1f} (0-255)"
        )

    if report.warnings:
        lines.append(f"warnings ({len(report.warnings)}):")
        lines.extend(f"  - {warning}" for warning in report.warnings)
    else:
        lines.append("warnings: none")
    return lines


# --- what the model is fed -------------------------------------------------------------------


def fingerprint_inputs(
    samples: pd.DataFrame,
    *,
    preprocessing: str,
    image_size: int,
    batch_size: int = 32,
    batches: int = 2,
    seed: int = 0,
) -> pd.DataFrame:
    """Measure what the model is fed per split: channel order, value range and per-channel mean and std.

    The first ``batches`` batches of a seeded shuffle of each split go through
    ``cellnb.data.make_dataset`` with the named preprocessing, exactly as in training.
    Channel 0 is blue for the caffe encodings (vgg16, resnet50), red otherwise.
    """
    from cellnb.model import PREPROCESSING, get_preprocessing

    if preprocessing not in PREPROCESSING:
        raise ParameterError(f"preprocessing {preprocessing!r} is unknown; valid choices are {sorted(PREPROCESSING)}")
    preprocess = get_preprocessing(preprocessing)
    channel_order = "BGR" if preprocessing in ("vgg16", "resnet50") else "RGB"
    rows = []
    for split in data.SPLITS:
        chosen = samples[samples["split"] == split].sample(frac=1.0, random_state=seed).head(batches * batch_size)
        if chosen.empty:
            continue
        dataset = data.make_dataset(chosen, image_size=image_size, batch_size=batch_size, preprocess=preprocess)
        images = np.concatenate([batch["image"].numpy() for batch in dataset], axis=0)
        means = images.mean(axis=(0, 1, 2))
        stds = images.std(axis=(0, 1, 2))
        rows.append({
            "split": split, "images": len(images), "preprocessing": preprocessing, "channel_order": channel_order,
            "min": float(images.min()), "max": float(images.max()),
            "mean_0": float(means[0]), "mean_1": float(means[1]), "mean_2": float(means[2]),
            "std_0": float(stds[0]), "std_1": float(stds[1]), "std_2": float(stds[2]),
        })
    return pd.DataFrame(rows)


def check_preprocessing(*, backbone: str, weights, preprocessing: str) -> list[str]:
    """Return a warning when pretrained weights expect another input encoding than the one in effect."""
    from cellnb.model import PREPROCESSING

    expected = _encoding_expected_by_weights(backbone, weights)
    if expected is None or preprocessing == expected:
        return []
    return [
        f"{backbone} with weights {weights!r} expects inputs encoded as {expected!r} "
        f"({PREPROCESSING[expected]}), but {preprocessing!r} is in effect ({PREPROCESSING[preprocessing]}); "
        f"the pretrained filters see unfamiliar values, so set preprocessing to auto"
    ]


def _encoding_expected_by_weights(backbone: str, weights) -> str | None:
    """Return the preprocessing a backbone's loaded weights were trained with, or None for random weights."""
    from cellnb.model import get_backbone

    spec = get_backbone(backbone)
    if not spec.pretrained or weights in (None, "", "none", "None"):
        return None
    return spec.preprocessing


def describe_preprocessing(report: AuditReport) -> str:
    """Return a Markdown paragraph on the preprocessing in effect and whether the backbone's weights expect it."""
    from cellnb.model import PREPROCESSING

    if report.preprocessing is None:
        return "No run configuration was given to the audit, so the preprocessing was not checked."
    setup = report.preprocessing
    in_effect = setup["preprocessing_in_effect"]
    text = (f"Preprocessing in effect: `{in_effect}` ({PREPROCESSING[in_effect]}), for backbone `{setup['backbone']}` "
            f"with weights `{setup['weights']}`. ")
    if setup["expected_by_weights"] is None:
        return text + "No pretrained weights are loaded, so any encoding works if every split gets the same one."
    if setup["fits_weights"]:
        return text + "It is the encoding these pretrained weights expect."
    return text + f"**The pretrained weights expect `{setup['expected_by_weights']}` instead.**"


def _compare_fingerprints(fingerprint: pd.DataFrame) -> list[str]:
    """Warn when the splits are fed on different scales: value ranges that do not overlap in sign or size."""
    rows = {row.split: row for row in fingerprint.itertuples()}
    if "train" not in rows:
        return []
    train = rows["train"]
    warnings = []
    for split, row in rows.items():
        if split == "train":
            continue
        train_span, span = train.max - train.min, row.max - row.min
        different_scale = span > 0 and train_span > 0 and max(span / train_span, train_span / span) > 2
        different_sign = (train.min < 0) != (row.min < 0)
        if different_scale or different_sign:
            warnings.append(
                f"{split} inputs range over [{row.min:.3g}, {row.max:.3g}] but train inputs over "
                f"[{train.min:.3g}, {train.max:.3g}]; the splits are not encoded the same way"
            )
    return warnings


def _add_input_fingerprint(report: AuditReport, config: Mapping) -> None:
    from cellnb.model import resolve_preprocessing

    backbone = config.get("backbone", "small_cnn")
    preprocessing = config.get("preprocessing_in_effect") or resolve_preprocessing(backbone, config.get("preprocessing", "auto"))
    report.input_fingerprint = fingerprint_inputs(
        report.samples, preprocessing=preprocessing, image_size=int(config.get("image_size", report.image_size)),
        batch_size=int(config.get("batch_size", 32)), seed=int(config.get("seed", 0)),
    )
    weights = config.get("weights")
    expected = _encoding_expected_by_weights(backbone, weights)
    mismatch = check_preprocessing(backbone=backbone, weights=weights, preprocessing=preprocessing)
    report.preprocessing = {
        "backbone": backbone, "weights": weights, "preprocessing_in_effect": preprocessing,
        "expected_by_weights": expected, "fits_weights": not mismatch,
    }
    report.warnings.extend(mismatch)
    report.warnings.extend(_compare_fingerprints(report.input_fingerprint))


# --- model setup -----------------------------------------------------------------------------


TRAINING_ONLY_LAYERS = {
    "Dropout": "drops a share of units in training; passes everything through in inference",
    "SpatialDropout1D": "drops whole feature maps in training only",
    "SpatialDropout2D": "drops whole feature maps in training only",
    "SpatialDropout3D": "drops whole feature maps in training only",
    "GaussianDropout": "multiplies by random noise in training only",
    "AlphaDropout": "drops units in training only",
    "GaussianNoise": "adds random noise in training only",
    "ActivityRegularization": "adds a penalty to the training loss only",
    "BatchNormalization": "normalises with the batch's statistics in training and with moving averages in inference",
}
AUGMENTATION_LAYERS = {"AugMix", "RandAugment", "CutMix", "MixUp", "Solarization"}


@dataclass
class SetupCheck:
    """The result of ``check_setup``: errors that make training meaningless, warnings, and train-only layers."""

    output_units: int
    output_activation: str
    loss: str
    from_logits: bool
    label_format: str
    errors: list[str]
    warnings: list[str]
    training_behaviour: pd.DataFrame

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_for_errors(self) -> None:
        """Raise ModelError listing every error, if there is one."""
        if self.errors:
            raise ModelError("the model setup cannot train a binary classifier: " + "; ".join(self.errors))

    def summary_lines(self) -> list[str]:
        lines = [
            f"output: {self.output_units} unit(s) with {self.output_activation}; loss {self.loss}"
            f"{' (from logits)' if self.from_logits else ''}; labels {self.label_format} ({LABEL_FORMATS[self.label_format]})",
        ]
        lines.extend(f"error: {error}" for error in self.errors)
        lines.extend(f"warning: {warning}" for warning in self.warnings)
        differing = self.training_behaviour[self.training_behaviour["differs"]]
        if len(differing):
            names = ", ".join(f"{row.layer} ({row.kind})" for row in differing.itertuples())
            lines.append(
                f"layers that act differently in training: {names}. The training loss that fit() reports is measured "
                f"with them active, so it can sit above the validation loss of the same weights"
            )
        return lines


def check_setup(model, *, loss, label_format: str, raise_on_error: bool = False) -> SetupCheck:
    """Check that output width, output activation, loss and label format fit a binary classifier.

    Parameters
    ----------
    model : keras.Model
        The model to train (compiled or not).
    loss : str, keras loss instance or function
        The loss it is (or will be) compiled with, e.g. ``model.loss``.
    label_format : str
        What the labels look like: ``sparse`` (integer class indices), ``binary`` (0/1 of shape
        (batch, 1)) or ``one_hot`` (two columns).
    raise_on_error : bool
        Raise ModelError when a combination is wrong instead of only listing it.

    Returns
    -------
    SetupCheck
        ``errors`` name the fix; ``training_behaviour`` lists the layers that act differently
        in training and inference (Dropout, BatchNormalization, augmentation layers).
    """
    if label_format not in LABEL_FORMATS:
        raise ParameterError(f"label_format {label_format!r} is invalid; valid formats are {sorted(LABEL_FORMATS)}")
    units = int(model.outputs[0].shape[-1]) if model.outputs else 0
    activation = _output_activation(model)
    loss_name, from_logits = _loss_name(loss)
    errors, warnings = _setup_problems(units, activation, loss_name, from_logits, label_format)
    check = SetupCheck(units, activation, loss_name, from_logits, label_format, errors, warnings, _training_behaviour(model))
    for warning in warnings:
        logger.warning("model setup: %s", warning)
    if raise_on_error:
        check.raise_for_errors()
    return check


def check_run_setup(run: rundir.Run) -> SetupCheck:
    """Load a run's ``model.keras`` and check it with the label format its head was trained with."""
    import keras

    path = run.run_dir / rundir.MODEL_FILE
    if not path.is_file():
        raise RunDirectoryError(f"{path} not found; the run has not finished training, so there is no model to check")
    model = keras.models.load_model(path)
    label_format = "binary" if run.config.get("head") == "sigmoid1" else "sparse"
    return check_setup(model, loss=model.loss, label_format=label_format)


def _output_activation(model) -> str:
    layer = model.layers[-1]
    while hasattr(layer, "layers") and layer.layers:
        layer = layer.layers[-1]
    if type(layer).__name__ == "Softmax":
        return "softmax"
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", "linear") if activation is not None else "linear"


def _loss_name(loss) -> tuple[str, bool]:
    if isinstance(loss, str):
        return loss.lower(), False
    if hasattr(loss, "get_config"):
        config = loss.get_config()
        name = config.get("name") or re.sub(r"(?<!^)(?=[A-Z])", "_", type(loss).__name__).lower()
        return name.lower(), bool(config.get("from_logits", False))
    return getattr(loss, "__name__", str(loss)).lower(), False


def _setup_problems(units: int, activation: str, loss: str, from_logits: bool, label_format: str):
    errors, warnings = [], []
    if units not in (1, 2):
        errors.append(f"the output has {units} units; a binary classifier needs 1 (sigmoid) or 2 (softmax)")

    if units == 1 and activation == "softmax":
        errors.append("a 1-unit softmax always outputs 1.0 and cannot learn; use sigmoid on 1 unit or softmax on 2 units")
    if units == 1 and loss in ("categorical_crossentropy", "sparse_categorical_crossentropy"):
        errors.append(f"{loss} over one unit has nothing to compare; use binary_crossentropy with a sigmoid unit")
    if units == 1 and label_format == "one_hot":
        errors.append("one-hot labels (two columns) do not fit one output unit; pass 0/1 labels of shape (batch, 1)")

    if units == 2 and loss == "sparse_categorical_crossentropy" and label_format == "one_hot":
        errors.append("sparse_categorical_crossentropy expects integer class indices; use categorical_crossentropy for one-hot labels")
    if units == 2 and loss == "categorical_crossentropy" and label_format != "one_hot":
        errors.append("categorical_crossentropy expects one-hot labels; use sparse_categorical_crossentropy for integer labels")
    if units == 2 and loss == "binary_crossentropy" and label_format == "one_hot":
        warnings.append("binary_crossentropy over 2 units averages two per-unit losses, so its value is not the "
                        "categorical cross-entropy that cellnb records; use categorical_crossentropy")
    if units == 2 and loss == "binary_crossentropy" and label_format != "one_hot":
        errors.append("binary_crossentropy over 2 units needs two label columns; use sparse_categorical_crossentropy")
    if units == 2 and activation == "sigmoid":
        warnings.append("two sigmoid units give probabilities that need not sum to 1; use softmax on 2 units")

    if activation == "linear" and not from_logits and "crossentropy" in loss:
        errors.append(f"the output is linear (logits) but {loss} expects probabilities; add a softmax or sigmoid, "
                      f"or pass from_logits=True to the loss")
    if activation in ("softmax", "sigmoid") and from_logits:
        errors.append(f"the output already applies {activation} but the loss has from_logits=True; set from_logits=False")
    if "crossentropy" not in loss:
        warnings.append(f"loss {loss!r} is not a cross-entropy, so val_loss is not comparable with cellnb's recorded cross-entropy")
    return errors, warnings


def _training_behaviour(model) -> pd.DataFrame:
    rows = []
    for path, layer, trainable in _walk_layers(model, "", True):
        kind = type(layer).__name__
        if kind in TRAINING_ONLY_LAYERS:
            effect = TRAINING_ONLY_LAYERS[kind]
        elif kind.startswith("Random") or kind in AUGMENTATION_LAYERS:
            effect = "augments images in training only; passes them unchanged in inference"
        else:
            continue
        # A frozen BatchNormalization layer runs in inference mode during training too, as the
        # BatchNormalization docstring of Keras 3.15 states.
        differs = not (kind == "BatchNormalization" and not trainable)
        rows.append({"layer": path, "kind": kind, "trainable": trainable, "differs": differs, "effect": effect})
    return pd.DataFrame(rows, columns=["layer", "kind", "trainable", "differs", "effect"])


def _walk_layers(layer, prefix: str, parent_trainable: bool):
    for child in getattr(layer, "layers", []):
        path = f"{prefix}{child.name}"
        trainable = parent_trainable and child.trainable
        yield path, child, trainable
        yield from _walk_layers(child, f"{path}/", trainable)
