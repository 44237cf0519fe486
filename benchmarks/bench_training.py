"""Compare the wall time and peak memory of cellnb training with the standard Keras loop.

Each case runs in its own Python process, so its peak resident memory is its own and no case
warms another's caches. The cases, on PatchCamelyon patches at 96x96 with a frozen VGG16
(``weights=None``) and a 2-unit softmax head, all with the same batch size, epochs and seed:

- ``keras_predict``: ``image_dataset_from_directory`` with ``.cache().prefetch()``,
  ``model.fit(validation_data=...)`` and a callback that calls ``model.predict`` on the
  validation set at each epoch end to record per-sample probabilities (the usual pattern);
- ``keras_plain``: the same without that callback;
- ``cellnb_cold``: ``cellnb.train`` with an empty feature cache;
- ``cellnb_warm``: ``cellnb.train`` again on the same data and cache;
- ``floor``: one backbone forward pass over the training and validation images.

Then a fine-tuning variant (VGG16's last block trainable, so nothing can be cached):
``keras_plain_fine_tune`` against ``cellnb_fine_tune``, which records every validation
probability. Last, memory runs of cellnb (``small_cnn``, one epoch) over random 64x64 PNGs.

Run from the repository root: ``.venv/bin/python benchmarks/bench_training.py``. The results
are written to ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "pcam"
RESULT_PREFIX = "BENCHMARK_RESULT "
IMAGE_SIZE = 96
FINE_TUNE_LAYERS = 4  # VGG16's last block: three convolutions and a pooling layer


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="PCam folder with negative/, positive/, manifest.csv")
    parser.add_argument("--train-per-class", type=int, default=60, help="training images taken per class")
    parser.add_argument("--valid-per-class", type=int, default=20, help="validation images taken per class")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of the frozen-backbone comparison")
    parser.add_argument("--fine-tune-epochs", type=int, default=2, help="epochs of the fine-tuning comparison")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch in every case")
    parser.add_argument("--memory-images", type=int, default=20000, help="random 64x64 PNGs of the large memory run")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md", help="Markdown file the results go to")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------- cases, each run in a child process


def vgg16_classifier(*, trainable_layers: int):
    """Build the VGG16 + pooling + dropout + 2-unit softmax model of the Keras cases, as cellnb builds it."""
    import keras

    from cellnb.model import build_model

    return build_model(backbone="vgg16", weights=None, head="softmax2", image_size=IMAGE_SIZE,
                       trainable_layers=trainable_layers, dropout=0.2, seed=0)


def case_keras(workdir: Path, args, *, record: bool, trainable_layers: int, epochs: int) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    preprocess = keras.applications.vgg16.preprocess_input

    def load(split, shuffle):
        dataset = keras.utils.image_dataset_from_directory(
            workdir / "pcam" / split, labels="inferred", label_mode="int", class_names=["negative", "positive"],
            image_size=(IMAGE_SIZE, IMAGE_SIZE), batch_size=args.batch_size, shuffle=shuffle, seed=0,
        )
        return dataset.map(lambda images, labels: (preprocess(images), labels)).cache().prefetch(tf.data.AUTOTUNE)

    train, valid = load("train", True), load("valid", False)
    model = vgg16_classifier(trainable_layers=trainable_layers)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    recorded = []

    class PredictValidation(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            recorded.append(self.model.predict(valid, verbose=0)[:, 1])

    callbacks = [PredictValidation()] if record else []
    model.fit(train, validation_data=valid, epochs=epochs, callbacks=callbacks, verbose=0)
    model.save(workdir / f"keras_{record}_{trainable_layers}.keras")  # cellnb saves model.keras too
    return {"recorded_epochs": len(recorded), "validation_images": int(sum(len(batch[1]) for batch in valid))}


def case_cellnb(workdir: Path, args, *, name: str, trainable_layers: int, epochs: int) -> dict:
    from cellnb import params, train

    config = params.check_parameters("01_train", {
        "data_dir": str(workdir / "pcam"), "run_dir": str(workdir / f"run_{name}"), "backbone": "vgg16",
        "weights": None, "image_size": IMAGE_SIZE, "epochs": epochs, "batch_size": args.batch_size,
        "trainable_layers": trainable_layers, "record_train": False, "cache_dir": str(workdir / "feature_cache"),
    })
    setup = train.prepare_run(config)
    model = train.build_for_run(setup)
    history = train.train(setup, model)
    stats = setup.feature_stats
    run_bytes = sum(path.stat().st_size for path in setup.run_dir.rglob("*") if path.is_file())
    return {
        "backbone_images": stats.computed if stats else None,
        "backbone_batches": stats.backbone_batches if stats else None,
        "cached_images": stats.reused if stats else None,
        "run_dir_megabytes": round(run_bytes / 1e6, 1),
        "record_seconds": float(history["record_seconds"].sum()),
    }


def case_floor(workdir: Path, args) -> dict:
    import tensorflow as tf

    from cellnb import data, features
    from cellnb.model import get_preprocessing

    discovery = data.discover_samples(workdir / "pcam")
    samples = discovery.samples[discovery.samples["split"].isin(["train", "valid"])]
    model = vgg16_classifier(trainable_layers=0)
    extractor, _, _ = features.split_model(model)
    _, batches = features.run_backbone(extractor, samples, image_size=IMAGE_SIZE, batch_size=args.batch_size,
                                       preprocess=get_preprocessing("vgg16"))
    return {"backbone_images": len(samples), "backbone_batches": batches}


def case_memory(workdir: Path, args, *, folder: str) -> dict:
    from cellnb import params, train

    config = params.check_parameters("01_train", {
        "data_dir": str(workdir / folder), "run_dir": str(workdir / f"run_{folder}"), "backbone": "small_cnn",
        "image_size": 64, "epochs": 1, "batch_size": args.batch_size, "record_train": False,
    })
    setup = train.prepare_run(config)
    model = train.build_for_run(setup)
    train.train(setup, model)
    images = len(setup.discovery.samples)
    return {"images": images, "decoded_megabytes": round(images * 64 * 64 * 3 / 1e6, 1)}


CASES = {
    "keras_predict": lambda workdir, args: case_keras(workdir, args, record=True, trainable_layers=0, epochs=args.epochs),
    "keras_plain": lambda workdir, args: case_keras(workdir, args, record=False, trainable_layers=0, epochs=args.epochs),
    "cellnb_cold": lambda workdir, args: case_cellnb(workdir, args, name="cold", trainable_layers=0, epochs=args.epochs),
    "cellnb_warm": lambda workdir, args: case_cellnb(workdir, args, name="warm", trainable_layers=0, epochs=args.epochs),
    "floor": case_floor,
    "keras_plain_fine_tune": lambda workdir, args: case_keras(
        workdir, args, record=False, trainable_layers=FINE_TUNE_LAYERS, epochs=args.fine_tune_epochs),
    "cellnb_fine_tune": lambda workdir, args: case_cellnb(
        workdir, args, name="fine_tune", trainable_layers=FINE_TUNE_LAYERS, epochs=args.fine_tune_epochs),
    "memory_small": lambda workdir, args: case_memory(workdir, args, folder="random_small"),
    "memory_large": lambda workdir, args: case_memory(workdir, args, folder="random_large"),
}


def run_case_in_this_process(args) -> None:
    """Run one case after the imports, and print its seconds, peak memory and details as one JSON line."""
    import keras  # noqa: F401  imported before the clock starts, as in a notebook kernel
    import tensorflow  # noqa: F401

    started = time.perf_counter()
    details = CASES[args.case](args.workdir, args)
    seconds = time.perf_counter() - started
    peak_kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(RESULT_PREFIX + json.dumps({"case": args.case, "seconds": seconds, "peak_megabytes": peak_kilobytes / 1024, **details}))


# ---------------------------------------------------------------- the parent: data, children, report


def link_pcam_subset(data: Path, target: Path, *, train_per_class: int, valid_per_class: int) -> dict:
    """Symlink the first images of each class and split (by path) into ``target/{train,valid}/{negative,positive}``."""
    import pandas as pd

    manifest = pd.read_csv(data / "manifest.csv", dtype=str)
    counts = {}
    for split, per_class in (("train", train_per_class), ("valid", valid_per_class)):
        for label in ("negative", "positive"):
            rows = manifest[(manifest["source_split"] == split) & (manifest["label"] == label)].sort_values("path")
            if len(rows) < per_class:
                raise SystemExit(f"{data} has only {len(rows)} {split} images of class {label}; lower the count per class")
            folder = target / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for relative in rows["path"].head(per_class):
                (folder / Path(relative).name).symlink_to(data / relative)
            counts[(split, label)] = per_class
    return counts


def write_random_pngs(target: Path, count: int, *, size: int = 64, seed: int = 0) -> None:
    """Write ``count`` random RGB PNGs as split folders, 80% train and 20% valid, half of them brighter."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for index in range(count):
        split = "train" if index % 5 else "valid"
        label = index % 2
        low, high = (100, 256) if label else (0, 156)
        folder = target / split / ("positive" if label else "negative")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(low, high, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels, mode="RGB").save(folder / f"img_{index:06d}.png")


