"""One self-contained HTML page to explore surfaces in a browser, offline.

A static PNG answers one question; exploring a surface means turning it in 3-D, reading values
under the cursor and switching between loss and accuracy. This page puts the 3-D surface and
the contour map side by side (1-D files: curves), shows α, β and every quantity of the file
(loss, accuracy, standard errors) on hover, and has selectors for the quantity and, with several
files, for the file.

It must open anywhere — on a cluster's login node, attached to an e-mail, years later — so
plotly's JavaScript is inlined (no CDN) and the numbers are embedded once, as JSON in
``<script type="application/json" id="lsurf-data">`` (not computed / non-finite → ``null``),
from which a small script fills the plots; tests and other tools can read them back from
there too. plotly is optional (``pip install lsurf[html]``) and is imported only here.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from lsurf.engine.evaluation.quantities import is_error
from lsurf.engine.formats.surface_file import CURVE, Surface, View
from lsurf.engine.geometry.levels import color_range
from lsurf.engine.io import atomic_write
from lsurf.errors import UserError
from lsurf.post.compare import grid_text, provenance, short_names
from lsurf.post.plot import comparable_axes, figure_title
from lsurf.post.plot import quantity as _quantity

DATA_ID = "lsurf-data"
PLOT_ID = "lsurf-plot"


def _plotly():
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:
        raise UserError("the HTML page needs plotly: pip install lsurf[html]") from None
    return go, make_subplots


def _choose_quantities(surfaces: list[Surface], quantities: list[str] | None) -> list[str]:
    """The selectable quantities: those asked for, or every non-stderr quantity all files share."""
    if quantities is None:
        common = [n for n in surfaces[0].values if not is_error(n)
                  and all(n in s.values for s in surfaces)]
        if not common:
            raise UserError("`surfaces` share no quantity: pass `quantities` explicitly")
        return common
    if not quantities:
        raise UserError("`quantities` is empty: name at least one, e.g. ['train_loss']")
    for s, name in zip(surfaces, short_names(surfaces)):
        for q in quantities:
            try:
                _quantity(s, q)
            except UserError:
                raise UserError(f"`quantities`: {name} has no {q!r} (it has: {', '.join(s.values)})") from None
    return list(quantities)


def _json_array(a: np.ndarray) -> list:
    """Nested lists with ``None`` for NaN and infinities (JSON has neither)."""
    obj = np.asarray(a, dtype=np.float64).astype(object)
    obj[~np.isfinite(np.asarray(a, dtype=np.float64))] = None
    return obj.tolist()


def page_data(surfaces: list[Surface], quantities: list[str]) -> dict:
    """What the page embeds: per file its grid, every quantity (masked where not done) and colour
    limits. The values are the view's (a coarse-to-fine file filled in, as its plots are); the
    title and ``done`` are the surface's as given."""
    out = []
    for s, name in zip(surfaces, short_names(surfaces)):
        names = list(s.values) + [q for q in quantities if q not in s.values]
        view = s.view("the interactive page")
        values = {n: _quantity(view.surface, n) for n in names}
        ranges: dict[str, list[float] | None] = {}
        for q in quantities:
            try:
                ranges[q] = list(color_range(values[q], None, None, False))
            except UserError:  # nothing computed yet
                ranges[q] = None
        coords = {a: _json_array(axis.coords) for a, axis in zip(("x", "y"), view.plane_axes)}  # a curve: no y
        out.append({"name": name, "path": str(s.path), "title": figure_title(s, name), "provenance": provenance(s),
                    "grid": grid_text(view), "x": coords["x"], "y": coords.get("y"),
                    "done": np.asarray(s.done, dtype=int).tolist(),
                    "values": {n: _json_array(v) for n, v in values.items()}, "ranges": ranges})
    return {"format": "lsurf-page-1", "quantities": quantities, "surfaces": out}


def write_html(surfaces: list[Surface], path: str | Path, quantities: list[str] | None = None,
               refresh: float | None = None) -> Path:
    """Write the page for ``surfaces`` (all 1-D or all 2-D) to ``path``; returns the path. ``refresh``:
    seconds after which the browser reloads it (``lsurf watch`` rewrites it meanwhile)."""
    go, make_subplots = _plotly()
    if not surfaces:
        raise UserError("`surfaces` is empty: give at least one surface")
    views = [s.view("the interactive page") for s in surfaces]
    if len({v.kind for v in views}) > 1:
        raise UserError("`surfaces` mixes 1-D and 2-D files: write one page for each")
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"`path`: folder {str(path.parent)!r} does not exist")
    quantities = _choose_quantities(surfaces, quantities)
    data = page_data(surfaces, quantities)
    fig = _figure(go, make_subplots, views)
    plot = fig.to_html(full_html=False, include_plotlyjs=True, div_id=PLOT_ID, post_script=_SCRIPT,
                       default_width="100%", default_height="82vh", config={"responsive": True})
    page = _page(data, plot, refresh)
    with atomic_write(path, "path") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def _figure(go, make_subplots, views: list[View]):
    """The layout and empty traces; the page's script puts the selected data in."""
    if views[0].kind == CURVE:
        fig = go.Figure([go.Scatter(x=[], y=[], mode="lines+markers", name=n, hovertemplate="%{text}<extra></extra>")
                         for n in short_names([v.surface for v in views])])
        fig.update_layout(xaxis_title="α", hovermode="closest", legend={"orientation": "h", "y": -0.15})
        return fig
    fig = make_subplots(rows=1, cols=2, specs=[[{"type": "surface"}, {"type": "xy"}]],
                        column_widths=[0.55, 0.45], horizontal_spacing=0.06)
    fig.add_trace(go.Surface(x=[], y=[], z=[], colorscale="Viridis", showscale=False,
                             hovertemplate="%{text}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Contour(x=[], y=[], z=[], colorscale="Viridis", contours={"coloring": "fill"},
                             colorbar={"len": 0.9}, hovertemplate="%{text}<extra></extra>",
                             connectgaps=False), row=1, col=2)
    fig.update_layout(scene={"xaxis_title": "α", "yaxis_title": "β", "aspectmode": "cube"},
                      xaxis_title="α", yaxis_title="β", margin={"l": 10, "r": 10, "t": 30, "b": 40})
    if all(comparable_axes(v.x, v.y) for v in views):  # filter-normalised axes: equal lengths look equal
        fig.update_yaxes(scaleanchor="x", scaleratio=1, row=1, col=2)
    return fig


