"""retina_fn.assign: hand-computed cases, and a per-image, per-gt loop over exact fractions written from
mmdetection 2.9.0's MaxIoUAssigner description (and torchvision's Matcher) compared on random boxes, eager and
compiled by torch.compile."""

from __future__ import annotations

from fractions import Fraction

import dataclasses

import pytest
import torch

from configs.common import base_config
from retina_fn.assign import _first_index_of_max, _last_true_index, assign, crowd_ignored
from retina_fn.boxes import pairwise_iou
from tests.model_fixtures import spec_of


def assigner_cfg(**overrides):
    """The 1x recipe's assigner settings (mmdetection's), with some fields changed."""
    return dataclasses.replace(spec_of(base_config()).assigner, **overrides)


def run(anchors, gts, gt_valid=None, anchor_valid=None, cfg=None, ignore=None, ignore_valid=None):
    """Runs `assign` on one image given as lists of boxes; returns (positive, negative, matched, Assignment)."""
    a = torch.tensor(anchors, dtype=torch.float32)
    g = torch.tensor(gts, dtype=torch.float32).reshape(1, -1, 4)
    gv = torch.ones(g.shape[:2], dtype=torch.bool) if gt_valid is None else torch.tensor([gt_valid])
    av = torch.ones(1, a.shape[0], dtype=torch.bool) if anchor_valid is None else torch.tensor([anchor_valid])
    kw = {}
    if ignore is not None:
        ig = torch.tensor(ignore, dtype=torch.float32).reshape(1, -1, 4)
        kw = dict(ignore_boxes=ig, ignore_valid=torch.tensor([ignore_valid or [True] * ig.shape[1]]))
    out = assign(a, av, g, gv, cfg or assigner_cfg(), **kw)
    return out.positive[0].tolist(), out.negative[0].tolist(), out.matched[0].tolist(), out


# ----------------------------------------------------------------------------- hand-computed cases

def test_thresholds_positive_ignored_negative():
    gt = [[0, 0, 10, 10]]
    anchors = [
        [0, 0, 10, 10],  # IoU 1      -> positive
        [0, 0, 10, 5],  # IoU 0.5    -> positive (>= pos_iou_thr)
        [0, 0, 10, 4.5],  # IoU 0.45   -> ignored
        [0, 0, 10, 4],  # IoU 0.4    -> ignored (not < neg_iou_thr)
        [0, 0, 10, 3],  # IoU 0.3    -> negative
        [50, 50, 60, 60],  # IoU 0      -> negative
    ]
    pos, neg, matched, out = run(anchors, gt)
    assert pos == [True, True, False, False, False, False]
    assert neg == [False, False, False, False, True, True]
    assert matched == [0] * 6
    torch.testing.assert_close(out.max_iou[0], torch.tensor([1.0, 0.5, 0.45, 0.4, 0.3, 0.0]))


def test_low_quality_claims_every_anchor_tied_at_the_gt_best():
    gt = [[100, 100, 200, 200]]  # area 10000
    anchors = [
        [100, 100, 120, 120],  # IoU 400 / 10000 = 0.04: the gt's best
        [180, 180, 200, 200],  # IoU 0.04: tied best
        [150, 150, 160, 160],  # IoU 0.01 -> negative
    ]
    pos, neg, _, _ = run(anchors, gt)
    assert pos == [True, True, False]
    assert neg == [False, False, True]
    pos, neg, _, _ = run(anchors, gt, cfg=assigner_cfg(match_low_quality=False))
    assert pos == [False, False, False] and neg == [True, True, True]
    pos, _, _, _ = run(anchors, gt, cfg=assigner_cfg(min_pos_iou=0.05))  # best 0.04 < min_pos_iou
    assert pos == [False, False, False]


def test_low_quality_later_gt_wins_and_torchvision_keeps_argmax():
    anchors = [[300, 300, 310, 310]]  # area 100
    gts = [[300, 300, 330, 310], [300, 300, 310, 330]]  # both IoU 100 / 300 with the anchor
    _, _, matched, out = run(anchors, gts)
    assert out.positive[0].tolist() == [True] and matched == [1]  # mmdet: the later gt overwrites
    _, _, matched, out = run(anchors, gts, cfg=assigner_cfg(low_quality="torchvision"))
    assert out.positive[0].tolist() == [True] and matched == [0]  # own argmax, tie -> lowest index


