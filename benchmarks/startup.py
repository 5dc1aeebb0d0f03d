"""Start-up cost of the CLI: `automodel --help` against its 0.3 s goal, a few other light commands,
and the cost of importing torch (which the CLI must not do just to show help).

Start-up depends on what is installed next to the CLI: typer formats help with rich when rich is
importable, and scanning entry points reads every installed distribution's metadata. So the
script first prints the interpreter, its venv, the installed optional extras of automodel-cli and
the number of installed distributions, and should be run in a venv with the `test` and `bench`
extras (the heaviest usual one): `pip install -e '.[test,bench]'`.

Each repeat runs every command once in a fresh process (interleaved, so a burst of load from
another process hits all commands alike); one warm-up round (bytecode compilation, disk cache) is
discarded. The load average before and after is printed: numbers taken on a busy machine are
higher than on an idle one.

Usage: python benchmarks/startup.py [--runs 15] [--python .venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HELP_GOAL_S = 0.3

#: Run inside the measured interpreter: where it is and which extras of automodel-cli it satisfies.
PROBE = r"""
import json, sys
from importlib import metadata
from packaging.requirements import Requirement

dist = metadata.distribution("automodel-cli")
installed = {(d.metadata["Name"] or "").lower().replace("_", "-"): d.version for d in metadata.distributions()}
extras = {}
for extra in dist.metadata.get_all("Provides-Extra") or []:
    needed = [Requirement(r) for r in dist.requires or []]
    needed = [r for r in needed if r.marker is not None and r.marker.evaluate({"extra": extra})]
    extras[extra] = all(r.name.lower().replace("_", "-") in installed
                        and r.specifier.contains(installed[r.name.lower().replace("_", "-")], prereleases=True)
                        for r in needed)
print(json.dumps({
    "python": sys.version.split()[0], "executable": sys.executable, "prefix": sys.prefix,
    "venv": sys.prefix != sys.base_prefix, "automodel_cli": dist.version,
    "extras_installed": sorted(e for e, ok in extras.items() if ok),
    "extras_missing": sorted(e for e, ok in extras.items() if not ok),
    "rich": installed.get("rich"), "typer": installed.get("typer"), "distributions": len(installed),
}))
"""


def commands(python: str) -> dict[str, list[str]]:
    cli = [python, "-m", "automodel_cli"]
    return {
        "python -c pass": [python, "-c", "pass"],
        "python -c 'import torch'": [python, "-c", "import torch"],
        "automodel --help": [*cli, "--help"],
        "automodel finetune --help": [*cli, "finetune", "--help"],
        "automodel plugins list --all": [*cli, "plugins", "list", "--all"],
        "automodel list models": [*cli, "list", "models"],
    }


def seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def describe(python: str) -> dict:
    probe = subprocess.run([python, "-c", PROBE], check=True, capture_output=True, text=True)
    return json.loads(probe.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="Measured repeats of each command.")
    parser.add_argument("--python", default=sys.executable,
                        help="Interpreter of the venv to measure (default: this one).")
    args = parser.parse_args()

    env = describe(args.python)
    print(f"python {env['python']} at {env['executable']} "
          f"({'venv ' + env['prefix'] if env['venv'] else 'not a venv'})")
    print(f"automodel-cli {env['automodel_cli']}; extras installed: {', '.join(env['extras_installed']) or '-'}; "
          f"missing: {', '.join(env['extras_missing']) or '-'}")
    print(f"typer {env['typer']}, rich {env['rich'] or 'not installed'}, {env['distributions']} distributions")
    if not {"test", "bench"} <= set(env["extras_installed"]):
        print("note: the reference numbers are taken with the test and bench extras installed")
    print(f"load average before: {os.getloadavg()[0]:.2f}")

    to_run = commands(args.python)
    samples: dict[str, list[float]] = {name: [] for name in to_run}
    for round_ in range(args.runs + 1):
        for name, command in to_run.items():
            elapsed = seconds(command)
            if round_:  # round 0 warms caches and is discarded
                samples[name].append(elapsed)
    print(f"load average after: {os.getloadavg()[0]:.2f}; {args.runs} runs each\n")

    medians = {name: statistics.median(values) for name, values in samples.items()}
    torch_s = medians["python -c 'import torch'"]
    print(f"{'command':30s} {'median s':>9s} {'min s':>7s} {'vs import torch':>16s}")
    for name, median in medians.items():
        print(f"{name:30s} {median:9.3f} {min(samples[name]):7.3f} {median / torch_s:15.2f}x")
    help_s = medians["automodel --help"]
    verdict = "within" if help_s < HELP_GOAL_S else "OVER"
    print(f"\nautomodel --help: median {help_s:.3f} s = {help_s / HELP_GOAL_S:.2f}x the {HELP_GOAL_S} s goal "
          f"({verdict} goal)")


if __name__ == "__main__":
    main()
