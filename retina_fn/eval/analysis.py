"""Tables from COCOeval's precision arrays (numpy in, numbers and markdown out; no I/O).

COCOeval's `summarize` rule: an AP is the mean of the interpolated precision over recall (and IoU)
thresholds, leaving out the -1 entries (no ground truth); a category with only -1 entries has no AP (NaN).
The mean of the category APs is COCOeval's bbox_mAP, as every category with ground truth has as many entries."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np


def class_ap(precision: np.ndarray) -> np.ndarray:
    """float64 [K]: per-category AP of precision float [..., R, K] (e.g. [T, R, K] or [R, K]); NaN where
    a category has only -1 entries."""
    p = np.asarray(precision, dtype=np.float64)
    if p.ndim < 2:
        raise ValueError(f"precision must have shape [..., R, K], got {list(p.shape)}")
    flat = p.reshape(-1, p.shape[-1])
    valid = flat > -1
    counts = valid.sum(axis=0)
    sums = np.where(valid, flat, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def iou_index(iou_thrs: np.ndarray, iou: float) -> int:
    """The position of `iou` in iou_thrs [T]; ValueError when it is not one of them."""
    hits = np.flatnonzero(np.isclose(np.asarray(iou_thrs, dtype=np.float64), iou))
    if hits.size == 0:
        raise ValueError(f"IoU threshold {iou} is not among the evaluated ones {np.round(iou_thrs, 2).tolist()}")
    return int(hits[0])


def per_class_table(precision: np.ndarray, iou_thrs: np.ndarray, cat_ids: Sequence[int], names: Sequence[str],
                    num_gt: Sequence[int]) -> list[dict]:
    """AP, AP50, AP75 and ground-truth count of every category.

    Args:
      precision: float [T, R, K] at area 'all', 100 detections; iou_thrs: float [T] with 0.5 and 0.75.
      cat_ids, names, num_gt: K ids, names and non-crowd ground-truth counts.
    Returns:
      K dicts {'category_id', 'name', 'AP', 'AP50', 'AP75' (NaN without ground truth), 'num_gt'}; ValueError
      for shapes that do not agree, or IoU 0.5 or 0.75 not evaluated."""
    p = np.asarray(precision, dtype=np.float64)
    if p.ndim != 3 or p.shape[0] != len(iou_thrs) or not len(cat_ids) == len(names) == len(num_gt) == p.shape[2]:
        raise ValueError(f"precision {list(p.shape)} must be [T={len(iou_thrs)}, R, K={len(cat_ids)}], with "
                         f"{len(names)} names and {len(num_gt)} counts")
    aps = zip(class_ap(p), class_ap(p[iou_index(iou_thrs, 0.5)]), class_ap(p[iou_index(iou_thrs, 0.75)]))
    return [{"category_id": int(c), "name": str(n), "AP": float(a), "AP50": float(a50), "AP75": float(a75),
             "num_gt": int(g)} for c, n, (a, a50, a75), g in zip(cat_ids, names, aps, num_gt)]


def mean_row(rows: Sequence[Mapping]) -> dict:
    """{'name': 'mean (N classes)', 'AP', 'AP50', 'AP75', 'num_gt'}: the means over the rows with an AP
    (COCOeval's bbox_mAP, _50, _75; NaN without any) and the total ground-truth count."""
    scored = [r for r in rows if math.isfinite(r["AP"])]
    mean = {key: float(np.mean([r[key] for r in scored])) if scored else math.nan for key in ("AP", "AP50", "AP75")}
    return {"name": f"mean ({len(scored)} classes)", **mean, "num_gt": int(sum(r["num_gt"] for r in rows))}


def _cell(value: float, digits: int = 3) -> str:
    return "-" if not math.isfinite(value) else f"{value:.{digits}f}"


def format_per_class(rows: Sequence[Mapping], digits: int = 3) -> str:
    """A markdown table of `per_class_table` rows and their `mean_row` ('-' for an AP that does not exist)."""
    lines = ["| class | id | AP | AP50 | AP75 | GT |", "| :--- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['category_id']} | {_cell(r['AP'], digits)} | {_cell(r['AP50'], digits)} | "
                     f"{_cell(r['AP75'], digits)} | {r['num_gt']} |")
    m = mean_row(rows)
    lines.append(f"| **{m['name']}** | | {_cell(m['AP'], digits)} | {_cell(m['AP50'], digits)} | "
                 f"{_cell(m['AP75'], digits)} | {m['num_gt']} |")
    return "\n".join(lines)


def extreme_classes(ap: np.ndarray, n: int = 3) -> tuple[list[int], list[int]]:
    """(worst, best): the indices of the n lowest (ascending) and n highest (descending) of ap float [K],
    NaN never picked; with fewer than 2n APs each appears once, the lower half in worst; ties keep order."""
    ap = np.asarray(ap, dtype=np.float64)
    scored = [int(i) for i in np.argsort(ap, kind="stable") if math.isfinite(ap[i])]
    n_worst = min(n, (len(scored) + 1) // 2)
    return scored[:n_worst], scored[n_worst:][::-1][:n]


def breakdown_summary(precision: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """APs and mean curves of an error breakdown's precision float [E, R, K] (-1: no ground truth): (ap float64
    [E, K], NaN without ground truth; overall float64 [E], the mean ap over the categories with ground truth,
    NaN when none; curves float64 [E, R], the precision averaged over them)."""
    p = np.asarray(precision, dtype=np.float64)
    if p.ndim != 3 or p.shape[0] == 0:
        raise ValueError(f"precision must have shape [E, R, K] with E >= 1, got {list(p.shape)}")
    ap = np.stack([class_ap(p[e]) for e in range(p.shape[0])])
    defined = (p > -1).all(axis=(0, 1))
    if not defined.any():
        return ap, np.full(p.shape[0], np.nan), np.full(p.shape[:2], np.nan)
    return ap, ap[:, defined].mean(axis=1), p[:, :, defined].mean(axis=2)


def format_breakdown(kinds: Sequence[str], overall: np.ndarray, ap: np.ndarray, names: Sequence[str],
                     descriptions: Mapping[str, str], digits: int = 3) -> str:
    """Two markdown tables: each of the E kinds' overall AP [E] with its description, and ap [E, K] per
    class name ('-' for a class without ground truth)."""
    lines = ["| curve | AP | what it counts |", "| :--- | ---: | :--- |"]
    lines += [f"| {k} | {_cell(float(v), digits)} | {descriptions[k]} |" for k, v in zip(kinds, overall)]
    lines += ["", "| class | " + " | ".join(kinds) + " |", "| :--- |" + " ---: |" * len(kinds)]
    for k, name in enumerate(names):
        lines.append(f"| {name} | " + " | ".join(_cell(float(v), digits) for v in ap[:, k]) + " |")
    return "\n".join(lines)
