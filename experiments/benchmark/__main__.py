"""The command line of experiments.benchmark: flags -> Options, run, print the table, write --json."""

from __future__ import annotations


def main() -> None:
    """Parses the flags and runs one benchmark; a user's mistake ends in one `error: ...` line (exit status 2)."""
    from absl import flags
    from ml_collections import config_flags

    from experiments import benchmark, cli
    from experiments.benchmark import options
    from retina_fn import precision as precision_lib
    from retina_fn.parallel import backend

    config = config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py).", lock_config=True)
    flags.mark_flags_as_required(["config"])
    mode = flags.DEFINE_enum("mode", "train", list(options.MODES), "What to time.")
    batch = flags.DEFINE_integer("batch", None, "Images per step (default: data.images_per_device).")
    canvas = flags.DEFINE_string("canvas", None, "HxW canvas (default: data.landscape_canvas).")
    prec = flags.DEFINE_enum("precision", None, list(precision_lib.PRECISIONS), "Default: train.precision.")
    compile_ = flags.DEFINE_bool("compile", None, "Sets train.compile (default: as configured).")
    channels_last = flags.DEFINE_bool("channels-last", None, "Sets model.backbone.channels_last.")
    iters = flags.DEFINE_integer("iters", 10, "Timed calls per subject.")
    warmup = flags.DEFINE_integer("warmup", 2, "Untimed calls per subject first (compilation, capture).")
    rounds = flags.DEFINE_integer("rounds", 1, "Alternate the subjects this many times.")
    threads = flags.DEFINE_integer("threads", None, "torch.set_num_threads (default: torch's choice).")
    peak = flags.DEFINE_float("peak-tflops", None, "The device's peak TFLOP/s at this precision, for MFU.")
    compare = flags.DEFINE_enum("compare", "none", list(options.COMPARISONS), "Also time torchvision's model.")
    device = flags.DEFINE_enum("device", "auto", list(backend.REQUESTS), "'auto': NPU, then CUDA, then CPU.")
    no_flops = flags.DEFINE_bool("skip-flops", False, "Do not count FLOPs (saves one eager step per subject).")
    variants = flags.DEFINE_list("variants", [], f"Also time these config overrides: {', '.join(options.VARIANTS)}.")
    check = flags.DEFINE_integer("check-steps", 0, "Compare this many compiled / graphed steps with eager ones.")
    profile = flags.DEFINE_integer("profile", 0, "Profile this many calls of ours (top operations).")
    image_size = flags.DEFINE_integer("image-size", None, "data: stand-in JPEG side (default: canvas long side).")
    out = flags.DEFINE_string("json", None, "Also write the result here.")

    def run(argv):
        del argv
        opts = benchmark.Options(
            mode=mode.value, batch=batch.value, canvas=benchmark.parse_canvas(canvas.value) if canvas.value else None,
            precision=prec.value, compile=compile_.value, channels_last=channels_last.value, iters=iters.value,
            warmup=warmup.value, rounds=rounds.value, threads=threads.value, peak_tflops=peak.value,
            compare=compare.value, device=device.value, count_flops=not no_flops.value, variants=tuple(variants.value),
            check_steps=check.value, profile_steps=profile.value, image_size=image_size.value)
        result = benchmark.run(config.value, opts)
        print(benchmark.format_table(result))
        if out.value:
            benchmark.write_json(out.value, result)
            print(f"wrote {out.value}")

    cli.run(run)


if __name__ == "__main__":
    main()
