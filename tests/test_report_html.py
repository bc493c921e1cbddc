"""report.html (one self-contained page) and the terminal summary, from a small hand-made report (fast, no run)."""

import base64
import html.parser
import os

import numpy as np
import pytest

from hm3_jax.pipeline import report as report_lib
from hm3_jax.pipeline import report_html, report_tables, summary

TASKS = ["translation", "math", "code"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _report():
    """A report with every kind of method: experts, base, parameter and path baselines, HM3 and its ablations."""
    rng = np.random.default_rng(0)
    methods = {f"expert:{t}": {"points": [[90.0 if j == k else 10.0 for j in range(3)]], "evaluations": 0,
                               "wall_seconds": 0.0} for k, t in enumerate(TASKS)}  # fmt: skip
    methods["base"] = {"points": [[20.0, 20.0, 20.0]], "evaluations": 0, "wall_seconds": 0.0}
    for name, evals in [("task_arithmetic", 6), ("ties", 6), ("ea", 40), ("moea", 40)]:
        methods[name] = {"points": (20 + 50 * rng.random((3, 3))).tolist(), "evaluations": evals,
                         "wall_seconds": 3.0}  # fmt: skip
    prefs = [[1 / 3] * 3, [0.6, 0.2, 0.2], [0.2, 0.2, 0.6]]
    for name, (path_evals, model_evals) in {"hm3": (40, 12), "hm3_no_param_level": (38, 0),
                                             "hm3_no_arch_level": (0, 12)}.items():  # fmt: skip
        methods[name] = {"points": (30 + 50 * rng.random((3, 3))).tolist(), "preferences": prefs,
                         "evaluations": path_evals + model_evals, "wall_seconds": 9.0}  # fmt: skip
    methods["hm3"].update(path_evaluations=40, model_evaluations=12)
    extra = {
        "balanced": report_lib.balanced_retention(
            TASKS, methods["hm3"]["points"][0], [methods[f"expert:{t}"]["points"][0] for t in TASKS]
        ),  # fmt: skip
        "budget": {
            "path_evaluations_per_path_baseline": 40,
            "hm3_path_evaluations": 40,
            "hm3_model_evaluations": 12,
        },
        "arch_level_summary": {"alignment": "none", "flops": 1.5e9, "engine_seconds": 2.0},
    }
    rep = report_lib.build_report(TASKS, [90.0, 90.0, 90.0], methods, extra=extra)
    bootstrap = {"num_samples": 100, "seed": 0, "level": 0.95, "examples_per_task": 30, "methods": {}}
    for name, m in rep["methods"].items():
        hv = m["hypervolume"]
        entry = {"hypervolume": hv, "interval": [0.8 * hv, 1.2 * hv]}
        if name != "hm3":
            entry["p_hm3_greater"] = 0.75
        bootstrap["methods"][name] = entry
    return report_lib.add_bootstrap(rep, bootstrap)


class _Page(html.parser.HTMLParser):
    """Collects the page's text, <img> sources and unclosed tags."""

    VOID = {"img", "meta", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.text, self.images, self.open = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, (tag, self.open[-5:])
        self.open.pop()

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    rep = _report()
    paths = report_lib.write_report(rep, str(out), curves={"hm3": [0.1, 0.4, 0.5], "hm3_no_param_level": [0.1, 0.2]},
                                    title="HM3 on hand-made")  # fmt: skip
    return rep, out, paths


def test_report_html_is_written_beside_report_md_and_parses(written):
    rep, out, paths = written
    assert paths["html"] == os.path.join(str(out), "report.html")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("report.")) == [
        "report.html",
        "report.json",
        "report.md",
    ]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp")]
    page = _Page()
    page.feed((out / "report.html").read_text())
    page.close()
    assert page.open == []  # every element closed
    text = " ".join(page.text)
    for name in rep["methods"]:
        assert name in text, name
    for title in ("Table 1 analogue", "bootstrap intervals", "Ablation", "Equal budget", "Dominance against HM3",
                  "Balanced preference", "Reward curves", "Fronts", "Cost accounting", "budget",
                  "arch level summary"):  # fmt: skip
        assert title in text, title


def test_every_image_is_an_embedded_png(written):
    _, out, paths = written
    page = _Page()
    page.feed((out / "report.html").read_text())
    # front.png, the three task pairs and the reward curves: every plot written is on the page.
    assert len(page.images) == len(paths["plots"]) == 5
    for src in page.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix), src[:40]
        data = base64.b64decode(src[len(prefix) :], validate=True)
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_html_and_markdown_show_the_same_tables(written):
    """Every cell of every table in report.md is in report.html (both render `report_sections`)."""
    rep, out, _ = written
    md, page_html = (out / "report.md").read_text(), (out / "report.html").read_text()
    sections = report_tables.report_sections(rep)
    assert [s.key for s in sections][:4] == ["table1", "bootstrap", "ablation", "equal_budget"]
    for s in sections:
        assert f"## {s.title}" in md
        for row in s.rows:
            assert "| " + " | ".join(row) + " |" in md
            assert "<td>" + "</td><td>".join(report_html.html.escape(c) for c in row) + "</td>" in page_html


