"""Writes tests/golden/torchvision_v1.npz: torchvision's own RetinaNet v1 outputs on rebuilt weights.

Run beside torchvision (never a dependency of the project), from the repository root:
    python -m tests.golden.make_torchvision_golden [--out tests/golden/torchvision_v1.npz]

What it does, with torchvision's code only (nothing from retina_fn):
  1. builds retinanet_resnet50_fpn(weights=None, weights_backbone=None) with FrozenBatchNorm2d (eps 0,
     as for the published COCO_V1 weights), eval mode, default transform (min_size 800, max_size 1333);
  2. fills every tensor from tests/golden/recipe.py (integer-seeded streams), then calibrates: each FPN
     output conv and head tower conv scaled to unit output spread, each output channel of the last
     head convs to spread 1.0 (classification) / 0.3 (regression); the scale factors are stored, so a
     reader rebuilds the same state_dict without running torchvision;
  3. for each test image (recipe.image, sizes below; one image per call, as torchvision evaluates):
     backbone C2..C5 summaries (per-channel means over the map, values at fixed sampled positions),
     FPN per-channel means, head outputs at sampled anchors of every level, and the final detections.
Stored as float32 / int arrays and one JSON string: about 2 MB.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from tests.golden import recipe

IMAGE_SIZES = ((120, 160), (800, 1000), (1100, 800), (427, 640), (300, 700))  # (h, w): small, ..., > 2:1
SEED = 0
POSITIONS_PER_MAP = 1024
ANCHORS_PER_LEVEL = 96


def frozen_bn_everywhere(module: torch.nn.Module) -> None:
    """Replaces every BatchNorm2d by a FrozenBatchNorm2d with eps 0 (the published v1 setting)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child.num_features, eps=0.0))
        else:
            frozen_bn_everywhere(child)


def build_model() -> torch.nn.Module:
    from torchvision.models.detection import retinanet_resnet50_fpn

    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None)
    frozen_bn_everywhere(model.backbone.body)
    return model.eval()


def _spread_factor(outputs: list[torch.Tensor]) -> np.ndarray:
    return np.float32(1.0 / float(torch.cat([o.flatten() for o in outputs]).std()))


