"""A short report of an evaluation that a person can open: report.md and report.html.

Both are made from results.json and the figures beside it, so the table in
the report is exactly the one in the results: `write_report` for one
method, `write_comparison_report` for several (evaluation.compare).
"""

import html
import pathlib

from fers_jax import plots


def _fmt(value, digits=4):
    return "-" if value is None else f"{value:.{digits}f}"


def _rows(results: dict):
    for r in results["scenes"]:
        yield (r["name"], "x".join(map(str, r["shape"])), _fmt(r["auc"]),
               _fmt(r.get("auc_pd_tau")), _fmt(r.get("auc_pf_tau")),
               _fmt(r["seconds"]), r.get("not_scored", ""))


HEADER = ("scene", "H x W x B", "AUC", "AUC(Pd,tau)", "AUC(Pf,tau)", "seconds", "note")


def _figures(out: pathlib.Path, results: dict) -> dict:
    """Relative paths of the figures that exist, and the box plots made here."""
    figs = {"roc": "roc.png" if (out / "roc.png").exists() else None,
            "maps": {r["name"]: f"maps/{r['name']}.png" for r in results["scenes"]
                     if (out / "maps" / f"{r['name']}.png").exists()}}
    stats = {r["name"]: r["score_stats"] for r in results["scenes"]
             if r.get("score_stats")}
    figs["box"] = None
    if stats:
        plots.save_boxplots(out / "boxplots.png", stats,
                            title=f"{results['method']}: background (blue) vs anomaly (red)")
        figs["box"] = "boxplots.png"
    return figs


def _title(results: dict) -> str:
    bands = results["bands"] if results["bands"] is not None else "all"
    return f"fers_jax evaluation: {results['method']}, {bands} bands"


def _md_table(header, rows, marked=frozenset()) -> list:
    """Markdown table lines; cells at (row, column) in `marked` in bold."""
    cell = lambda i, j, c: f"**{c}**" if (i, j) in marked else c  # noqa: E731
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(cell(i, j, c) for j, c in enumerate(row)) + " |"
               for i, row in enumerate(rows)])


def _html_table(header, rows, marked=frozenset()) -> str:
    esc = html.escape
    cell = lambda i, j, c: (f"<td><strong>{esc(c)}</strong></td>"  # noqa: E731
                            if (i, j) in marked else f"<td>{esc(c)}</td>")
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(i, j, c) for j, c in enumerate(row))
                   + "</tr>\n" for i, row in enumerate(rows))
    return (f'<table id="results"><thead><tr>{head}</tr></thead><tbody>\n'
            f"{body}</tbody></table>")


def _html_page(title: str, parts: list) -> str:
    esc = html.escape
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em}"
        "img{max-width:100%}</style>", "</head>", "<body>",
        f"<h1>{esc(title)}</h1>", *parts, "</body>", "</html>"]) + "\n"


def _md_figures(sections) -> list:
    """Markdown for [(caption, {name: path})] sections of figures."""
    lines = []
    for caption, figures in sections:
        if figures:
            lines += ["", f"## {caption}", ""]
            lines += [f"![{name}]({path})" for name, path in figures.items()]
    return lines


def _html_figures(sections) -> list:
    esc = html.escape
    parts = []
    for caption, figures in sections:
        if figures:
            parts.append(f"<h2>{esc(caption)}</h2>")
            parts += [f'<figure><img src="{esc(p)}" alt="{esc(n)}"><figcaption>'
                      f"{esc(n)}</figcaption></figure>" for n, p in figures.items()]
    return parts


def _sections(figs: dict) -> list:
    return [(caption, {caption: figs[key]} if figs[key] else {})
            for key, caption in (("roc", "ROC curves"),
                                 ("box", "Score distributions"))] + [
        ("Detection maps beside the ground truth", figs["maps"])]


def _markdown(results: dict, figs: dict) -> str:
    mean = _fmt(results["mean_auc"])
    lines = [f"# {_title(results)}", "",
             f"Device: {results['device']}. Mean AUC over "
             f"{results.get('scored_scenes', 0)} scored scenes: **{mean}**.", ""]
    lines += _md_table(HEADER, list(_rows(results)))
    lines += _md_figures(_sections(figs))
    return "\n".join(lines) + "\n"


def _html(results: dict, figs: dict) -> str:
    esc = html.escape
    return _html_page(_title(results), [
        f"<p>Device: {esc(results['device'])}. Mean AUC over "
        f"{results.get('scored_scenes', 0)} scored scenes: "
        f"<strong>{esc(_fmt(results['mean_auc']))}</strong>.</p>",
        _html_table(HEADER, list(_rows(results)))] + _html_figures(_sections(figs)))


def write_report(out, results: dict) -> None:
    """Writes out/report.md and out/report.html (and out/boxplots.png)."""
    out = pathlib.Path(out)
    figs = _figures(out, results)
    (out / "report.md").write_text(_markdown(results, figs), encoding="utf-8")
    (out / "report.html").write_text(_html(results, figs), encoding="utf-8")


# --- Several methods: one comparison ------------------------------------------

def comparison_table(results: dict):
    """(header, rows, marked) of the comparison: a row per scene and a mean
    row, a column per method; `marked` holds the (row, column) cells of
    each row's best AUC."""
    methods = results["methods"]
    header = ("scene", *methods)
    rows, marked = [], set()
    lines = [(r["name"], r["auc"], r["best"]) for r in results["scenes"]]
    lines.append(("mean", results["mean_auc"], results["best_mean"]))
    for i, (name, aucs, best) in enumerate(lines):
        rows.append((name, *(_fmt(aucs[m]) for m in methods)))
        marked |= {(i, 1 + j) for j, m in enumerate(methods) if m in best}
    return header, rows, marked


def _comparison_figures(out: pathlib.Path, results: dict) -> list:
    names = [r["name"] for r in results["scenes"]]
    return [(caption, {n: f"{folder}/{n}.png" for n in names
                       if (out / folder / f"{n}.png").exists()})
            for folder, caption in (("roc", "ROC curves per scene"),
                                    ("maps", "Detection maps side by side"))]


def write_comparison_report(out, results: dict) -> None:
    """Writes out/report.md and out/report.html of a comparison
    (evaluation.compare): the AUC table with each row's best in bold and
    a mean row, the per-scene ROC curves and maps."""
    out = pathlib.Path(out)
    title = f"fers_jax comparison: {', '.join(results['methods'])}"
    intro = (f"Device: {results['device']}. ROC AUC per scene; the best of "
             "each row in bold; mean over each method's scored scenes.")
    header, rows, marked = comparison_table(results)
    sections = _comparison_figures(out, results)
    md = [f"# {title}", "", intro, ""] + _md_table(header, rows, marked)
    md += _md_figures(sections)
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    page = _html_page(title, [f"<p>{html.escape(intro)}</p>",
                              _html_table(header, rows, marked)]
                      + _html_figures(sections))
    (out / "report.html").write_text(page, encoding="utf-8")
