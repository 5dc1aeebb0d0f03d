"""metrics.jsonl: one flushed line per step, survives kills, truncates on resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import numpy as np
import torch

from automodel_cli.components.logging import JsonlLogger, read_metrics, truncate_after


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_object_per_step_visible_before_close(tmp_path):
    path = tmp_path / "out" / "metrics.jsonl"
    logger = JsonlLogger(path)
    logger.log({"loss": torch.tensor(2.5), "lr": np.float32(0.5), "tokens": 128}, step=1)
    logger.log({"loss": 1.25, "lr": 0.25, "tokens": 128, "grad_norm": float("nan")}, step=2)
    # Flushed per line: another reader sees both steps while the logger is still open.
    records = lines(path)
    assert records[0] == {"step": 1, "loss": 2.5, "lr": 0.5, "tokens": 128}
    assert records[1]["step"] == 2 and records[1]["loss"] == 1.25
    assert records[1]["grad_norm"] != records[1]["grad_norm"]  # NaN kept, not dropped
    logger.close()
    logger.close()  # idempotent


def test_killed_run_keeps_completed_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    child = textwrap.dedent(f"""
        import os, signal
        from automodel_cli.components.logging.jsonl import JsonlLogger
        logger = JsonlLogger({str(path)!r})
        for step in range(1, 4):
            logger.log({{"loss": 1.0 / step}}, step)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [r["step"] for r in lines(path)] == [1, 2, 3]


def test_truncate_after_drops_later_steps_and_broken_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    logger = JsonlLogger(path)
    for step in range(1, 6):
        logger.log({"loss": float(step)}, step)
    logger.close()
    with open(path, "a") as f:
        f.write('{"step": 6, "loss": 0.')  # cut off by a kill mid-write
    original = path.read_text().splitlines()

    assert truncate_after(path, 3) == 3  # steps 4, 5 and the broken line
    assert path.read_text().splitlines() == original[:3]  # kept lines byte for byte
    assert truncate_after(path, 3) == 0
    assert truncate_after(tmp_path / "missing.jsonl", 3) == 0

    # The resumed run appends after the kept steps.
    logger = JsonlLogger(path)
    logger.log({"loss": 4.5}, 4)
    logger.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]


def test_reopening_after_a_cut_line_starts_a_new_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    logger = JsonlLogger(path)
    logger.log({"loss": 3.0}, 3)
    logger.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 3]