def _page(data: dict, plot: str, refresh: float | None = None) -> str:
    surfaces, quantities = data["surfaces"], data["quantities"]
    blob = json.dumps(data, allow_nan=False, separators=(",", ":")).replace("</", "<\\/")
    files = "".join(f'<option value="{k}">{html.escape(s["name"])} ({html.escape(s["grid"])})</option>'
                    for k, s in enumerate(surfaces))
    options = "".join(f'<option value="{html.escape(q)}">{html.escape(q)}</option>' for q in quantities)
    hide_files = "" if len(surfaces) > 1 and surfaces[0]["y"] is not None else ' style="display:none"'
    reload = "" if refresh is None else f'\n<meta http-equiv="refresh" content="{max(1, round(refresh))}">'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">{reload}
<title>lsurf: {html.escape(", ".join(s["name"] for s in surfaces))}</title>
<style>body{{font-family:sans-serif;margin:0.6em 1em}} header{{display:flex;gap:1.5em;align-items:baseline;
flex-wrap:wrap}} h1{{font-size:1.1em;margin:0}} label{{font-size:0.95em}}</style>
</head><body>
<header><h1 id="lsurf-title">{html.escape(surfaces[0]["title"])}</h1>
<label{hide_files}>file <select id="lsurf-surface">{files}</select></label>
<label>quantity <select id="lsurf-quantity">{options}</select></label></header>
<script type="application/json" id="{DATA_ID}">{blob}</script>
{plot}
</body></html>
"""


# Runs after Plotly.newPlot: fills the traces from the JSON for the selected file and quantity.
# A URL hash such as #surface=1&quantity=test_loss opens a given view (bookmarks, tests).
_SCRIPT = r"""
var gd = document.getElementById('{plot_id}');
var D = JSON.parse(document.getElementById('lsurf-data').textContent);
var selS = document.getElementById('lsurf-surface'), selQ = document.getElementById('lsurf-quantity');
function num(v) { return v === null ? 'not computed' : Number(v).toPrecision(5); }
function hover(s, q, coords, idx) {
  var lines = ['α = ' + num(coords[0])];
  if (coords.length > 1) lines.push('β = ' + num(coords[1]));
  var names = [q].concat(Object.keys(s.values).filter(function (n) { return n !== q; }));
  names.forEach(function (n) {
    var v = s.values[n]; idx.forEach(function (k) { v = v[k]; });
    lines.push((n === q ? '<b>' : '') + n + ' = ' + num(v) + (n === q ? '</b>' : ''));
  });
  return lines.join('<br>');
}
function show() {
  var q = selQ.value, is1d = D.surfaces[0].y === null;
  if (is1d) {
    var xs = [], ys = [], ts = [];
    D.surfaces.forEach(function (s) {
      xs.push(s.x);
      ys.push(s.values[q]);
      ts.push(s.x.map(function (a, i) { return hover(s, q, [a], [i]); }));
    });
    Plotly.restyle(gd, {x: xs, y: ys, text: ts});
    Plotly.relayout(gd, {'yaxis.title.text': q});
    document.getElementById('lsurf-title').textContent = q + ': ' + D.surfaces.map(function (s) {
      return s.name + (s.provenance ? ' (' + s.provenance + ')' : ''); }).join(', ');
  } else {
    var s = D.surfaces[+selS.value], r = s.ranges[q] || [null, null], z = s.values[q];
    var t = s.y.map(function (b, j) { return s.x.map(function (a, i) { return hover(s, q, [a, b], [j, i]); }); });
    Plotly.restyle(gd, {x: [s.x], y: [s.y], z: [z], text: [t], cmin: r[0], cmax: r[1], cauto: r[0] === null}, [0]);
    Plotly.restyle(gd, {x: [s.x], y: [s.y], z: [z], text: [t], zmin: r[0], zmax: r[1], zauto: r[0] === null,
      'colorbar.title.text': q}, [1]);
    Plotly.relayout(gd, {'scene.zaxis.title.text': q});
    document.getElementById('lsurf-title').textContent = s.title;
  }
  gd.setAttribute('data-lsurf-shown', (is1d ? 'all' : selS.value) + ':' + q);
  // the view in the URL: a page that reloads itself (lsurf watch --html) comes back to it
  history.replaceState(null, '', '#surface=' + selS.value + '&quantity=' + encodeURIComponent(q));
}
var want = new URLSearchParams(location.hash.slice(1));
if (want.get('surface') !== null) selS.value = want.get('surface');
if (want.get('quantity') !== null) selQ.value = want.get('quantity');
selS.addEventListener('change', show);
selQ.addEventListener('change', show);
show();
"""
