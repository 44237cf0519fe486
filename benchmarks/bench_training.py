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

The cases compared against a target within a few percent (``floor`` with ``cellnb_cold``, and
the two fine-tuning cases) run ``--repeats`` times, interleaved, and the report compares their
fastest runs, because load from other processes only ever adds time.

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
SMALL_MEMORY_IMAGES = 400


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="PCam folder with negative/, positive/, manifest.csv")
    parser.add_argument("--train-per-class", type=int, default=400, help="training images taken per class (PCam has 400)")
    parser.add_argument("--valid-per-class", type=int, default=100, help="validation images taken per class (PCam has 100)")
    parser.add_argument("--repeats", type=int, default=4, help="runs of each case that is compared against a close target")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of the frozen-backbone comparison")
    parser.add_argument("--fine-tune-epochs", type=int, default=2, help="epochs of the fine-tuning comparison")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch in every case")
    parser.add_argument("--memory-images", type=int, default=20000, help="random 64x64 PNGs of the large memory run")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md", help="Markdown file the results go to")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--repetition", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("train_per_class", "valid_per_class", "epochs", "fine_tune_epochs", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    if not args.case and not (args.data / "manifest.csv").is_file():
        parser.error(f"--data {str(args.data)!r} has no manifest.csv; pass the PatchCamelyon folder that contains "
                     f"negative/, positive/ and manifest.csv")
    if args.memory_images <= SMALL_MEMORY_IMAGES:
        parser.error(f"--memory-images must be above the {SMALL_MEMORY_IMAGES} images of the small memory run, so the two "
                     f"runs can be compared; got {args.memory_images}")
    return args


# ---------------------------------------------------------------- cases, each run in a child process


def vgg16_classifier(*, trainable_layers: int):
    """Build the VGG16 + pooling + dropout + 2-unit softmax model of the Keras cases, as cellnb builds it."""
    from cellnb.model import build_model

    return build_model(backbone="vgg16", weights=None, head="softmax2", image_size=IMAGE_SIZE,
                       trainable_layers=trainable_layers, dropout=0.2, seed=0)


def case_keras(workdir: Path, args, *, record: bool, trainable_layers: int, epochs: int) -> dict:
    import keras
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


def case_cellnb(workdir: Path, args, *, name: str, trainable_layers: int, epochs: int, cache: str) -> dict:
    from cellnb import params, train

    config = params.check_parameters("01_train", {
        "data_dir": str(workdir / "pcam"), "run_dir": str(workdir / f"run_{name}"), "backbone": "vgg16",
        "weights": None, "image_size": IMAGE_SIZE, "epochs": epochs, "batch_size": args.batch_size,
        "trainable_layers": trainable_layers, "record_train": False, "cache_dir": str(workdir / cache),
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
    return {
        "images": images,
        "decoded_megabytes": round(images * 64 * 64 * 3 / 1e6, 1),
        "images_in_memory": train.images_in_memory(setup.params, images),
        "image_memory_mb": setup.params["image_memory_mb"],
    }


CASES = {
    "keras_predict": lambda workdir, args: case_keras(workdir, args, record=True, trainable_layers=0, epochs=args.epochs),
    "keras_plain": lambda workdir, args: case_keras(workdir, args, record=False, trainable_layers=0, epochs=args.epochs),
    "cellnb_cold": lambda workdir, args: case_cellnb(
        workdir, args, name=f"cold_{args.repetition}", cache=f"feature_cache_{args.repetition}", trainable_layers=0,
        epochs=args.epochs),
    # Reuses the cache that the first cold run filled.
    "cellnb_warm": lambda workdir, args: case_cellnb(
        workdir, args, name="warm", cache="feature_cache_0", trainable_layers=0, epochs=args.epochs),
    "floor": case_floor,
    "keras_plain_fine_tune": lambda workdir, args: case_keras(
        workdir, args, record=False, trainable_layers=FINE_TUNE_LAYERS, epochs=args.fine_tune_epochs),
    "cellnb_fine_tune": lambda workdir, args: case_cellnb(
        workdir, args, name=f"fine_tune_{args.repetition}", cache="feature_cache_fine_tune",
        trainable_layers=FINE_TUNE_LAYERS, epochs=args.fine_tune_epochs),
    "memory_small": lambda workdir, args: case_memory(workdir, args, folder="random_small"),
    "memory_large": lambda workdir, args: case_memory(workdir, args, folder="random_large"),
}


def run_case_in_this_process(args) -> None:
    """Run one case after the imports, and print its seconds, peak memory and details as one JSON line."""
    import keras  # noqa: F401  imported before the clock starts, as in a notebook kernel
    import tensorflow  # noqa: F401

    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    details = CASES[args.case](args.workdir, args)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(RESULT_PREFIX + json.dumps({
        "case": args.case, "repetition": args.repetition, "seconds": seconds, "cpu_seconds": cpu_seconds,
        "peak_megabytes": after.ru_maxrss / 1024, **details,
    }))


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


class CaseFailed(Exception):
    """A case's child process exited with an error."""


def run_child(case: str, workdir: Path, args, *, repetition: int = 0) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--case", case, "--workdir", str(workdir),
               "--epochs", str(args.epochs), "--fine-tune-epochs", str(args.fine_tune_epochs),
               "--batch-size", str(args.batch_size), "--repetition", str(repetition)]
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPO)
    process_seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise CaseFailed(f"case {case} failed with exit code {completed.returncode}:\n{completed.stderr[-4000:]}")
    line = next(line for line in reversed(completed.stdout.splitlines()) if line.startswith(RESULT_PREFIX))
    result = json.loads(line[len(RESULT_PREFIX):])
    result.update(process_seconds=process_seconds, load_before=load_before, load_after=os.getloadavg()[0])
    print(f"{case} #{repetition}: {result['seconds']:.1f} s wall, {result['cpu_seconds']:.1f} s CPU, "
          f"peak {result['peak_megabytes']:.0f} MB, load {load_before:.1f} -> {result['load_after']:.1f}", flush=True)
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
        results: dict[str, list[dict]] = {}

        def run(case, repetition=0):
            try:
                result = run_child(case, workdir, args, repetition=repetition)
            except CaseFailed as failure:
                # Keep the finished runs, because the whole benchmark takes most of an hour.
                partial = args.output.with_suffix(".partial.json")
                partial.write_text(json.dumps({"machine": machine, "results": results}, indent=2), encoding="utf-8")
                raise SystemExit(f"{failure}\nthe runs that finished are in {partial}") from None
            results.setdefault(case, []).append(result)

        for repetition in range(args.repeats):
            run("floor", repetition)
            run("cellnb_cold", repetition)
        run("cellnb_warm")
        run("keras_plain")
        run("keras_predict")
        for repetition in range(args.repeats):
            run("keras_plain_fine_tune", repetition)
            run("cellnb_fine_tune", repetition)
        write_random_pngs(workdir / "random_small", SMALL_MEMORY_IMAGES)
        run("memory_small")
        write_random_pngs(workdir / "random_large", args.memory_images)
        run("memory_large")
        machine["load_average_at_end"] = os.getloadavg()
        (workdir / "results.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2))
        args.output.write_text(render_report(args, machine, results), encoding="utf-8")
        print(f"wrote {args.output}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def fastest(runs: list[dict]) -> dict:
    """Return the run with the least wall time: load from other processes only ever adds time."""
    return min(runs, key=lambda run: run["seconds"])


def _all_runs(runs: list[dict]) -> str:
    """List each run's wall seconds with the cores it used on average (CPU seconds over wall seconds)."""
    return ", ".join(f"{run['seconds']:.1f} ({run['cpu_seconds'] / run['seconds']:.1f} cores)" for run in runs)


def render_report(args, machine: dict, results: dict) -> str:
    best = {case: fastest(runs) for case, runs in results.items()}
    seconds = {case: run["seconds"] for case, run in best.items()}
    train_images, valid_images = 2 * args.train_per_class, 2 * args.valid_per_class
    lines = [
        "# Benchmarks",
        "",
        "Measured by `benchmarks/bench_training.py` in one invocation, each case in its own process, on",
        f"{machine['cpu']} with {machine['cores']} cores, Python {machine['python']}, "
        f"TensorFlow {machine['tensorflow']}, Keras {machine['keras']}.",
        f"The 1-minute load average was {machine['load_average_at_start'][0]:.1f} at the start and "
        f"{machine['load_average_at_end'][0]:.1f} at the end; the machine is shared with other jobs.",
        "",
        "Times are wall seconds of the work after `import tensorflow, keras` (data loading, model",
        "building, training and saving the model as a `.keras` file); CPU seconds are the process's",
        "user plus system time over the same span. Peak memory is the maximum resident set size of",
        "the case's process (`resource.getrusage(RUSAGE_SELF).ru_maxrss`).",
        "",
        f"The cases that a target compares within a few percent ran {args.repeats} time(s) each, interleaved",
        "(floor, cellnb, floor, cellnb, ...), and the targets compare the fastest run of each case,",
        "because other processes on the machine can only add time to a run. Every run's time is listed.",
        "",
        "cellnb turns tf.data's autotuning off in its datasets (`cellnb.data.without_autotune`): with it",
        "on, destroying an iterator sometimes left every core idle for up to 16 s on the 2-core machines",
        "where this script was written. The Keras cases keep TensorFlow's default, as a standard loop",
        "does, so they can wait like that once per epoch. Each run's cores used (CPU seconds over wall",
        "seconds) are listed, and the CPU seconds, which such a wait does not add to, are compared too.",
        "",
        "## Frozen VGG16",
        "",
        f"{train_images + valid_images} PatchCamelyon patches ({train_images} training, {valid_images} validation, 96x96 RGB JPEG),",
        "VGG16 with `weights=None` and all backbone layers frozen, global average pooling, dropout 0.2,",
        f"a 2-unit softmax head, Adam at 1e-3, batch size {args.batch_size}, {args.epochs} epochs, seed 0.",
        "cellnb runs with `record_train` off, so it records the validation samples only, as (a) does.",
        "",
        "| case | seconds (fastest) | all runs (cores used) | CPU seconds | peak MB | backbone images | speed-up over (a) | times the floor |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    frozen_rows = [
        ("(a) Keras loop + `model.predict` callback", "keras_predict", args.epochs * (train_images + 2 * valid_images)),
        ("(b) Keras loop, no recording", "keras_plain", args.epochs * (train_images + valid_images)),
        ("(c) cellnb, cold feature cache", "cellnb_cold", None),
        ("(c2) cellnb, warm feature cache", "cellnb_warm", None),
        ("floor: one backbone pass over all images", "floor", None),
    ]
    for label, case, backbone in frozen_rows:
        run = best[case]
        backbone = run.get("backbone_images") if backbone is None else backbone
        lines.append(
            f"| {label} | {run['seconds']:.1f} | {_all_runs(results[case])} | {run['cpu_seconds']:.1f} | "
            f"{run['peak_megabytes']:.0f} | {backbone} | {seconds['keras_predict'] / run['seconds']:.1f}x | "
            f"{run['seconds'] / seconds['floor']:.2f}x |"
        )
    cold_speedup = seconds["keras_predict"] / seconds["cellnb_cold"]
    cpu_speedup = best["keras_predict"]["cpu_seconds"] / best["cellnb_cold"]["cpu_seconds"]
    cold_floor = seconds["cellnb_cold"] / seconds["floor"]
    cpu_floor = best["cellnb_cold"]["cpu_seconds"] / best["floor"]["cpu_seconds"]
    warm = best["cellnb_warm"]
    lines += [
        "",
        f"The warm run passed {warm['backbone_images']} images through the backbone ({warm['backbone_batches']} batches) "
        f"and read {warm['cached_images']} from the cache.",
        f"The cellnb run directory holds {best['cellnb_cold']['run_dir_megabytes']} MB (mostly `model.keras`); "
        "the cache lives outside it.",
        "",
        f"- Target: cellnb (cold) at least 10 times faster than (a): measured {cold_speedup:.1f} times, "
        f"{'met' if cold_speedup >= 10 else 'missed'} (in CPU seconds: {cpu_speedup:.1f} times).",
        f"- Target: cellnb (cold) within 1.25 times the floor: measured {cold_floor:.2f} times, "
        f"{'met' if cold_floor <= 1.25 else 'missed'} (in CPU seconds: {cpu_floor:.2f} times).",
        f"- The warm run, {seconds['cellnb_warm']:.1f} s, is everything cellnb does besides the backbone pass: the file",
        "  audit (sha256 and a full decode of every file), building the model, hashing the backbone",
        f"  weights for the cache key, {args.epochs} epochs of the head, and saving `model.keras`.",
    ]

    fine_plain, fine_cellnb = best["keras_plain_fine_tune"], best["cellnb_fine_tune"]
    fine_tune_ratio = fine_cellnb["seconds"] / fine_plain["seconds"]
    lines += [
        "",
        "## Fine-tuning VGG16's last block",
        "",
        f"The same data and model with VGG16's last {FINE_TUNE_LAYERS} layers (block 5) trainable, so the backbone runs",
        f"every epoch and no feature can be cached; {args.fine_tune_epochs} epochs. Keras (b) validates with",
        "`validation_data`; cellnb makes the same single validation pass itself and records every",
        "validation probability from it. Its fastest run spent "
        f"{fine_cellnb['record_seconds']:.1f} s in those passes (`record_seconds` in `history.csv`).",
        "",
        "| case | seconds (fastest) | all runs (cores used) | CPU seconds | peak MB |",
        "| --- | ---: | --- | ---: | ---: |",
        f"| (b) Keras loop, no recording | {fine_plain['seconds']:.1f} | {_all_runs(results['keras_plain_fine_tune'])} | "
        f"{fine_plain['cpu_seconds']:.1f} | {fine_plain['peak_megabytes']:.0f} |",
        f"| cellnb with recording | {fine_cellnb['seconds']:.1f} | {_all_runs(results['cellnb_fine_tune'])} | "
        f"{fine_cellnb['cpu_seconds']:.1f} | {fine_cellnb['peak_megabytes']:.0f} |",
        "",
        f"- Target: recording adds at most 5% over (b): cellnb takes {fine_tune_ratio:.3f} times as long "
        f"({(fine_tune_ratio - 1) * 100:+.1f}%), {'met' if fine_tune_ratio <= 1.05 else 'missed'} "
        f"(in CPU seconds: {fine_cellnb['cpu_seconds'] / fine_plain['cpu_seconds']:.3f} times).",
        "",
        "## Memory over many images",
        "",
        "cellnb with the `small_cnn` backbone, one epoch at 64x64, over random RGB PNGs (80% training,",
        "20% validation). cellnb keeps the decoded images in memory only while they fit in",
        "`image_memory_mb` (default 128 MB); above it, it decodes them batch by batch in every pass,",
        "so peak memory should not grow with the number of images.",
        "",
        "| images | decoded size MB (uint8) | held in memory | seconds | peak MB |",
        "| ---: | ---: | --- | ---: | ---: |",
    ]
    for case in ("memory_small", "memory_large"):
        run = best[case]
        in_memory = "yes" if run["images_in_memory"] else "no"
        lines.append(f"| {run['images']} | {run['decoded_megabytes']} | {in_memory} | {run['seconds']:.1f} | {run['peak_megabytes']:.0f} |")
    small, large = best["memory_small"], best["memory_large"]
    lines += [
        "",
        f"From {small['images']} to {large['images']} images the decoded size grew by "
        f"{large['decoded_megabytes'] - small['decoded_megabytes']:.1f} MB and the peak memory by "
        f"{large['peak_megabytes'] - small['peak_megabytes']:.0f} MB.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
