"""report.html is valid HTML, its images exist, its table equals results.json."""

import html.parser
import json

import numpy as np

import evaluate
from fers_jax import cli


class Page(html.parser.HTMLParser):
    """Collects images, table cells and checks that tags nest properly."""
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.rows, self.errors = [], [], [], []
        self.in_cell = False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self.rows[-1].append("")
            self.in_cell = True
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unbalanced </{tag}>")
        self.in_cell = False if tag in ("td", "th") else self.in_cell

    def handle_data(self, data):
        if self.in_cell:
            self.rows[-1][-1] += data


def test_report_html_renders_the_results(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        gt = np.zeros((20, 20), np.uint8)
        gt[5 + i, 5:8] = 1
        cube = rng.random((20, 20, 8))
        cube[gt == 1] += 2.0
        np.savez(tmp_path / f"scene{i}.npz", data=cube, gt=gt)
    np.savez(tmp_path / "blank.npz", data=rng.random((20, 20, 8)), gt=np.zeros((20, 20)))
    out = tmp_path / "out"
    assert cli.run(evaluate.main, ["--scenes", str(tmp_path), "--out", str(out),
                                   "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    page = Page()
    text = (out / "report.html").read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    page.feed(text)
    page.close()
    assert not page.errors and not page.stack
    assert page.images and all((out / src).is_file() for src in page.images)
    assert len(page.images) == 2 + len(results["scenes"])  # ROC, box plots, maps
    header, *rows = page.rows
    assert header[:3] == ["scene", "H x W x B", "AUC"]
    assert len(rows) == len(results["scenes"])
    for row, scene in zip(rows, results["scenes"]):
        assert row[0] == scene["name"]
        assert row[2] == ("-" if scene["auc"] is None else f"{scene['auc']:.4f}")
    assert "no anomaly" in rows[0][-1]  # blank.npz comes first by name
    assert (out / "report.md").read_text().count("\n| ") == 1 + len(rows)
