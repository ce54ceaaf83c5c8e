"""Small Dash views: tables, notes, links, progress bars. All text is passed as text children
(Dash escapes it), never as HTML."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dash import dcc, html

Cell = Callable[[dict[str, Any]], Any]


def fmt(value: Any) -> str:
    """A compact cell string: floats to 4 significant digits, None to an empty cell."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str | Cell]], *,
          table_id: str | None = None, empty: str = "nothing here yet") -> html.Div | html.Table:
    """An HTML table; each column is (header, key or a function of the row returning a component)."""
    if not rows:
        return note(empty)
    head = html.Thead(html.Tr([html.Th(h) for h, _ in columns]))
    body = html.Tbody([html.Tr([html.Td(c(row) if callable(c) else fmt(row.get(c))) for _, c in columns])
                       for row in rows])
    kwargs = {"id": table_id} if table_id else {}
    return html.Table([head, body], className="pie-table", **kwargs)


def note(text: str, kind: str = "info") -> html.Div:
    """A one-line message box (kind: info, warning, error)."""
    return html.Div(text, className=f"pie-note pie-note-{kind}")


def error_note(err: Exception) -> html.Div:
    return note(str(err), "error")


def progress_bar(fraction: float, status: str, *, bar_id: dict[str, Any] | str | None = None) -> html.Div:
    """A progress bar whose label reads e.g. "57%" (status decides the colour)."""
    pct = max(0.0, min(1.0, float(fraction or 0.0))) * 100
    kwargs = {"id": bar_id} if bar_id is not None else {}
    return html.Div(html.Div(f"{pct:.0f}%", className=f"pie-progress-fill pie-status-{status}",
                             style={"width": f"{max(pct, 6):.0f}%"}), className="pie-progress", **kwargs)


def link(text: str, href: str, **kwargs: Any) -> dcc.Link:
    return dcc.Link(text, href=href, **kwargs)


def graphs_label(keys: list[str]) -> str:
    """The computed graphs of a circuit in words. Its keys are "all" and prompt indices (with
    "@logit" for graphs of the answer logit), so a graph of prompt 0 alone used to read
    "graphs 0", as if there were none."""
    if not keys:
        return "none"

    def words(group: list[str], suffix: str = "") -> list[str]:
        prompts = sorted(int(k) for k in group if k != "all")
        parts = (["all prompts"] if "all" in group else []) + \
            ([("prompt " if len(prompts) == 1 else "prompts ") + ", ".join(map(str, prompts))] if prompts else [])
        return [part + suffix for part in parts]

    metric = [k for k in keys if "@" not in k]
    logit = [k.partition("@")[0] for k in keys if "@" in k]
    return f"{len(keys)}: " + "; ".join(words(metric) + words(logit, " (logit)"))