@torch.no_grad()
def calibration(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Loads the calibrated weights into `model`; returns the factors ({key: float32 [] or [C_out]})."""
    factors: dict[str, np.ndarray] = {}

    def scale(prefix: str, conv: torch.nn.Conv2d, factor: np.ndarray, with_bias: bool = True) -> None:
        f = torch.from_numpy(np.asarray(factor, np.float32))
        conv.weight.copy_(conv.weight * (f.reshape(-1, 1, 1, 1) if f.dim() else f))
        factors[prefix + ".weight"] = factor
        if with_bias:
            conv.bias.copy_(conv.bias * f)
            factors[prefix + ".bias"] = factor

    calib = torch.from_numpy(recipe.image(10_000, 480, 640)).permute(2, 0, 1).float() / 255.0
    body = model.backbone.body(model.transform([calib])[0].tensors)  # normalised and resized as in use
    fpn = model.backbone.fpn
    names = [f"backbone.fpn.layer_blocks.{i}.0" for i in range(3)] + ["backbone.fpn.extra_blocks.p6",
                                                                      "backbone.fpn.extra_blocks.p7"]
    convs = [b[0] for b in fpn.layer_blocks] + [fpn.extra_blocks.p6, fpn.extra_blocks.p7]
    for k, (name, conv) in enumerate(zip(names, convs)):  # P6 follows P5 and P7 follows P6: in order
        scale(name, conv, _spread_factor([list(fpn(body).values())[k]]))
    levels = list(fpn(body).values())
    for branch, last_name, target in (("classification_head", "cls_logits", 1.0),
                                      ("regression_head", "bbox_reg", 0.3)):
        head = getattr(model.head, branch)
        h = levels
        for i, block in enumerate(head.conv):
            conv = block[0]
            scale(f"head.{branch}.conv.{i}.0", conv, _spread_factor([conv(t) for t in h]))
            h = [torch.relu(conv(t)) for t in h]
        last = getattr(head, last_name)
        per_channel = torch.cat([last(t).transpose(0, 1).flatten(1) for t in h], dim=1).std(dim=1)
        scale(f"head.{branch}.{last_name}", last, (target / per_channel).numpy().astype(np.float32),
              with_bias=False)
    return factors


def _sample_positions(shape: tuple[int, int, int], count: int, stream: int) -> np.ndarray:
    """int32 [count, 3] (channel, y, x), uniform over a [C, h, w] map."""
    u = recipe.uniform(stream, count * 3).reshape(count, 3)
    return np.floor(u * np.array(shape)).astype(np.int32)


@torch.no_grad()
def image_record(model: torch.nn.Module, index: int, hw: tuple[int, int]) -> dict[str, np.ndarray]:
    img = recipe.image(index + 1, *hw)
    tensor = torch.from_numpy(img).permute(2, 0, 1).float() / 255.0
    images, _ = model.transform([tensor])
    x = images.tensors
    rec: dict[str, np.ndarray] = {"digest": np.array(recipe.digest(img)),
                                  "resized_hw": np.array(images.image_sizes[0], np.int64),
                                  "padded_hw": np.array(x.shape[-2:], np.int64)}
    taps = {}
    hooks = [getattr(model.backbone.body, f"layer{i}").register_forward_hook(
        lambda _m, _i, out, k=f"C{i + 1}": taps.__setitem__(k, out)) for i in range(1, 5)]
    features = list(model.backbone(x).values())
    for h in hooks:
        h.remove()
    for k, name in enumerate(("C2", "C3", "C4", "C5")):
        fmap = taps[name][0]
        pos = _sample_positions(tuple(fmap.shape), POSITIONS_PER_MAP, 1000 * (index + 1) + k)
        rec[f"{name}_mean"] = fmap.mean(dim=(1, 2)).numpy()
        rec[f"{name}_pos"] = pos
        rec[f"{name}_val"] = fmap[pos[:, 0], pos[:, 1], pos[:, 2]].numpy()
    for k, fmap in enumerate(features):
        rec[f"P{k + 3}_mean"] = fmap[0].mean(dim=(1, 2)).numpy()
        rec[f"P{k + 3}_hw"] = np.array(fmap.shape[-2:], np.int64)
    out = model.head(features)
    n_anchors = 9
    cells, start, rows = [], 0, []
    for k, fmap in enumerate(features):  # anchors of every level: (level, y, x, a)
        h, w = fmap.shape[-2:]
        u = recipe.uniform(2000 * (index + 1) + k, ANCHORS_PER_LEVEL * 3).reshape(-1, 3)
        pick = np.floor(u * np.array([h, w, n_anchors])).astype(np.int64)
        cells.append(np.concatenate([np.full((len(pick), 1), k), pick], axis=1))
        rows.append(start + (pick[:, 0] * w + pick[:, 1]) * n_anchors + pick[:, 2])
        start += h * w * n_anchors
    rows = np.concatenate(rows)
    rec["anchor_cells"] = np.concatenate(cells).astype(np.int32)
    rec["cls_logits"] = out["cls_logits"][0, rows].numpy()
    rec["bbox_regression"] = out["bbox_regression"][0, rows].numpy()
    det = model([tensor])[0]
    rec["det_boxes"], rec["det_scores"] = det["boxes"].numpy(), det["scores"].numpy()
    rec["det_labels"] = det["labels"].numpy().astype(np.int64)
    return rec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/golden/torchvision_v1.npz")
    args = parser.parse_args()
    import torchvision

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = build_model()
    spec = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    model.load_state_dict(recipe.synthesize(spec, SEED))
    factors = calibration(model)
    arrays: dict[str, np.ndarray] = {}
    for name, factor in factors.items():
        arrays[f"factor/{name}"] = np.asarray(factor, np.float32)
    state = model.state_dict()
    arrays["state_abs_sum"] = np.array([float(state[k].double().abs().sum()) for k, _ in spec])
    for i, hw in enumerate(IMAGE_SIZES):
        for k, v in image_record(model, i, hw).items():
            arrays[f"image{i}/{k}"] = v
        print(f"image {i} {hw}: {len(arrays[f'image{i}/det_scores'])} detections", flush=True)
    meta = dict(torch=torch.__version__, torchvision=torchvision.__version__, seed=SEED,
                image_sizes=IMAGE_SIZES, spec=spec, factors=sorted(factors))
    np.savez_compressed(args.out, meta=np.array(json.dumps(meta)), **arrays)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
