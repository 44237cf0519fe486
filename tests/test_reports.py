"""Reports and progress: widget outputs in HTML, reports without code, index.html, and per-epoch progress."""

from __future__ import annotations

import base64
import json
import signal
import time
import types

import nbformat
import numpy as np
import pandas as pd
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from cellnb import recorder, rundir, runner

# A 1x1 PNG, enough for nbconvert to embed an image output.
PIXEL = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)).decode()
WIDGET_STATE = {"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2, "version_minor": 0}}


def write_executed_notebook(path):
    widget = new_output("display_data", data={
        runner.WIDGET_VIEW: {"model_id": "abc", "version_major": 2, "version_minor": 0},
        "text/plain": "EpochExplorer(children=(...))",
    })
    figure = new_output("display_data", data={"image/png": PIXEL, "text/plain": "<Figure>"})
    cell = new_code_cell("explorer = widgets.EpochExplorer(run)  # CODE_MARKER", outputs=[widget, figure],
                         execution_count=1)
    notebook = new_notebook(cells=[new_markdown_cell("# Title of the report"), cell],
                            metadata={"widgets": WIDGET_STATE})
    nbformat.write(notebook, path)
    return path


def test_replace_widget_views_drops_state(tmp_path):
    node = nbformat.read(write_executed_notebook(tmp_path / "n.ipynb"), as_version=4)

    replaced = runner.replace_widget_views(node)

    assert replaced == 1
    assert "widgets" not in node.metadata
    outputs = node.cells[1].outputs
    assert outputs[0]["data"] == {"text/html": runner.WIDGET_NOTE}
    assert outputs[1]["data"]["image/png"] == PIXEL


def test_render_html_embeds_figures_without_widget_scripts(tmp_path):
    notebook = write_executed_notebook(tmp_path / "n.ipynb")

    report = runner.render_html(notebook, tmp_path / "n.html").read_text()

    assert f"data:image/png;base64,{PIXEL}" in report
    assert "Interactive widget: open the notebook in JupyterLab" in report
    assert runner.WIDGET_VIEW not in report
    assert "application/vnd.jupyter.widget-state+json" not in report
    assert "html-manager" not in report
    assert "CODE_MARKER" in report


def test_render_html_without_code(tmp_path):
    notebook = write_executed_notebook(tmp_path / "n.ipynb")

    report = runner.render_html(notebook, tmp_path / "n.html", report_code=False).read_text()

    assert "CODE_MARKER" not in report
    assert "Title of the report" in report
    assert f"data:image/png;base64,{PIXEL}" in report


def write_run_files(run_dir):
    history = pd.DataFrame({"epoch": [1, 2, 3, 4], "loss": [0.7, 0.5, 0.4, 0.3], "accuracy": [0.5, 0.7, 0.8, 0.9],
                            "val_loss": [0.69, 0.52, 0.58, 0.61], "val_accuracy": [0.55, 0.75, 0.8, 0.75]})
    rundir.write_csv(run_dir / rundir.HISTORY_FILE, history)
    rundir.write_json(run_dir / rundir.CONFIG_FILE, {"classes": ["benign", "malignant"]})
    contributions = pd.DataFrame({
        "sample_id": ["valid/a.png", "valid/b.png", "valid/c.png"], "epoch_from": 2, "epoch_to": 4,
        "loss_from": [0.1, 0.3, 0.5], "loss_to": [0.9, 0.2, 0.8], "contribution": [0.2667, -0.0333, 0.1],
        "category": ["wrong_more_confident", "right_more_confident", "right_less_confident"],
    })
    rundir.write_csv(run_dir / "loss_contributions.csv", contributions)


def test_write_index_key_numbers_and_links(tmp_path):
    write_run_files(tmp_path)
    results = [runner.NotebookResult(name, tmp_path / f"{name}.ipynb", tmp_path / f"{name}.html", 12.0)
               for name in runner.NOTEBOOKS]

    index = runner.write_index(tmp_path, results).read_text()

    assert "<th>final validation loss</th><td>0.6100</td>" in index
    assert "<th>minimum validation loss</th><td>0.5200 at epoch 2</td>" in index
    assert "<th>final validation accuracy</th><td>0.7500</td>" in index
    assert "<th>best validation accuracy</th><td>0.8000</td>" in index
    assert "<th>scored class (index 1)</th><td>malignant</td>" in index
    for name in runner.NOTEBOOKS:
        assert f'href="{name}.html"' in index
    assert "(epoch 2 to 4)" in index
    assert index.index("valid/a.png") < index.index("valid/c.png") < index.index("valid/b.png")
    assert index.count('src="data:image/png;base64,') == 1
    assert "largest one possible" not in index  # no shown loss reaches the cap


def test_write_index_explains_loss_cap(tmp_path):
    write_run_files(tmp_path)
    contributions = pd.read_csv(tmp_path / "loss_contributions.csv")
    contributions.loc[0, "loss_to"] = -np.log(1e-7)
    rundir.write_csv(tmp_path / "loss_contributions.csv", contributions)

    index = runner.write_index(tmp_path, []).read_text()

    assert "<td>16.118</td>" in index
    assert "A loss of 16.118 is the largest one possible" in index
    assert "-ln(1e-07) = 16.118" in index


def test_write_index_marks_failed_and_missing(tmp_path):
    failure = runner.NotebookFailed("02_inspect_validation", 3, "1 / 0", "ZeroDivisionError: division by zero")
    results = [runner.NotebookResult("01_train", tmp_path / "a", tmp_path / "a.html", 5.0),
               runner.NotebookResult("02_inspect_validation", tmp_path / "b", tmp_path / "b.html", 1.0, failure)]

    index = runner.write_index(tmp_path, results).read_text()

    assert "No finished epoch yet" in index
    assert "<td>FAILED</td>" in index
    assert "<td>not run</td>" in index
    assert 'href="03_explain_loss.html"' not in index
    assert "<img" not in index


def _index_row(index: str, name: str) -> str:
    start = index.index(f"<tr><td>{name}</td>")
    return index[start:index.index("</tr>", start)]


def test_write_index_shows_resumed_training(tmp_path):
    write_run_files(tmp_path)
    results = [runner.resumed_training_result(tmp_path, resumed_after=2, seconds=30.0),
               runner.NotebookResult("02_inspect_validation", tmp_path / "b", tmp_path / "b.html", 1.0)]

    row = _index_row(runner.write_index(tmp_path, results).read_text(), "01_train")

    assert "not run" not in row
    assert "href=" not in row
    assert ("resumed after epoch 2: epochs 3 to 4 were trained by cellnb run --resume, outside the notebook; "
            "the notebook left no report") in row


def test_write_index_links_report_of_interrupted_training(tmp_path):
    write_run_files(tmp_path)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "01_train.html").write_text("<html></html>")

    resumed = runner.resumed_training_result(tmp_path, resumed_after=1, seconds=30.0)
    row = _index_row(runner.write_index(tmp_path, [resumed]).read_text(), "01_train")
    restarted = runner.resumed_training_result(tmp_path, resumed_after=0, seconds=30.0)
    finished = runner.resumed_training_result(tmp_path, resumed_after=4, seconds=1.0)

    assert 'href="01_train.html"' in row
    assert resumed.state.endswith("the linked report is from the notebook's execution before the interruption, "
                                  "so it shows no epoch after 1")
    assert "so it shows no epoch after 1</td>" in row
    assert restarted.state.startswith("trained again from epoch 1 to 4 by cellnb run --resume")
    assert finished.state == ("all 4 epochs were trained before this --resume, which trained none; "
                              "the linked report is from the notebook's earlier execution")