def test_low_quality_overrides_a_threshold_match():
    gts = [[400, 400, 410, 410], [400, 395, 410, 406]]  # P (area 100), Q (area 110)
    anchors = [
        [400, 400, 410, 410],  # Y: IoU 1 with P; with Q 60 / 150 = 0.4
        [400, 400, 410, 406],  # X: IoU 0.6 with P (argmax); with Q 60 / 110 = 0.545, Q's best
    ]
    pos, _, matched, _ = run(anchors, gts)
    assert pos == [True, True] and matched == [0, 1]  # X goes to Q, the gt it is best for
    pos, _, matched, _ = run(anchors, gts, cfg=assigner_cfg(low_quality="torchvision"))
    assert pos == [True, True] and matched == [0, 0]
    # with Q first, P's loop runs later, but X is not P's best, so X still goes to Q
    pos, _, matched, _ = run(anchors, gts[::-1])
    assert pos == [True, True] and matched == [1, 0]


def test_argmax_tie_goes_to_lowest_gt_index():
    gt = [0, 0, 10, 10]
    anchors = [
        [0, 0, 10, 10],  # IoU 1 with both duplicates: best of both
        [0, 0, 10, 7],  # IoU 0.7 with both: a threshold match, nobody's best
    ]
    pos, _, matched, _ = run(anchors, [gt, gt])
    assert pos == [True, True] and matched == [1, 0]  # low quality: later duplicate wins anchor 0
    pos, _, matched, _ = run(anchors, [gt, gt], cfg=assigner_cfg(low_quality="torchvision"))
    assert pos == [True, True] and matched == [0, 0]


def test_padding_gts_match_nothing():
    anchors = [[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 6]]
    real = [[0, 0, 10, 10]]
    padded = [[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 0, 0]]
    pos, neg, matched, out = run(anchors, padded, gt_valid=[True, False, False])
    ref_pos, ref_neg, ref_matched, ref = run(anchors, real)
    assert (pos, neg, matched) == (ref_pos, ref_neg, ref_matched)
    assert pos == [True, False, True] and neg == [False, True, False]
    torch.testing.assert_close(out.max_iou, ref.max_iou)
    # a padding row in front: indices still refer to the padded layout
    pos, _, matched, _ = run(anchors, [[20, 20, 30, 30]] + real, gt_valid=[False, True])
    assert pos == [True, False, True] and matched == [1, 0, 1]


def test_image_without_gt_is_all_negative():
    anchors = [[0, 0, 10, 10], [5, 5, 15, 15], [0, 0, 1, 1]]
    pos, neg, matched, out = run(anchors, [[0, 0, 10, 10]], gt_valid=[False], anchor_valid=[True, False, True])
    assert pos == [False] * 3
    assert neg == [True, False, True]  # the invalid anchor is neither
    assert matched == [0, 0, 0]
    assert out.max_iou[0].tolist() == [-1.0] * 3
    # zero gt rows at all
    a = torch.tensor(anchors, dtype=torch.float32)
    out = assign(a, torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool),
                 assigner_cfg())
    assert not out.positive.any() and out.negative.all() and (out.matched == 0).all()


def test_invalid_anchors_take_no_part():
    gt = [[0, 0, 10, 10]]
    anchors = [
        [0, 0, 10, 10],  # IoU 1, but invalid
        [0, 0, 10, 3],  # IoU 0.3: the best valid anchor -> low-quality positive
        [40, 40, 50, 50],  # IoU 0 -> negative
        [41, 41, 50, 50],  # invalid, IoU 0 -> neither
    ]
    pos, neg, matched, out = run(anchors, gt, anchor_valid=[False, True, True, False])
    assert pos == [False, True, False, False]
    assert neg == [False, False, True, False]
    assert out.max_iou[0, 0].item() == -1.0


