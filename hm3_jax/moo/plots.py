"""PNG plots of multi-objective results (matplotlib's Agg canvas; no pyplot global state, no display).

* ``plot_front``: every method's points; k = 2 a scatter with the highlighted method's Pareto front as a
  step line, k = 3 a 3-D scatter, k > 3 parallel coordinates (one polyline per point).
* ``plot_curves``: named curves (e.g. reward per PPO iteration).

Files are written to a temporary file in the target directory and moved into place, so a crash never leaves
a half-written PNG.
"""

import os

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hm3_jax.io import atomic
from hm3_jax.moo._checks import as_points
from hm3_jax.moo.pareto import pareto_mask


def _save(fig: Figure, path: str) -> str:
    path = os.fspath(path)
    FigureCanvasAgg(fig)
    with atomic.atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    return path


def _check_methods(method_points: dict) -> tuple[dict, int]:
    if not isinstance(method_points, dict) or not method_points:
        raise ValueError("method_points must be a non-empty dict {method name: [n, k] points}")
    checked = {name: as_points(pts, f"method_points[{name!r}]") for name, pts in method_points.items()}
    ks = {p.shape[1] for p in checked.values()}
    if len(ks) != 1:
        raise ValueError(
            f"methods disagree on the number of objectives: { {n: p.shape[1] for n, p in checked.items()} }"
        )
    return checked, ks.pop()


def plot_front(
    method_points: dict,
    path: str,
    objective_names=None,
    front_method: str | None = "hm3",
    reference=None,
    title: str = "",
) -> str:
    """Plots every method's points (maximised objectives) and saves a PNG.

    Args:
      method_points: ``{name: [n, k] points}``; all with the same k.
      path: output PNG path (parent directories are created).
      objective_names: k axis labels (default ``f0, f1, ...``).
      front_method: the method whose non-dominated points are joined by a front line (k = 2) or outlined
        (k = 3); ignored if absent from ``method_points``.
      reference: optional ``[k]`` reference point, drawn as a cross for k <= 3.
      title: figure title.

    Returns:
      ``path``.
    """
    checked, k = _check_methods(method_points)
    names = list(objective_names) if objective_names is not None else [f"f{j}" for j in range(k)]
    if len(names) != k:
        raise ValueError(f"objective_names has {len(names)} names but the points have k={k} objectives")
    fig = Figure(figsize=(6.4, 4.8) if k <= 3 else (1.2 * k + 3, 4.8))
    # More than 10 methods: tab20 colours plus a marker cycle, so no two series look alike.
    colors = (
        [f"C{i % 10}" for i in range(len(checked))]
        if len(checked) <= 10
        else [matplotlib.colormaps["tab20"](i % 20) for i in range(len(checked))]
    )
    colors = ["black" if name == front_method else c for name, c in zip(checked, colors, strict=True)]
    markers = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h"]
    marker_of = {
        name: ("*" if name == front_method else markers[i % len(markers)]) for i, name in enumerate(checked)
    }
    if k <= 2:
        ax = fig.add_subplot()
        for (name, pts), color in zip(checked.items(), colors, strict=True):
            ys = pts[:, 1] if k == 2 else np.zeros(len(pts))
            marker = marker_of[name]
            ax.scatter(pts[:, 0], ys, label=name, color=color, marker=marker, s=80 if marker == "*" else 30)
            if name == front_method and k == 2:
                front = pts[pareto_mask(pts)]
                front = front[np.argsort(-front[:, 0])]
                ax.step(front[:, 0], front[:, 1], where="post", color=color, linewidth=1.5)
        if reference is not None:
            ref = np.asarray(reference, dtype=float)
            ax.scatter([ref[0]], [ref[1] if k == 2 else 0.0], marker="x", color="k", label="reference")
        ax.set_xlabel(names[0])
        if k == 2:
            ax.set_ylabel(names[1])
        ax.grid(alpha=0.3)
    elif k == 3:
        ax = fig.add_subplot(projection="3d")
        for (name, pts), color in zip(checked.items(), colors, strict=True):
            ax.scatter(pts[:, 0], pts[:, 1], pts[:, 2], label=name, color=color, marker=marker_of[name])
        if reference is not None:
            ref = np.asarray(reference, dtype=float)
            ax.scatter([ref[0]], [ref[1]], [ref[2]], marker="x", color="k", label="reference")
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
        ax.set_zlabel(names[2])
    else:
        ax = fig.add_subplot()
        xs = np.arange(k)
        for (name, pts), color in zip(checked.items(), colors, strict=True):
            width = 2.0 if name == front_method else 1.0
            for i, row in enumerate(pts):
                ax.plot(xs, row, color=color, linewidth=width, alpha=0.8, label=name if i == 0 else None)
        ax.set_xticks(xs, names, rotation=30)
        ax.set_ylabel("score (higher is better)")
        ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_curves(
    curves: dict, path: str, xlabel: str = "iteration", ylabel: str = "reward", title: str = ""
) -> str:
    """Plots named 1-D curves (e.g. mean episode reward per iteration) against their index; saves a PNG.

    Args:
      curves: ``{name: sequence of finite floats}``, each non-empty.
      path: output PNG path.

    Returns:
      ``path``.
    """
    if not isinstance(curves, dict) or not curves:
        raise ValueError("curves must be a non-empty dict {name: list of values}")
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    for name, values in curves.items():
        arr = np.asarray(values, dtype=float)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"curve {name!r} must be a non-empty 1-D sequence, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"curve {name!r} contains NaN or inf")
        ax.plot(np.arange(arr.size), arr, label=str(name))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return _save(fig, path)
