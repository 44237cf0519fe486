"""The ``cellnb`` command: ``run`` executes the three notebooks, ``audit`` checks a data directory,
``synth`` writes the built-in images.

Errors from bad input (``CellnbError``) are printed as one message and exit with status 2; a
failed notebook exits with status 1 after printing the failing cell and its error.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

from cellnb import params as parameters
from cellnb import rundir
from cellnb.errors import CellnbError, ParameterError, RunDirectoryError

logger = logging.getLogger(__name__)

DEFAULT_RUN_NAME = "run"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellnb",
        description="Train, audit and explain binary cell-image classifiers: run the notebooks, audit a data "
                    "directory, or write the built-in synthetic images.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="train, inspect and explain: run the three notebooks into a run directory")
    run.add_argument("--data-dir", default="",
                     help="image folder, the same as -p data_dir (default: generate the built-in synthetic cells)")
    run.add_argument("--run-dir", default=None, help="output folder, the same as -p run_dir (default: outputs/<name>)")
    run.add_argument("--name", default=None,
                     help=f"run name; the run directory is outputs/<name> (default: {DEFAULT_RUN_NAME}); not with --run-dir")
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                     help="set a notebook parameter; repeatable; the value is checked against the declared type")
    run.add_argument("-f", "--parameters-file", default=None, help="YAML file of parameters (-p values win)")
    existing = run.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace a run directory that already contains a run")
    existing.add_argument("--resume", default=None, metavar="RUN_DIR",
                          help="continue an interrupted run from its last finished epoch with the parameters in its "
                               "config.json, then run notebooks 02 and 03")
    run.add_argument("--kernel", default="python3", help="Jupyter kernel that runs the notebooks")
    run.add_argument("--notebooks", default=None, help="folder holding the notebooks (default: the project's notebooks/)")
    run.add_argument("--no-code", action="store_true", help="leave code cells out of the HTML reports")

    synth = commands.add_parser("synth", help="write the built-in synthetic cell images to a folder")
    synth.add_argument("directory", help="folder to create; must not exist or be empty")
    synth.add_argument("--seed", type=int, default=0, help="seed; the same seed gives byte-identical files")
    synth.add_argument("--image-size", type=int, default=96, help="image width and height in pixels")

    audit = commands.add_parser("audit", help="audit a data directory: files, class order, balance, duplicates, "
                                "leakage and image statistics per split")
    audit.add_argument("data_dir", help="the image folder to audit")
    audit.add_argument("--classes", default=None,
                       help="the two class folder names, comma-separated, the scored class second (default: negative,positive)")
    audit.add_argument("--json", default=None, metavar="PATH", help="also write the machine-readable report to PATH")
    audit.add_argument("--near-threshold", default=None, metavar="N",
                       help="largest perceptual-hash distance, of 64 bits, for near duplicates across splits (default: 8)")
    audit.add_argument("--group-pattern", default=None, metavar="REGEX",
                       help="regular expression searched in each file name; its first capture group is the patient or slide id")
    audit.add_argument("--seed", default=None, help="split seed, used only for class folders without split information (default: 0)")
    audit.add_argument("--split-fractions", default=None,
                       help="train,valid,test fractions, used only for class folders without split information "
                            "(default: 0.7,0.15,0.15)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The notebook kernels inherit this, so TensorFlow's C++ info and warning lines stay out of the
    # terminal and the reports. A value the user set is kept.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return command_run(args)
        if args.command == "audit":
            return command_audit(args)
        return command_synth(args)
    except CellnbError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1 if error.__class__.__name__ == "NotebookFailed" else 2
    except KeyboardInterrupt:
        print("interrupted; the finished epochs are kept in the run directory, continue with "
              "`cellnb run --resume RUN_DIR`", file=sys.stderr)
        return 130


def collect_parameters(pairs: list[list[str]], parameters_file: str | None) -> dict:
    """Merge ``-f`` YAML values and ``-p NAME VALUE`` pairs, each checked against its declaration."""
    known = parameters.all_parameters()
    values = {}
    if parameters_file:
        values.update(_read_yaml(Path(parameters_file), known))
    for name, text in pairs:
        parameters.check_names([name], known)
        values[name] = parameters.parse_text(known[name], text)
        values[name] = parameters.coerce_value(known[name], values[name])
    return values


def _read_yaml(path: Path, known: dict) -> dict:
    import yaml

    if not path.is_file():
        raise ParameterError(f"parameters file {str(path)!r} not found")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ParameterError(f"parameters file {str(path)!r} is not valid YAML: {error}") from None
    if not isinstance(loaded, dict):
        raise ParameterError(f"parameters file {str(path)!r} must hold a mapping of NAME: VALUE, not {type(loaded).__name__}")
    values = {}
    for name, value in loaded.items():
        parameters.check_names([name], known, source=f" in {str(path)!r}")
        try:
            values[name] = parameters.coerce_value(known[name], value)
        except ParameterError as error:
            raise ParameterError(f"in parameters file {str(path)!r}: {error}") from None
    return values


def command_run(args) -> int:
    from cellnb.runner import check_before_run, run_notebooks

    if args.resume:
        return command_resume(args)
    values = collect_parameters(args.parameter, args.parameters_file)
    data_dir_text, data_dir_option = choose_path("--data-dir", args.data_dir, "data_dir", values, args)
    run_dir_text, run_dir_option = choose_path("--run-dir", args.run_dir, "run_dir", values, args)
    if args.name is not None:
        check_run_name(args.name)
    if args.name is not None and run_dir_text:
        raise ParameterError(
            f"--name {args.name!r} chooses the run directory outputs/{args.name}, but {run_dir_option} {run_dir_text!r} "
            f"chooses another; give only one of them"
        )
    check_training_values(values)
    if data_dir_text:
        data_dir = Path(data_dir_text).expanduser()
        if data_dir.is_file():
            raise ParameterError(f"{data_dir_option} {data_dir_text!r} is a file; pass the folder that contains your images")
        if not data_dir.is_dir():
            raise ParameterError(f"{data_dir_option} {data_dir_text!r} not found; pass the folder that contains your images")
        values["data_dir"] = str(data_dir.resolve())
        image_paths = check_data(data_dir, values)
    run_dir = Path(run_dir_text or Path("outputs") / (args.name or DEFAULT_RUN_NAME)).expanduser().resolve()
    check_run_dir(run_dir, overwrite=args.overwrite)
    if args.overwrite and data_dir_text:
        check_data_outside(Path(values["data_dir"]), image_paths, run_dir)
    check_before_run(args.notebooks, args.kernel)
    prepare_run_dir(run_dir, overwrite=args.overwrite)
    values["run_dir"] = str(run_dir)

    print(f"cellnb run -> {run_dir}")
    try:
        run_notebooks(run_dir, values, notebooks_dir=args.notebooks, kernel_name=args.kernel,
                      echo=lambda line: print(line, flush=True), report_code=not args.no_code)
    except KeyboardInterrupt:
        return interrupted(run_dir)
    print(f"reports: {run_dir / 'reports' / 'index.html'}")
    return 0


def choose_path(option: str, option_value: str | None, name: str, values: dict, args) -> tuple[str | None, str]:
    """Return the path that ``option`` (``--data-dir``) or the parameter ``name`` (``data_dir``) gives, and which one gave it.

    The parameter may come from ``-p`` or from the ``-f`` file. Both given with different paths
    raise ParameterError, because neither would win silently.
    """
    option_value = option_value or None
    if name not in values:
        return option_value, option
    given_as = _parameter_source(args, name)
    if option_value is not None and not _same_path(option_value, values[name]):
        other_way = f"with -p {name}" if given_as.startswith("-p") else "in the file"
        raise ParameterError(
            f"{option} {option_value!r} and {given_as} {values[name]!r} name different folders; "
            f"give the folder once, with {option} or {other_way}"
        )
    return option_value if option_value is not None else values[name], given_as


def _parameter_source(args, name: str) -> str:
    """Return how the parameter was given: ``-p NAME``, or ``NAME from FILE`` when it came from ``-f``."""
    if any(pair_name == name for pair_name, _ in args.parameter):
        return f"-p {name}"
    return f"{name} from {args.parameters_file!r}"


def _same_path(first: str, second: str) -> bool:
    if not first or not second:
        return first == second
    return Path(first).expanduser().resolve() == Path(second).expanduser().resolve()


def check_training_values(values: dict) -> None:
    """Reject, before any kernel starts, values that would only fail after training."""
    known = parameters.all_parameters()
    epochs = parameters.planned_epochs(values)
    if epochs < 2:
        raise ParameterError(
            f"parameter 'epochs' received {values.get('epochs')!r}; cellnb run explains the change of the validation "
            f"loss between two epochs, so it needs at least 2 (run notebooks/01_train.ipynb alone for a 1-epoch run)"
        )
    check_comparison_epochs(values, epochs)
    from cellnb.train import check_fine_tuning

    check_fine_tuning({name: values.get(name, known[name].default)
                       for name in ("backbone", "fine_tune_epochs", "fine_tune_layers")})
    weights = values.get("weights")
    if weights not in (None, "imagenet") and not Path(weights).expanduser().is_file():
        raise ParameterError(
            f"parameter 'weights' received {weights!r}, which is neither 'imagenet', None nor an existing file; "
            f"pass the path of a weights file of the backbone without its top"
        )


def check_data(data_dir: Path, values: dict) -> list[str]:
    """Find the samples as notebook 01 will, so a bad data directory fails before any kernel starts; return their paths.

    NOTE: this reads and hashes every image once more than the run itself does; on a large data
    set that adds the time of one pass over the files.
    """
    from cellnb.data import discover_samples

    known = parameters.all_parameters()
    options = {name: values.get(name, known[name].default) for name in ("classes", "split_fractions", "seed", "skip_unreadable")}
    return list(discover_samples(data_dir, **options).samples["path"].astype(str))


def command_resume(args) -> int:
    """Continue training in this process, then run notebooks 02 and 03 on the completed run directory."""
    from cellnb.resume import find_resume_point, read_config, resume_training
    from cellnb.runner import (
        NOTEBOOKS,
        StopOnInterrupt,
        check_before_run,
        mark_progress_stopped,
        resumed_training_result,
        run_notebooks,
        stopped_training_state,
        write_index,
    )

    values = collect_parameters(args.parameter, args.parameters_file)
    if "run_dir" in values and not _same_path(args.resume, values["run_dir"]):
        raise ParameterError(
            f"--resume {args.resume!r} and {_parameter_source(args, 'run_dir')} {values['run_dir']!r} name different "
            f"run directories; give the run directory once, with --resume"
        )
    training = sorted(set(values) & set(parameters.declared("01_train")) - {"run_dir"})
    if args.data_dir or args.run_dir or args.name is not None or training:
        rejected = []
        if args.data_dir:
            rejected.append("--data-dir")
        if args.run_dir:
            rejected.append("--run-dir")
        if args.name is not None:
            rejected.append("--name")
        rejected += training
        raise ParameterError(
            f"--resume continues with the training parameters in the run's config.json, so {', '.join(rejected)} "
            f"cannot be changed; leave them out to continue this run, or start a new run in another --run-dir"
        )
    run_dir = Path(args.resume).expanduser().resolve()
    if not run_dir.is_dir():
        raise RunDirectoryError(f"--resume {args.resume!r} not found; pass the run directory of the interrupted run")
    config = read_config(run_dir)
    check_comparison_epochs(values, parameters.planned_epochs(config))
    check_before_run(args.notebooks, args.kernel, names=NOTEBOOKS[1:])

    print(f"cellnb run --resume {run_dir}")
    resumed_after = find_resume_point(run_dir).epoch
    started = time.time()
    aborted = False
    with StopOnInterrupt(run_dir, lambda line: print(line, flush=True)) as interrupt:
        interrupt.training = True
        try:
            # Indented like the epoch lines of notebook 01 in a normal run.
            resume_training(run_dir, echo=lambda line: print("  " + line, flush=True))
        except KeyboardInterrupt:
            # A second Ctrl-C aborts the epoch under way; the finished ones are kept on disk.
            aborted = True
            mark_progress_stopped(run_dir)
    training_result = resumed_training_result(run_dir, resumed_after=resumed_after, seconds=time.time() - started)
    if interrupt.requested or aborted:
        training_result.state = stopped_training_state(run_dir, config) or training_result.state
        write_index(run_dir, [training_result], skipped_by_interrupt=True)
        return interrupted(run_dir)
    try:
        run_notebooks(run_dir, values, notebooks_dir=args.notebooks, kernel_name=args.kernel,
                      echo=lambda line: print(line, flush=True), report_code=not args.no_code, names=NOTEBOOKS[1:],
                      earlier=[training_result])
    except KeyboardInterrupt:
        return interrupted(run_dir)
    print(f"reports: {run_dir / 'reports' / 'index.html'}")
    return 0


def interrupted(run_dir: Path) -> int:
    """Say how to continue a run that Ctrl-C stopped, and return the exit status 130 (128 + SIGINT)."""
    print(f"interrupted; the finished epochs and reports are kept in {run_dir}, continue with "
          f"`cellnb run --resume {run_dir}`", file=sys.stderr)
    return 130


def check_comparison_epochs(values: dict, epochs: int) -> None:
    """Reject an ``epoch_from`` or ``epoch_to`` beyond the ``epochs`` that the run trains, or not in that order."""
    known = parameters.all_parameters()
    chosen = {name: values.get(name, known[name].default) for name in ("epoch_from", "epoch_to")}
    for name, epoch in chosen.items():
        if epoch > epochs:
            raise ParameterError(
                f"parameter {name!r} received {epoch}, but the run trains {epochs} epochs; choose an epoch from "
                f"1 to {epochs}, or 0 for the default"
            )
    # 0 means the default: the epoch of minimum validation loss for epoch_from, the last for epoch_to.
    epoch_to = chosen["epoch_to"] or epochs
    if chosen["epoch_from"] and chosen["epoch_from"] >= epoch_to:
        epoch_to_text = f"{epoch_to}" if chosen["epoch_to"] else f"{epoch_to} (the last epoch)"
        raise ParameterError(
            f"parameter 'epoch_from' received {chosen['epoch_from']}, which is not earlier than epoch_to {epoch_to_text}; "
            f"choose epoch_from below epoch_to"
        )


def check_run_name(name: str) -> None:
    """Reject a --name that is not one plain folder name, because the run directory outputs/NAME may be emptied."""
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name):
        raise ParameterError(
            f"--name {name!r} is not a plain folder name; use letters, digits, '.', '-' or '_', not starting with '.', "
            f"such as --name trial_2, or pass a path with --run-dir"
        )


def check_data_outside(data_dir: Path, image_paths: list[str], run_dir: Path) -> None:
    """Reject --overwrite when the data folder or any image, through symbolic links too, is inside the run directory."""
    inside = [path for path in [str(data_dir), *image_paths] if _is_within(Path(path).resolve(), run_dir)]
    if inside:
        raise RunDirectoryError(
            f"--overwrite would empty the run directory {str(run_dir)!r}, which contains the data of "
            f"{str(data_dir)!r} (for example {inside[0]!r}); move the data out of it or choose another --run-dir"
        )


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_run_dir(run_dir: Path, *, overwrite: bool) -> bool:
    """Reject a run directory that already contains a run unless ``overwrite``; return whether it contains one."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirectoryError(f"--run-dir {str(run_dir)!r} is a file; pass a folder path")
    holds_run = run_dir.is_dir() and any((run_dir / name).exists() for name in (rundir.HISTORY_FILE, rundir.CONFIG_FILE))
    if holds_run and not overwrite:
        raise RunDirectoryError(
            f"run directory {str(run_dir)!r} already contains a run; pass --overwrite to replace it, "
            f"--resume {str(run_dir)!r} to continue it, or choose another --run-dir"
        )
    return holds_run