def test_equal_budget_table_by_hand(written):
    rep = written[0]
    (section,) = [s for s in report_tables.report_sections(rep) if s.key == "equal_budget"]
    rows = {r[0]: r[1:4] for r in section.rows}
    assert rows["ea"] == ("40", "0", "100%")
    assert rows["ties"] == ("0", "6", "-")
    assert rows["hm3"] == ("40", "12", "-")
    assert "expert:math" not in rows and "base" not in rows


def test_inline_markdown_is_escaped_html():
    assert report_html.inline("a **b** `c<d>` & e") == "a <strong>b</strong> <code>c&lt;d&gt;</code> &amp; e"


def test_summary_by_hand(written):
    rep, out, _ = written
    text = summary.format_summary(rep, str(out))
    lines = text.splitlines()
    assert lines[0].startswith("Held-out hypervolume")
    # Best hypervolume first, with its bootstrap interval and P(HM3 > X) (none for HM3 itself).
    order = [line.split()[0] for line in lines[2 : 2 + len(rep["methods"])]]
    hv = {n: m["hypervolume"] for n, m in rep["methods"].items()}
    assert order == sorted(hv, key=lambda n: -hv[n])
    (hm3_line,) = [line for line in lines if line.split()[:1] == ["hm3"]]
    h = hv["hm3"]
    assert hm3_line.split()[1:] == [f"{h:.3f}", f"[{0.8 * h:.3f},", f"{1.2 * h:.3f}]", "-"]
    (ea_line,) = [line for line in lines if line.split()[:1] == ["ea"]]
    assert ea_line.split()[-1] == "0.75"
    # The balanced preference: HM3's held-out score, the expert's own-task score, the retention.
    b = rep["balanced"]
    (math_line,) = [line for line in lines if line.split()[:1] == ["math"]]
    assert math_line.split()[1:] == [f"{b['hm3_point'][1]:.1f}", "90.0", f"{100 * b['retention'][1]:.1f}%"]
    # The files written, report first.
    written_lines = lines[lines.index("Written:") + 1 :]
    assert written_lines[:3] == [f"  {out / n}" for n in ("report.md", "report.html", "report.json")]
    assert f"  {out / 'front.png'}" in written_lines and f"  {out / 'reward_curves.png'}" in written_lines


def test_summary_without_bootstrap_or_files():
    rep = _report()
    del rep["bootstrap"], rep["balanced"]
    text = summary.format_summary(rep)
    assert "Written:" not in text and "Balanced" not in text
    assert all(line.split()[-2:] == ["-", "-"] for line in text.splitlines()[2:])
