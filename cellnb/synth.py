"""Generate a deterministic synthetic set of H&E-like cell images with known label noise.

The set has the usual split-folder layout (``train|valid|test/<class>/``) plus a manifest that
records, per image, the true class, whether the folder label is flipped, how ambiguous the
image is and its synthetic slide. It is a stand-in for real data, not a model of any tissue.
"""

from __future__ import annotations

import logging
import math
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from cellnb.errors import DataError, ParameterError

logger = logging.getLogger(__name__)

DEFAULT_COUNTS = {"train": (154, 154), "valid": (26, 26), "test": (77, 77)}
DEFAULT_IMAGE_SIZE = 96
DEFAULT_MISLABEL_RATES = {"train": 0.02, "valid": 0.1, "test": 0.1}
DEFAULT_AMBIGUOUS_RATE = 0.1
SPLITS = ("train", "valid", "test")
MANIFEST_FILE = "manifest.csv"
MANIFEST_COLUMNS = ["path", "split", "label", "true_label", "mislabeled", "difficulty", "group"]
MIN_IMAGE_SIZE = 16

# Each split is cut into slides of about this many images, so every slide contains both classes.
IMAGES_PER_SLIDE = 16

# Difficulty ranges: ambiguous images sit near the class boundary, the rest near their prototype.
AMBIGUOUS_DIFFICULTY = (0.5, 0.9)
PROTOTYPICAL_DIFFICULTY = (0.0, 0.2)

# Standard deviation of each image's malignancy around the value its difficulty sets.
MALIGNANCY_SPREAD = 0.08

# Optical density directions of haematoxylin (purple) and eosin (pink) for Beer-Lambert mixing.
HAEMATOXYLIN_OD = np.array([0.62, 0.72, 0.31])
EOSIN_OD = np.array([0.12, 0.90, 0.42])

# Masks are drawn at this multiple of the image size and box-filtered down, to smooth the edges.
SUPERSAMPLING = 2

# Stream ids keep the random streams of one (seed, split) apart from each other.
_STREAM_IMAGE = 0
_STREAM_SLIDE = 1
_STREAM_MISLABEL = 2
_STREAM_AMBIGUOUS = 3
_STREAM_DIFFICULTY = 4


@dataclass(frozen=True)
class SlideStain:
    """Stain colours and strengths shared by every image of one synthetic slide."""

    haematoxylin_od: np.ndarray
    eosin_od: np.ndarray
    haematoxylin_scale: float
    eosin_scale: float
    illumination: float


@dataclass(frozen=True)
class ImagePlan:
    """Labels, difficulty and slide of one image, decided before any pixel is drawn."""

    split: str
    label_index: int
    index: int
    true_index: int
    difficulty: float
    slide: int


