"""Execute the three notebooks with papermill into a run directory and render them to HTML.

A notebook counts as successful only if papermill ran every cell without an error; a failure
stops the sequence, still renders the partial notebook (marked failed at its top) and raises
``NotebookFailed`` with the failing cell's source and error.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cellnb import params as parameters
from cellnb import rundir
from cellnb.errors import CellnbError

logger = logging.getLogger(__name__)

NOTEBOOKS = ("01_train", "02_inspect_validation", "03_explain_loss")
TITLES = {
    "01_train": "Training: curves and probability trajectories",
    "02_inspect_validation": "The validation split: balance, thumbnails, largest changes",
    "03_explain_loss": "Why the validation loss rose: the per-sample explanation",
}
REPORTS_FOLDER = "reports"
NOTEBOOKS_FOLDER = "notebooks"


class NotebookFailed(CellnbError):
    """A notebook stopped at a cell with an error. The message contains the cell source and the error."""

    def __init__(self, notebook: str, cell_index: int | None, source: str, error: str):
        self.notebook = notebook
        self.cell_index = cell_index
        self.source = source
        self.error = error
        where = f"cell {cell_index}" if cell_index is not None else "a cell"
        super().__init__(f"notebook {notebook} failed at {where}:\n{_indent(source)}\n{error}")


@dataclass
class NotebookResult:
    """One notebook's outcome; ``state``, when set, replaces the index's "finished in N s" for it."""

    name: str
    notebook: Path
    report: Path
    seconds: float
    failed: NotebookFailed | None = None
    state: str | None = None


def default_notebooks_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "notebooks"


def run_notebooks(
    run_dir: str | Path,
    values: dict,
    *,
    notebooks_dir: Path | None = None,
    kernel_name: str = "python3",
    echo: Callable[[str], None] = logger.info,
    report_code: bool = True,
    names: tuple[str, ...] = NOTEBOOKS,
    earlier: Sequence[NotebookResult] = (),
) -> list[NotebookResult]:
    """Run the notebooks ``names`` (by default 01, 02 and 03) in order; each receives the parameters it declares from ``values``.

    A notebook counts as finished only when every code cell ran without an error: papermill
    does not raise for ``sys.exit(0)``, so the executed notebook is inspected as well.
    ``earlier`` lists the outcomes of notebooks not run here, such as ``resumed_training_result``,
    which ``index.html`` shows with the others.
    """
    run_dir = Path(run_dir).resolve()
    notebooks_dir = Path(notebooks_dir or default_notebooks_dir())
    (run_dir / NOTEBOOKS_FOLDER).mkdir(parents=True, exist_ok=True)
    (run_dir / REPORTS_FOLDER).mkdir(parents=True, exist_ok=True)
    with StopOnInterrupt(run_dir, echo) as interrupt:
        return _run_each(run_dir, values, notebooks_dir, kernel_name, echo, report_code, names, interrupt, earlier)


class StopOnInterrupt:
    """Turn the first Ctrl-C into a request that training stop after its current epoch.

    The kernel runs in its own process group, so the terminal's interrupt reaches only this
    process. The first one writes ``stop_requested`` into the run directory, which the training
    callbacks read at each epoch end. No further notebook starts after the current one. A
    second Ctrl-C raises KeyboardInterrupt at once. Outside the main thread it does nothing.
    """

    def __init__(self, run_dir: Path, echo: Callable[[str], None]):
        self.path = Path(run_dir) / rundir.STOP_FILE
        self.echo = echo
        self.requested = False
        # Set while notebook 01 runs, so epochs that finished before the Ctrl-C are printed before its message.
        self.progress: ProgressWatcher | None = None
        # Whether training runs now, in a kernel or in this process; it chooses the message of a Ctrl-C.
        self.training = False
        self._previous = None

    def __enter__(self):
        self.path.unlink(missing_ok=True)
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.path.write_text("stop requested by Ctrl-C\n", encoding="utf-8")
        if self.progress is not None:
            self.progress.report()
        if self.training:
            self.echo("interrupt received: training stops after the current epoch and keeps every finished epoch; "
                      "press Ctrl-C again to abort at once")
        else:
            self.echo("interrupt received: the current notebook finishes and no later one starts; "
                      "press Ctrl-C again to abort at once")

    def __exit__(self, *exc_info):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        self.path.unlink(missing_ok=True)
        return False


def _run_each(run_dir, values, notebooks_dir, kernel_name, echo, report_code, names, interrupt, earlier) -> list[NotebookResult]:
    import papermill
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    results = list(earlier)
    for name in names:
        source = notebooks_dir / f"{name}.ipynb"
        if not source.is_file():
            raise CellnbError(f"notebook {source} not found; pass --notebooks with the folder that contains {name}.ipynb")
        declared = parameters.declared(name)
        notebook_values = {key: value for key, value in values.items() if key in declared}
        notebook_values["run_dir"] = str(run_dir)
        output = run_dir / NOTEBOOKS_FOLDER / f"{name}.ipynb"

        echo(f"running {name}.ipynb")
        started = time.time()
        watcher = ProgressWatcher(run_dir, echo) if name == "01_train" else None
        interrupt.progress = watcher
        interrupt.training = name == "01_train"
        failure = None
        try:
            papermill.execute_notebook(
                str(source), str(output), parameters=notebook_values, kernel_name=kernel_name,
                progress_bar=False, cwd=str(run_dir), request_save_on_cell_execute=True,
            )
        except papermill.PapermillExecutionError as error:
            failure = NotebookFailed(name, error.exec_count, error.source, f"{error.ename}: {error.evalue}")
        except (DeadKernelError, CellTimeoutError) as error:
            failure = NotebookFailed(name, None, "", f"{type(error).__name__}: {error}")
        finally:
            interrupt.progress = None
            interrupt.training = False
            if watcher is not None:
                watcher.stop()
        if output.is_file():
            # The executed notebook names the cell and its error even where papermill does not
            # raise (sys.exit(0)) or raises without the error text (a missing line magic).
            found = find_failed_cell(output, name)
            if found is not None and (failure is None or failure.source):
                failure = found

        report = render_html(output, run_dir / REPORTS_FOLDER / f"{name}.html", failure=failure, report_code=report_code)
        result = NotebookResult(name, output, report, time.time() - started, failure)
        if name == "01_train" and interrupt.requested and failure is None:
            result.state = stopped_training_state(run_dir, values)
        results.append(result)
        if failure is not None:
            outcome = "FAILED"
        elif result.state is not None:
            outcome = "stopped"
        else:
            outcome = "finished"
        echo(f"{outcome} {name}.ipynb in {result.seconds:.0f} s -> {report}")
        if failure is not None:
            write_index(run_dir, results)
            raise failure
        if interrupt.requested:
            write_index(run_dir, results, skipped_by_interrupt=True)
            raise KeyboardInterrupt
    write_index(run_dir, results)
    return results


def find_failed_cell(notebook_path: Path, name: str) -> NotebookFailed | None:
    """Return the first code cell of an executed notebook that failed or never ran, else None.

    A cell failed when it has an error output (an exception, ``sys.exit``) or papermill marked
    it failed (a line magic that does not exist prints ``UsageError`` to stderr without an error
    output). A cell with source but no execution count never ran, because an earlier cell
    stopped the kernel.
    """
    import nbformat

    notebook = nbformat.read(str(notebook_path), as_version=4)
    for cell in notebook.cells:
        if cell.cell_type != "code" or not cell.source.strip():
            continue
        errors = [output for output in cell.get("outputs", []) if output.get("output_type") == "error"]
        if errors:
            return NotebookFailed(name, cell.execution_count, cell.source, f"{errors[0].ename}: {errors[0].evalue}")
        status = cell.get("metadata", {}).get("papermill", {}).get("status")
        if status == "failed":
            return NotebookFailed(name, cell.execution_count, cell.source, _stderr_text(cell) or "the cell failed")
        if cell.execution_count is None:
            return NotebookFailed(name, None, cell.source, "the cell never ran: an earlier cell stopped the notebook")
    return None


def _stderr_text(cell) -> str:
    streams = [output.get("text", "") for output in cell.get("outputs", [])
               if output.get("output_type") == "stream" and output.get("name") == "stderr"]
    return "".join(streams).strip()


def check_before_run(notebooks_dir: Path | None, kernel_name: str, names: tuple[str, ...] = NOTEBOOKS) -> None:
    """Check that each notebook has a ``parameters`` cell and that the kernel can import TensorFlow and cellnb."""
    notebooks_dir = Path(notebooks_dir or default_notebooks_dir())
    for name in names:
        check_parameters_cell(notebooks_dir / f"{name}.ipynb")
    check_kernel(kernel_name)


def check_parameters_cell(path: Path) -> None:
    """Raise CellnbError when a notebook is missing or has no code cell tagged ``parameters``."""
    import nbformat

    if not path.is_file():
        raise CellnbError(f"notebook {path} not found; pass --notebooks with the folder that contains {path.name}")
    notebook = nbformat.read(str(path), as_version=4)
    tagged = [cell for cell in notebook.cells
              if cell.cell_type == "code" and "parameters" in cell.get("metadata", {}).get("tags", [])]
    if not tagged:
        raise CellnbError(
            f"notebook {path} has no code cell tagged 'parameters', so papermill cannot set its parameters; "
            f"add the tag 'parameters' to the cell that holds the defaults"
        )


def check_kernel(kernel_name: str, *, timeout: float = 300.0) -> None:
    """Raise CellnbError when the Jupyter kernel is not installed or its Python cannot import TensorFlow and cellnb.

    Runs the kernel's own interpreter (``argv[0]`` of its kernel spec, with ``python`` replaced
    by this interpreter as jupyter_client does) with ``-c "import tensorflow, cellnb"``.
    """
    import subprocess
    import sys

    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    manager = KernelSpecManager()
    try:
        spec = manager.get_kernel_spec(kernel_name)
    except NoSuchKernel:
        raise CellnbError(
            f"Jupyter kernel {kernel_name!r} not found; installed kernels are {sorted(manager.find_kernel_specs())}; "
            f"pass one with --kernel, or install this environment's kernel with "
            f"`python -m ipykernel install --user --name {kernel_name}`"
        ) from None
    executable = spec.argv[0] if spec.argv else ""
    if executable in {"python", f"python{sys.version_info[0]}", f"python{sys.version_info[0]}.{sys.version_info[1]}"}:
        executable = sys.executable
    if spec.language.lower() != "python":
        raise CellnbError(f"Jupyter kernel {kernel_name!r} runs {spec.language}, not Python; pass a Python kernel with --kernel")

    try:
        completed = subprocess.run([executable, "-c", "import tensorflow, cellnb"], capture_output=True, text=True,
                                   timeout=timeout, env={**os.environ, **spec.env} if spec.env else None)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise CellnbError(f"could not start the Python of Jupyter kernel {kernel_name!r} ({executable}): {error}") from None
    if completed.returncode != 0:
        last_line = (completed.stderr.strip().splitlines() or ["no error output"])[-1]
        raise CellnbError(
            f"the Python of Jupyter kernel {kernel_name!r} ({executable}) cannot import tensorflow and cellnb: "
            f"{last_line}; install cellnb into that environment (pip install -e .) or pass another kernel with --kernel"
        )


class ProgressWatcher:
    """Poll ``progress.json`` in a thread while papermill runs and echo each finished epoch once."""

    def __init__(self, run_dir: Path, echo: Callable[[str], None], interval: float = 1.0):
        from cellnb.recorder import format_progress, json_or_empty

        self._format, self._read = format_progress, json_or_empty
        self.path = Path(run_dir) / rundir.PROGRESS_FILE
        self.echo = echo
        self.interval = interval
        self.seen = self._read(self.path).get("epoch", 0) if self.path.exists() else 0
        # Reentrant, because the Ctrl-C handler can call report() while the main thread is inside it.
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.report()

    def report(self) -> None:
        """Echo the epochs finished since the last call."""
        with self._lock:
            self._report_unlocked()

    def _report_unlocked(self) -> None:
        progress = self._read(self.path)
        epoch = int(progress.get("epoch", 0) or 0)
        if epoch <= self.seen or not progress.get("metrics"):
            return
        total = int(progress.get("epochs", epoch))
        for finished, metrics in self._epochs_since_last_echo(epoch, progress["metrics"]):
            self.echo("  " + self._format(finished, total, metrics))
        self.seen = epoch

    def _epochs_since_last_echo(self, epoch: int, latest: dict) -> list[tuple[int, dict]]:
        """Return every epoch finished since the last echo, with its metrics from ``history.csv``.

        Epochs can finish faster than the polling interval, and ``progress.json`` keeps only the
        latest one, so the earlier ones are read from the history, which is written first.
        """
        try:
            history = pd.read_csv(self.path.parent / rundir.HISTORY_FILE)
            rows = {int(row["epoch"]): row for row in history.to_dict("records")}
        except (OSError, ValueError, KeyError):
            rows = {}
        rows[epoch] = latest
        return [(finished, rows[finished]) for finished in range(self.seen + 1, epoch + 1) if finished in rows]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.report()


def render_html(notebook: Path, target: Path, *, failure: NotebookFailed | None = None, report_code: bool = True) -> Path:
    """Render an executed notebook to a standalone HTML file with its figures embedded."""
    import nbformat
    from nbconvert import HTMLExporter

    node = nbformat.read(str(notebook), as_version=4)
    replace_widget_views(node)
    exporter = HTMLExporter(template_name="lab")
    exporter.exclude_input = not report_code
    exporter.exclude_input_prompt = not report_code
    body, _ = exporter.from_notebook_node(node)
    if failure is not None:
        banner = (
            '<div style="background:#b00020;color:white;padding:1em;font-family:sans-serif">'
            f"<strong>This notebook FAILED</strong> at cell {failure.cell_index}: {html.escape(failure.error)}. "
            "The outputs below stop at that cell.</div>"
        )
        position = body.find(">", body.find("<body")) + 1
        body = body[:position] + banner + body[position:]
    rundir.atomic_write_bytes(target, body.encode("utf-8"))
    return target


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = (
    '<p class="cellnb-widget-note" style="font-style:italic;color:#555">Interactive widget: open the notebook '
    "in JupyterLab to use it. The figure below shows the same view as a static image.</p>"
)


def replace_widget_views(node) -> int:
    """Replace every widget output of a notebook node by a short note, and drop the saved widget state.

    Rendering widgets in HTML needs the widget manager JavaScript from a CDN, which a report
    opened offline cannot load, so the report would show an empty box. The notebooks put a
    static figure after each widget instead. Returns the number of outputs replaced.
    """
    node.metadata.pop("widgets", None)
    replaced = 0
    for cell in node.cells:
        for output in cell.get("outputs", []):
            if WIDGET_VIEW in output.get("data", {}):
                output["data"] = {"text/html": WIDGET_NOTE}
                replaced += 1
    return replaced


def write_index(run_dir: Path, results: list[NotebookResult], *, skipped_by_interrupt: bool = False) -> Path:
    """Write ``reports/index.html``: the run's key numbers and links to the three reports.

    With ``skipped_by_interrupt``, the notebooks missing from ``results`` were skipped after a
    Ctrl-C, and their state explains how to run them.
    """
    rows = []
    for name in NOTEBOOKS:
        result = next((item for item in results if item.name == name), None)
        if result is None:
            state = "not run"
            if skipped_by_interrupt:
                state = f"not run: skipped after Ctrl-C; run it with cellnb run --resume {Path(run_dir)}"
            link = html.escape(TITLES[name])
        else:
            state = "FAILED" if result.failed else result.state or f"finished in {result.seconds:.0f} s"
            link = f'<a href="{name}.html">{html.escape(TITLES[name])}</a>'
            if result.state is not None and not result.report.is_file():
                link = html.escape(TITLES[name])
        rows.append(f"<tr><td>{name}</td><td>{link}</td><td>{html.escape(state)}</td></tr>")

    body = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>cellnb run {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{padding:.3em .8em;text-align:left}}
table{{border-collapse:collapse}}tr:nth-child(even){{background:#f3f3f3}}</style></head>
<body><h1>cellnb run <code>{html.escape(run_dir.name)}</code></h1>
{key_numbers_html(run_dir)}
{history_figure_html(run_dir)}
<h2>Reports</h2><table><tr><th>notebook</th><th>report</th><th>state</th></tr>{''.join(rows)}</table>
<p>Run directory: <code>{html.escape(str(run_dir))}</code></p></body></html>
"""
    target = run_dir / REPORTS_FOLDER / "index.html"
    rundir.atomic_write_bytes(target, body.encode("utf-8"))
    return target