def prepare_run_dir(run_dir: Path, *, overwrite: bool) -> None:
    """Reject a run directory that already contains a run unless ``overwrite``, which empties it first."""
    if check_run_dir(run_dir, overwrite=overwrite):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def command_synth(args) -> int:
    from cellnb.synth import generate_synthetic_cells

    manifest = generate_synthetic_cells(Path(args.directory), seed=args.seed, image_size=args.image_size)
    counts = manifest.groupby(["split", "label"]).size()
    print(f"wrote {len(manifest)} images to {args.directory}")
    print(counts.to_string())
    return 0


def command_audit(args) -> int:
    from cellnb.audit import audit_data

    known = parameters.all_parameters()

    def parse(name: str, text: str | None):
        """Check an option as its notebook parameter is checked; None gives the declared default."""
        if text is None:
            return known[name].default
        return parameters.coerce_value(known[name], parameters.parse_text(known[name], text))

    # The audit lists unreadable files itself; the loader's warnings about them would repeat it.
    logging.getLogger("cellnb.data").setLevel(logging.ERROR)
    report = audit_data(
        args.data_dir,
        classes=parse("classes", args.classes),
        near_threshold=parse("near_threshold", args.near_threshold),
        group_pattern=parse("group_pattern", args.group_pattern),
        split_fractions=parse("split_fractions", args.split_fractions),
        seed=parse("seed", args.seed),
    )
    for line in report.summary_lines():
        print(line)
    if args.json:
        rundir.write_json(Path(args.json).expanduser(), report.to_json())
        print(f"report: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
