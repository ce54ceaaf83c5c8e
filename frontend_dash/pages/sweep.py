"""KL-vs-K: a sweep's methods with 95% CI bands on a log-K axis, the random-from-active curve and
the effective compression of each point. /sweep?id=<sweep id> (newest sweep by default)."""

from __future__ import annotations

import dash
from dash import Input, Output, callback, dcc, html

from frontend_dash.api_client import ApiError, current_client
from frontend_dash.components.kl_figure import budget_rows, kl_vs_k_figure, point_rows
from frontend_dash.components.views import error_note, fmt, note, table



def layout(id: str | None = None, **_query: str) -> html.Div:  # noqa: A002
    try:
        sweeps = current_client().sweeps(limit=500)["items"]
    except ApiError as err:
        return html.Div([html.H2("KL vs K"), error_note(err)])
    if not sweeps:
        return html.Div([html.H2("KL vs K"), note("no sweeps stored yet: launch one from Jobs")])
    options = [{"label": f"#{s['id']} {s['model']} / {s['task']}: {', '.join(s['methods'])} (N={s['n_prompts']})",
                "value": s["id"]} for s in sweeps]
    chosen = int(id) if id is not None and str(id).isdigit() else sweeps[0]["id"]
    return html.Div([
        html.H2("KL vs K"),
        dcc.Dropdown(id="sweep-select", options=options, value=chosen, clearable=False),
        dcc.Checklist(id="sweep-random", options=[{"label": " random-from-active curve", "value": "show"}],
                      value=["show"]),
        html.Div(id="sweep-body"),
    ])


@callback(Output("sweep-body", "children"), Input("sweep-select", "value"), Input("sweep-random", "value"))
def show_sweep(sweep_id: int, random_curve: list[str]):
    try:
        sweep = current_client().sweep(sweep_id)
    except ApiError as err:
        return error_note(err)
    result = sweep["result"]
    budgets = budget_rows(result)
    base = budgets[0]["base"] if budgets else "the base method"
    margin = budgets[0].get("margin") if budgets else None
    return html.Div([
        dcc.Graph(id="sweep-figure", figure=kl_vs_k_figure(result, show_random_curve="show" in (random_curve or [])),
                  config={"displaylogo": False}),
        html.P(f"{sweep['transcoder']} · corruption {sweep['corruption']} · mean active occurrences "
               f"{fmt(sweep['n_active_mean'])} · KL with nothing kept {fmt(sweep['kl_none_mean'])}",
               className="pie-meta"),
        html.H3("Points: KL, faithfulness, completeness, effective compression"),
        table(point_rows(result), [("method", "method"), ("K", "k"), ("KL mean", "kl_mean"), ("KL 95% CI", "kl_ci95"),
                                   ("pred. changed", "pred_change_rate"), ("faithfulness", "faithfulness_mean"),
                                   ("completeness", "completeness_mean"),
                                   ("K_random / K", "effective_compression"), ("how K was filled", "selection")],
              table_id="sweep-compression"),
        html.H3("Effective budget (paired TOST)"),
        html.P(f"K': where {base}'s mean-KL curve reaches the method's KL at K; {base} is then run at round(K') and "
               f"at 1.5 K on the same prompts, and each is tested for equivalence with a paired TOST on per-prompt "
               f"KL (margin {fmt(margin)} nats; equivalent when the TOST p < 0.05).", className="pie-meta"),
        table(budgets, [("method", "method"), ("K", "k"), ("KL", "kl_mean"), ("K'", "k_equivalent"),
                        ("base at round(K')", "k_base"), ("its KL", "base_kl_at_k_base"),
                        ("p lower", "p_lower"), ("p upper", "p_upper"), ("TOST p", "p_value"),
                        ("equivalent", "equivalent"), ("base at 1.5 K", "k_claimed"),
                        ("KL at 1.5 K", "base_kl_at_k_claimed"), ("p lower (1.5 K)", "claimed_p_lower"),
                        ("p upper (1.5 K)", "claimed_p_upper"), ("TOST p (1.5 K)", "claimed_p_value"),
                        ("equivalent (1.5 K)", "claimed_equivalent")],
              table_id="sweep-budgets", empty="no effective-budget rows in this sweep"),
    ])


dash.register_page(__name__, path="/sweep", name="KL-vs-K", title="PIEscope — KL vs K", layout=layout)