def resumed_training_result(run_dir: str | Path, *, resumed_after: int, seconds: float) -> NotebookResult:
    """Describe, for ``index.html``, how ``cellnb run --resume`` finished the training of notebook 01 outside it.

    ``resumed_after`` is the epoch the training continued from (0 when it started over). The
    notebook's report, if any, stays as its interrupted or earlier execution rendered it.
    """
    run_dir = Path(run_dir)
    epochs = key_numbers(run_dir).get("epochs", 0)
    report = run_dir / REPORTS_FOLDER / "01_train.html"
    if resumed_after >= epochs:
        state = f"all {epochs} epochs were trained before this --resume, which trained none"
        report_note = "the linked report is from the notebook's earlier execution"
    elif resumed_after == 0:
        state = (f"trained again from epoch 1 to {epochs} by cellnb run --resume, outside the notebook, "
                 f"because no finished epoch had a checkpoint")
        report_note = "the linked report is from the notebook's interrupted execution"
    else:
        state = (f"resumed after epoch {resumed_after}: epochs {resumed_after + 1} to {epochs} were trained by "
                 f"cellnb run --resume, outside the notebook")
        report_note = (f"the linked report is from the notebook's execution before the interruption, "
                       f"so it shows no epoch after {resumed_after}")
    state += f"; {report_note}" if report.is_file() else "; the notebook left no report"
    return NotebookResult("01_train", run_dir / NOTEBOOKS_FOLDER / "01_train.ipynb", report, seconds, state=state)


