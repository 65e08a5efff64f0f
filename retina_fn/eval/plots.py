"""Evaluation figures as PNG files (matplotlib's Agg canvas; pyplot and its global state are not used)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from retina_fn.eval import analysis

_BREAKDOWN_COLOURS = {"C75": "#babdb6", "C50": "#3465a4", "Loc": "#73d216", "Sim": "#e9b96e", "Oth": "#75507b",
                      "BG": "#cc0000", "FN": "#fcaf3e"}


def _save(fig: Figure, path: str, dpi: int = 90) -> str:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi)
    return path


def plot_pr_curves(path: str, precision: np.ndarray, iou_thrs: np.ndarray, rec_thrs: np.ndarray,
                   names: Sequence[str], worst: Sequence[int], best: Sequence[int],
                   ious: Sequence[float] = (0.5, 0.75)) -> str:
    """Writes the PNG `path` (returned): PR curves of the `best` (solid) and `worst` (dashed) class indices,
    one panel per IoU of `ious` (all in iou_thrs [T]); precision float [T, R, K], rec_thrs [R], K names."""
    fig = Figure(figsize=(5.5 * len(ious), 4.5))
    axes = fig.subplots(1, len(ious), squeeze=False)[0]
    p = np.asarray(precision, dtype=np.float64)
    for ax, iou in zip(axes, ious):
        at = p[analysis.iou_index(iou_thrs, iou)]
        ap = analysis.class_ap(at)
        for group, style in ((best, "-"), (worst, "--")):
            for k in group:
                ax.plot(rec_thrs, at[:, k], style, label=f"{names[k]} (AP{round(iou * 100)} {ap[k]:.3f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(f"IoU {iou:.2f}: best (solid) and worst (dashed) classes by AP")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return _save(fig, path)


def plot_error_breakdown(path: str, kinds: Sequence[str], curves: np.ndarray, overall: np.ndarray,
                         rec_thrs: np.ndarray, title: str = "all classes") -> str:
    """Writes the PNG `path` (returned): the analyze tool's stacked bands, the precision each kind of error
    costs; E kinds strictest first, curves float [E, R] (`analysis.breakdown_summary`), overall APs [E]."""
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    curves = np.asarray(curves, dtype=np.float64)
    below = np.zeros_like(rec_thrs, dtype=np.float64)
    for kind, curve, ap in zip(kinds, curves, overall):
        top = np.maximum(below, curve)  # a band never folds over the one below it
        ax.fill_between(rec_thrs, below, top, facecolor=_BREAKDOWN_COLOURS[kind], edgecolor="black",
                        linewidth=0.5, label=f"[{ap:.3f}] {kind}")
        below = top
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"error breakdown, {title}")
    handles, labels = ax.get_legend_handles_labels()
    # FN first, as the bands stack; beside the chart, where it hides no band
    ax.legend(handles[::-1], labels[::-1], fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    return _save(fig, path)
