"""Evaluation figures (retina_fn.eval.plots) are whole PNG images of the requested size."""

import numpy as np
from PIL import Image

from retina_fn.eval import plots

REC = np.linspace(0.0, 1.0, 101)
IOUS = np.linspace(0.5, 0.95, 10)


def _png(path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()  # decodes every pixel: a truncated file fails here
        return img.size


def test_pr_curves_png(tmp_path):
    # [T, R, K]: class k's precision falls from 1 to k / 5 as recall grows; lower at stricter IoU.
    precision = np.stack([np.stack([1.0 - (1.0 - k / 5) * REC * (1 + t / 10) for k in range(5)], axis=1)
                          for t in range(10)]).clip(0, 1)
    precision[:, :, 4] = -1.0  # a class without ground truth (never picked by the caller, still accepted here)
    path = plots.plot_pr_curves(str(tmp_path / "pr.png"), precision, IOUS, REC, ["a", "b", "c", "d", "e"],
                                worst=[0, 1], best=[3, 2])
    assert path == str(tmp_path / "pr.png")
    assert _png(path) == (990, 405)  # two panels of 5.5 x 4.5 inches at 90 dpi


def test_error_breakdown_png(tmp_path):
    kinds = ("C75", "C50", "Loc", "Sim", "Oth", "BG", "FN")
    curves = np.stack([np.clip(1.0 - REC * (1.5 - 0.2 * e), 0, 1) for e in range(7)])
    curves[-1] = 1.0
    overall = curves.mean(axis=1)
    path = plots.plot_error_breakdown(str(tmp_path / "eb.png"), kinds, curves, overall, REC, "7 classes")
    assert _png(path) == (675, 405)  # 7.5 x 4.5 inches at 90 dpi, the legend beside the chart
