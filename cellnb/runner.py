"""Execute the three notebooks with papermill into a run directory and render them to HTML.

A notebook counts as successful only if papermill ran every cell without an error; a failure
stops the sequence, still renders the partial notebook (marked failed at its top) and raises
``NotebookFailed`` with the failing cell's source and error.
"""

from __future__ import annotations

import html
import json
import logging
import threading
import time
from collections.abc import Callable
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
    name: str
    notebook: Path
    report: Path
    seconds: float
    failed: NotebookFailed | None = None


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
) -> list[NotebookResult]:
    """Run 01, 02 and 03 in order; each receives the parameters it declares from ``values``."""
    import papermill

    run_dir = Path(run_dir).resolve()
    notebooks_dir = Path(notebooks_dir or default_notebooks_dir())
    (run_dir / NOTEBOOKS_FOLDER).mkdir(parents=True, exist_ok=True)
    (run_dir / REPORTS_FOLDER).mkdir(parents=True, exist_ok=True)
    results = []
    for name in NOTEBOOKS:
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
        failure = None
        try:
            papermill.execute_notebook(
                str(source), str(output), parameters=notebook_values, kernel_name=kernel_name,
                progress_bar=False, cwd=str(run_dir), request_save_on_cell_execute=True,
            )
        except papermill.PapermillExecutionError as error:
            failure = NotebookFailed(name, error.exec_count, error.source, f"{error.ename}: {error.evalue}")
        finally:
            if watcher is not None:
                watcher.stop()

        report = render_html(output, run_dir / REPORTS_FOLDER / f"{name}.html", failure=failure, report_code=report_code)
        result = NotebookResult(name, output, report, time.time() - started, failure)
        results.append(result)
        echo(f"{'FAILED' if failure else 'finished'} {name}.ipynb in {result.seconds:.0f} s -> {report}")
        if failure is not None:
            write_index(run_dir, results)
            raise failure
    write_index(run_dir, results)
    return results


class ProgressWatcher:
    """Poll ``progress.json`` in a thread while papermill runs and echo each finished epoch once."""

    def __init__(self, run_dir: Path, echo: Callable[[str], None], interval: float = 1.0):
        from cellnb.recorder import format_progress, json_or_empty

        self._format, self._read = format_progress, json_or_empty
        self.path = Path(run_dir) / rundir.PROGRESS_FILE
        self.echo = echo
        self.interval = interval
        self.seen = self._read(self.path).get("epoch", 0) if self.path.exists() else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._report()

    def _report(self) -> None:
        progress = self._read(self.path)
        epoch = int(progress.get("epoch", 0) or 0)
        if epoch > self.seen and progress.get("metrics"):
            self.seen = epoch
            self.echo("  " + self._format(epoch, int(progress.get("epochs", epoch)), progress["metrics"]))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._report()


def render_html(notebook: Path, target: Path, *, failure: NotebookFailed | None = None, report_code: bool = True) -> Path:
    """Render an executed notebook to a standalone HTML file with its figures embedded."""
    import nbformat
    from nbconvert import HTMLExporter

    node = nbformat.read(str(notebook), as_version=4)
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


def write_index(run_dir: Path, results: list[NotebookResult]) -> Path:
    """Write ``reports/index.html``: the run's key numbers and links to the three reports."""
    rows = []
    for name in NOTEBOOKS:
        result = next((item for item in results if item.name == name), None)
        if result is None:
            state = "not run"
            link = html.escape(TITLES[name])
        else:
            state = "FAILED" if result.failed else f"finished in {result.seconds:.0f} s"
            link = f'<a href="{name}.html">{html.escape(TITLES[name])}</a>'
        rows.append(f"<tr><td>{name}</td><td>{link}</td><td>{state}</td></tr>")

    body = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>cellnb run {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{padding:.3em .8em;text-align:left}}
table{{border-collapse:collapse}}tr:nth-child(even){{background:#f3f3f3}}</style></head>
<body><h1>cellnb run <code>{html.escape(run_dir.name)}</code></h1>
{key_numbers_html(run_dir)}
<h2>Reports</h2><table><tr><th>notebook</th><th>report</th><th>state</th></tr>{''.join(rows)}</table>
<p>Run directory: <code>{html.escape(str(run_dir))}</code></p></body></html>
"""
    target = run_dir / REPORTS_FOLDER / "index.html"
    rundir.atomic_write_bytes(target, body.encode("utf-8"))
    return target


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
    )


def _scored_class(run_dir: Path) -> str:
    try:
        config = json.loads((Path(run_dir) / rundir.CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "unknown"
    return str(config.get("classes", ["negative", "positive"])[1])


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in str(text).splitlines())
