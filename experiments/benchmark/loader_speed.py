"""How many images per second the training loader sustains, shipping float32 (normalised) or uint8
(data.uint8_canvas) canvases, per worker count; and where one worker's time goes.

    python -m experiments.benchmark.loader_speed --config configs/retinanet_r50_fpn_1x_coco.py \\
        --batch 2 --workers 0,1,2 --iters 20 --image-size 640 --json runs/bench/loader_speed.json

Stand-in synthetic JPEGs (sides uniform in 0.78..1.25 x --image-size; 640 is about COCO's size) are written
once to a temporary folder unless --data-root holds a COCO-format dataset (data.train_ann under it). For each
canvas dtype and worker count the loader is timed by experiments.benchmark.data_mode (its first batches,
worker start-up included, are the warm-up). The stage table times one worker's work per image over the
same files, in this process: decode, transform (resize, flip, normalise for float32; resize and flip for
uint8, whose normalisation runs on the device, retina_fn.model.inputs) and collate (per image of a batch; in
a worker it stacks straight into the shared memory the batch is sent through); 1 / their sum is what one
worker sustains with a CPU to itself. With CUDA it also times the copy into pinned memory that the training
process's pin-memory thread makes for every image of every worker.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time

import torch

from experiments.benchmark.data_mode import measure_data
from experiments.benchmark.measurement import machine_info
from experiments.benchmark.options import Options
from retina_fn import rng
from retina_fn.data import batching, coco, synthetic, transforms
from retina_fn.data.images import load_record_image


def _ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def stage_times(data_cfg, images: int, batch: int, seed: int = 0) -> dict:
    """Median milliseconds per image of each stage of one worker's work, for both canvas dtypes.

    Args:
      data_cfg: the `data` block (its files, transforms, max_boxes); the training split is read.
      images: how many images to time (the first ones of the split).
      batch: images per collated batch.
      seed: the augmentation key's seed (flips).

    Returns:
      {'decode_ms', 'float32': {...}, 'uint8': {...}} where each dtype has 'transform_ms', 'collate_ms',
      'pin_ms' (copy into pinned memory; None without CUDA), 'total_ms' (decode + transform + collate) and
      'images_per_s' (1000 / total_ms).
    """
    train_set = coco.load_split(data_cfg, "train")
    records = train_set.records[:images]
    decode, decoded = [], []
    for r in records:
        t0 = time.perf_counter()
        decoded.append(load_record_image(r))
        decode.append(time.perf_counter() - t0)
    out = {"decode_ms": _ms(decode)}
    for name, uint8 in (("float32", False), ("uint8", True)):
        cfg = transforms.TransformConfig.from_config(data_cfg)._replace(uint8_canvas=uint8)
        transform, collate, pin = [], [], []
        pending: dict = {}  # canvas shape -> samples waiting for a full batch (then dropped, as in a worker)
        for i, (r, image) in enumerate(zip(records, decoded)):
            t0 = time.perf_counter()
            sample = transforms.train_transform(image, r.boxes, r.ignore_boxes, cfg, rng.fold_in(rng.key(seed), i))
            transform.append(time.perf_counter() - t0)
            group = pending.setdefault(sample["image"].shape, [])
            group.append(dict(sample, labels=r.labels, image_id=r.image_id, index=i, replaced=False))
            if len(group) < batch:
                continue
            t0 = time.perf_counter()
            collated = batching.collate(group, data_cfg.max_boxes, data_cfg.max_ignore_boxes)
            collate.append((time.perf_counter() - t0) / batch)
            if torch.cuda.is_available():
                t0 = time.perf_counter()
                collated["image"].pin_memory()
                pin.append((time.perf_counter() - t0) / batch)
            group.clear()
        if not collate:
            raise ValueError(f"fewer than {batch} of the {images} timed images share a canvas; time more images")
        row = {"transform_ms": _ms(transform), "collate_ms": _ms(collate), "pin_ms": _ms(pin) if pin else None}
        row["total_ms"] = out["decode_ms"] + row["transform_ms"] + row["collate_ms"]
        row["images_per_s"] = 1e3 / row["total_ms"]
        out[name] = row
    return out


def _use_files(data_cfg, root: str) -> None:
    """Points the data block at a synthetic dataset under root (no filters)."""
    data_cfg.dataset = "coco"
    data_cfg.root = root
    data_cfg.update(synthetic.LAYOUT)
    data_cfg.filter_empty_gt = False
    data_cfg.min_size = 0


def measure_loader_speed(cfg, *, batch: int, workers: list[int], iters: int, warmup: int, image_size: int,
                         stage_images: int, data_root: str | None = None, seed: int = 0) -> dict:
    """Loader images/s for float32 and uint8 canvases at each worker count, and the per-image stage times.

    Args:
      cfg: the whole config (data block: canvases, scale, resize_mode 'mmdet' for uint8).
      batch: images per batch; workers: the data.workers values to time.
      iters, warmup: batches timed, and drawn before timing, per setting.
      image_size: the stand-in JPEGs' base side (unused with data_root).
      stage_images: images timed by `stage_times`.
      data_root: a COCO-format dataset laid out as the config says; None: synthetic stand-ins.
      seed: of the stand-ins and the loader.

    Returns:
      {'loader': [{'canvas_dtype', 'workers', 'images_per_s', 'images_per_s_per_worker', 'canvas_mb',
      'first_batch_s', 'source'}], 'stages': stage_times(...), 'machine'}.
    """
    with tempfile.TemporaryDirectory(prefix="retina_loader_speed_") as tmp:
        cfg = copy.deepcopy(cfg)
        if data_root is None:
            count = 2 * (warmup + iters) * batch + 2 * batch + stage_images
            synthetic.generate_synthetic(tmp, count, 1, seed, image_size=image_size, num_classes=5)
            _use_files(cfg.data, tmp)
            source = f"{count} synthetic JPEGs of about {image_size} px"
        else:
            cfg.data.root = data_root
            source = data_root
        rows = []
        opts = Options(mode="data", iters=iters, warmup=warmup, seed=seed)
        for uint8 in (False, True):
            for n in workers:
                run = copy.deepcopy(cfg)
                run.data.uint8_canvas = uint8
                run.data.workers = int(n)
                d = measure_data(run, opts, batch)
                rows.append({"canvas_dtype": d["image_dtype"], "workers": d["workers"],
                             "images_per_s": d["images_per_s"], "images_per_s_per_worker": d["images_per_s_per_worker"],
                             "canvas_mb": d["canvas_mb"], "first_batch_s": d["first_batch_s"], "source": source})
        stages = stage_times(cfg.data, stage_images, batch, seed)
    return {"loader": rows, "stages": stages, "batch": batch, "scale": list(cfg.data.scale),
            "canvases": [list(cfg.data.landscape_canvas), list(cfg.data.portrait_canvas)],
            "machine": machine_info(torch.device("cpu"))}


def format_table(result: dict) -> str:
    """Two tables: the loader per setting, and one worker's stages per image."""
    m = result["machine"]
    lines = [f"loader | batch {result['batch']} | scale {tuple(result['scale'])} | canvases "
             f"{[tuple(c) for c in result['canvases']]} | {m['cpu_count']} CPUs ({m.get('cpu', '')}) | torch "
             f"{m['torch']} | load {m.get('load_avg_start')}",
             f"  {'canvas':<8} {'workers':>7} {'img/s':>8} {'img/s/worker':>13} {'MB/canvas':>10} {'first s':>8}"]
    for r in result["loader"]:
        lines.append(f"  {r['canvas_dtype']:<8} {r['workers']:>7} {r['images_per_s']:8.1f} "
                     f"{r['images_per_s_per_worker']:13.1f} {r['canvas_mb']:10.1f} {r['first_batch_s']:8.2f}")
    s = result["stages"]
    lines.append(f"  one worker, ms per image (median): decode {s['decode_ms']:.1f}")
    lines.append(f"  {'canvas':<8} {'transform':>9} {'collate':>8} {'total':>7} {'img/s':>7} {'pin (main)':>10}")
    for name in ("float32", "uint8"):
        r = s[name]
        pin = "n/a" if r["pin_ms"] is None else f"{r['pin_ms']:.2f}"
        lines.append(f"  {name:<8} {r['transform_ms']:9.2f} {r['collate_ms']:8.2f} {r['total_ms']:7.2f} "
                     f"{r['images_per_s']:7.1f} {pin:>10}")
    return "\n".join(lines)


