"""report.html: the run's report as one self-contained page (PNG plots embedded as base64 data URIs).

Same content as report.md (both render `report_tables.report_sections`), plus the plots: the front plots after the
Table 1 analogue and the bootstrap hypervolumes, the reward curves after the ablation, the cost accounting (budget,
timings, per-level summaries) folded at the end. No scripts, no external files: it opens from a mail attachment.
"""

from __future__ import annotations

import base64
import html
import os
import re

from hm3_jax.pipeline import report_tables
from hm3_jax.pipeline.workdir import atomic_write_text

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ccc; padding-bottom: .2em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #e3e3e3; }
table { border-collapse: collapse; margin: .6em 0; font-size: 14px; }
th, td { border: 1px solid #d5d5d5; padding: 3px 9px; text-align: right; }
th { background: #f2f4f7; }
td:first-child, th:first-child { text-align: left; font-family: ui-monospace, monospace; }
tr.hm3 td { background: #fff4dc; font-weight: 600; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: 12px; }
code { background: #f2f2f2; padding: 0 3px; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(320px, 1fr)); gap: 12px; }
.figures figure { margin: 0; }
.figures figure.wide { grid-column: span 2; }
figure img { width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 12px; color: #666; text-align: center; }
"""
_FIGURES_AFTER = {"fronts": ("bootstrap", "table1"), "curves": ("ablation", "bootstrap", "table1")}


def inline(text: str) -> str:
    """Markdown-inline text (`**bold**`, `` `code` ``) of a report section as escaped HTML."""
    out = html.escape(text, quote=False)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def png_data_uri(path: str) -> str:
    """`data:image/png;base64,...` of a PNG file."""
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def _figure(path: str, wide: bool = False) -> str:
    name = os.path.splitext(os.path.basename(path))[0]
    cls = ' class="wide"' if wide else ""
    return (
        f'<figure{cls}><img src="{png_data_uri(path)}" alt="{html.escape(name)}">'
        f"<figcaption>{html.escape(name)}</figcaption></figure>"
    )


def _figures_block(title: str, paths: list[str], first_wide: bool) -> list[str]:
    if not paths:
        return []
    figs = [_figure(p, wide=first_wide and i == 0) for i, p in enumerate(paths)]
    return [f"<h2>{html.escape(title)}</h2>", '<div class="figures">', *figs, "</div>"]


def _section(s: report_tables.Section) -> list[str]:
    lines = []
    if s.key in report_tables.COST_SECTIONS:  # long JSON: folded, the budget open
        opened = " open" if s.key == "budget" else ""
        return [
            f"<details{opened}><summary><strong>{html.escape(s.title)}</strong></summary>",
            f"<pre>{html.escape(s.code or '')}</pre></details>",
        ]
    lines.append(f'<h2 id="{s.key}">{html.escape(s.title)}</h2>')
    lines += [f"<p>{inline(p)}</p>" for p in s.intro]
    if s.header:
        lines.append(
            "<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in s.header) + "</tr></thead>"
        )
        lines.append("<tbody>")
        for row in s.rows:
            cls = ' class="hm3"' if row and row[0] == "hm3" else ""
            lines.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
        lines.append("</tbody></table>")
    lines += [f"<p>{inline(p)}</p>" for p in s.outro]
    if s.code is not None:
        lines.append(f"<pre>{html.escape(s.code)}</pre>")
    return lines


def render_html(report: dict, plot_paths: list[str], title: str = "HM3") -> str:
    """The page's HTML text.

    Args:
      report: the report dict (`report.build_report`, maybe with `add_bootstrap` and the run's extra entries).
      plot_paths: PNG files (`report.write_plots`): front*.png are the fronts (front.png first, wide), the rest
        (reward_curves.png) the training curves.
      title: the page's title and heading.
    """
    fronts = [p for p in plot_paths if os.path.basename(p).startswith("front")]
    others = [p for p in plot_paths if p not in fronts]
    blocks = {
        "fronts": _figures_block("Fronts (normalised held-out scores)", fronts, True),
        "curves": _figures_block("Reward curves", others, True),
    }
    sections = report_tables.report_sections(report)
    keys = [s.key for s in sections]
    after = {}  # section key -> figure blocks placed after it
    for block, candidates in _FIGURES_AFTER.items():
        anchor = next((k for k in candidates if k in keys), keys[0] if keys else None)
        after.setdefault(anchor, []).append(block)
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{inline(report_tables.PREAMBLE)}</p>"]
    cost_started = False
    for s in sections:
        if s.key in report_tables.COST_SECTIONS and not cost_started:
            body.append("<h2>Cost accounting</h2>")
            cost_started = True
        body += _section(s)
        for block in after.get(s.key, []):
            body += blocks[block]
    head = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_STYLE}</style></head>'
    )
    return head + "\n<body>\n" + "\n".join(body) + "\n</body></html>\n"


def write_html(report: dict, path: str, plot_paths: list[str], title: str = "HM3") -> str:
    """Writes report.html atomically (`workdir.atomic_write_text`); returns its path."""
    atomic_write_text(path, render_html(report, plot_paths, title))
    return path
