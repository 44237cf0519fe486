"""Shared fixtures: tiny image trees written by the tests themselves."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PCAM_DIR = PROJECT_ROOT.parent / "shared" / "data" / "pcam"


def write_image(path: Path, *, seed: int = 0, size: int = 24, mode: str = "RGB", fmt: str = "PNG", bright: bool = False) -> Path:
    """Write a small random image; ``bright`` images are lighter on average, so a model can learn the class."""
    rng = np.random.default_rng(seed)
    low, high = (120, 256) if bright else (0, 136)
    pixels = rng.integers(low, high, size=(size, size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, mode="RGB")
    if mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


def write_split_tree(root: Path, counts: dict, *, classes=("negative", "positive"), size: int = 24) -> Path:
    """Write ``root/<split>/<class>/img_<n>.png`` with ``counts = {split: (n_negative, n_positive)}``."""
    seed = 0
    for split, per_class in counts.items():
        for label, (name, count) in enumerate(zip(classes, per_class)):
            for index in range(count):
                seed += 1
                write_image(root / split / name / f"img_{index:03d}.png", seed=seed, size=size, bright=label == 1)
    return root


@pytest.fixture
def split_tree(tmp_path) -> Path:
    return write_split_tree(tmp_path / "data", {"train": (6, 6), "valid": (3, 3), "test": (2, 2)})


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """A small built-in synthetic set at 32x32 pixels, written once per test session."""
    from cellnb.synth import generate_synthetic_cells

    root = tmp_path_factory.mktemp("synthetic") / "cells"
    generate_synthetic_cells(root, seed=1, counts={"train": (16, 16), "valid": (6, 6), "test": (3, 3)}, image_size=32)
    return root