def main() -> None:
    """The command line (see the module docstring)."""
    from absl import flags
    from ml_collections import config_flags

    from experiments.benchmark import report

    config = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                             lock_config=True)
    batch = flags.DEFINE_integer("batch", 2, "Images per batch.")
    workers = flags.DEFINE_list("workers", ["0", "1"], "data.workers values to time.")
    iters = flags.DEFINE_integer("iters", 20, "Batches timed per setting.")
    warmup = flags.DEFINE_integer("warmup", 2, "Batches drawn before timing (worker start-up).")
    image_size = flags.DEFINE_integer("image-size", 640, "Base side of the stand-in JPEGs.")
    stage_images = flags.DEFINE_integer("stage-images", 16, "Images timed stage by stage.")
    data_root = flags.DEFINE_string("data-root", None, "A COCO-format dataset instead of stand-ins.")
    threads = flags.DEFINE_integer("threads", None, "torch.set_num_threads in this process.")
    out = flags.DEFINE_string("json", None, "Also write the result here.")

    report.run_tool(lambda: measure_loader_speed(
        config.value, batch=batch.value, workers=[int(w) for w in workers.value], iters=iters.value,
        warmup=warmup.value, image_size=image_size.value, stage_images=stage_images.value,
        data_root=data_root.value), format_table, threads, out)


if __name__ == "__main__":
    main()