def stopped_training_state(run_dir: Path, values: dict) -> str | None:
    """Return the index's state of notebook 01 when Ctrl-C ended its training early, or None if every epoch ran.

    ``values`` are the run's parameters; missing ones take their declared defaults.
    """
    planned = parameters.planned_epochs(values)
    trained = key_numbers(run_dir).get("epochs", 0)
    if trained >= planned:
        return None
    return (f"stopped by Ctrl-C after epoch {trained} of {planned}; "
            f"continue with cellnb run --resume {Path(run_dir)}")


def mark_progress_stopped(run_dir: Path) -> None:
    """Set ``progress.json``'s state to ``stopped`` after training was aborted without its callbacks' last write."""
    from cellnb.recorder import json_or_empty

    path = Path(run_dir) / rundir.PROGRESS_FILE
    progress = json_or_empty(path)
    if progress:
        rundir.write_json(path, {**progress, "state": "stopped"})


def key_numbers(run_dir: Path) -> dict:
    """Return final and best validation loss and accuracy and the epoch of minimum loss from ``history.csv``."""
    history_path = Path(run_dir) / rundir.HISTORY_FILE
    if not history_path.is_file():
        return {}
    history = pd.read_csv(history_path)
    if history.empty:
        return {}
    best = history.loc[history["val_loss"].idxmin()]
    last = history.iloc[-1]
    return {
        "epochs": int(last["epoch"]),
        "final_val_loss": float(last["val_loss"]),
        "final_val_accuracy": float(last["val_accuracy"]),
        "min_val_loss": float(best["val_loss"]),
        "min_val_loss_epoch": int(best["epoch"]),
        "val_accuracy_at_min_loss": float(best["val_accuracy"]),
        "best_val_accuracy": float(history["val_accuracy"].max()),
    }


