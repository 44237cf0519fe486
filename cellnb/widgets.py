"""Interactive views of a run for JupyterLab: an epoch explorer and a sample browser, on ipywidgets.

The widgets only wire controls to numbers from ``cellnb.explain`` and ``cellnb.inspection`` and
to figures from ``cellnb.plots``. Each view is drawn as a PNG into an ``ipywidgets.Image``.
``static_figure()`` returns the same view as a matplotlib Figure for a few epochs or samples, so
a rendered report shows the pictures even where widget JavaScript does not load.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import ipywidgets
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cellnb import explain, inspection, plots
from cellnb.errors import ParameterError
from cellnb.rundir import Run

logger = logging.getLogger(__name__)

ALL = "all"
"""Value of the class and category filters that keeps every sample."""

SPLIT_AUDIT_FILE = "split_audit.json"

SORT_KEYS = {
    "contribution": (["contribution"], [False]),
    "final probability": (["probability_last"], [False]),
    "label-error score": (["label_issue_score"], [False]),
    "split audit flags": (["audit_flagged", "contribution"], [False, False]),
}
"""Orders of ``SampleBrowser``: the columns sorted on and whether each is ascending."""


# --- the numbers behind the views ------------------------------------------------------------------


def sample_table(run: Run, *, epoch_from: int | None = None, epoch_to: int | None = None,
                 audit_flags: pd.DataFrame | None = None) -> pd.DataFrame:
    """Join per validation sample what the views filter and sort on.

    Columns: ``sample_id, label, label_name, probability_first, probability_last`` and
    ``correct_last`` (from ``inspection.final_probabilities``), ``contribution`` and ``category``
    (from ``explain.decompose_loss_change`` between the epochs ``explain.resolve_epochs`` picks),
    ``label_issue_score`` and ``is_label_issue`` (from ``explain.rank_label_issues``),
    ``audit_flags`` (the reasons of the split audit, empty when none) and ``audit_flagged``.
    A run with one epoch has no category or contribution, and a run whose validation split has one
    class has no label-error score: those columns are then empty or NaN.
    """
    table = inspection.final_probabilities(run)
    table = table.merge(_contributions(run, epoch_from, epoch_to), on="sample_id", how="left")
    table = table.merge(_label_issues(run), on="sample_id", how="left")

    flags = _flags_by_sample(audit_flags)
    table["audit_flags"] = [flags.get(sample_id, "") for sample_id in table["sample_id"]]
    table["audit_flagged"] = table["audit_flags"] != ""
    table["category"] = table["category"].fillna("")
    table["is_label_issue"] = table["is_label_issue"].astype("boolean").fillna(False).astype(bool)
    return table


def _contributions(run: Run, epoch_from: int | None, epoch_to: int | None) -> pd.DataFrame:
    if len(run.history) < 2:
        logger.info("the run has one epoch, so samples get no loss-change category")
        return pd.DataFrame({"sample_id": pd.Series(dtype=str), "contribution": pd.Series(dtype=float),
                             "category": pd.Series(dtype=str)})
    epoch_from, epoch_to = explain.resolve_epochs(run.history, epoch_from, epoch_to)
    decomposition = explain.decompose_loss_change(run.trajectories, epoch_from, epoch_to)
    return decomposition[["sample_id", "contribution", "category"]]


def _label_issues(run: Run) -> pd.DataFrame:
    try:
        ranked = explain.rank_label_issues(*explain.probabilities_for_label_issues(run.trajectories, run.history))
    except ParameterError as error:
        logger.info("no label-error score: %s", error)
        return pd.DataFrame({"sample_id": pd.Series(dtype=str), "label_issue_score": pd.Series(dtype=float),
                             "is_label_issue": pd.Series(dtype=bool)})
    return ranked[["sample_id", "label_issue_score", "is_label_issue"]]


def _flags_by_sample(audit_flags: pd.DataFrame | None) -> dict[str, str]:
    if audit_flags is None or audit_flags.empty:
        return {}
    missing = {"sample_id", "reasons"} - set(audit_flags.columns)
    if missing:
        raise ParameterError(f"audit_flags lacks the columns {sorted(missing)}; pass AuditReport.leaked or "
                             f"read_audit_flags(run_dir)")
    return {str(row.sample_id): str(row.reasons) for row in audit_flags.itertuples()}


def read_audit_flags(run_dir: str | Path) -> pd.DataFrame | None:
    """Read the leaked samples of ``split_audit.json`` (written by notebook 02), or None when it is absent."""
    path = Path(run_dir) / SPLIT_AUDIT_FILE
    if not path.is_file():
        return None
    leaked = json.loads(path.read_text(encoding="utf-8")).get("leaked_samples", [])
    return pd.DataFrame(leaked, columns=["sample_id", "split", "reasons"])


def filter_samples(table: pd.DataFrame, *, class_name: str = ALL, category: str = ALL) -> pd.DataFrame:
    """Keep the rows of ``sample_table`` of one class (by name) and one category; ``"all"`` keeps every row."""
    if class_name != ALL:
        table = table[table["label_name"] == class_name]
    if category != ALL:
        table = table[table["category"] == category]
    return table


def epoch_view(run: Run, sample_ids: Iterable[str], epoch: int, *, bins: int = 10) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return the per-sample probability and cross-entropy at ``epoch``, and the reliability table of those samples.

    The first table has ``sample_id, label, probability, loss``, in the order of ``sample_ids``.
    The reliability table is ``explain.reliability_table``, empty when no sample is given.
    """
    trajectories = run.trajectories
    position = {sample_id: index for index, sample_id in enumerate(np.asarray(trajectories.sample_ids, dtype=str))}
    columns = [position[str(sample_id)] for sample_id in sample_ids]
    probabilities = explain.probabilities_at_epoch(trajectories, epoch)[columns]
    labels = np.asarray(trajectories.labels, dtype=np.int64)[columns]

    view = pd.DataFrame({
        "sample_id": np.asarray(trajectories.sample_ids, dtype=str)[columns],
        "label": labels,
        "probability": probabilities,
        "loss": explain.cross_entropy(probabilities, labels),
    })
    if not columns:
        return view, explain.reliability_table([0.5], [0], bins=bins).assign(count=0)
    return view, explain.reliability_table(probabilities, labels, bins=bins)