def test_crowd_regions_are_ignored_above_the_iof_threshold():
    gt = [[0, 0, 10, 10]]
    anchors = [
        [0, 0, 10, 10],  # IoU 1 with the gt, but 60% covered by crowd 0 -> ignored
        [100, 100, 110, 110],  # inside crowd 1 (IoF 1) -> ignored instead of negative
        [105, 100, 115, 110],  # half inside crowd 1 (IoF 0.5, not > 0.5) -> negative
        [0, 2, 10, 10],  # IoU 0.8, IoF 40 / 80 = 0.5 with crowd 0 -> positive
        [300, 300, 310, 310],  # inside a padding crowd box -> negative
        [0, 6, 10, 16],  # IoU 40 / 160 = 0.25 -> negative
    ]
    crowd = [[-5, -5, 15, 6], [95, 95, 110, 110], [290, 290, 320, 320]]
    cfg = assigner_cfg(ignore_iof_thr=0.5)
    pos, neg, _, out = run(anchors, gt, cfg=cfg, ignore=crowd, ignore_valid=[True, True, False])
    assert pos == [False, False, False, True, False, False]
    assert neg == [False, False, True, False, True, True]
    assert out.max_iou[0, :2].tolist() == [-1.0, -1.0]
    # a crowd box over anchors 0 and 3: the gt's best over the rest is anchor 5 (0.25) -> low-quality positive
    crowd2 = [[-5, -5, 15, 10]]
    pos, neg, _, _ = run(anchors, gt, cfg=cfg, ignore=crowd2)
    assert pos == [False, False, False, False, False, True]
    assert neg == [False, True, True, False, True, False]
    # ignore_iof_thr <= 0 switches the crowd step off
    pos, neg, _, _ = run(anchors, gt, ignore=crowd, ignore_valid=[True, True, True])
    assert pos == [True, False, False, True, False, False]
    assert neg == [False, True, True, False, True, True]
    # an image without gt stays all negative, crowd or not (mmdetection skips the ignore step then)
    pos, neg, _, _ = run(anchors, gt, gt_valid=[False], cfg=cfg, ignore=crowd)
    assert pos == [False] * 6 and neg == [True] * 6


def test_gt_overlapping_no_anchor_claims_nothing():
    anchors = [[0, 0, 10, 10], [20, 0, 30, 10]]
    gts = [[0, 0, 10, 4], [500, 500, 510, 510]]  # gt 1 overlaps nothing: best IoU 0
    pos, neg, matched, _ = run(anchors, gts)
    assert pos == [True, False] and neg == [False, True] and matched == [0, 0]


def test_bad_inputs_name_the_field():
    a = torch.zeros(3, 4)
    g = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match="anchor_valid"):
        assign(a, torch.ones(1, 4, dtype=torch.bool), g, torch.ones(1, 2, dtype=torch.bool), assigner_cfg())
    with pytest.raises(ValueError, match="gt_valid"):
        assign(a, torch.ones(1, 3, dtype=torch.bool), g, torch.ones(1, 2), assigner_cfg())
    with pytest.raises(ValueError, match="ignore"):
        assign(a, torch.ones(1, 3, dtype=torch.bool), g, torch.ones(1, 2, dtype=torch.bool), assigner_cfg(),
               ignore_boxes=torch.zeros(1, 1, 4))


# ----------------------------------------------------------------------------- brute-force reference

def frac_iou(a, b, mode="iou"):
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return Fraction(inter, area_a + area_b - inter if mode == "iou" else area_a)


def reference_assign(anchors, anchor_valid, gts, gt_valid, cfg, ignores, ignore_valid):
    """mmdetection's MaxIoUAssigner, one image at a time on its valid anchors and real gts, with exact
    rational IoUs. Returns per-anchor codes: -1 ignored, 0 negative, g + 1 positive for padded gt row g."""
    pos_thr, neg_thr = Fraction(str(cfg.pos_iou_thr)), Fraction(str(cfg.neg_iou_thr))
    min_pos = Fraction(str(cfg.min_pos_iou))
    results = []
    for b in range(len(gts)):
        codes = [-1] * len(anchors)
        cand = [k for k in range(len(anchors)) if anchor_valid[b][k]]
        real = [g for g in range(len(gts[b])) if gt_valid[b][g]]
        if not real:
            for k in cand:
                codes[k] = 0
            results.append(codes)
            continue
        overlaps = {(g, k): frac_iou(anchors[k], gts[b][g]) for g in real for k in cand}
        crowd = [ignores[b][i] for i in range(len(ignores[b])) if ignore_valid[b][i]]
        if cfg.ignore_iof_thr > 0 and crowd:
            thr = Fraction(str(cfg.ignore_iof_thr))
            for k in cand:
                if max(frac_iou(anchors[k], c, "iof") for c in crowd) > thr:
                    for g in real:
                        overlaps[g, k] = Fraction(-1)
        argmax = {}
        for k in cand:
            best, best_g = None, None
            for g in real:  # strict '>' keeps the first (lowest) gt among ties
                if best is None or overlaps[g, k] > best:
                    best, best_g = overlaps[g, k], g
            argmax[k] = best_g
            if 0 <= best < neg_thr:
                codes[k] = 0
            if best >= pos_thr:
                codes[k] = best_g + 1
        if cfg.match_low_quality:
            for g in real:
                gt_best = max(overlaps[g, k] for k in cand) if cand else Fraction(-1)
                if gt_best >= min_pos and gt_best > 0:
                    for k in cand:
                        if overlaps[g, k] == gt_best:
                            codes[k] = (g if cfg.low_quality == "mmdet" else argmax[k]) + 1
        results.append(codes)
    return results