def generate_synthetic_cells(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    counts: dict | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    classes: tuple[str, str] = ("negative", "positive"),
    mislabel_rate: float | dict = None,
    ambiguous_rate: float = DEFAULT_AMBIGUOUS_RATE,
) -> pd.DataFrame:
    """Write a synthetic set of microscopy-like cell images and its manifest.

    Negatives show small, round, evenly stained nuclei in loosely spaced cells. Positives
    (cancer-like) show enlarged, irregular, darker nuclei, sometimes two per cell, a higher
    nuclear-to-cytoplasm ratio and more crowded cells. In every split, exactly
    ``round(rate * n)`` of the ``n`` images of each class folder show the other class, with the
    split's mislabel rate, and ``round(ambiguous_rate * n)`` are drawn close to the class boundary.

    Parameters
    ----------
    out_dir : path
        Directory to write into. It is created if missing and must be empty if it exists.
    seed : int
        Seed of every random choice. The same arguments give byte-identical files.
    counts : dict, optional
        ``{split: (n_first_class, n_second_class)}`` for any of ``train``, ``valid`` and
        ``test``; defaults to ``DEFAULT_COUNTS``. Each image's pixels depend only on the seed,
        its split, class folder and index, and the counts of its own split, so changing one
        split's counts leaves the other splits' images unchanged.
    image_size : int
        Width and height in pixels, at least 16.
    classes : tuple of two str
        Folder names of class 0 (healthy) and class 1 (cancer-like, the scored class).
    mislabel_rate : float or dict, optional
        Share of each class folder, in [0, 0.5), whose images show the other class: one share
        for every split, or ``{split: share}``. The default, ``DEFAULT_MISLABEL_RATES``, flips
        10% of the validation and test folders but only 2% of the training folders: enough
        training noise for a model to start memorizing it after a few epochs, while what it
        learned from the clean majority still holds, so the validation accuracy stays flat
        while confidence in the mislabeled validation images grows and the validation loss
        climbs.
    ambiguous_rate : float
        Share of each class folder, in [0, 1], drawn with difficulty in
        ``AMBIGUOUS_DIFFICULTY``, chosen among the images that are not mislabeled (so at most the
        rest of the folder). The other images, mislabeled ones included, get difficulty in
        ``PROTOTYPICAL_DIFFICULTY``: every mislabeled image is a clear example of its true class.

    Returns
    -------
    pandas.DataFrame
        The manifest, also written to ``out_dir/manifest.csv``, with columns
        ``MANIFEST_COLUMNS``: ``path`` relative to ``out_dir``, ``split``, ``label`` (the folder
        class), ``true_label`` (the class drawn), ``mislabeled`` (0 or 1), ``difficulty`` and
        ``group`` (slide id such as ``train-slide03``, and slides never cross splits). Difficulty 0
        puts the nuclear features at the prototype of the true class, and 1 puts them halfway
        to the other class, where the two classes are indistinguishable. Each image also
        varies around that point by ``MALIGNANCY_SPREAD``.

    Examples
    --------
    >>> manifest = generate_synthetic_cells("data/synthetic", seed=1)
    >>> manifest.groupby(["split", "label"]).size()
    """
    counts = _validate_counts(DEFAULT_COUNTS if counts is None else counts)
    rates = _mislabel_rates(DEFAULT_MISLABEL_RATES if mislabel_rate is None else mislabel_rate, counts)
    for rate in rates.values():
        _validate_options(seed, image_size, classes, rate, ambiguous_rate)
    out_dir = _prepare_out_dir(out_dir)

    started = time.perf_counter()
    plans = []
    for split, split_counts in counts.items():
        plans.extend(_plan_split(seed, split, split_counts, rates[split], ambiguous_rate))

    rows = []
    stains = {}
    for plan in plans:
        slide_key = (plan.split, plan.slide)
        if slide_key not in stains:
            stains[slide_key] = _draw_slide_stain(seed, plan.split, plan.slide)
        pixels = _render_image(_image_rng(seed, plan), plan, stains[slide_key], image_size)
        rows.append(_write_image(out_dir, plan, pixels, classes))

    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    manifest.to_csv(out_dir / MANIFEST_FILE, index=False, lineterminator="\n")
    logger.info(
        "Wrote %d synthetic images (%d mislabeled) to %s in %.1f s",
        len(manifest),
        int(manifest["mislabeled"].sum()),
        out_dir,
        time.perf_counter() - started,
    )
    return manifest


# --- input checks -------------------------------------------------------------------------


def _validate_counts(counts) -> dict[str, tuple[int, int]]:
    if not isinstance(counts, dict) or not counts:
        raise ParameterError(
            f"counts={counts!r} is invalid; pass a dict such as {DEFAULT_COUNTS!r}"
        )

    checked = {}
    for split, pair in counts.items():
        if split not in SPLITS:
            raise ParameterError(
                f"counts has an unknown split {split!r}; valid splits are {list(SPLITS)}"
            )
        is_pair = isinstance(pair, (tuple, list)) and len(pair) == 2
        if not is_pair or not all(_is_int(n) and n >= 0 for n in pair):
            raise ParameterError(
                f"counts[{split!r}]={pair!r} is invalid; pass two non-negative integers "
                "(images of the first class, images of the second class)"
            )
        checked[split] = (int(pair[0]), int(pair[1]))

    if sum(sum(pair) for pair in checked.values()) == 0:
        raise ParameterError(f"counts={counts!r} asks for no images; give at least one split a positive count")

    # Manifest rows follow the train, valid, test order whatever the order of the dict.
    return {split: checked[split] for split in SPLITS if split in checked}


