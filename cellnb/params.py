"""Declared parameters of each notebook: name, type, default, allowed values, and their checks.

The same declarations check values from the notebook's ``parameters`` cell, from papermill
``-p``, from ``cellnb run -p NAME VALUE`` and from a YAML file, so every route gets the same
error for the same mistake. Text from the command line is parsed here and never evaluated.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cellnb.errors import ParameterError

logger = logging.getLogger(__name__)

TRUE_WORDS = {"true", "yes", "on", "1"}
FALSE_WORDS = {"false", "no", "off", "0"}
NONE_WORDS = {"none", "null", ""}


@dataclass(frozen=True)
class Parameter:
    """One notebook parameter: its type (``str``, ``int``, ``float``, ``bool``, ``list``), default and checks."""

    name: str
    kind: type
    default: Any
    help: str
    optional: bool = False
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    check: Callable[[Any], str | None] | None = field(default=None, compare=False)

    @property
    def expected(self) -> str:
        text = self.kind.__name__
        if self.choices:
            text += f" among {list(self.choices)}"
        if self.minimum is not None and self.maximum is not None:
            text += f" in [{self.minimum}, {self.maximum}]"
        elif self.minimum is not None:
            text += f" >= {self.minimum}"
        elif self.maximum is not None:
            text += f" <= {self.maximum}"
        if self.kind is bool:
            text += f" ({', '.join(sorted(TRUE_WORDS))} or {', '.join(sorted(FALSE_WORDS))} on the command line)"
        return text + (" or None" if self.optional else "")


def _two_names(value) -> str | None:
    if len(value) != 2 or not all(isinstance(item, str) and item for item in value) or value[0] == value[1]:
        return "two different class folder names, negative first and scored class second"
    return None


def _fractions(value) -> str | None:
    if len(value) != 3 or not all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in value):
        return "three numbers: train, valid and test fractions"
    if min(value) < 0 or not math.isclose(sum(value), 1.0, abs_tol=1e-6) or min(value[:2]) <= 0:
        return "three non-negative fractions summing to 1, with train and valid above 0"
    return None


RUN_DIR = Parameter("run_dir", str, "../outputs/demo",
                    "folder the run writes to (notebooks 02 and 03 read it); a relative path starts at the kernel's folder")

TRAIN = (
    Parameter("data_dir", str, "", "image folder; empty = generate the built-in synthetic cells into RUN_DIR/data"),
    RUN_DIR,
    Parameter("classes", list, ["negative", "positive"], "class folder names; the second is the scored class", check=_two_names),
    Parameter("backbone", str, "small_cnn", "feature extractor", choices=("small_cnn", "vgg16", "mobilenet_v2", "resnet50")),
    Parameter("weights", str, None, "'imagenet', a local weights file path, or None for random weights", optional=True),
    Parameter("head", str, "softmax2", "classifier head", choices=("softmax2", "sigmoid1")),
    Parameter("preprocessing", str, "auto", "input encoding; auto = the backbone's own",
              choices=("auto", "vgg16", "mobilenet_v2", "resnet50", "rescale", "none")),
    Parameter("image_size", int, 96, "images are resized to IMAGE_SIZE x IMAGE_SIZE pixels", minimum=16, maximum=1024),
    Parameter("epochs", int, 30, "number of training epochs", minimum=1, maximum=10000),
    Parameter("batch_size", int, 32, "images per batch", minimum=1, maximum=4096),
    Parameter("learning_rate", float, 1e-3, "optimizer step size", minimum=1e-9, maximum=10.0),
    Parameter("optimizer", str, "adam", "optimizer", choices=("adam", "sgd", "rmsprop")),
    Parameter("trainable_layers", int, 0, "last backbone layers to train; 0 = frozen, -1 = all", minimum=-1),
    Parameter("dropout", float, 0.2, "dropout rate before the head", minimum=0.0, maximum=0.95),
    Parameter("seed", int, 0, "seed for the split, the synthetic data, shuffling and initial weights", minimum=0),
    Parameter("split_fractions", list, [0.7, 0.15, 0.15], "train, valid, test fractions for class folders without splits",
              check=_fractions),
    Parameter("skip_unreadable", bool, True, "train without files that cannot be decoded (they are listed)"),
    Parameter("record_train", bool, True, "also record training samples' probabilities each epoch (inference mode)"),
    Parameter("fine_tune_epochs", int, 0, "epochs of a second phase that trains the top backbone layers too; 0 = none",
              minimum=0, maximum=10000),
    Parameter("fine_tune_layers", int, 4, "last backbone layers trained in the second phase; -1 = all "
              "(VGG16's last block is 4 layers)", minimum=-1),
    Parameter("fine_tune_learning_rate", float, 1e-5, "optimizer step size in the second phase", minimum=1e-9, maximum=10.0),
    Parameter("feature_cache", bool, True, "train the head on cached backbone features while the backbone is frozen"),
    Parameter("cache_dir", str, None, "folder of the feature cache; None = ~/.cache/cellnb/features", optional=True),
    Parameter("image_memory_mb", int, 128, "keep the decoded training and validation images in memory when they fit in "
              "this many MB (uint8); above it, or at 0, they are decoded from disk every epoch", minimum=0, maximum=1_000_000),
)

INSPECT = (
    RUN_DIR,
    Parameter("thumbnails_per_class", int, 12, "validation thumbnails shown per class", minimum=0, maximum=200),
    Parameter("top_k", int, 10, "how many most-changed samples to list", minimum=1, maximum=1000),
    Parameter("near_threshold", int, 8, "largest perceptual-hash distance, of 64 bits, at which images from two splits "
              "count as near duplicates", minimum=0, maximum=64),
    Parameter("group_pattern", str, None, "regular expression searched in each file name, whose first capture group is "
              "the patient or slide id; None = the manifest's group column", optional=True),
)

EXPLAIN = (
    RUN_DIR,
    Parameter("epoch_from", int, 0, "first epoch of the comparison; 0 = epoch of minimum validation loss", minimum=0),
    Parameter("epoch_to", int, 0, "second epoch of the comparison; 0 = last epoch", minimum=0),
    Parameter("calibration_bins", int, 10, "equal-width bins of the reliability diagram", minimum=2, maximum=100),
    Parameter("top_k", int, 10, "how many top contributors to show", minimum=1, maximum=1000),
)

NOTEBOOKS = {
    "01_train": TRAIN,
    "02_inspect_validation": INSPECT,
    "03_explain_loss": EXPLAIN,
}


def declared(notebook: str) -> dict[str, Parameter]:
    if notebook not in NOTEBOOKS:
        raise ParameterError(f"unknown notebook {notebook!r}; {_valid_names_advice(notebook, NOTEBOOKS, 'notebooks')}")
    return {parameter.name: parameter for parameter in NOTEBOOKS[notebook]}


def all_parameters() -> dict[str, Parameter]:
    """Return every parameter any notebook declares, by name (shared names have one declaration)."""
    merged: dict[str, Parameter] = {}
    for parameters in NOTEBOOKS.values():
        for parameter in parameters:
            merged.setdefault(parameter.name, parameter)
    return merged


def check_parameters(notebook: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Check a notebook's parameter values and return them typed, in declaration order.

    ``values`` may be the notebook's ``globals()``; names that the notebook does not declare are
    ignored there, but one that looks like a misspelt parameter (``papermill -p epoch 5``) is
    logged as a warning with the suggestion. A value of the wrong type raises ParameterError
    naming the parameter, the value received and the type expected. Text that papermill passed
    for a bool or a list (``"false"``, ``"[1, 2]"``) is parsed as the command line would.
    """
    parameters = declared(notebook)
    _warn_misspelt_names(notebook, parameters, values)
    checked = {}
    for name, parameter in parameters.items():
        value = values.get(name, parameter.default)
        checked[name] = coerce_value(parameter, value)
    return checked


