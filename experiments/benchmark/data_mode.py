"""--mode data: images/s of the config's training loader, over generated JPEGs when its dataset is absent."""

from __future__ import annotations

import os
import tempfile

from experiments.benchmark.options import Options
from retina_fn import rng


def _dataset_files_present(data_cfg) -> bool:
    if data_cfg.dataset != "coco" or not data_cfg.root:
        return False
    return os.path.isfile(os.path.join(data_cfg.root, data_cfg.train_ann))


def _recorded(batches, seen: list):
    """`batches`, each one's (ground-truth rows G, image dtype, MB per canvas) appended to `seen`."""
    for batch in batches:
        image = batch["image"]
        seen.append((int(batch["box_valid"].shape[1]), str(image.dtype).replace("torch.", ""),
                     image[0].numel() * image.element_size() / 1e6))
        yield batch


def measure_data(cfg, opts: Options, batch_size: int) -> dict:
    """Times the config's training loader (retina_fn.data.throughput.measure).

    Synthetic JPEGs (about canvas-sized, in a temporary directory) stand in for a dataset whose files are
    absent, including data.dataset == 'synthetic'.

    Args:
      cfg: the whole config; its data block is edited in place to point at the stand-in files.
      opts: iters, warmup, seed, canvas (sets data.scale), image_size (the stand-in JPEGs' base side).
      batch_size: images per batch.

    Returns:
      throughput.measure's figures plus 'source' (which files), 'workers' (data.workers resolved),
      'images_per_s_per_worker' (images/s over max(workers, 1)), 'image_dtype' and 'canvas_mb' (what one
      canvas ships: float32 normalised or uint8 with data.uint8_canvas), 'gt_rows' (the ground-truth rows G
      of each batch drawn: data.max_boxes, or its bucket with data.box_buckets), 'steps_per_epoch', 'scale' and
      'canvases'.
    """
    from retina_fn.data import coco, loader as data_loader, synthetic, throughput

    needed = (opts.warmup + opts.iters) * batch_size
    with tempfile.TemporaryDirectory(prefix="retina_bench_") as tmp:
        source = "configured dataset"
        if not _dataset_files_present(cfg.data):
            size = opts.image_size or (max(cfg.data.landscape_canvas) if opts.canvas is None else max(opts.canvas))
            # Twice the images needed: the group sampler drops incomplete per-aspect batches.
            count = 2 * needed + 2 * batch_size
            synthetic.generate_synthetic(tmp, count, 1, opts.seed, image_size=int(size), num_classes=5)
            cfg.data.root = tmp
            cfg.data.train_ann = "annotations/instances_train.json"
            cfg.data.train_images = "train"
            cfg.data.filter_empty_gt = False
            cfg.data.min_size = 0
            source = f"{count} synthetic JPEGs of about {size} px"
        if opts.canvas is not None:
            cfg.data.scale = (max(opts.canvas), min(opts.canvas))
        train_set = coco.load_split(cfg.data, "train")
        loader = data_loader.make_train_loader(cfg.data, train_set, rank=0, world_size=1, key=rng.key(opts.seed))
        seen: list[tuple[int, str, float]] = []
        result = throughput.measure(_recorded(loader, seen), num_batches=opts.iters, warmup=opts.warmup)
        steps_per_epoch = loader.steps_per_epoch
        del loader  # stops its workers before their files go
        workers = data_loader.resolve_workers(cfg.data.workers)
        result.update(source=source, workers=workers, images_per_s_per_worker=result["images_per_s"] / max(workers, 1),
                      image_dtype=seen[-1][1], canvas_mb=seen[-1][2], gt_rows=[g for g, _, _ in seen],
                      steps_per_epoch=steps_per_epoch,
                      scale=tuple(cfg.data.scale), canvases=[tuple(cfg.data.landscape_canvas),
                                                            tuple(cfg.data.portrait_canvas)])
    return result