def _mislabel_rates(mislabel_rate, counts: dict) -> dict:
    if not isinstance(mislabel_rate, dict):
        return {split: mislabel_rate for split in counts}
    unknown = sorted(set(mislabel_rate) - set(DEFAULT_COUNTS))
    if unknown:
        raise ParameterError(f"mislabel_rate has splits {unknown}; valid splits are {sorted(DEFAULT_COUNTS)}")
    return {split: mislabel_rate.get(split, 0.0) for split in counts}


def _validate_options(seed, image_size, classes, mislabel_rate, ambiguous_rate) -> None:
    if not _is_int(seed) or seed < 0:
        raise ParameterError(f"seed={seed!r} is invalid; pass a non-negative integer")
    if not _is_int(image_size) or image_size < MIN_IMAGE_SIZE:
        raise ParameterError(
            f"image_size={image_size!r} is invalid; pass an integer of at least {MIN_IMAGE_SIZE} pixels"
        )
    _validate_classes(classes)
    if not _is_rate(mislabel_rate) or not 0 <= mislabel_rate < 0.5:
        raise ParameterError(
            f"mislabel_rate={mislabel_rate!r} is outside [0, 0.5); pass a share such as 0.1 "
            "(at 0.5 or more the folder labels would carry no information)"
        )
    if not _is_rate(ambiguous_rate) or not 0 <= ambiguous_rate <= 1:
        raise ParameterError(f"ambiguous_rate={ambiguous_rate!r} is outside [0, 1]; pass a share such as 0.15")


def _validate_classes(classes) -> None:
    if not isinstance(classes, (tuple, list)) or len(classes) != 2:
        raise ParameterError(f"classes={classes!r} is invalid; pass two folder names such as ('negative', 'positive')")
    for name in classes:
        is_folder_name = isinstance(name, str) and name not in ("", ".", "..") and not set(name) & set("/\\")
        if not is_folder_name:
            raise ParameterError(
                f"class name {name!r} in classes={classes!r} is not a valid folder name; "
                "use a non-empty name without '/' or '\\'"
            )
    if classes[0] == classes[1]:
        raise ParameterError(f"classes={classes!r} repeats a name; the two classes need different names")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_rate(value) -> bool:
    return isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and math.isfinite(value)


