"""COCO 2017 detection categories (ids 1..90 with ten gaps) as the published RetinaNet checkpoints number them.

mmdetection (and retina_fn on COCO): 80 class indices, index i = the i-th id ascending (`COCO80_IDS[i]`).
torchvision: 91 outputs indexed by the category id itself; index 0 ('__background__') and the gaps ('N/A') are
never trained. `COCO91_NAMES[id]` names index `id`.
"""

from __future__ import annotations

_CATEGORIES = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
    (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
    (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"),
    (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
    (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"),
    (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"),
    (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"),
    (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"),
    (89, "hair drier"), (90, "toothbrush"),
)

COCO80_IDS: tuple[int, ...] = tuple(cid for cid, _ in _CATEGORIES)
COCO80_NAMES: tuple[str, ...] = tuple(name for _, name in _CATEGORIES)

COCO91_NAMES: tuple[str, ...] = ("__background__",) + tuple(dict(_CATEGORIES).get(i, "N/A") for i in range(1, 91))


def label_map_for(num_classes: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(category ids, names) of the class indices of weights that store no label map: 91 -> torchvision's
    layout (ids 0..90), 80 -> mmdetection's (COCO80_IDS / COCO80_NAMES), else ids 1..K named by their ids."""
    if num_classes == len(COCO91_NAMES):
        return tuple(range(len(COCO91_NAMES))), COCO91_NAMES
    if num_classes == len(COCO80_IDS):
        return COCO80_IDS, COCO80_NAMES
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return tuple(range(1, num_classes + 1)), tuple(str(i) for i in range(1, num_classes + 1))