def key_numbers_html(run_dir: Path) -> str:
    numbers = key_numbers(run_dir)
    if not numbers:
        return "<p>No finished epoch yet: history.csv is missing or empty.</p>"
    scored = _scored_class(run_dir)
    rows = [
        ("epochs trained", numbers["epochs"]),
        ("final validation loss", f"{numbers['final_val_loss']:.4f}"),
        ("minimum validation loss", f"{numbers['min_val_loss']:.4f} at epoch {numbers['min_val_loss_epoch']}"),
        ("final / minimum validation loss", f"{numbers['final_val_loss'] / numbers['min_val_loss']:.2f}"),
        ("final validation accuracy", f"{numbers['final_val_accuracy']:.4f}"),
        ("validation accuracy at minimum loss", f"{numbers['val_accuracy_at_min_loss']:.4f}"),
        ("best validation accuracy", f"{numbers['best_val_accuracy']:.4f}"),
        ("scored class (index 1)", scored),
    ]
    table = "".join(f"<tr><th>{html.escape(label)}</th><td>{html.escape(str(value))}</td></tr>" for label, value in rows)
    return f"<h2>Key numbers</h2><table>{table}</table>{top_contributors_html(run_dir)}"


def history_figure_html(run_dir: Path) -> str:
    """Return the loss and accuracy curves of ``history.csv`` as an embedded PNG, or "" without history."""
    import base64
    import io

    from cellnb import plots

    history_path = Path(run_dir) / rundir.HISTORY_FILE
    if not history_path.is_file():
        return ""
    history = pd.read_csv(history_path)
    if history.empty or history["val_loss"].isna().all():
        return ""
    buffer = io.BytesIO()
    plots.plot_history(history).savefig(buffer, format="png", dpi=72)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (
        '<h2>Curves</h2><img alt="training and validation loss and accuracy per epoch" '
        f'style="max-width:100%" src="data:image/png;base64,{encoded}">'
    )