def random_problem(seed: int, num_valid: list[int], num_anchors: int = 40, max_gt: int = 8, num_ignore: int = 3):
    """Integer boxes in [0, 32]: every IoU is a fraction with denominator <= 2048, so float32 keeps distinct
    values distinct and ties exact. Gts copy or nudge anchors (high IoU, exact ties) and repeat each other."""
    gen = torch.Generator().manual_seed(seed)

    def rand_box():
        x1, y1 = torch.randint(0, 28, (2,), generator=gen).tolist()
        w, h = torch.randint(1, 33, (2,), generator=gen).tolist()
        return [x1, y1, min(x1 + w, 32), min(y1 + h, 32)]

    anchors = [rand_box() for _ in range(num_anchors)]
    for k in range(0, num_anchors, 7):
        anchors[k + 1] = list(anchors[k])  # duplicate anchors: exact ties for a gt's best
    gts, gt_valid, ignores, ignore_valid, anchor_valid = [], [], [], [], []
    for n in num_valid:
        rows = []
        for g in range(max_gt):
            kind = torch.randint(0, 4, (1,), generator=gen).item()
            if kind == 0:
                box = list(anchors[torch.randint(0, num_anchors, (1,), generator=gen).item()])
            elif kind == 1:
                base = anchors[torch.randint(0, num_anchors, (1,), generator=gen).item()]
                d = torch.randint(-2, 3, (4,), generator=gen).tolist()
                box = [base[0] + d[0], base[1] + d[1], max(base[2] + d[2], base[0] + d[0] + 1),
                       max(base[3] + d[3], base[1] + d[1] + 1)]
            elif kind == 2 and rows:
                box = list(rows[torch.randint(0, len(rows), (1,), generator=gen).item()])
            else:
                box = rand_box()
            rows.append(box)
        valid = [False] * max_gt
        for g in torch.randperm(max_gt, generator=gen)[:n].tolist():
            valid[g] = True
        gts.append(rows)
        gt_valid.append(valid)
        ignores.append([rand_box() for _ in range(num_ignore)])
        ignore_valid.append((torch.rand(num_ignore, generator=gen) < 0.6).tolist())
        anchor_valid.append((torch.rand(num_anchors, generator=gen) < 0.85).tolist())
    return anchors, anchor_valid, gts, gt_valid, ignores, ignore_valid


CONFIGS = [
    dict(),
    dict(low_quality="torchvision"),
    dict(min_pos_iou=0.3),
    dict(match_low_quality=False),
    dict(ignore_iof_thr=0.5),
    dict(ignore_iof_thr=0.5, low_quality="torchvision"),
]


@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "default")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_on_random_boxes(overrides, seed):
    cfg = assigner_cfg(**overrides)
    problem = random_problem(seed, num_valid=[0, 1, 7, 8])
    anchors, anchor_valid, gts, gt_valid, ignores, ignore_valid = problem
    out = assign(torch.tensor(anchors, dtype=torch.float32), torch.tensor(anchor_valid),
                 torch.tensor(gts, dtype=torch.float32), torch.tensor(gt_valid), cfg,
                 ignore_boxes=torch.tensor(ignores, dtype=torch.float32), ignore_valid=torch.tensor(ignore_valid))
    codes = torch.tensor(reference_assign(*problem[:4], cfg, ignores, ignore_valid))
    assert torch.equal(out.positive, codes > 0)
    assert torch.equal(out.negative, codes == 0)
    assert torch.equal(out.matched, (codes - 1).clamp(min=0))
    # the random problems do exercise every outcome
    ignored = ~out.positive & ~out.negative & torch.tensor(anchor_valid)
    assert out.positive.any() and out.negative.any() and ignored.any()


