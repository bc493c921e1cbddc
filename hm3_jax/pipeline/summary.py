"""The short summary a finished run prints to the terminal: hypervolumes, the balanced preference, the files.

`format_summary(report, run_dir)` reads only the report dict (`report.build_report`, with `add_bootstrap` and the
run's `balanced` entry) and the names of the files in the run directory; the full tables are in report.md and
report.html.
"""

from __future__ import annotations

import glob
import os

from hm3_jax.pipeline.report_tables import fmt_hv, fmt_score


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Plain-text columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )

    return [line(header), *(line(r) for r in rows)]


def hypervolume_rows(report: dict) -> list[tuple[str, ...]]:
    """(method, hypervolume, interval, P(HM3 > X)) per method, best hypervolume first; interval and P are "-"
    without a bootstrap (or for HM3 itself)."""
    intervals = report.get("bootstrap", {}).get("methods", {})
    rows = []
    for name, m in sorted(report["methods"].items(), key=lambda kv: -kv[1]["hypervolume"]):
        e = intervals.get(name, {})
        interval = f"[{fmt_hv(e['interval'][0])}, {fmt_hv(e['interval'][1])}]" if "interval" in e else "-"
        rows.append((name, fmt_hv(m["hypervolume"]), interval, fmt_score(e.get("p_hm3_greater"), 2)))
    return rows


def written_files(run_dir: str) -> list[str]:
    """The report files, plots and export directories a run writes, those present in `run_dir`."""
    names = ["report.md", "report.html", "report.json"]
    found = [os.path.join(run_dir, n) for n in names if os.path.exists(os.path.join(run_dir, n))]
    found += sorted(glob.glob(os.path.join(run_dir, "*.png")))
    exports = sorted(glob.glob(os.path.join(run_dir, "exports", "*", "")))
    if exports:
        found.append(f"{os.path.join(run_dir, 'exports', '')} ({len(exports)} preferences)")
    return found


def format_summary(report: dict, run_dir: str | None = None) -> str:
    """The terminal summary of a finished run.

    Args:
      report: the report dict `run_hm3` returns (also report.json).
      run_dir: the run directory, whose written files are listed; None lists none.
    Returns: text lines: the hypervolume table (method, hypervolume, bootstrap interval, P(HM3 > X)), HM3's
      held-out scores at the balanced preference against each expert's own-task score, and the files.
    """
    tasks = report["tasks"]
    lines = ["Held-out hypervolume (normalised, shared reference point):"]
    lines += [
        "  " + s
        for s in _table(("method", "hypervolume", "interval", "P(HM3 > X)"), hypervolume_rows(report))
    ]
    if "balanced" in report:
        b = report["balanced"]
        rows = [
            (t, fmt_score(h), fmt_score(e), f"{fmt_score(100 * r)}%")
            for t, h, e, r in zip(tasks, b["hm3_point"], b["expert_own_task"], b["retention"], strict=True)
        ]
        lines += ["", "Balanced preference, held-out: HM3 against each expert on its own task:"]
        lines += ["  " + s for s in _table(("task", "HM3", "expert", "retention"), rows)]
    files = written_files(run_dir) if run_dir else []
    if files:
        lines += ["", "Written:", *("  " + f for f in files)]
    return "\n".join(lines)