def planned_epochs(values: Mapping[str, Any]) -> int:
    """Return the epochs a training run makes, ``epochs`` plus ``fine_tune_epochs``, with defaults for missing ones."""
    known = all_parameters()
    return (values.get("epochs", known["epochs"].default)
            + values.get("fine_tune_epochs", known["fine_tune_epochs"].default))


def check_names(names: Iterable[str], valid: Iterable[str], *, source: str = "") -> None:
    """Raise ParameterError for the first of ``names`` that is not among ``valid``, suggesting the closest valid name.

    ``source`` names where the names come from, such as ``" in 'params.yaml'"``.
    """
    valid = sorted(valid)
    for name in names:
        if name not in valid:
            raise ParameterError(f"unknown parameter {name!r}{source}; {_valid_names_advice(name, valid, 'parameters')}")


def closest_name(name: str, valid: Iterable[str]) -> str | None:
    """Return the valid name closest to ``name`` (difflib's default cutoff of 0.6), or None when none is close."""
    matches = difflib.get_close_matches(str(name), list(valid), n=1)
    return matches[0] if matches else None


def _valid_names_advice(name: str, valid: Iterable[str], kind: str) -> str:
    valid = sorted(valid)
    closest = closest_name(name, valid)
    if closest is None:
        return f"valid {kind} are {valid}"
    return f"did you mean {closest!r}? The valid {kind} are {valid}"


