"""The command line of experiments.benchmark: flags -> Options, run, print the table, write the JSON.

    python -m experiments.benchmark --config configs/smoke.py --mode train --batch 1 --canvas 128x128 \\
        --iters 2 --warmup 1 --json runs/bench/smoke_train.json
    python -m experiments.benchmark --suite gpu --out runs/gpu_suite [--dry-run]   # experiments.benchmark.suite
"""

from __future__ import annotations

import logging


def main() -> None:
    """Defines the flags, parses argv and runs one benchmark (see experiments.benchmark's docstring), or with
    --suite a prepared suite (experiments.benchmark.suite).

    Returns:
      None; prints the table and writes --json (a suite: its files under --out).
    """
    from absl import app, flags
    from ml_collections import config_flags

    from experiments import benchmark, cli
    from retina_fn.engine import host_memory
    from experiments.benchmark import suite, suite_plan, suite_report
    from retina_fn import precision as precision_lib
    from retina_fn.parallel import backend

    config = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                             lock_config=True)
    mode = flags.DEFINE_enum("mode", "train", list(benchmark.MODES), "What to time.")
    batch = flags.DEFINE_integer("batch", None, "Images per step (default: data.images_per_device).")
    canvas = flags.DEFINE_string("canvas", None, "HxW canvas (default: data.landscape_canvas).")
    prec = flags.DEFINE_enum("precision", None, list(precision_lib.PRECISIONS), "Default: train.precision.")
    compile_ = flags.DEFINE_bool("compile", None, "torch.compile the step (sets train.compile; default: "
                                                  "as configured).")
    channels_last = flags.DEFINE_bool("channels-last", None, "Sets model.backbone.channels_last (default: as "
                                                             "configured).")
    iters = flags.DEFINE_integer("iters", 10, "Timed calls per model.")
    warmup = flags.DEFINE_integer("warmup", 2, "Untimed calls per model first (compilation happens here).")
    rounds = flags.DEFINE_integer("rounds", 1, "Alternate ours and torchvision this many times.")
    threads = flags.DEFINE_integer("threads", None, "torch.set_num_threads (default: torch's choice).")
    peak = flags.DEFINE_float("peak-tflops", None, "The device's peak TFLOP/s at this precision, for MFU.")
    compare = flags.DEFINE_enum("compare", "none", list(benchmark.COMPARISONS), "Also measure torchvision.")
    device = flags.DEFINE_enum("device", "auto", list(backend.REQUESTS), "Where to run ('auto': NPU, then CUDA, "
                                                                         "then CPU).")
    dense = flags.DEFINE_bool("dense-scores", True, "infer: zero classification bias so NMS works at full load.")
    tv_variant = flags.DEFINE_enum("tv-variant", "pretrained", list(benchmark.TV_VARIANTS),
                                   "torchvision model layout.")
    tv_cl = flags.DEFINE_bool("tv-channels-last", False, "Run torchvision in channels_last too.")
    no_flops = flags.DEFINE_bool("skip-flops", False, "Do not count FLOPs (saves one step per model).")
    variants = flags.DEFINE_list("variants", [], "Also time these variants of our step (one optimisation undone "
                                                 f"or a proposed one applied): {', '.join(benchmark.VARIANTS)}.")
    image_size = flags.DEFINE_integer("image-size", None, "data: base side of the stand-in synthetic JPEGs (each "
                                      "side uniform in 0.78..1.25 x it; default: the canvas's long side).")
    out = flags.DEFINE_string("json", None, "Write the result here.")
    suite_name = flags.DEFINE_enum("suite", None, list(suite_plan.SUITES), "Run a prepared suite instead (--out, "
                                   "--dry-run, --compile-cap, --budget; see experiments.benchmark.suite).")
    suite_out = flags.DEFINE_string("out", None, "--suite: the folder for gpu_suite.json and gpu_suite.md.")
    dry_run = flags.DEFINE_bool("dry-run", False, "--suite: a tiny CPU run of the same rows (plumbing only).")
    compile_cap = flags.DEFINE_float("compile-cap", None, "--suite: seconds the compiled rows may take at most "
                                     "(default: the suite's).")
    budget = flags.DEFINE_float("budget", None, "--suite: the whole suite's time budget in seconds (default: "
                                "the suite's).")

    def run_suite(argv):
        del argv
        plan = suite_plan.gpu_plan(dry_run.value)
        plan = plan._replace(compile_cap_s=compile_cap.value or plan.compile_cap_s,
                             budget_s=budget.value or plan.budget_s)
        for name in ("retina_fn", "experiments"):
            logging.getLogger(name).setLevel(logging.INFO)
        result = suite.run_suite(plan, suite_out.value, dry_run=dry_run.value)
        print(suite_report.markdown(result))
        print(f"wrote {suite_out.value}/gpu_suite.json and gpu_suite.md")

    def run_from_flags(argv):
        if suite_name.value:
            if not suite_out.value:
                raise app.UsageError("--suite needs --out DIR")
            return run_suite(argv)
        if not config.value or not out.value:
            raise app.UsageError("--config and --json are required (or --suite)")
        del argv
        opts = benchmark.Options(
            mode=mode.value, batch=batch.value, canvas=benchmark.parse_canvas(canvas.value) if canvas.value else None,
            precision=prec.value, compile=compile_.value, channels_last=channels_last.value, iters=iters.value,
            warmup=warmup.value, rounds=rounds.value, threads=threads.value, peak_tflops=peak.value,
            compare=compare.value, device=device.value, dense_scores=dense.value, tv_variant=tv_variant.value,
            tv_channels_last=tv_cl.value, count_flops=not no_flops.value, variants=tuple(variants.value),
            image_size=image_size.value)
        host_memory.keep_freed_memory()  # as the trainer: a CPU step reuses its freed buffers
        result = benchmark.run(config.value, opts)
        print(benchmark.format_table(result))
        if out.value:
            benchmark.write_json(out.value, result)
            print(f"wrote {out.value}")

    cli.run(run_from_flags)


if __name__ == "__main__":
    main()
