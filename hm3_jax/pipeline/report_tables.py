"""The report's tables as data: one list of sections that report.md and report.html both render.

`report_sections(report)` turns a report dict (`report.build_report`, with `add_bootstrap` and the run's extra
entries) into titled tables of formatted cells, notes and preformatted blocks, so the Markdown and the HTML
page cannot drift apart; `summary` formats the terminal summary with the same number formats.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import numpy as np

PARAM_METHODS = ("task_arithmetic", "ties", "dare_ties", "consensus", "pcb")
PATH_METHODS = ("ea", "moea", "grid_search", "differential_evolution")
ABLATIONS = ("hm3_no_param_level", "hm3_no_arch_level")


def fmt_score(v, digits=1):
    """Scores in [0, 100] (and shares): `digits` decimals; None as "-"."""
    return "-" if v is None else f"{v:.{digits}f}"


def fmt_hv(v):
    """Hypervolumes: 3 decimals, or 3 significant digits when small (8 objectives give values ~1e-6)."""
    if v is None:
        return "-"
    return f"{v:.3f}" if v == 0 or abs(v) >= 0.01 else f"{v:.3g}"


class Section(NamedTuple):
    """One part of the report, rendered alike to report.md (`report.write_markdown`) and report.html
    (`report_html.render_html`).

    Text is Markdown-inline (`**bold**`, `` `code` ``); `rows` are formatted cells under `header`; `code` is a
    preformatted block (JSON of the cost accounting, the claims).
    """

    key: str
    title: str
    intro: tuple[str, ...] = ()
    header: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()
    outro: tuple[str, ...] = ()
    code: str | None = None


PREAMBLE = "All scores are on the **held-out** split (30% of each task), in [0, 100]."
COST_SECTIONS = ("budget", "timings", "param_level_summary", "arch_level_summary")


def report_sections(report: dict) -> list[Section]:
    """The report's tables in order: Table 1 analogue, bootstrap hypervolumes, ablation, equal budget,
    dominance, balanced preference, claims, cost accounting (each only when the report holds its data)."""
    tasks = report["tasks"]
    methods = report["methods"]
    rows = []
    for name, m in methods.items():
        pts = np.asarray(m["points"], np.float64)
        if not len(pts):
            continue
        row = pts[m.get("balanced_index", 0)]
        rows.append(
            (
                name,
                *(fmt_score(v) for v in row),
                fmt_score(row.mean()),
                fmt_hv(m["hypervolume"]),
                str(m.get("evaluations", "-")),
                fmt_score(m.get("wall_seconds"), 0),
            )
        )
    ref = report["reference_point"]
    out = [
        Section(
            "table1",
            "Table 1 analogue: one model per method at the balanced preference",
            (
                "For preference-driven methods the point is the one for the balanced preference (1/K each); a set "
                "method (MOEA, grid search) shows its point closest to balanced; experts show their own model.",
            ),
            ("method", *tasks, "mean", "hypervolume", "evaluations", "seconds"),
            tuple(rows),
            (
                f"Hypervolume of each method's normalised held-out set, reference point {np.round(ref, 3).tolist()} "
                "(shared by all methods).",
            ),
        )
    ]
    if "bootstrap" in report:
        bs = report["bootstrap"]
        rows = []
        for n, e in bs["methods"].items():
            lo, hi = e["interval"]
            p = e.get("p_hm3_greater")
            rows.append((n, fmt_hv(e["hypervolume"]), f"[{fmt_hv(lo)}, {fmt_hv(hi)}]", fmt_score(p, 2)))
        out.append(
            Section(
                "bootstrap",
                f"Hypervolume with {100 * bs['level']:.0f}% bootstrap intervals",
                (
                    f"{bs['num_samples']} paired resamples of the held-out examples ({bs['examples_per_task']} per "
                    "task; every method and the ideal point on the same resamples; `hm3_jax.moo.bootstrap`). "
                    "P(HM3 > X) is the share of resamples where HM3's hypervolume is larger.",
                ),
                ("method", "hypervolume", "interval", "P(HM3 > X)"),
                tuple(rows),
            )
        )
    abl = [n for n in ("hm3", *ABLATIONS) if n in methods]
    if abl:
        rows = tuple((n, fmt_hv(methods[n]["hypervolume"]), str(sum(methods[n]["pareto_mask"]))) for n in abl)
        out.append(
            Section("ablation", "Ablation", (), ("variant", "hypervolume", "non-dominated points"), rows)
        )
    if "budget" in report:
        out.append(_equal_budget_section(report))
    if "dominance" in report:
        rows = tuple(
            (n, fmt_score(d["b_dominated_by_a"], 2), fmt_score(d["a_dominated_by_b"], 2))
            for n, d in report["dominance"].items()
        )
        out.append(
            Section(
                "dominance",
                "Dominance against HM3",
                ("C(HM3, X) = fraction of X's points dominated by some HM3 point; C(X, HM3) the reverse.",),
                ("method", "C(HM3, X)", "C(X, HM3)"),
                rows,
            )
        )
    if "balanced" in report:
        b = report["balanced"]
        rows = tuple(
            (t, fmt_score(h), fmt_score(e), f"{fmt_score(100 * r)}%")
            for t, h, e, r in zip(tasks, b["hm3_point"], b["expert_own_task"], b["retention"], strict=True)
        )
        out.append(
            Section(
                "balanced",
                "Balanced preference: HM3 against each expert on its own task",
                (),
                ("task", "HM3", "expert", "retention"),
                rows,
            )
        )
    if "claims" in report:
        code = "\n".join(f"{k}: {v}" for k, v in report["claims"].items())
        out.append(Section("claims", "Claims checked", code=code))
    for section in COST_SECTIONS:
        if section in report:
            out.append(Section(section, section.replace("_", " "), code=pretty_json(report[section])))
    return out


def _equal_budget_section(report: dict) -> Section:
    """Who spent what: path evaluations against the path baselines' shared budget, model evaluations."""
    methods, budget = report["methods"], report["budget"]
    per_path = budget.get("path_evaluations_per_path_baseline")
    rows = []
    for name, m in methods.items():
        if name in PARAM_METHODS or name == "hm3_no_arch_level":
            path, model = 0, m.get("evaluations", 0)
        elif name in PATH_METHODS or name == "hm3_no_param_level":
            path, model = m.get("evaluations", 0), 0
        elif name == "hm3":
            path, model = m.get("path_evaluations", 0), m.get("model_evaluations", 0)
        else:
            continue  # experts and the base cost nothing
        share = f"{100 * path / per_path:.0f}%" if per_path and name in PATH_METHODS else "-"
        rows.append((name, str(path), str(model), share, fmt_score(m.get("wall_seconds"), 0)))
    return Section(
        "equal_budget",
        "Equal budget",
        (
            f"Every path baseline may spend {per_path} path evaluations (HM3's architecture level spent "
            f"{budget.get('hm3_path_evaluations')}, its parameter level {budget.get('hm3_model_evaluations')} "
            "model evaluations); share = path evaluations / that budget.",
        ),
        ("method", "path evaluations", "model evaluations", "share of path budget", "seconds"),
        tuple(rows),
    )


def pretty_json(obj) -> str:
    return json.dumps(obj, indent=2)
