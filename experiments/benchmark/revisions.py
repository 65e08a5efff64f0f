"""The benchmark of another git revision beside this checkout's, in one run: what a change gave.

    python -m experiments.benchmark.revisions --base 6023e9a --rounds 3 -- \\
        --config configs/demo.py --mode train --canvas 320x320 --batch 8 --threads 2 --iters 6 --skip-flops

The base revision's tree is exported (`git archive`) into a temporary folder, and the two run
`python -m experiments.benchmark ARGS` alternately, each in a fresh process (base, this checkout, base, ...),
so that both meet the machine's load alike and neither inherits the other's allocator or thread state.
Each side runs its own code and its own config files: `configs/demo.py` at the base revision is the demo
as it was. Each process's own median step time ('ours') is one sample; the table gives the median over the
rounds and the ratio paired by round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def export_revision(revision: str, dest: str, repo: str = ROOT) -> str:
    """Writes the files of `revision` under dest (no .git) and returns dest.

    Raises:
      ValueError: the revision is unknown to the repository.
    """
    archive = os.path.join(dest, "tree.tar")
    done = subprocess.run(["git", "-C", repo, "archive", "--format=tar", "-o", archive, revision],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise ValueError(f"git archive {revision}: {done.stderr.strip()}")
    tree = os.path.join(dest, "tree")
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    os.remove(archive)
    return tree


def run_once(tree: str, args: Sequence[str], out_json: str) -> dict:
    """One `python -m experiments.benchmark` process in `tree`; returns its JSON result.

    Raises:
      RuntimeError: the benchmark failed (its output's tail is in the message).
    """
    env = dict(os.environ, PYTHONPATH=tree)
    done = subprocess.run([sys.executable, "-m", "experiments.benchmark", *args, "--json", out_json], cwd=tree,
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark in {tree} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    with open(out_json) as f:
        return json.load(f)


def compare(base: str, args: Sequence[str], rounds: int, repo: str = ROOT) -> dict:
    """Alternates the base revision's benchmark and this checkout's for `rounds` rounds.

    Returns:
      {'base': revision, 'args': [...], 'rounds': [{'base_s', 'head_s'} per round] (each the process's median
      step seconds), 'base_s', 'head_s' (medians over rounds), 'speedup_paired' (median of base_s / head_s by
      round), 'images_per_step'}.
    """
    with tempfile.TemporaryDirectory(prefix="retina_rev_") as tmp:
        base_tree = export_revision(base, tmp, repo)
        samples = []
        for i in range(rounds):
            row = {}
            for side, tree in (("base", base_tree), ("head", repo)):
                result = run_once(tree, args, os.path.join(tmp, f"{side}_{i}.json"))
                row[f"{side}_s"] = result["ours"]["step_s"]["median"]
                row["images_per_step"] = result["batch"]
            samples.append(row)
            print(f"round {i + 1}/{rounds}: base {row['base_s']:.3f} s/step, this checkout {row['head_s']:.3f} s/step",
                  flush=True)
    return {"base": base, "args": list(args), "rounds": samples,
            "base_s": statistics.median(r["base_s"] for r in samples),
            "head_s": statistics.median(r["head_s"] for r in samples),
            "speedup_paired": statistics.median(r["base_s"] / r["head_s"] for r in samples),
            "images_per_step": samples[0]["images_per_step"]}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the git revision to compare with (a commit, tag, branch)")
    parser.add_argument("--rounds", type=int, default=3, help="base / this checkout pairs")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("benchmark_args", nargs=argparse.REMAINDER, help="-- then experiments.benchmark's flags")
    opts = parser.parse_args(argv)
    args = [a for a in opts.benchmark_args if a != "--"]
    result = compare(opts.base, args, opts.rounds)
    n = result["images_per_step"]
    print(f"{opts.base}: {result['base_s']:.3f} s/step ({n / result['base_s']:.1f} img/s) | this checkout: "
          f"{result['head_s']:.3f} s/step ({n / result['head_s']:.1f} img/s) | {result['speedup_paired']:.2f}x "
          f"paired by round ({opts.rounds} rounds)")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
