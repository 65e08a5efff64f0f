"""Writes the synthetic shapes dataset in COCO format.

    python -m experiments.make_synthetic --out data/synthetic --num-train 1500 --num-val 200 --seed 0

Produces OUT/train/*.jpg, OUT/val/*.jpg, OUT/annotations/instances_{train,val}.json and OUT/synthetic.json,
then prints counts per class, per COCO size bin, empty images and crowd regions. A folder it wrote before (it
holds OUT/synthetic.json) is written over; one holding train/, val/ or annotations/ without that marker is
refused (it may be real data). `retina_fn.data.synthetic.ensure_synthetic` generates only when absent.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from experiments import cli
from retina_fn import errors
from retina_fn.data import synthetic


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-train", type=int, required=True, help="number of training images")
    parser.add_argument("--num-val", type=int, required=True, help="number of validation images")
    parser.add_argument("--seed", type=int, required=True, help="dataset seed (same seed, same bytes)")
    parser.add_argument("--image-size", type=int, default=256, help="nominal image side in pixels")
    parser.add_argument("--num-classes", type=int, default=5,
                        help=f"shape classes, 1..{len(synthetic.SHAPE_NAMES)}: {', '.join(synthetic.SHAPE_NAMES)}")
    return parser.parse_args(argv)


def generate(args: argparse.Namespace) -> int:
    """Writes the dataset the parsed arguments describe and prints its summary; returns 0.

    Raises:
      OutputExistsError: --out holds train/, val/ or annotations/ but no generator's marker.
    """
    found = [n for n in ("annotations", "train", "val") if os.path.exists(os.path.join(args.out, n))]
    if found and not os.path.isfile(os.path.join(args.out, synthetic.MARKER_FILE)):
        raise errors.OutputExistsError(
            f"--out {args.out} holds {'/, '.join(found)}/ but no {synthetic.MARKER_FILE}: not a folder this program "
            f"wrote, so it is not written over; pass an empty or new --out")
    start = time.perf_counter()
    paths = synthetic.generate_synthetic(args.out, args.num_train, args.num_val, args.seed, args.image_size,
                                         args.num_classes)
    elapsed = time.perf_counter() - start
    print(synthetic.format_summary(paths.summary))
    print(f"wrote {paths.root} in {elapsed:.1f} s")
    return 0


def main(argv=None) -> int:
    """The command line (argv: the arguments without the program name; None: sys.argv's).

    Returns:
      0, or 2 after printing 'error: ...' for a bad parameter (experiments.cli); argparse exits with 2 itself
      for flags it cannot parse.
    """
    return cli.call(generate, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
