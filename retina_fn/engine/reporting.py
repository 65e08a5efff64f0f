"""What a run shows and writes: console progress lines, JSONL metrics, the results table and file,
training-curve plots. Only rank 0 calls these."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

LOGGERS = ("retina_fn", "experiments")  # the library's and the programs' loggers

RESULT_KEYS = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l")


def set_log_level(level: int) -> None:
    """Sets the level of the library's and the programs' loggers (their modules log under __name__)."""
    for name in LOGGERS:
        logging.getLogger(name).setLevel(level)


def memory_gb(device: torch.device) -> float:
    """Peak memory so far: max allocated on CUDA/NPU, peak resident set size of this process on the CPU."""
    import torch  # noqa: PLC0415 - here, so that the launch scripts print results.json's lines without torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if device.type == "npu":
        return torch.npu.max_memory_allocated(device) / 2**30  # type: ignore[attr-defined]
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def progress_line(epoch: int, epochs: int, step_in_epoch: int, steps_per_epoch: int, eta_s: float,
                  metrics: dict[str, float], images_per_s: float, mem_gb: float, width: int = 20) -> str:
    """'[ep 3/12] 120/7330 [###-------]  1.6% eta 3:21:05 | loss 1.234 (cls 0.812 box 0.422) | lr 1.00e-02 |
    15.2 img/s | mem 3.21G'."""
    frac = step_in_epoch / max(steps_per_epoch, 1)
    filled = int(round(frac * width))
    bar = "#" * filled + "-" * (width - filled)
    return (f"[ep {epoch + 1}/{epochs}] {step_in_epoch}/{steps_per_epoch} [{bar}] {100 * frac:5.1f}% "
            f"eta {format_duration(eta_s)} | loss {metrics['loss']:.4f} (cls {metrics['loss_cls']:.4f} "
            f"box {metrics['loss_box']:.4f}) | lr {metrics['lr']:.2e} | {images_per_s:.1f} img/s | "
            f"mem {mem_gb:.2f}G")


class JsonlWriter:
    """Appends one JSON object per line to workdir/metrics.jsonl (rank 0)."""

    def __init__(self, path: str):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]


def results_table(rows: Sequence[dict[str, Any]]) -> str:
    """The seed's table: NAME | mAP | FPS | Epochs | AMP_Type; mAP '-' for a run that was not evaluated."""
    header = "|  NAME  |  mAP  |  FPS  | Epochs | AMP_Type |"
    lines = [header, "| :----: | :---: | :---: | :----: | :------: |"]
    for r in rows:
        m_ap = "-" if math.isnan(r["bbox_mAP"]) else f"{r['bbox_mAP']:.3f}"
        lines.append(f"| {r['name']} | {m_ap} | {r['fps']:.1f} | {r['epochs']:g} | {r['amp_type']} |")
    return "\n".join(lines)


def throughput(segments: Sequence[dict[str, Any]]) -> tuple[float, bool]:
    """A run's training images per second over its segments (retina_fn.engine.resume's records).

    The throughput meter leaves out each epoch's first steps (compilation, warm-up). A run too short to have any
    other step is measured over all of its steps instead (their images over train_s: the steps and the waits for
    their batches), so that it reports a real rate, marked as including the warm-up, rather than 0.

    Args:
      segments: the run's segment records, oldest first.

    Returns:
      (images/s, whether the warm-up steps are in it); (0.0, False) when no step was trained.
    """
    images = sum(s["measured_images"] for s in segments)
    seconds = sum(s["measured_s"] for s in segments)
    if seconds > 0:
        return images / seconds, False
    images = sum((s["end_step"] - s["start_step"]) * s["global_batch"] for s in segments)
    seconds = sum(s["train_s"] for s in segments)
    return (images / seconds, True) if images > 0 and seconds > 0 else (0.0, False)


def seed_closing_lines(results: dict[str, Any]) -> list[str]:
    """The seed's closing lines (scripts/train_*.sh print them) from a run's results.json: the whole run's
    throughput and duration, all of its segments included when it was interrupted and resumed.

    Args:
      results: results.json's content (train_images_per_s, wall_s, bbox_mAP: retina_fn.engine.trainer).

    Returns:
      ['Final Performance images/sec : <whole run's images/s, 2 decimals>',
       'Final Train Accuracy : <bbox mAP, 3 decimals>' or 'Final Train Accuracy : (not evaluated)',
       'E2E Training Duration sec : <the segments' wall seconds summed, rounded>'].
    """
    accuracy = float(results.get("bbox_mAP", float("nan")))
    return [f"Final Performance images/sec : {results['train_images_per_s']:.2f}",
            "Final Train Accuracy : (not evaluated)" if math.isnan(accuracy) else
            f"Final Train Accuracy : {accuracy:.3f}",
            f"E2E Training Duration sec : {round(results['wall_s'])}"]


def read_json(path: str) -> Any:
    """The JSON document at `path`."""
    with open(path) as f:
        return json.load(f)


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def plot_curves(records: Sequence[dict[str, Any]], path: str) -> bool:
    """Training curves (loss terms, lr, mAP against step) as a PNG. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no training-curve plot written")
        return False
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in train]
    for key, style in (("loss", "-"), ("loss_cls", "--"), ("loss_box", ":")):
        axes[0].plot(steps, [r[key] for r in train], style, label=key)
    axes[0].set_xlabel("step")
    axes[0].set_title("training loss")
    axes[0].legend()
    axes[1].plot(steps, [r["lr"] for r in train])
    axes[1].set_xlabel("step")
    axes[1].set_title("learning rate")
    if evals:
        for key in ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75"):
            axes[2].plot([r["step"] for r in evals], [r[key] for r in evals], "o-", label=key)
        axes[2].legend()
    axes[2].set_xlabel("step")
    axes[2].set_title("validation")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True