def figure_png(figure: Figure, *, dpi: int = 80) -> bytes:
    """Render a Figure to PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


# --- widgets ---------------------------------------------------------------------------------------


class _Filters:
    """The class and category dropdowns shared by both widgets."""

    def __init__(self, table: pd.DataFrame, classes: list[str]):
        categories = [category for category in explain.CATEGORIES if category in set(table["category"])]
        self.class_filter = ipywidgets.Dropdown(options=[ALL, *classes], value=ALL, description="class")
        self.category_filter = ipywidgets.Dropdown(options=[ALL, *categories], value=ALL, description="category",
                                                   disabled=not categories)

    @property
    def controls(self) -> list[ipywidgets.Widget]:
        return [self.class_filter, self.category_filter]

    def apply(self, table: pd.DataFrame) -> pd.DataFrame:
        return filter_samples(table, class_name=self.class_filter.value, category=self.category_filter.value)

    def observe(self, handler) -> None:
        for control in self.controls:
            control.observe(handler, names="value")


class EpochExplorer(ipywidgets.VBox):
    """An epoch slider with class and category filters, redrawing three panels for the chosen epoch.

    The panels are the probability trajectories up to the epoch, the histogram of per-sample
    cross-entropy at the epoch and the reliability diagram at the epoch, for the samples the
    filters keep. ``figure`` is the Figure drawn last and ``image.value`` its PNG bytes.

    Examples
    --------
    >>> explorer = EpochExplorer(load_run("outputs/demo"))   # doctest: +SKIP
    >>> explorer.slider.value = 3                            # doctest: +SKIP
    """

    def __init__(self, run: Run, *, epoch_from: int | None = None, epoch_to: int | None = None, bins: int = 10,
                 epoch: int | None = None):
        self.run = run
        self.bins = bins
        self.table = sample_table(run, epoch_from=epoch_from, epoch_to=epoch_to)
        self.epochs = [int(value) for value in run.trajectories.epochs]
        if epoch is not None and epoch not in self.epochs:
            raise ParameterError(f"epoch={epoch!r} is not a recorded epoch; choose one of {self.epochs}")
        self.epoch_from, self.epoch_to = _compared_epochs(run, epoch_from, epoch_to)

        self.slider = ipywidgets.SelectionSlider(options=self.epochs, value=epoch or self.epochs[-1],
                                                 description="epoch", continuous_update=False)
        self.filters = _Filters(self.table, run.classes)
        self.image = ipywidgets.Image(format="png", layout=ipywidgets.Layout(width="100%", max_width="1200px"))
        self.figure: Figure | None = None
        super().__init__([ipywidgets.HBox([self.slider, *self.filters.controls]), self.image])

        self.slider.observe(self.redraw, names="value")
        self.filters.observe(self.redraw)
        self.redraw()

    def selected_sample_ids(self) -> list[str]:
        return list(self.filters.apply(self.table)["sample_id"])

    def redraw(self, change=None) -> None:
        epoch = int(self.slider.value)
        views = {epoch: epoch_view(self.run, self.selected_sample_ids(), epoch, bins=self.bins)}
        self.figure = plots.plot_epoch_views(self.run.trajectories, views, classes=self.run.classes)
        self.image.value = figure_png(self.figure)

    def static_figure(self, epochs: Iterable[int] | None = None) -> Figure:
        """Draw the three panels for several epochs, one row each, with the current filters.

        By default the epochs are the first, ``epoch_from`` and ``epoch_to`` (the epoch of lowest
        validation loss and the last, unless given), without repeats.
        """
        chosen = sorted(set(epochs)) if epochs is not None else sorted({self.epochs[0], self.epoch_from, self.epoch_to})
        unknown = [epoch for epoch in chosen if epoch not in self.epochs]
        if unknown:
            raise ParameterError(f"epochs {unknown} are not recorded; choose among {self.epochs}")
        sample_ids = self.selected_sample_ids()
        views = {epoch: epoch_view(self.run, sample_ids, epoch, bins=self.bins) for epoch in chosen}
        return plots.plot_epoch_views(self.run.trajectories, views, classes=self.run.classes)


class SampleBrowser(ipywidgets.VBox):
    """A table of validation samples, sortable and filtered, where choosing one shows its image and curves.

    The sort orders are ``SORT_KEYS``: contribution to the loss change, final probability of the
    scored class, label-error score and split-audit flags (flagged samples first). ``select``
    lists the rows in the current order. Choosing one draws the sample's image, its probability
    of the scored class and its cross-entropy per epoch into ``image``.
    """

    def __init__(self, run: Run, *, epoch_from: int | None = None, epoch_to: int | None = None,
                 audit_flags: pd.DataFrame | None = None, rows: int = 12):
        self.run = run
        self.rows = rows
        self.epoch_from, self.epoch_to = _compared_epochs(run, epoch_from, epoch_to)
        if audit_flags is None:
            audit_flags = read_audit_flags(run.run_dir)
        self.table = sample_table(run, epoch_from=epoch_from, epoch_to=epoch_to, audit_flags=audit_flags)

        self.sort = ipywidgets.Dropdown(options=list(SORT_KEYS), value="contribution", description="sort by")
        self.filters = _Filters(self.table, run.classes)
        self.select = ipywidgets.Select(options=[], rows=min(rows, 12), description="sample",
                                        layout=ipywidgets.Layout(width="60em"))
        self.table_html = ipywidgets.HTML()
        self.image = ipywidgets.Image(format="png", layout=ipywidgets.Layout(width="100%", max_width="1000px"))
        self.figure: Figure | None = None
        super().__init__([ipywidgets.HBox([self.sort, *self.filters.controls]), self.table_html, self.select, self.image])

        self.sort.observe(self.refresh, names="value")
        self.filters.observe(self.refresh)
        self.select.observe(self._on_select, names="value")
        self.refresh()

    def sorted_rows(self) -> pd.DataFrame:
        """Return the rows the filters keep, in the chosen order; ties keep the order of ``sample_id``."""
        columns, ascending = SORT_KEYS[self.sort.value]
        rows = self.filters.apply(self.table).sort_values("sample_id")
        return rows.sort_values(columns, ascending=ascending, kind="stable", na_position="last").reset_index(drop=True)

    def refresh(self, change=None) -> None:
        rows = self.sorted_rows()
        self.table_html.value = _table_html(rows.head(self.rows))
        self.select.options = [(_option_text(row), row.sample_id) for row in rows.itertuples()]
        if len(rows):
            self.select.value = rows["sample_id"].iloc[0]
        else:
            self.image.value = b""
            self.figure = None

    def _on_select(self, change) -> None:
        if change["new"] is not None:
            self.show_sample(change["new"])

    def show_sample(self, sample_id: str) -> None:
        self.figure = self._details([sample_id])
        self.image.value = figure_png(self.figure)

    def static_figure(self, count: int = 4) -> Figure:
        """Draw the first ``count`` samples of the current order, one row each, for a static report."""
        rows = self.sorted_rows().head(count)
        if rows.empty:
            raise ParameterError("no sample matches the filters; set the class and category filters to 'all'")
        return self._details(list(rows["sample_id"]))

    def _details(self, sample_ids: list[str]) -> Figure:
        trajectories = explain.sample_trajectories(self.run.trajectories, sample_ids)
        paths = [self.run.data_dir / sample_id for sample_id in sample_ids]
        rows = self.table.set_index("sample_id").loc[sample_ids]
        titles = [f"{Path(sample_id).name}\n{_flags_text(row)}" for sample_id, row in zip(sample_ids, rows.itertuples())]
        return plots.plot_sample_details(trajectories, paths, classes=self.run.classes, titles=titles,
                                         epoch_from=self.epoch_from, epoch_to=self.epoch_to)


def _compared_epochs(run: Run, epoch_from: int | None, epoch_to: int | None) -> tuple[int, int]:
    if len(run.history) < 2:
        only = int(run.trajectories.epochs[-1])
        return only, only
    return explain.resolve_epochs(run.history, epoch_from, epoch_to)


def _flags_text(row) -> str:
    parts = [row.category or "no category"]
    if row.is_label_issue:
        parts.append("likely label error")
    if row.audit_flagged:
        parts.append("audit flag")
    return ", ".join(parts)


def _option_text(row) -> str:
    contribution = "" if pd.isna(row.contribution) else f"  contribution {row.contribution:+.4f}"
    flag = "  [audit]" if row.audit_flagged else ""
    return f"{row.sample_id}  ({row.label_name})  P={row.probability_last:.3f}{contribution}{flag}"


def _table_html(rows: pd.DataFrame) -> str:
    columns = ["sample_id", "label_name", "probability_last", "contribution", "category", "label_issue_score",
               "audit_flags"]
    return rows[columns].to_html(index=False, float_format=lambda value: f"{value:.4f}", na_rep="",
                                 classes="cellnb-samples", border=0)
