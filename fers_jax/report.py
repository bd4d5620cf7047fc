"""A short report of an evaluation that a person can open: report.md and report.html.

Both are made from results.json and the figures beside it, so the table in
the report is exactly the one in the results.
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


def _markdown(results: dict, figs: dict) -> str:
    mean = _fmt(results["mean_auc"])
    lines = [f"# {_title(results)}", "",
             f"Device: {results['device']}. Mean AUC over "
             f"{results.get('scored_scenes', 0)} scored scenes: **{mean}**.", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(results)]
    for key, caption in (("roc", "ROC curves"), ("box", "Score distributions")):
        if figs[key]:
            lines += ["", f"## {caption}", "", f"![{caption}]({figs[key]})"]
    if figs["maps"]:
        lines += ["", "## Detection maps beside the ground truth", ""]
        lines += [f"![{name}]({path})" for name, path in figs["maps"].items()]
    return "\n".join(lines) + "\n"


def _html(results: dict, figs: dict) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>\n"
                   for row in _rows(results))
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{esc(_title(results))}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em}"
        "img{max-width:100%}</style>", "</head>", "<body>",
        f"<h1>{esc(_title(results))}</h1>",
        f"<p>Device: {esc(results['device'])}. Mean AUC over "
        f"{results.get('scored_scenes', 0)} scored scenes: "
        f"<strong>{esc(_fmt(results['mean_auc']))}</strong>.</p>",
        f'<table id="results"><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>']
    for key, caption in (("roc", "ROC curves"), ("box", "Score distributions")):
        if figs[key]:
            parts += [f"<h2>{caption}</h2>", f'<img src="{esc(figs[key])}" alt="{caption}">']
    if figs["maps"]:
        parts.append("<h2>Detection maps beside the ground truth</h2>")
        parts += [f'<figure><img src="{esc(p)}" alt="{esc(n)}"><figcaption>{esc(n)}'
                  "</figcaption></figure>" for n, p in figs["maps"].items()]
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


def write_report(out, results: dict) -> None:
    """Writes out/report.md and out/report.html (and out/boxplots.png)."""
    out = pathlib.Path(out)
    figs = _figures(out, results)
    (out / "report.md").write_text(_markdown(results, figs), encoding="utf-8")
    (out / "report.html").write_text(_html(results, figs), encoding="utf-8")
