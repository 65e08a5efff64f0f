"""Console and file output of a run: durations, progress lines, the seed's results table, the JSONL log."""

import math

from retina_fn.engine import reporting


def test_format_duration_by_hand():
    assert reporting.format_duration(59.9) == "00:59"
    assert reporting.format_duration(3 * 3600 + 21 * 60 + 5) == "3:21:05"
    assert reporting.format_duration(float("inf")) == "--:--"


def test_progress_line_by_hand():
    metrics = {"loss": 1.5, "loss_cls": 1.0, "loss_box": 0.5, "lr": 0.01}
    line = reporting.progress_line(2, 12, 5, 20, 125.0, metrics, 15.24, 3.2, width=4)
    assert line == ("[ep 3/12] 5/20 [#---]  25.0% eta 02:05 | loss 1.5000 (cls 1.0000 box 0.5000) | "
                    "lr 1.00e-02 | 15.2 img/s | mem 3.20G")


def test_results_table_is_the_seeds_and_marks_unevaluated_runs():
    rows = [{"name": "1p-NPU", "bbox_mAP": 0.3661, "fps": 17.04, "epochs": 12.0, "amp_type": "O1"},
            {"name": "8p-NPU", "bbox_mAP": math.nan, "fps": 112.0, "epochs": 1, "amp_type": "O1"}]
    assert reporting.results_table(rows).splitlines() == [
        "|  NAME  |  mAP  |  FPS  | Epochs | AMP_Type |",
        "| :----: | :---: | :---: | :----: | :------: |",
        "| 1p-NPU | 0.366 | 17.0 | 12 | O1 |",
        "| 8p-NPU | - | 112.0 | 1 | O1 |",
    ]


def test_jsonl_writer_appends_and_reads_back(tmp_path):
    log = reporting.JsonlWriter(str(tmp_path / "metrics.jsonl"))
    assert log.read() == []
    log.write({"step": 1, "loss": 2.0})
    log.write({"step": 2, "loss": 1.5})
    assert log.read() == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]


def test_the_closing_lines_are_printed_without_loading_torch():
    """scripts/common.sh prints results.json's closing lines with a fresh interpreter after every launch: reporting
    must not import torch (a second and a half per launch)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; from retina_fn.engine.reporting import seed_closing_lines; "
            "print(seed_closing_lines({'train_images_per_s': 2.0, 'wall_s': 9.6})[0], 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split("\n")[0] == "Final Performance images/sec : 2.00 False"