def top_contributors_html(run_dir: Path, count: int = 5) -> str:
    path = Path(run_dir) / "loss_contributions.csv"
    if not path.is_file():
        return ""
    table = pd.read_csv(path).sort_values("contribution", ascending=False).head(count)
    rows = "".join(
        f"<tr><td><code>{html.escape(str(row.sample_id))}</code></td><td>{row.loss_from:.3f}</td>"
        f"<td>{row.loss_to:.3f}</td><td>{row.contribution:+.4f}</td><td>{html.escape(str(row.category))}</td></tr>"
        for row in table.itertuples()
    )
    first = table.iloc[0] if len(table) else None
    caption = f" (epoch {int(first.epoch_from)} to {int(first.epoch_to)})" if first is not None else ""
    return (
        f"<h2>Top contributors to the validation loss change{caption}</h2><table><tr><th>sample</th>"
        f"<th>loss before</th><th>loss after</th><th>contribution</th><th>category</th></tr>{rows}</table>"
        f"{_loss_cap_note(table)}"
    )


def _loss_cap_note(table: pd.DataFrame) -> str:
    """Explain the largest possible loss when the table shows it, so that it does not read as a coincidence."""
    from cellnb.explain import EPSILON

    cap = -math.log(EPSILON)
    losses = pd.concat([table["loss_from"], table["loss_to"]])
    if not (losses >= cap - 1e-3).any():
        return ""
    return (
        f"<p>A loss of {cap:.3f} is the largest one possible: like Keras, cellnb clips the probability of the true "
        f"class to at least {EPSILON:g}, so a sample given probability 0 for its true class has loss "
        f"-ln({EPSILON:g}) = {cap:.3f}, however confidently it is wrong.</p>"
    )


def _scored_class(run_dir: Path) -> str:
    try:
        config = json.loads((Path(run_dir) / rundir.CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "unknown"
    return str(config.get("classes", ["negative", "positive"])[1])


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in str(text).splitlines())
