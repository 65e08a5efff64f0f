"""A run's segments: what each process lifetime of a run trained, so that a resumed run reports the whole run.

A run that is interrupted and resumed (a failure and a restart, a node lost or added) is trained by several
segments, each from one step to another on its own number of processes. Every checkpoint stores the segments
that led to it (its metadata's 'segments', the last one ending at the checkpoint's step); a resumed run continues
that list with its own segment. results.json reports the whole run (the sums over the segments) and each segment.
Steps a process trained after its newest checkpoint and then lost with it are in no segment: they are trained
again by the next one.

A segment record (plain JSON):
  start_step, end_step   the global steps it trained: (start_step, end_step]
  world_size, accum_steps, global_batch
  train_s                seconds of training (the steps and the waits for their batches)
  wall_s                 seconds from the process's start of training setup to the record (setup, evaluation,
                         checkpoints included)
  measured_images, measured_s, images_per_s
                         the throughput meter's count: each epoch's steps after its warm-up steps
                         (experiments.train_hooks.ThroughputMeter); images_per_s = measured_images / measured_s
                         (0.0 when no step was measured)
"""

from __future__ import annotations

from typing import Sequence


def _rate(images: float, seconds: float) -> float:
    return images / seconds if seconds > 0 else 0.0


def record(*, start_step: int, end_step: int, world_size: int, accum_steps: int, global_batch: int, train_s: float,
           wall_s: float, measured_images: int, measured_s: float) -> dict:
    """One segment record (see the module docstring), with images_per_s derived."""
    return {"start_step": int(start_step), "end_step": int(end_step), "world_size": int(world_size),
            "accum_steps": int(accum_steps), "global_batch": int(global_batch), "train_s": float(train_s),
            "wall_s": float(wall_s), "measured_images": int(measured_images), "measured_s": float(measured_s),
            "images_per_s": _rate(measured_images, measured_s)}


def earlier_segments(meta: dict | None) -> list[dict]:
    """The segments stored in a checkpoint's metadata ([] for a first start or a checkpoint written before
    segments were stored).

    Args:
      meta: the resumed checkpoint's metadata, or None.

    Returns:
      list of segment records, oldest first.
    """
    return [dict(s) for s in (meta or {}).get("segments", [])]


def whole_run(segments: Sequence[dict]) -> dict:
    """The run's totals over its segments.

    Args:
      segments: segment records, oldest first (at least one).

    Returns:
      {'train_s': sum of train_s, 'wall_s': sum of wall_s, 'train_images_per_s': the sum of measured images over
      the sum of measured seconds (0.0 when nothing was measured), 'segments': len(segments)}.
    """
    images = sum(s["measured_images"] for s in segments)
    seconds = sum(s["measured_s"] for s in segments)
    return {"train_s": sum(s["train_s"] for s in segments), "wall_s": sum(s["wall_s"] for s in segments),
            "train_images_per_s": _rate(images, seconds), "segments": len(segments)}


def describe(segments: Sequence[dict]) -> str:
    """One line per segment for the log: steps, processes, accumulation, seconds, images/s."""
    def rate(s: dict) -> str:
        return f"{s['images_per_s']:.1f} img/s" if s["measured_s"] > 0 else "img/s not measured (warm-up steps only)"

    return "\n".join(f"  segment {i + 1}: steps {s['start_step']}..{s['end_step']} on {s['world_size']} process(es) "
                     f"x accum {s['accum_steps']} (global batch {s['global_batch']}): {s['train_s']:.1f} s training, "
                     f"{s['wall_s']:.1f} s wall, {rate(s)}" for i, s in enumerate(segments))
