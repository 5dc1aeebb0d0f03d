"""Start-up cost of the CLI: `automodel --help` and `automodel plugins list` against the cost of
importing torch (which the CLI must not do just to show help).

Usage: python benchmarks/startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def median_seconds(command: list[str], runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    python = sys.executable
    results = {
        "python -c pass": median_seconds([python, "-c", "pass"], args.runs),
        "python -c 'import torch'": median_seconds([python, "-c", "import torch"], args.runs),
        "automodel --help": median_seconds([python, "-m", "automodel_cli", "--help"], args.runs),
        "automodel plugins list --all": median_seconds(
            [python, "-m", "automodel_cli", "plugins", "list", "--all"], args.runs),
        "automodel list models": median_seconds([python, "-m", "automodel_cli", "list", "models"], args.runs),
    }
    torch_time = results["python -c 'import torch'"]
    print(f"{'command':32s} {'median s':>9s} {'vs import torch':>16s}")
    for name, seconds in results.items():
        print(f"{name:32s} {seconds:9.3f} {seconds / torch_time:15.2f}x")


if __name__ == "__main__":
    main()