def run_child(case: str, workdir: Path, args) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--case", case, "--workdir", str(workdir),
               "--epochs", str(args.epochs), "--fine-tune-epochs", str(args.fine_tune_epochs),
               "--batch-size", str(args.batch_size)]
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPO)
    process_seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise SystemExit(f"case {case} failed with exit code {completed.returncode}:\n{completed.stderr[-4000:]}")
    line = next(line for line in reversed(completed.stdout.splitlines()) if line.startswith(RESULT_PREFIX))
    result = json.loads(line[len(RESULT_PREFIX):])
    result["process_seconds"] = process_seconds
    print(f"{case}: {result['seconds']:.1f} s, peak {result['peak_megabytes']:.0f} MB", flush=True)
    return result


def machine_description() -> dict:
    import keras
    import tensorflow as tf

    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
    }


def main(argv=None) -> None:
    args = parse_arguments(argv)
    if args.case:
        run_case_in_this_process(args)
        return

    workdir = Path(tempfile.mkdtemp(prefix="cellnb-bench-"))
    try:
        machine = machine_description()
        link_pcam_subset(args.data, workdir / "pcam", train_per_class=args.train_per_class, valid_per_class=args.valid_per_class)
        results = {}
        for case in ("floor", "cellnb_cold", "cellnb_warm", "keras_plain", "keras_predict",
                     "keras_plain_fine_tune", "cellnb_fine_tune"):
            results[case] = run_child(case, workdir, args)
        write_random_pngs(workdir / "random_small", 400)
        results["memory_small"] = run_child("memory_small", workdir, args)
        write_random_pngs(workdir / "random_large", args.memory_images)
        results["memory_large"] = run_child("memory_large", workdir, args)
        machine["load_average_at_end"] = os.getloadavg()
        (workdir / "results.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2))
        args.output.write_text(render_report(args, machine, results), encoding="utf-8")
        print(f"wrote {args.output}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def render_report(args, machine: dict, results: dict) -> str:
    seconds = {case: result["seconds"] for case, result in results.items()}
    images = 2 * (args.train_per_class + args.valid_per_class)
    frozen_rows = [
        ("(a) Keras loop + `model.predict` callback", "keras_predict"),
        ("(b) Keras loop, no recording", "keras_plain"),
        ("(c) cellnb, cold feature cache", "cellnb_cold"),
        ("(c2) cellnb, warm feature cache", "cellnb_warm"),
        ("floor: one backbone pass over all images", "floor"),
    ]
    lines = [
        "# Benchmarks",
        "",
        f"Measured by `benchmarks/bench_training.py` in one invocation, each case in its own process, on",
        f"{machine['cpu']} with {machine['cores']} cores (load average {machine['load_average_at_start'][0]:.1f} at the start and "
        f"{machine['load_average_at_end'][0]:.1f} at the end, because other jobs shared the machine),",
        f"Python {machine['python']}, TensorFlow {machine['tensorflow']}, Keras {machine['keras']}.",
        "",
        "Times are wall seconds of the work after `import tensorflow, keras` (data loading, model",
        "building, training and saving the model as a `.keras` file). Peak memory is the maximum",
        "resident set size of the case's process (`resource.getrusage(RUSAGE_SELF).ru_maxrss`).",
        "",
        "## Frozen VGG16",
        "",
        f"{images} PatchCamelyon patches ({2 * args.train_per_class} training, {2 * args.valid_per_class} validation, "
        f"96x96 RGB JPEG), VGG16 with `weights=None` and all backbone layers frozen, global average",
        f"pooling, dropout 0.2, a 2-unit softmax head, Adam at 1e-3, batch size {args.batch_size}, {args.epochs} epochs, seed 0.",
        "cellnb runs with `record_train` off, so it records the validation samples only, as (a) does.",
        "",
        "| case | seconds | peak MB | backbone images | vs (a) | vs floor |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, case in frozen_rows:
        result = results[case]
        backbone = result.get("backbone_images")
        if case.startswith("keras"):
            backbone = f"{args.epochs * (2 * args.train_per_class + 2 * args.valid_per_class * (2 if case == 'keras_predict' else 1))}"
        lines.append(
            f"| {label} | {seconds[case]:.1f} | {result['peak_megabytes']:.0f} | {backbone} | "
            f"{seconds['keras_predict'] / seconds[case]:.1f}x faster | {seconds[case] / seconds['floor']:.2f} |"
        )
    cold_speedup = seconds["keras_predict"] / seconds["cellnb_cold"]
    cold_floor = seconds["cellnb_cold"] / seconds["floor"]
    warm = results["cellnb_warm"]
    fine_tune_ratio = seconds["cellnb_fine_tune"] / seconds["keras_plain_fine_tune"]
    lines += [
        "",
        f"The warm run passed {warm['backbone_images']} images through the backbone ({warm['backbone_batches']} batches) "
        f"and read {warm['cached_images']} from the cache.",
        f"The cellnb run directory holds {results['cellnb_cold']['run_dir_megabytes']} MB (mostly `model.keras`); the cache lives outside it.",
        "",
        f"- Target: cellnb (cold) at least 10 times faster than (a): measured {cold_speedup:.1f} times, "
        f"{'met' if cold_speedup >= 10 else 'missed'}.",
        f"- Target: cellnb (cold) within 1.25 times the floor: measured {cold_floor:.2f} times, "
        f"{'met' if cold_floor <= 1.25 else 'missed'}.",
        "",
        "## Fine-tuning VGG16's last block",
        "",
        f"The same data and model with VGG16's last {FINE_TUNE_LAYERS} layers (block 5) trainable, so the backbone runs",
        f"every epoch and no feature can be cached; {args.fine_tune_epochs} epochs. Keras (b) validates with",
        "`validation_data`; cellnb makes the same single validation pass itself and records every",
        "validation probability from it.",
        f"Its validation passes took {results['cellnb_fine_tune']['record_seconds']:.1f} s in all (`record_seconds` in `history.csv`).",
        "",
        "| case | seconds | peak MB |",
        "| --- | ---: | ---: |",
        f"| (b) Keras loop, no recording | {seconds['keras_plain_fine_tune']:.1f} | {results['keras_plain_fine_tune']['peak_megabytes']:.0f} |",
        f"| cellnb with recording | {seconds['cellnb_fine_tune']:.1f} | {results['cellnb_fine_tune']['peak_megabytes']:.0f} |",
        "",
        f"- Target: recording adds at most 5% over (b): cellnb takes {fine_tune_ratio:.2f} times as long "
        f"({(fine_tune_ratio - 1) * 100:+.1f}%), {'met' if fine_tune_ratio <= 1.05 else 'missed'}.",
        "",
        "## Memory over many images",
        "",
        "cellnb with the `small_cnn` backbone, one epoch at 64x64, over random RGB PNGs (80% training,",
        "20% validation). Images are decoded batch by batch, so peak memory should not grow with the",
        "number of images.",
        "",
        "| images | decoded size MB (uint8) | seconds | peak MB |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for case in ("memory_small", "memory_large"):
        result = results[case]
        lines.append(f"| {result['images']} | {result['decoded_megabytes']} | {seconds[case]:.1f} | {result['peak_megabytes']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