def _prepare_out_dir(out_dir) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"out_dir {out_dir} is a file; pass a directory path")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise DataError(
            f"out_dir {out_dir} is not empty; pass a new or empty directory, "
            "or delete the old synthetic set first"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


# --- planning: labels, flips, difficulty, slides ------------------------------------------


def _plan_split(seed, split, split_counts, mislabel_rate, ambiguous_rate) -> list[ImagePlan]:
    n_slides = max(1, math.ceil(sum(split_counts) / IMAGES_PER_SLIDE))
    plans = []
    for label_index, n_images in enumerate(split_counts):
        flipped = _choose_subset(seed, split, label_index, _STREAM_MISLABEL, n_images, mislabel_rate)
        # Flipped images are drawn as prototypes of their true class, so each one is a clear label
        # error, and ambiguous images are chosen among the correctly labelled ones.
        ambiguous = _choose_subset(seed, split, label_index, _STREAM_AMBIGUOUS, n_images, ambiguous_rate, exclude=flipped)
        for index in range(n_images):
            plans.append(
                ImagePlan(
                    split=split,
                    label_index=label_index,
                    index=index,
                    true_index=1 - label_index if flipped[index] else label_index,
                    difficulty=_draw_difficulty(seed, split, label_index, index, ambiguous[index]),
                    slide=index * n_slides // n_images,
                )
            )
    return plans


def _choose_subset(seed, split, label_index, stream, n_images, rate, exclude=None) -> np.ndarray:
    """Mark ``round(rate * n_images)`` of ``n_images`` positions, chosen by the seed.

    Positions in ``exclude`` are never marked, so fewer are marked when too few remain.
    """
    rng = np.random.default_rng([seed, _split_code(split), stream, label_index])
    chosen = np.zeros(n_images, dtype=bool)
    allowed = [position for position in rng.permutation(n_images) if exclude is None or not exclude[position]]
    chosen[allowed[: round(rate * n_images)]] = True
    return chosen


def _draw_difficulty(seed, split, label_index, index, is_ambiguous) -> float:
    rng = np.random.default_rng([seed, _split_code(split), _STREAM_DIFFICULTY, label_index, index])
    low, high = AMBIGUOUS_DIFFICULTY if is_ambiguous else PROTOTYPICAL_DIFFICULTY
    return round(float(rng.uniform(low, high)), 4)


def _split_code(split: str) -> int:
    # crc32 rather than hash(), because hash() of a str changes between Python processes.
    return zlib.crc32(split.encode("utf-8"))


def _image_rng(seed, plan: ImagePlan) -> np.random.Generator:
    entropy = [seed, _split_code(plan.split), _STREAM_IMAGE, plan.label_index, plan.index]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _draw_slide_stain(seed, split, slide) -> SlideStain:
    rng = np.random.default_rng([seed, _split_code(split), _STREAM_SLIDE, slide])
    return SlideStain(
        haematoxylin_od=_jitter_direction(rng, HAEMATOXYLIN_OD, 0.06),
        eosin_od=_jitter_direction(rng, EOSIN_OD, 0.08),
        haematoxylin_scale=float(rng.uniform(0.85, 1.15)),
        eosin_scale=float(rng.uniform(0.75, 1.25)),
        illumination=float(rng.uniform(238, 252)),
    )


def _jitter_direction(rng, direction, spread) -> np.ndarray:
    jittered = np.clip(direction + rng.normal(0, spread, size=3), 0.02, None)
    return jittered / np.linalg.norm(jittered)


# --- rendering ----------------------------------------------------------------------------


@dataclass(frozen=True)
class NuclearPhenotype:
    """Cell and nucleus features of one image, from healthy (malignancy 0) to cancer-like (1)."""

    cell_count: float
    spacing: float
    cell_radius: float
    nucleus_ratio: float
    nucleus_size_spread: float
    irregularity: float
    haematoxylin: float
    chromatin: float
    multinucleated_share: float
    nucleolus_share: float


def _phenotype(malignancy: float) -> NuclearPhenotype:
    """Interpolate every feature linearly between the healthy and the cancer-like prototype.

    Lengths are in units of the image size.
    """

    def lerp(healthy, cancer_like):
        return healthy + malignancy * (cancer_like - healthy)

    return NuclearPhenotype(
        cell_count=lerp(11.0, 20.0),
        spacing=lerp(1.3, 0.85),
        cell_radius=lerp(0.085, 0.092),
        nucleus_ratio=lerp(0.36, 0.70),
        nucleus_size_spread=lerp(0.08, 0.22),
        irregularity=lerp(0.02, 0.16),
        haematoxylin=lerp(1.1, 2.1),
        chromatin=lerp(0.10, 0.35),
        multinucleated_share=lerp(0.0, 0.3),
        nucleolus_share=lerp(0.0, 0.6),
    )


def _draw_malignancy(rng, plan: ImagePlan) -> float:
    """Place the image between the healthy (0) and the cancer-like (1) prototype.

    Difficulty 1 moves it halfway, where both classes draw from the same distribution. The
    per-image spread makes images near the halfway point overlap across classes, so ambiguous
    images are truly hard and not only closer to the boundary.
    """
    shift = plan.difficulty / 2
    planned = shift if plan.true_index == 0 else 1 - shift
    return float(np.clip(planned + rng.normal(0, MALIGNANCY_SPREAD), 0, 1))


def _render_image(rng, plan: ImagePlan, stain: SlideStain, size: int) -> np.ndarray:
    phenotype = _phenotype(_draw_malignancy(rng, plan))
    big = size * SUPERSAMPLING

    fibres = Image.new("L", (big, big), 0)
    cytoplasm = Image.new("L", (big, big), 0)
    nuclei = Image.new("L", (big, big), 0)
    _draw_fibres(rng, ImageDraw.Draw(fibres), big)
    _draw_cells(rng, ImageDraw.Draw(cytoplasm), ImageDraw.Draw(nuclei), phenotype, big)

    eosin = _stain_concentration_eosin(rng, fibres, cytoplasm, nuclei, size)
    haematoxylin = _stain_concentration_haematoxylin(rng, nuclei, phenotype, size)
    return _mix_stains(rng, haematoxylin, eosin, stain)


def _draw_fibres(rng, draw: ImageDraw.ImageDraw, big: int) -> None:
    """Draw wavy stroma fibres that mostly run in one direction, like connective tissue."""
    main_angle = rng.uniform(0, np.pi)
    steps = np.linspace(-0.75, 0.75, 24) * big
    for _ in range(rng.integers(16, 28)):
        angle = main_angle + rng.normal(0, 0.25)
        centre = rng.uniform(0, big, size=2)
        wave = rng.uniform(0.01, 0.04) * big * np.sin(steps / big * rng.uniform(6, 14) + rng.uniform(0, 6.3))
        x = centre[0] + steps * np.cos(angle) - wave * np.sin(angle)
        y = centre[1] + steps * np.sin(angle) + wave * np.cos(angle)
        width = int(rng.integers(1, 3 * SUPERSAMPLING + 1))
        draw.line(list(zip(x.tolist(), y.tolist())), fill=int(rng.integers(40, 120)), width=width)


def _draw_cells(rng, cytoplasm_draw, nucleus_draw, phenotype: NuclearPhenotype, big: int) -> None:
    cell_radius = phenotype.cell_radius * big
    count = max(3, round(phenotype.cell_count + rng.normal(0, 1.5)))
    for centre in _place_cells(rng, count, phenotype.spacing * 2 * cell_radius, big):
        radius = cell_radius * rng.uniform(0.85, 1.15)
        outline = _blob_outline(rng, centre, radius, irregularity=0.04, max_aspect=1.35)
        shade = int(rng.integers(90, 140))
        cytoplasm_draw.polygon(outline, fill=shade, outline=min(255, shade + 50))
        _draw_nuclei(rng, nucleus_draw, centre, radius, phenotype)


def _place_cells(rng, count, min_distance, big) -> np.ndarray:
    """Scatter up to ``count`` cell centres at least ``min_distance`` apart (dart throwing)."""
    centres = np.empty((count, 2))
    placed = 0
    for candidate in rng.uniform(-0.05 * big, 1.05 * big, size=(count * 30, 2)):
        distances = np.hypot(*(centres[:placed] - candidate).T)
        if placed == 0 or distances.min() >= min_distance:
            centres[placed] = candidate
            placed += 1
            if placed == count:
                break
    return centres[:placed]


def _draw_nuclei(rng, draw, centre, cell_radius, phenotype: NuclearPhenotype) -> None:
    radius = cell_radius * phenotype.nucleus_ratio * max(0.5, rng.normal(1, phenotype.nucleus_size_spread))
    if rng.random() < phenotype.multinucleated_share:
        offset = rng.normal(0, 1, size=2)
        offset *= 0.45 * radius / max(np.linalg.norm(offset), 1e-6)
        nucleus_centres = [centre + offset, centre - offset]
        radius *= 0.8
    else:
        nucleus_centres = [centre + rng.normal(0, 0.12 * cell_radius, size=2)]

    for nucleus_centre in nucleus_centres:
        outline = _blob_outline(rng, nucleus_centre, radius, phenotype.irregularity, max_aspect=1.3)
        darkness = phenotype.haematoxylin * rng.uniform(0.9, 1.1)
        draw.polygon(outline, fill=_haematoxylin_to_level(darkness))
        if rng.random() < phenotype.nucleolus_share:
            spot = nucleus_centre + rng.normal(0, 0.25 * radius, size=2)
            spot_radius = max(1.0, 0.18 * radius)
            box = [spot[0] - spot_radius, spot[1] - spot_radius, spot[0] + spot_radius, spot[1] + spot_radius]
            draw.ellipse(box, fill=_haematoxylin_to_level(darkness * 1.35))


def _blob_outline(rng, centre, radius, irregularity, max_aspect) -> list[tuple[float, float]]:
    """Return the vertices of a rotated ellipse whose radius wobbles by ``irregularity``.

    Harmonics of 2 to 5 lobes, weaker as the lobe count rises, make the outline lobulated rather
    than spiky.
    """
    amplitudes = rng.normal(0, irregularity * 2 / _HARMONICS)
    phases = rng.uniform(0, 2 * np.pi, size=len(_HARMONICS))
    wobble = amplitudes @ np.cos(_HARMONICS[:, None] * _OUTLINE_ANGLES + phases[:, None])
    r = radius * np.clip(1 + wobble, 0.45, None)

    aspect = rng.uniform(1.0, max_aspect)
    x = r * _OUTLINE_COS * aspect
    y = r * _OUTLINE_SIN / aspect
    rotation = rng.uniform(0, np.pi)
    xs = centre[0] + x * np.cos(rotation) - y * np.sin(rotation)
    ys = centre[1] + x * np.sin(rotation) + y * np.cos(rotation)
    return list(zip(xs.tolist(), ys.tolist()))


_HARMONICS = np.arange(2, 6)
_OUTLINE_ANGLES = np.linspace(0, 2 * np.pi, 28, endpoint=False)
_OUTLINE_COS = np.cos(_OUTLINE_ANGLES)
_OUTLINE_SIN = np.sin(_OUTLINE_ANGLES)


# Nucleus layers store haematoxylin concentration as 8-bit levels, 0 to HAEMATOXYLIN_MAX.
HAEMATOXYLIN_MAX = 3.5


def _haematoxylin_to_level(concentration: float) -> int:
    return int(round(np.clip(concentration / HAEMATOXYLIN_MAX, 0, 1) * 255))


def _downsample(layer: Image.Image, size: int) -> np.ndarray:
    """Box-filter a supersampled 8-bit layer to ``size`` and scale it to [0, 1]."""
    return np.asarray(layer.reduce(SUPERSAMPLING), dtype=np.float32)[:size, :size] / 255


def _smooth_noise(rng, size, cells) -> np.ndarray:
    """Return zero-mean noise of unit scale that varies smoothly over about ``size / cells`` pixels."""
    coarse = rng.normal(0, 1, size=(cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))


def _stain_concentration_eosin(rng, fibres, cytoplasm, nuclei, size) -> np.ndarray:
    nucleus_cover = np.clip(_downsample(nuclei, size) * 4, 0, 1)
    background = 0.16 * (1 + 0.35 * _smooth_noise(rng, size, 5))
    fibre = 0.30 * _downsample(fibres, size)
    cell = 0.75 * _downsample(cytoplasm, size) * (1 - 0.6 * nucleus_cover)
    return np.clip(background + fibre + cell, 0, None)


def _stain_concentration_haematoxylin(rng, nuclei, phenotype: NuclearPhenotype, size) -> np.ndarray:
    chromatin = 1 + phenotype.chromatin * _smooth_noise(rng, size, max(4, size // 3))
    nucleus = HAEMATOXYLIN_MAX * _downsample(nuclei, size) * np.clip(chromatin, 0.3, None)
    background = 0.06 * (1 + 0.4 * _smooth_noise(rng, size, 4))
    return np.clip(background + nucleus, 0, None)


def _mix_stains(rng, haematoxylin, eosin, stain: SlideStain) -> np.ndarray:
    """Combine stain concentrations into RGB by Beer-Lambert absorption, then blur and add noise."""
    optical_density = (
        stain.haematoxylin_scale * haematoxylin[..., None] * stain.haematoxylin_od
        + stain.eosin_scale * eosin[..., None] * stain.eosin_od
    )
    rgb = stain.illumination * np.exp(-optical_density)
    blurred = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
    noisy = np.asarray(blurred, dtype=np.float32) + rng.normal(0, 2.0, size=rgb.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


# --- output -------------------------------------------------------------------------------


def _write_image(out_dir: Path, plan: ImagePlan, pixels: np.ndarray, classes) -> dict:
    label = classes[plan.label_index]
    relative = f"{plan.split}/{label}/{plan.split}_{label}_{plan.index:04d}.png"
    path = out_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)

    # Pillow 13 adds no tIME or text chunk unless pnginfo is passed, so equal pixels give equal bytes.
    Image.fromarray(pixels).save(path, format="PNG")
    return {
        "path": relative,
        "split": plan.split,
        "label": label,
        "true_label": classes[plan.true_index],
        "mislabeled": int(plan.true_index != plan.label_index),
        "difficulty": plan.difficulty,
        "group": f"{plan.split}-slide{plan.slide:02d}",
    }
