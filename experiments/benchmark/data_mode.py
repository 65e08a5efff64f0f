"""--mode data: images/s of the config's training loader, over generated JPEGs when its dataset is absent."""

from __future__ import annotations

import os
import tempfile

from experiments.benchmark.options import Options
from retina_fn import rng


def measure_data(cfg, opts: Options, batch_size: int) -> dict:
    """Times the config's training loader (throughput.measure); cfg.data is edited in place.

    Returns:
      throughput.measure's figures plus 'source', 'workers', 'image_dtype' and 'canvas_mb' (one canvas),
      'gt_rows' (each batch's padded ground-truth count), 'scale'.
    """
    from retina_fn.data import coco, loader as data_loader, synthetic, throughput

    with tempfile.TemporaryDirectory(prefix="retina_bench_") as tmp:
        source = "configured dataset"
        if cfg.data.dataset != "coco" or not os.path.isfile(os.path.join(cfg.data.root or "", cfg.data.train_ann)):
            size = opts.image_size or max(cfg.data.landscape_canvas)
            count = 2 * (opts.warmup + opts.iters + 1) * batch_size  # the sampler drops incomplete aspect batches
            synthetic.generate_synthetic(tmp, count, 1, opts.seed, image_size=int(size), num_classes=5)
            cfg.data.update(root=tmp, train_ann="annotations/instances_train.json", train_images="train",
                            filter_empty_gt=False, min_size=0)
            source = f"{count} synthetic JPEGs of about {size} px"
        if opts.canvas is not None:
            cfg.data.scale = (max(opts.canvas), min(opts.canvas))
        loader = data_loader.make_train_loader(cfg.data, coco.load_split(cfg.data, "train"), rank=0, world_size=1,
                                               key=rng.key(opts.seed))
        gt_rows, last = [], {}

        def recorded():
            for batch in loader:
                gt_rows.append(int(batch["box_valid"].shape[1]))
                last["image"] = batch["image"][0]
                yield batch

        result = throughput.measure(recorded(), num_batches=opts.iters, warmup=opts.warmup)
        image = last["image"]
        result.update(source=source, workers=data_loader.resolve_workers(cfg.data.workers), gt_rows=gt_rows,
                      image_dtype=str(image.dtype).replace("torch.", ""),
                      canvas_mb=image.numel() * image.element_size() / 1e6, scale=tuple(cfg.data.scale))
        del loader  # stops its workers before their files go
    return result