def test_first_index_of_max_is_torch_max_index_and_last_true_index_the_highest():
    """The index-free reductions that `assign` uses under torch.compile, in eager: ties go to the lowest
    index as torch.max gives them; on both sides of 16384 columns, where the index dtype widens to int32."""
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(0, 4, (3, 50, 21), generator=gen).float() / 4  # many exact ties
    values[0] = -1.0  # a whole image of excluded anchors: every column ties
    assert torch.equal(_first_index_of_max(values, values.amax(dim=-1)), values.max(dim=-1).indices)
    mask = values == 0.5
    expected = [[max((j for j, m in enumerate(row) if m), default=0) for row in image] for image in mask.tolist()]
    assert _last_true_index(mask).tolist() == expected
    for g in (16384, 16385):
        row = torch.zeros(3, g)
        row[0, [3, g - 1]] = 1.0  # tie: the first wins
        row[1, g - 1] = 1.0
        row[2, :] = 0.25  # all tied
        assert _first_index_of_max(row, row.amax(dim=-1)).tolist() == [3, g - 1, 0]
        assert _last_true_index(row == 1.0).tolist() == [g - 1, g - 1, 0]


# ----------------------------------------------------------------------------- compiled

# (anchors, gt rows, valid gt rows per image, config). With at least 8 gt rows and hundreds of anchors, CPU
# inductor vectorises the per-anchor reduction over gts across anchors; torch 2.11's kernel for that returns the
# right maxima with the wrong indices from max / argmax (pytorch#178964): compiling `iou.max(dim=2)` does so in
# the first and last case. 21 and 33 rows leave a vector tail.
COMPILED_CASES = [
    (600, 8, [0, 1, 5, 8], dict()),
    (600, 21, [0, 3, 13, 21], dict(ignore_iof_thr=0.5, low_quality="torchvision")),
    (600, 33, [0, 2, 17, 33], dict(match_low_quality=False)),
]


@pytest.mark.slow
@pytest.mark.parametrize("num_anchors,max_gt,num_valid,overrides", COMPILED_CASES,
                         ids=[f"gt{case[1]}" for case in COMPILED_CASES])
def test_compiled_assignment_matches_eager_and_the_reference(num_anchors, max_gt, num_valid, overrides):
    """torch.compile (CPU inductor) of `assign` on duplicate anchors and gts (exact ties), invalid anchors,
    padding rows, an image without gt and crowd regions: every field equals eager, and both equal the
    exact-fraction reference."""
    cfg = assigner_cfg(**overrides)
    problem = random_problem(4, num_valid=num_valid, num_anchors=num_anchors, max_gt=max_gt)
    anchors, anchor_valid, gts, gt_valid, ignores, ignore_valid = problem
    args = (torch.tensor(anchors, dtype=torch.float32), torch.tensor(anchor_valid),
            torch.tensor(gts, dtype=torch.float32), torch.tensor(gt_valid), cfg)
    kwargs = dict(ignore_boxes=torch.tensor(ignores, dtype=torch.float32), ignore_valid=torch.tensor(ignore_valid))
    eager = assign(*args, **kwargs)
    torch._dynamo.reset()
    compiled = torch.compile(assign, fullgraph=True)(*args, **kwargs)
    for field in ("positive", "negative", "matched", "max_iou"):
        got, want = getattr(compiled, field), getattr(eager, field)
        assert torch.equal(got, want), f"{field}: {int((got != want).sum())} of {want.numel()} differ"
    codes = torch.tensor(reference_assign(*problem[:4], cfg, ignores, ignore_valid))
    assert torch.equal(compiled.positive, codes > 0)
    assert torch.equal(compiled.negative, codes == 0)
    assert torch.equal(compiled.matched, (codes - 1).clamp(min=0))
    # the problem holds what the test is about: positives matched past gt row 0, positives whose best IoU is
    # shared by several gts and, with a crowd threshold, valid anchors that a crowd region takes out
    assert (compiled.matched[compiled.positive] > 0).sum() > 10
    iou = pairwise_iou(args[0], args[2]).masked_fill(~args[3][:, None, :], -1.0)
    tied = ((iou == compiled.max_iou[..., None]).sum(dim=-1) > 1) & compiled.positive
    assert tied.sum() > 10
    if cfg.ignore_iof_thr > 0:
        crowd = crowd_ignored(args[0], kwargs["ignore_boxes"], kwargs["ignore_valid"], cfg.ignore_iof_thr)
        assert (crowd & args[1])[torch.tensor(num_valid) > 0].any()
