"""The run's report: held-out points of every method, normalised, hypervolume, dominance, tables and plots.

Every number here is a **held-out** score (HM3_SPEC "Objectives": the search split is only for searching).
Each method contributes a set of points `[n, K]` (raw task scores in [0, 100], task order); they are
normalised by the held-out ideal point z*_k (best source model per task), and one reference point is shared
by all methods (`hm3_jax.moo.reference_point`: 1.1 past the worst normalised value on every axis, or a fixed
reference from the config), so hypervolumes are comparable across methods.

`report.json` keys: `tasks`, `ideal`, `reference_point`, `methods: {name: {points, normalised_points,
pareto_mask, hypervolume, evaluations, wall_seconds, preferences?, ...}}`, `dominance: {name: C-metric both
ways against hm3}`, `balanced` (HM3's model at the balanced preference against each expert's own-task score),
`claims` (the paper's claims checked on this run).
"""

from __future__ import annotations

import itertools
import os

import numpy as np

from hm3_jax import moo
from hm3_jax.moo import plots
from hm3_jax.pipeline import report_html
from hm3_jax.pipeline.report_tables import PREAMBLE, report_sections
from hm3_jax.pipeline.workdir import atomic_write_json, atomic_write_text


def build_report(
    tasks, ideal_heldout, methods: dict, fixed_reference=None, extra: dict | None = None
) -> dict:
    """Assembles report.json's content.

    Args:
      tasks: K task names.
      ideal_heldout: [K] held-out ideal point (raw scores).
      methods: {name: {"points": [n, K] raw held-out scores, "evaluations", "wall_seconds", ...}}.
      fixed_reference: optional [K] reference point in normalised units.
      extra: more top-level entries (config, timings, ...).
    """
    ideal = np.asarray(ideal_heldout, np.float64)
    normalised = {
        n: moo.normalize_by_ideal(np.asarray(m["points"], np.float64), ideal) for n, m in methods.items()
    }
    reference = moo.reference_point(list(normalised.values()), fixed=fixed_reference)
    out_methods = {}
    for name, m in methods.items():
        pts = normalised[name]
        entry = dict(m)
        entry["points"] = np.asarray(m["points"], np.float64).tolist()
        entry["normalised_points"] = pts.tolist()
        entry["pareto_mask"] = moo.pareto_mask(pts).tolist() if len(pts) else []
        entry["hypervolume"] = float(moo.hypervolume(pts, reference)) if len(pts) else 0.0
        out_methods[name] = entry
    report = {
        "tasks": list(tasks),
        "ideal": ideal.tolist(),
        "reference_point": np.asarray(reference).tolist(),
        "methods": out_methods,
        **(extra or {}),
    }
    if "hm3" in normalised:
        report["dominance"] = {
            name: moo.dominance_summary(normalised["hm3"], pts)
            for name, pts in normalised.items()
            if name != "hm3" and len(pts)
        }
        report["claims"] = _claims(report)  # after `extra`, which may hold the `balanced` retention
    return report


def _claims(report: dict) -> dict:
    """The paper's two small-scale claims, measured on this run (see README)."""
    methods = report["methods"]
    hv = {n: m["hypervolume"] for n, m in methods.items()}
    others = {n: v for n, v in hv.items() if n != "hm3" and not n.startswith("expert:")}
    best_other = max(others, key=others.get) if others else None
    claims = {
        "hm3_hypervolume": hv["hm3"],
        "best_other_method": best_other,
        "best_other_hypervolume": others.get(best_other) if best_other else None,
        "hm3_has_highest_hypervolume": bool(best_other is None or hv["hm3"] > others[best_other]),
    }
    bal = report.get("balanced")
    if bal:
        claims["balanced_min_retention"] = min(bal["retention"])
        claims["balanced_keeps_90_percent"] = bool(min(bal["retention"]) >= 0.9)
    return claims


def add_bootstrap(report: dict, bootstrap: dict) -> dict:
    """Adds the bootstrap section and, to the claims, P(HM3's hypervolume > the best other method's)."""
    report["bootstrap"] = bootstrap
    best = report.get("claims", {}).get("best_other_method")
    entry = bootstrap["methods"].get(best or "", {})
    if "p_hm3_greater" in entry:
        report["claims"]["p_hm3_hypervolume_greater_than_best_other"] = entry["p_hm3_greater"]
        report["claims"]["best_other_hypervolume_interval"] = entry["interval"]
        report["claims"]["hm3_hypervolume_interval"] = bootstrap["methods"]["hm3"]["interval"]
    return report


def balanced_retention(tasks, hm3_point, expert_points) -> dict:
    """HM3's held-out scores at the balanced preference over each expert's own-task held-out score."""
    own = np.array([expert_points[k][k] for k in range(len(tasks))], np.float64)
    point = np.asarray(hm3_point, np.float64)
    return {
        "hm3_point": point.tolist(),
        "expert_own_task": own.tolist(),
        "retention": (point / np.maximum(own, 1e-9)).tolist(),
    }


def write_markdown(report: dict, path: str, title: str = "HM3") -> str:
    """report.md: the paper's Table 1 analogue, hypervolumes, ablations, budgets, dominance (`report_sections`)."""
    lines = [f"# {title}", "", PREAMBLE, ""]
    for s in report_sections(report):
        lines += [f"## {s.title}", ""]
        for p in s.intro:
            lines += [p, ""]
        if s.header:
            lines += ["| " + " | ".join(s.header) + " |", "|---" * len(s.header) + "|"]
            lines += ["| " + " | ".join(r) + " |" for r in s.rows]
            lines.append("")
        for p in s.outro:
            lines += [p, ""]
        if s.code is not None:
            lines += ["```", s.code, "```", ""]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def write_plots(report: dict, out_dir: str, curves: dict | None = None) -> list[str]:
    """Front plots (every method, normalised held-out points; all task pairs plus 3-D) and reward curves."""
    tasks = report["tasks"]
    pts = {
        n: np.asarray(m["normalised_points"]) for n, m in report["methods"].items() if m["normalised_points"]
    }
    written = [
        plots.plot_front(
            pts,
            os.path.join(out_dir, "front.png"),
            tasks,
            "hm3",
            report["reference_point"],
            "normalised held-out scores",
        )
    ]
    if len(tasks) > 2:
        for a, b in itertools.combinations(range(len(tasks)), 2):
            pair = {n: p[:, [a, b]] for n, p in pts.items()}
            ref = np.asarray(report["reference_point"])[[a, b]]
            written.append(
                plots.plot_front(
                    pair,
                    os.path.join(out_dir, f"front_{tasks[a]}_{tasks[b]}.png"),
                    [tasks[a], tasks[b]],
                    "hm3",
                    ref,
                    f"{tasks[a]} vs {tasks[b]}",
                )
            )
    if curves:
        written.append(plots.plot_curves(curves, os.path.join(out_dir, "reward_curves.png")))
    return written


def write_report(report: dict, out_dir: str, curves: dict | None = None, title: str = "HM3") -> dict:
    """Writes report.json, report.md, report.html and the plots into `out_dir`; returns their paths."""
    paths = {name: os.path.join(out_dir, f"report.{name}") for name in ("json", "md", "html")}
    paths["plots"] = write_plots(report, out_dir, curves)
    write_markdown(report, paths["md"], title)
    report_html.write_html(report, paths["html"], paths["plots"], title)
    atomic_write_json(paths["json"], report)  # last: its presence marks a finished report
    return paths