# Types of the values papermill injects; other globals (modules, functions) are never parameters.
INJECTED_TYPES = (str, int, float, bool, list, dict, type(None))


def _warn_misspelt_names(notebook: str, parameters: Mapping[str, Parameter], values: Mapping[str, Any]) -> None:
    """Log a warning for each public value whose name is close to, but not, a declared parameter.

    A notebook's ``globals()`` also contains the user's own variables, so this warns and never
    raises. The cutoff of 0.8 (difflib's ratio) is stricter than the command line's, so that
    config.json keys such as ``preprocessing_in_effect`` do not count as misspellings.
    """
    for name, value in values.items():
        if name in parameters or name.startswith("_") or not isinstance(value, INJECTED_TYPES):
            continue
        matches = difflib.get_close_matches(name, list(parameters), n=1, cutoff=0.8)
        if matches:
            logger.warning("%r is not a parameter of %s, so it has no effect; did you mean %r?", name, notebook, matches[0])


def parse_text(parameter: Parameter, text: str) -> Any:
    """Parse a command-line string into the parameter's type, strictly; strings stay verbatim."""
    if parameter.optional and text.strip().lower() in NONE_WORDS:
        return None
    if parameter.kind is str:
        return text
    if parameter.kind is bool:
        lowered = text.strip().lower()
        if lowered in TRUE_WORDS:
            return True
        if lowered in FALSE_WORDS:
            return False
        raise _mismatch(parameter, text)
    if parameter.kind is int:
        try:
            return int(text.strip(), 10)
        except ValueError:
            raise _mismatch(parameter, text) from None
    if parameter.kind is float:
        try:
            return float(text.strip())
        except ValueError:
            raise _mismatch(parameter, text) from None
    if parameter.kind is list:
        return _parse_list(parameter, text)
    raise _mismatch(parameter, text)


def _parse_list(parameter: Parameter, text: str) -> list:
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            value = json.loads(stripped)
        except ValueError:
            raise ParameterError(
                f"parameter {parameter.name!r} received {text!r}, which is not a JSON list; "
                f"write it as [\"a\", \"b\"] or as comma-separated values a,b"
            ) from None
        return value
    items = [item.strip() for item in stripped.split(",")]
    return [_number_or_text(item) for item in items]


def _number_or_text(item: str):
    for kind in (int, float):
        try:
            return kind(item)
        except ValueError:
            continue
    return item


def coerce_value(parameter: Parameter, value: Any) -> Any:
    """Check a value that already has a Python type (notebook, papermill or YAML) and return it typed."""
    if value is None:
        if parameter.optional:
            return None
        raise _mismatch(parameter, value)
    if isinstance(value, str) and parameter.kind is not str:
        value = parse_text(parameter, value)
    elif parameter.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif parameter.kind is list and isinstance(value, tuple):
        value = list(value)

    if parameter.kind is int and isinstance(value, bool):
        raise _mismatch(parameter, value)
    if not isinstance(value, parameter.kind) and not (value is None and parameter.optional):
        raise _mismatch(parameter, value)
    _check_range(parameter, value)
    return value


def _check_range(parameter: Parameter, value: Any) -> None:
    if value is None:
        return
    if parameter.choices is not None and value not in parameter.choices:
        raise ParameterError(f"parameter {parameter.name!r} received {value!r}; valid values are {list(parameter.choices)}")
    if parameter.kind is float and not math.isfinite(value):
        raise ParameterError(f"parameter {parameter.name!r} received {value!r}; expected a finite number")
    below = parameter.minimum is not None and value < parameter.minimum
    above = parameter.maximum is not None and value > parameter.maximum
    if below or above:
        # The help text explains the limits, such as "0 = frozen, -1 = all".
        raise ParameterError(
            f"parameter {parameter.name!r} received {value!r}; expected {parameter.expected} ({parameter.help})"
        )
    if parameter.check is not None:
        problem = parameter.check(value)
        if problem:
            raise ParameterError(f"parameter {parameter.name!r} received {value!r}; expected {problem}")


def _mismatch(parameter: Parameter, value: Any) -> ParameterError:
    message = f"parameter {parameter.name!r} received {value!r} ({type(value).__name__}); expected {parameter.expected}"
    if parameter.kind is str and isinstance(value, (bool, int, float)):
        # papermill -p turns text that looks like a number or a bool into one ("007" becomes 7).
        message += (
            f"; papermill -p converts text that looks like a number or a bool, so pass this text with "
            f"papermill -r {parameter.name} VALUE, or quote it in a YAML file"
        )
    return ParameterError(message)