def test_progress_watcher_echoes_each_epoch(tmp_path):
    lines = []
    watcher = runner.ProgressWatcher(tmp_path, lines.append, interval=0.05)
    progress = recorder.ProgressFile(tmp_path, epochs=3)
    progress.on_train_begin()

    for epoch in range(3):
        progress.on_epoch_end(epoch, {"loss": 0.5 - epoch / 10, "val_loss": 0.6})
        deadline = time.monotonic() + 5
        while len(lines) < epoch + 1 and time.monotonic() < deadline:
            time.sleep(0.02)
    progress.on_train_end()
    watcher.stop()

    assert lines == [f"  epoch {epoch}/3  loss {0.5 - (epoch - 1) / 10:.4f}  val_loss 0.6000" for epoch in (1, 2, 3)]
    written = json.loads((tmp_path / rundir.PROGRESS_FILE).read_text())
    assert written["state"] == "finished"
    assert written["epoch"] == 3


@pytest.mark.parametrize(("planned", "state"), [(10, "stopped"), (2, "finished")])
def test_progress_state_after_stop_request(tmp_path, planned, state):
    # The stop arrives during epoch 2; with 2 epochs planned, the run is complete all the same.
    progress = recorder.ProgressFile(tmp_path, epochs=planned)
    progress.set_model(types.SimpleNamespace(stop_training=False))
    progress.on_train_begin()
    progress.on_epoch_end(0, {"loss": 0.5})
    (tmp_path / rundir.STOP_FILE).write_text("stop requested by Ctrl-C\n")

    progress.on_epoch_end(1, {"loss": 0.4})
    progress.on_train_end()

    written = json.loads((tmp_path / rundir.PROGRESS_FILE).read_text())
    assert progress.model.stop_training is True
    assert written["state"] == state
    assert written["epoch"] == 2


def test_mark_progress_stopped_keeps_epoch_and_metrics(tmp_path):
    rundir.write_json(tmp_path / rundir.PROGRESS_FILE, {"state": "training", "epoch": 7, "epochs": 40, "metrics": {"loss": 0.3}})

    runner.mark_progress_stopped(tmp_path)

    written = json.loads((tmp_path / rundir.PROGRESS_FILE).read_text())
    assert written == {"state": "stopped", "epoch": 7, "epochs": 40, "metrics": {"loss": 0.3}}


def test_progress_watcher_catches_up_on_fast_epochs(tmp_path):
    history = pd.DataFrame({"epoch": [1, 2, 3], "loss": [0.9, 0.8, 0.7], "val_loss": [1.0, 1.1, 1.2]})
    rundir.write_csv(tmp_path / rundir.HISTORY_FILE, history)
    rundir.write_json(tmp_path / rundir.PROGRESS_FILE, {"epoch": 3, "epochs": 5, "metrics": {"loss": 0.7, "val_loss": 1.2}})
    lines = []

    watcher = runner.ProgressWatcher(tmp_path, lines.append, interval=60)
    watcher.seen = 0
    watcher.stop()

    assert lines == [
        "  epoch 1/5  loss 0.9000  val_loss 1.0000",
        "  epoch 2/5  loss 0.8000  val_loss 1.1000",
        "  epoch 3/5  loss 0.7000  val_loss 1.2000",
    ]


def test_interrupt_prints_finished_epochs_first(tmp_path):
    lines = []
    interrupt = runner.StopOnInterrupt(tmp_path, lines.append)
    interrupt.progress = runner.ProgressWatcher(tmp_path, lines.append, interval=60)  # never polls in this test
    interrupt.training = True
    rundir.write_json(tmp_path / rundir.PROGRESS_FILE, {"epoch": 1, "epochs": 5, "metrics": {"loss": 0.7}})

    interrupt._handle(signal.SIGINT, None)
    interrupt.progress.stop()

    assert len(lines) == 2
    assert lines[0] == "  epoch 1/5  loss 0.7000"
    assert lines[1].startswith("interrupt received: training stops after the current epoch")
    assert (tmp_path / rundir.STOP_FILE).is_file()


def test_interrupt_outside_training_says_notebooks_stop(tmp_path):
    lines = []
    interrupt = runner.StopOnInterrupt(tmp_path, lines.append)

    interrupt._handle(signal.SIGINT, None)

    assert lines == ["interrupt received: the current notebook finishes and no later one starts; "
                     "press Ctrl-C again to abort at once"]
    assert interrupt.requested


def test_write_index_names_notebooks_skipped_by_ctrl_c(tmp_path):
    write_run_files(tmp_path)
    results = [runner.NotebookResult("01_train", tmp_path / "a", tmp_path / "01_train.html", 5.0)]

    index = runner.write_index(tmp_path, results, skipped_by_interrupt=True).read_text()

    skipped = f"not run: skipped after Ctrl-C; run it with cellnb run --resume {tmp_path}"
    assert index.count(skipped) == 2
    assert "finished in 5 s" in index


def test_progress_watcher_skips_epochs_done_before_it_started(tmp_path):
    rundir.write_json(tmp_path / rundir.PROGRESS_FILE, {"epoch": 2, "epochs": 4, "metrics": {"loss": 0.4}})
    lines = []

    watcher = runner.ProgressWatcher(tmp_path, lines.append, interval=0.05)
    watcher.stop()

    assert lines == []


@pytest.mark.slow
def test_training_cell_streams_one_line_per_epoch(tiny_synthetic, tmp_path):
    """Run notebook 01's cells in a kernel and check the epoch lines arrive as separate messages, while the cell runs."""
    from jupyter_client.manager import start_new_kernel

    from conftest import PROJECT_ROOT

    notebook = nbformat.read(PROJECT_ROOT / "notebooks" / "01_train.ipynb", as_version=4)
    code = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    training = next(index for index, source in enumerate(code) if "train.train(" in source)
    overrides = (f"data_dir = {str(tiny_synthetic)!r}\nrun_dir = {str(tmp_path / 'run')!r}\n"
                 "epochs = 3\nimage_size = 32\nbatch_size = 8\n")
    setup = "\n".join([code[0], overrides, *code[1:training]])
    manager, client = start_new_kernel(kernel_name="python3", cwd=str(tmp_path))
    try:
        reply = client.execute_interactive(setup, timeout=300)
        assert reply["content"]["status"] == "ok", reply["content"]

        arrivals = []

        def record(message):
            if message["msg_type"] == "stream" and "epoch " in message["content"]["text"]:
                arrivals.append((time.monotonic(), message["content"]["text"]))

        reply = client.execute_interactive(code[training], timeout=300, output_hook=record)
        finished = time.monotonic()
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)

    assert reply["content"]["status"] == "ok", reply["content"]
    texts = [text for _, text in arrivals]
    for epoch in (1, 2, 3):
        assert sum(f"epoch {epoch}/3" in text for text in texts) == 1, texts
    # ipykernel batches stream output for about 0.2 s, so epochs that short can share a message.
    # At least two messages show that the lines stream while the cell runs.
    assert len(arrivals) >= 2
    assert arrivals[0][0] < arrivals[-1][0] < finished
    assert json.loads((tmp_path / "run" / rundir.PROGRESS_FILE).read_text())["epoch"] == 3


def test_stopped_training_state_counts_epochs(tmp_path):
    write_run_files(tmp_path)  # four epochs in history.csv

    stopped = runner.stopped_training_state(tmp_path, {"epochs": 10})
    finished = runner.stopped_training_state(tmp_path, {"epochs": 2, "fine_tune_epochs": 2})

    assert stopped == f"stopped by Ctrl-C after epoch 4 of 10; continue with cellnb run --resume {tmp_path}"
    assert finished is None
